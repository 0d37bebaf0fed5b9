"""PPL-p% sparsity (``pplp``, ``measure --pplp``): Sparsing Law / ReLU^2 Wins (README "PPL-p% sparsity")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import pyplot, save_into
from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_pplp_by_layer(table, folder, title, manifest) -> list[str]:
    return plot_pplp(table("pplp"), table("pplp_trace"), table("pplp_summary"), Path(folder), title)


def summary_lines(result, options: dict[str, Any]) -> list[str]:
    from reports.pplp_report import pplp_summary_lines

    return list(pplp_summary_lines(result))


def plot_pplp(pplp: pd.DataFrame | None, trace: pd.DataFrame | None, summary: pd.DataFrame | None, folder: Path,
              title: str) -> list[str]:
    """Per-layer sparsity at each target p, and the search's passes as a sparsity-vs-PPL scatter."""
    has_layers = pplp is not None and len(pplp) and {"p_pct", "sparsity"} <= set(pplp.columns)
    has_trace = trace is not None and len(trace) and {"ppl_ratio", "mean_sparsity"} <= set(trace.columns)
    if not has_layers and not has_trace:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), squeeze=False)
    ax = axes[0][0]
    if has_layers:
        ps = sorted(pplp["p_pct"].dropna().unique())
        layers = sorted(pplp["layer"].dropna().unique()) if "layer" in pplp else []
        w = 0.8 / max(1, len(ps))
        for j, p in enumerate(ps):
            g = pplp[pplp["p_pct"] == p].sort_values("layer") if "layer" in pplp else pplp[pplp["p_pct"] == p]
            xs = [layers.index(v) - 0.4 + w * (j + 0.5) for v in g["layer"]] if layers else list(range(len(g)))
            err = _interval(g, "sparsity")  # bootstrap interval over windows, the threshold held fixed
            ax.bar(xs, 100 * g["sparsity"].astype(float), w, label=f"p = {p:g} %",
                   yerr=None if err is None else 100 * err, capsize=2 if err is not None else 0,
                   error_kw={"elinewidth": 0.8})
        if layers:
            ax.set_xticks(range(len(layers)), [str(int(v)) for v in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("sparsity at c*, %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no per-layer table", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("per-layer sparsity at the shared CETT c*", fontsize=9)
    ax = axes[0][1]
    if has_trace:
        ax.plot(100 * trace["mean_sparsity"].astype(float), 100 * (trace["ppl_ratio"].astype(float) - 1), "o",
                ms=4, color="C0", label="search passes")
        if summary is not None and {"p_pct", "achieved_ratio", "mean_sparsity"} <= set(summary.columns):
            ok = summary[summary["achieved_ratio"].notna()]
            xe, ye = _interval(ok, "mean_sparsity"), _interval(ok, "achieved_ratio")
            if xe is not None and ye is not None:  # 95 % bootstrap intervals over windows
                ax.errorbar(100 * ok["mean_sparsity"].astype(float), 100 * (ok["achieved_ratio"].astype(float) - 1),
                            xerr=100 * xe, yerr=100 * ye, fmt="none", ecolor="C3", elinewidth=1, capsize=3,
                            label="95 % interval over windows")
            ax.plot(100 * ok["mean_sparsity"].astype(float), 100 * (ok["achieved_ratio"].astype(float) - 1), "*",
                    ms=12, color="C3", label="reported c*")
            for p in summary["p_pct"].dropna().unique():
                ax.axhline(float(p), color="grey", ls="--", lw=0.8)
        ax.set_xlabel("mean sparsity of the sparse run, %")
        ax.set_ylabel("PPL increase, %")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no search trace", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("search passes: sparsity vs PPL", fontsize=9)
    n_win = (pd.to_numeric(summary["n_windows"], errors="coerce").max()
             if summary is not None and "n_windows" in summary and "achieved_ratio_lo" in summary else float("nan"))
    fig.suptitle(f"{title}: PPL-p% sparsity" + (f"\nerror bars: 95 % bootstrap intervals over {int(n_win)} windows, "
                                                 "the threshold held at c*" if n_win == n_win else ""), fontsize=10)
    fig.tight_layout()
    return save_into(fig, folder, "pplp_by_layer")


def _interval(g: pd.DataFrame, col: str):
    """``[below, above]`` distances of ``col``'s ``_lo``/``_hi`` columns from it, or None without them."""
    import numpy as np

    if f"{col}_lo" not in g or f"{col}_hi" not in g:
        return None
    v = pd.to_numeric(g[col], errors="coerce").to_numpy(float)
    lo = pd.to_numeric(g[f"{col}_lo"], errors="coerce").to_numpy(float)
    hi = pd.to_numeric(g[f"{col}_hi"], errors="coerce").to_numpy(float)
    return np.nan_to_num(np.clip(np.stack([v - lo, hi - v]), 0, None))


def write_files(folder, result, title: str) -> list[str]:
    from reports.pplp_report import write_pplp_tables

    return write_pplp_tables(folder, result)


def manifest_section(result) -> dict[str, Any]:
    from reports.pplp_report import pplp_manifest_section

    return pplp_manifest_section(result)


def warnings_section(result) -> dict[str, Any]:
    return {"warnings": list(result.warnings)}


SECTION = ReportSection(
    name="pplp",
    manifest_key="pplp",
    prefixes=(("pplp", "pplp"), ("cett", "pplp")),
    tables={
        "pplp": TableSpec(("p_pct", "canonical_name", "layer"), ("width", "target_ratio")),
        "pplp_summary": TableSpec(("p_pct",), ("target_ratio", "tol", "full_passes_total")),
        "pplp_trace": TableSpec((), skip="the search path pass by pass, which differs by design"),
        "cett_calibration": TableSpec(("canonical_name", "layer"), ("width", "grid_points")),
    },
    figures=(
        FigureSpec("pplp_by_layer", lambda c: "PPL-p% sparsity: per-layer sparsity at the shared CETT value c* for "
                   "each target p (left), and every pass of the search, mean sparsity against the PPL ratio, with "
                   "the targets as dashed lines (right). Error bars (when the tables carry them): 95 % bootstrap "
                   "intervals over windows with the threshold held at c*.",
                   draw="reports.sections.pplp:draw_pplp_by_layer",
                   needs_any=("pplp", "pplp_trace")),
    ),
    summary="reports.sections.pplp:summary_lines",
    write="reports.sections.pplp:write_files",
    manifest="reports.sections.pplp:manifest_section",
    extra_manifest="reports.sections.pplp:warnings_section",
)
