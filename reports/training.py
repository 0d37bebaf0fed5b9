"""Files of the training callbacks (``probes.training``): a ``track``-shaped output folder.

``write_training_outputs`` writes the long tables (a ``step`` column, the names ``actsparse track``
uses, plus ``trend_spikes`` and ``trend_gradients``), summary.md and a manifest with
``"command": "track"`` atomically (``reports.bundle``), so ``actsparse report`` and ``actsparse
compare`` read it like a ``track`` output; with ``figures`` also the trend figures
(``reports.track.plot_trends``) and the gradient-sparsity trend. The folder's temporary sibling and
lock live in its parent, which is the callback's own ``output_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import panel_size, pyplot
from reports.numbers import fmt


def plot_trend_gradients(gr: pd.DataFrame, folder: Path, title: str) -> list[str]:
    """deriv_sparsity and eff_grad_sparsity@1e-06 per layer against the step (arXiv 2309.03004)."""
    from reports.figures import save
    from reports.track import _legend_outside, _step_axis

    plt = pyplot()
    cols = [c for c in ("deriv_sparsity", "eff_grad_sparsity@1e-06") if c in gr]
    fig, axes = plt.subplots(1, len(cols), figsize=panel_size(len(cols), extra_width=1.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    layers = sorted(gr["layer"].dropna().unique())
    for ax, c in zip(axes[0], cols):
        for j, layer in enumerate(layers):
            h = gr[gr["layer"] == layer].groupby("step")[c].mean().sort_index()
            ax.plot(h.index, 100 * h.values.astype(float), "o-", ms=4, color=cmap(j / max(1, len(layers) - 1)),
                    label=f"layer {int(layer)}")
        _step_axis(ax, gr["step"])
        ax.set_ylim(0, 100)
        ax.set_ylabel({"deriv_sparsity": "% of entries with act'(h) = 0",
                       "eff_grad_sparsity@1e-06": "% of entries with |dL/dh| < 1e-6"}[c])
        ax.set_title(c)
    fig.suptitle(f"{title}: gradient sparsity of each training step's own backward pass")
    fig.tight_layout()
    _legend_outside(fig, axes[0][-1], n_layers=len(layers))
    return save(fig, folder, "trend_gradients")


def summary_md(tables: dict[str, pd.DataFrame], info: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    steps = info.get("steps") or []
    lines = ["# actsparse training callback", "",
             f"{len(steps)} logged steps ({', '.join(str(s) for s in steps)}); analyses "
             f"{', '.join(info.get('analyses', []))}; every {info.get('every_n_steps')} optimizer steps.", ""]
    for name, why in (info.get("disabled") or {}).items():
        lines += [f"> **WARNING:** {md_escape(name)} was disabled during the run: {md_escape(why)}", ""]
    tr = tables["trends"]
    cols = [c for c in tr.columns if c not in ("checkpoint_index", "checkpoint", "step_source")]
    lines += ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "---:|" * len(cols)]
    for r in tr.to_dict("records"):
        lines.append("| " + " | ".join(md_escape(fmt(r.get(c))) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_training_outputs(folder: str | Path, tables: dict[str, pd.DataFrame], info: dict[str, Any],
                           options: dict[str, Any], figures: bool = False) -> Path:
    """Write (or replace: only a folder actsparse wrote) ``folder`` atomically."""
    from reports.bundle import atomic_output_dir
    from reports.manifest import build_manifest, write_manifest
    from reports.tables import write_tables
    from reports.track import plot_trends

    with atomic_output_dir(folder, force=True) as tmp:
        files = write_tables(tables, tmp)
        if figures:
            title = "training run"
            files += plot_trends(tables, tmp, title)
            gr = tables.get("trend_gradients")
            if gr is not None and len(gr) and gr["step"].nunique() >= 1:
                files += plot_trend_gradients(gr, tmp, title)
        (tmp / "summary.md").write_text(summary_md(tables, info), encoding="utf-8")
        files.append("summary.md")
        manifest = build_manifest("track", options, track=info, training=True, files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(folder)
