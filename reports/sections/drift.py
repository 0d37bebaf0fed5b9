"""Weight drift (``drift``): Bug-or-Feature^2's per-linear weight statistics (code On-Point-RND/BugOrFeature,
custom_layers/custom_linear.py). The whole presentation of the analysis: its tables' compare specs,
its figure, its summary.md and its output folder. The metric is ``probes/drift.py``; the command
``actsparse_cli/drift_cmd.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.bundle import atomic_output_dir
from reports.figures import panel_size, pyplot, save
from reports.manifest import build_manifest, short_name, write_manifest
from reports.numbers import fmt
from reports.sections import FigureSpec, ReportSection, TableSpec
from reports.tables import write_tables


def draw_drift_by_layer(table, folder, title, manifest) -> list[str]:
    return drift_by_layer(table("drift"), folder, f"{title}: weight drift per tensor")


def drift_by_layer(df: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Mean weight, % negative, std, extreme fraction and the 99.9th percentile of |W| per weight tensor
    (one line per checkpoint)."""
    if df.empty:
        return []
    plt = pyplot()
    lin = df[df.kind.isin(["linear", "conv"])]
    if lin.empty:
        lin = df
    panels = (("mean", "mean weight"), ("neg_pct", "% negative"), ("std", "std"),
              ("extreme_frac", "fraction |w| >= q99.9(|W|)"), ("extreme_threshold", "q99.9(|W|)"))
    if "bias_mean" in lin and pd.to_numeric(lin["bias_mean"], errors="coerce").notna().any():
        panels += (("bias_mean", "mean bias (tensor's own bias)"),)  # Bug or Feature^2's stats['bias_mean']
    ncols = 3  # a grid (2 x 3) that stays legible inside a report; a spare cell holds the legend
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=panel_size(ncols, nrows), squeeze=False)
    cells = list(grid.flat)
    axes = [cells[: len(panels)]]
    for ax in cells[len(panels):]:
        ax.axis("off")
    for ci, g in lin.groupby("checkpoint_index", sort=True):
        g = g.reset_index(drop=True)
        label = short_name(g.checkpoint.iloc[0])
        for ax, (col, _) in zip(axes[0], panels):
            ax.plot(range(len(g)), g[col].astype(float), ".-", markersize=3, linewidth=0.8, label=label)
    first = lin[lin.checkpoint_index == lin.checkpoint_index.min()].reset_index(drop=True)
    layer_starts = [(i, int(v)) for i, v in enumerate(first.layer)
                    if v == v and (i == 0 or first.layer.iloc[i - 1] != v)]
    for ax, (col, lab) in zip(axes[0], panels):
        ax.set_title(lab)
        ax.set_xlabel("weight tensor (file order); ticks: layer starts")
        if layer_starts:
            step = max(1, len(layer_starts) // 12)
            ticks = layer_starts[::step]
            ax.set_xticks([i for i, _ in ticks], [str(v) for _, v in ticks], fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].axhline(0, color="0.5", linewidth=0.8)
    axes[0][1].axhline(50, color="0.5", linewidth=0.8, linestyle=":")
    if len(panels) > 5:
        axes[0][5].axhline(0, color="0.5", linewidth=0.8)
    below = False
    if lin.checkpoint_index.nunique() > 1:
        handles, labels = axes[0][0].get_legend_handles_labels()
        if len(cells) > len(panels):  # the spare grid cell
            cells[-1].legend(handles, labels, title="checkpoint", loc="center", frameon=False)
        else:  # every cell holds a panel: one legend under the grid
            fig.legend(handles, labels, title="checkpoint", loc="lower center", ncol=min(len(labels), 6),
                       frameon=False, fontsize=8, title_fontsize=8)
            below = True
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1) if below else (0, 0, 1, 1))
    return save(fig, folder, "drift_by_layer")


def drift_summary_md(folder: str | Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    summ = result.summary()
    lines = [f"# actsparse drift: {md_escape(', '.join(str(c) for c in options.get('checkpoints', [])))}", "",
             f"{result.info['n_tensors_measured']} weight tensors (2+ dims), {result.info['n_tensors_skipped']} "
             f"skipped (biases, norms, integer buffers). extreme = |w| >= exact 99.9th percentile of |W|.", "",
             "| checkpoint | kind | tensors | weights | mean (weighted) | % negative (weighted) | mean std | "
             "mean extreme frac | mean bias mean |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in summ.iterrows():
        lines.append(f"| {md_escape(short_name(r.checkpoint))} | {md_escape(r.kind)} | {r.n_tensors} | {r.n_weights} | "
                     f"{fmt(r.mean_weighted)} | {fmt(r.neg_pct_weighted)} | {fmt(r.std_mean)} | "
                     f"{fmt(r.extreme_frac_mean)} | {fmt(r.get('bias_mean_of_means'))} |")
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


def write_drift_outputs(output: str | Path, result, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        tables = result.tables()
        files = write_tables(tables, tmp)
        cks = options.get("checkpoints") or []
        files += drift_by_layer(tables["drift"], tmp, f"{', '.join(short_name(c) for c in cks)}: weight drift per tensor")
        files.append(drift_summary_md(tmp, result, options))
        manifest = build_manifest("drift", options, drift=result.info, skipped=result.skipped[:200],
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


SECTION = ReportSection(
    name="drift",
    manifest_key=None,
    prefixes=(("drift", None),),
    tables={
        "drift": TableSpec(("checkpoint_index", "name", "kind"), ("n", "layer")),
        "drift_summary": TableSpec(("checkpoint_index", "kind"), ("n_tensors", "n_weights")),
    },
    figures=(
        FigureSpec("drift_by_layer", lambda c: "Weight statistics per weight tensor in file order (a 2 x 3 "
                   "grid): mean, % negative, std, fraction with |w| >= the 99.9th percentile of |W| and that "
                   "percentile; one line per "
                   "checkpoint.", ("drift",), "reports.sections.drift:draw_drift_by_layer"),
    ),
)
