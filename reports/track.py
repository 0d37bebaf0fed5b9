"""Files of ``actsparse track``: trend tables, figures against the training step, summary.md and
the manifest. The models run in ``probes.track``; this module only writes what it returns."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from probes.track import (CheckpointStep, TrackOptions, TrackResult, emergence_curve, resid_post_rows,
                          resolve_analyses, run_track)
from reports.figures import panel_size, pyplot
from reports.numbers import fmt


def _step_axis(ax, steps: Sequence[float]) -> None:
    s = np.asarray(sorted(set(float(v) for v in steps)))
    pos = s[s > 0]
    if len(pos) >= 2 and pos.max() / pos.min() > 100:
        ax.set_xscale("symlog", linthresh=float(pos.min()))
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _legend_outside(fig, ax, max_items: int = 12, n_layers: int | None = None, cmap=None) -> None:
    """A legend beside the axes, or for many layer lines a 'layer' colour bar (``cmap``, default viridis)."""
    from reports.figures import layer_key

    if n_layers is not None and n_layers > max_items:
        layer_key(fig, [ax], n_layers, max_items, cmap=cmap)
        return
    handles, labels = ax.get_legend_handles_labels()
    if handles and len(handles) <= max(max_items, 24):
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)


def plot_trend_sparsity(sp: pd.DataFrame, folder: Path, title: str) -> list[str]:
    from reports.figures import save

    plt = pyplot()
    kinds = list(dict.fromkeys(sp["kind"].astype(str)))
    fig, axes = plt.subplots(1, len(kinds), figsize=panel_size(len(kinds), extra_width=1.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        g = sp[sp["kind"].astype(str) == kind]
        layers = sorted(g["layer"].dropna().unique())
        for j, layer in enumerate(layers):
            h = g[g["layer"] == layer].sort_values("step")
            ax.plot(h["step"], 100 * h["zero_frac"].astype(float), "o-", ms=4,
                    color=cmap(j / max(1, len(layers) - 1)), label=f"layer {int(layer)}")
        _step_axis(ax, g["step"])
        ax.set_ylabel("% of activation entries exactly 0")
        ax.set_ylim(0, 100)
        ax.set_title(kind)
    fig.suptitle(f"{title}: activation sparsity per layer vs training step")
    fig.tight_layout()
    n_layers = int(sp.groupby("kind")["layer"].nunique().max())
    from reports.figures import layer_key

    layer_key(fig, list(axes[0]), n_layers)
    return save(fig, folder, "trend_sparsity")


def plot_trend_drift(dr: pd.DataFrame, folder: Path, title: str) -> list[str]:
    from reports.figures import save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=panel_size(2, extra_width=1.1), squeeze=False)
    roles = ["all_linear"] + sorted(r for r in dr["role"].unique() if r != "all_linear")
    for j, role in enumerate(roles):
        h = dr[dr["role"] == role].sort_values("step")
        style = dict(color="k", lw=2.0) if role == "all_linear" else dict(color=f"C{(j - 1) % 7}", lw=1.2)  # C7 is black
        axes[0][0].plot(h["step"], h["mean_weighted"], "o-", ms=4, label=role, **style)
        axes[0][1].plot(h["step"], h["neg_pct_weighted"], "o-", ms=4, label=role, **style)
    axes[0][0].axhline(0, color="0.5", lw=0.8)
    axes[0][0].set_ylabel("mean weight (element-weighted)")
    axes[0][0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[0][1].axhline(50, color="0.5", lw=0.8, ls=":")
    axes[0][1].set_ylabel("% negative weights")
    for ax in axes[0]:
        _step_axis(ax, dr["step"])
    _legend_outside(fig, axes[0][1])
    fig.suptitle(f"{title}: weight drift of the linear layers vs training step")
    fig.tight_layout()
    return save(fig, folder, "trend_drift")


def plot_trend_massive(ma: pd.DataFrame, fits: pd.DataFrame | None, folder: Path, title: str) -> list[str]:
    from reports.figures import layer_cmap, layer_colors, save

    plt = pyplot()
    r = resid_post_rows(ma)
    fig, ax = plt.subplots(figsize=panel_size(extra_width=2.3))
    layers = sorted(r["layer"].dropna().unique())
    colors = layer_colors(len(layers))  # no low-contrast yellow
    steps = np.asarray(sorted(r["step"].unique()), dtype=float)
    grid = np.linspace(steps.min(), steps.max(), 200) if len(steps) > 1 else steps
    for j, layer in enumerate(layers):
        h = r[r["layer"] == layer].sort_values("step")
        col = colors[j]
        ax.plot(h["step"], h["ratio_top1_median"].astype(float), "o-", ms=4, lw=1, color=col,
                label=f"layer {int(layer)}")
        if fits is not None and len(fits):
            # only a determined fit is drawn: a curve through parameters the points do not pin down
            # (max_rel_se > MAX_REL_SE) would look like a result
            det = fits["determined"].astype(bool) if "determined" in fits else fits["converged"].astype(bool)
            f = fits[(fits["series"] == f"layer {int(layer)}") & fits["converged"].astype(bool) & det]
            if len(f):
                p = f.iloc[0]
                ax.plot(grid, emergence_curve(grid, p["A"], p["lambda"], p["gamma"], p["t0"], p["K"]), "--",
                        color=col, lw=1)
    vals = r["ratio_top1_median"].astype(float)
    if (vals > 0).all() and len(vals) and vals.max() / max(vals.min(), 1e-300) > 20:
        ax.set_yscale("log")
    n_conv = int((fits["converged"].astype(bool) & (fits["determined"].astype(bool) if "determined" in fits else
                                                     True)).sum()) if fits is not None and len(fits) else 0
    ax.set_ylabel("top-1 / median of |h| (residual stream)")
    _step_axis(ax, r["step"])
    ax.set_title(f"{title}: top-1/median ratio vs training step"
                 + (" (dashed: emergence fit)" if n_conv else " (no determined emergence fit)"))
    fig.tight_layout()
    _legend_outside(fig, ax, n_layers=len(layers), cmap=layer_cmap())
    return save(fig, folder, "trend_massive")


def plot_trend_alpha(spec: pd.DataFrame, folder: Path, title: str) -> list[str]:
    from reports.figures import save

    plt = pyplot()
    s = spec
    if "ww_skipped" in s and "non_ww" in s:
        s = s[~s["ww_skipped"].astype(bool) & ~s["non_ww"].astype(bool)]
    s = s[np.isfinite(pd.to_numeric(s["alpha"], errors="coerce").astype(float))]
    if s.empty:
        return []
    fig, ax = plt.subplots(figsize=panel_size(extra_width=2.3))
    band = s.groupby("step")["alpha"].agg(["min", "max"]).sort_index()
    ax.fill_between(band.index, band["min"], band["max"], color="0.85", label="min-max over matrices")
    for j, (role, g) in enumerate(s.groupby("role", sort=True)):
        m = g.groupby("step")["alpha"].mean().sort_index()
        ax.plot(m.index, m.values, "o-", ms=4, color=f"C{j % 7}", label=f"{role} (mean)")  # C7 is black
    allm = s.groupby("step")["alpha"].mean().sort_index()
    ax.plot(allm.index, allm.values, "s-", ms=4, color="k", lw=2, label="all (mean)")
    for y in (2.0, 6.0):
        ax.axhline(y, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(r"WeightWatcher $\alpha$")
    _step_axis(ax, s["step"])
    _legend_outside(fig, ax)
    ax.set_title(f"{title}: alpha vs training step")
    fig.tight_layout()
    return save(fig, folder, "trend_alpha")


def plot_trends(tables: dict[str, pd.DataFrame | None], folder: str | Path, title: str,
                skip: set[str] | frozenset = frozenset()) -> list[str]:
    """Every trend figure whose table is there (and whose stem is not in ``skip``)."""
    folder = Path(folder)
    files: list[str] = []
    t = {k: v for k, v in tables.items() if v is not None and len(v)}
    if "trend_sparsity" in t and "trend_sparsity" not in skip:
        files += plot_trend_sparsity(t["trend_sparsity"], folder, title)
    if "trend_drift" in t and "trend_drift" not in skip:
        files += plot_trend_drift(t["trend_drift"], folder, title)
    if "trend_massive" in t and "trend_massive" not in skip:
        files += plot_trend_massive(t["trend_massive"], t.get("emergence_fit"), folder, title)
    if "trend_spectrum" in t and "trend_alpha" not in skip:
        files += plot_trend_alpha(t["trend_spectrum"], folder, title)
    return files


# ------------------------------------------------------------------------------------------ writing
def run_title(cks: Sequence[CheckpointStep]) -> str:
    parent = Path(cks[0].path).resolve().parent.name if cks else ""
    return parent or "run"


def summary_md(result: TrackResult, options: dict[str, Any]) -> str:
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"# actsparse track: {md_escape(run_title(result.checkpoints))}", "",
             f"{info['n_checkpoints']} checkpoints, steps {', '.join(str(s) for s in info['steps'])}; analyses "
             f"{', '.join(info['analyses'])}."]
    if info.get("corpus"):
        lines[-1] += (f" Corpus {md_code(Path(str(info['corpus'])).name)}"
                      + (f", {info['n_counted_tokens_per_checkpoint']} counted tokens per checkpoint"
                         if "n_counted_tokens_per_checkpoint" in info else "") + ".")
    lines.append("")
    for w in result.warnings:
        lines += [f"> **WARNING:** {md_escape(w)}", ""]
    tables = result.tables()
    tr = tables["trends"]
    cols = [c for c in tr.columns if c not in ("checkpoint_index", "checkpoint")]
    lines += ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "---:|" * len(cols)]
    for r in tr.to_dict("records"):
        lines.append("| " + " | ".join(md_escape(fmt(r.get(c))) for c in cols) + " |")
    fits = tables.get("emergence_fit")
    if fits is not None and len(fits):
        lines += ["", "Emergence fit of top-1/median (f(t) = A exp(-lambda x) log x + K, x = gamma t + t0):", "",
                  "| series | A | lambda | gamma | t0 | K | R^2 | points | converged |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in fits.to_dict("records"):
            lines.append(f"| {r['series']} | {fmt(r['A'])} | {fmt(r['lambda'])} | {fmt(r['gamma'])} | "
                         f"{fmt(r['t0'])} | {fmt(r['K'])} | {fmt(r['r2'])} | {r['n_points']} | "
                         f"{_fit_status(r)} |")
    return "\n".join(lines) + "\n"


def _fit_status(r: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    if not r["converged"]:
        return "no: " + md_escape(r["message"])
    if not r.get("determined", True):
        return "yes, parameters not determined: " + md_escape(r["message"])
    return "yes"


def write_track_outputs(output: str | Path, result: TrackResult, options: dict[str, Any], force: bool = False) -> Path:
    from reports.bundle import atomic_output_dir
    from reports.manifest import build_manifest, write_manifest
    from reports.tables import write_tables

    with atomic_output_dir(output, force) as tmp:
        tables = result.tables()
        files = write_tables(tables, tmp)
        files += plot_trends(tables, tmp, run_title(result.checkpoints))
        (tmp / "summary.md").write_text(summary_md(result, options), encoding="utf-8")
        files.append("summary.md")
        manifest = build_manifest("track", options, track=result.info, warnings=result.warnings,
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def track(checkpoints: Sequence[str | Path], analyses: Sequence[str] | str | None = None,
          out: str | Path | None = None, force: bool = False,
          on_stage: Callable[[int, int, CheckpointStep, str], Any] | None = None, **options: Any) -> TrackResult:
    """Run ``analyses`` over ``checkpoints`` (paths or globs) and, with ``out``, write the trends folder.

    ``options`` are TrackOptions fields (data, max_tokens, max_length, batch_size, device, ...).
    """
    from reports.bundle import check_output_dir

    if out is not None:
        check_output_dir(out, force)  # before any model work
    opts = TrackOptions(analyses=resolve_analyses(analyses), **options)
    result = run_track(checkpoints, opts, on_stage=on_stage)
    if out is not None:
        write_track_outputs(out, result, {"checkpoints": [str(c) for c in checkpoints], **asdict(opts),
                                          "output": str(out), "force": force}, force)
    return result
