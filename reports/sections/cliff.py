"""The sparsity cliff (``cliff``, ``measure --also cliff``): Bug or Feature^2 (On-Point-RND/BugOrFeature),
with SPARLING's per-channel thresholds post hoc (kavigupta/sparling). The metric is ``probes/cliff.py``
and ``probes/sparling.py``; the command ``actsparse_cli/cliff_cmd.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import panel_size, pyplot, save
from reports.numbers import fixed, pct
from reports.sections import FigureSpec, ReportSection, TableSpec

_MARKERS = {"topk_sample": "o", "topk_token": "s", "magnitude_layer": "^", "sparling_posthoc": "D"}


def draw_cliff(table, folder, title, manifest) -> list[str]:
    sec = manifest.get("cliff") or {}
    n = sec.get("n_counted_tokens")
    n_tokens = int(n) if isinstance(n, (int, float)) else 0
    return plot_cliff(table("cliff_points"), table("cliff"), folder, title, n_tokens)


def quality_column(points: pd.DataFrame) -> str:
    """The quality ratio the cliff rules read: ``loss_ratio`` for a classifier, else ``ppl_ratio``."""
    return "loss_ratio" if points is not None and "loss_ratio" in points.columns else "ppl_ratio"


def plot_cliff(points: pd.DataFrame, cliffs: pd.DataFrame | None, folder: str | Path, title: str,
               n_tokens: int) -> list[str]:
    """PPL ratio (log) against the achieved activation sparsity, one line per family, with each family's
    cliff marked: the last point within 1 + p (open square) and the knee (filled triangle); the dense
    run's natural sparsity as a dotted vertical line and 1 + p as a dashed horizontal line.

    A classifier's points (``loss_ratio``, ``accuracy``) give two panels, quality against achieved
    sparsity as the paper draws it: accuracy (%) with the dense accuracy dotted, and the loss ratio (log)
    drawn as an LM's PPL ratio is."""
    if points is None or points.empty:
        return []
    plt = pyplot()
    if "accuracy" in points.columns:
        fig, (ax_acc, ax) = plt.subplots(1, 2, figsize=panel_size(2.6, 1.15))
        _accuracy_panel(ax_acc, points, cliffs)
    else:
        fig, ax = plt.subplots(figsize=panel_size(1.6, 1.15))
        ax_acc = None
    bars = _ratio_panel(ax, points, cliffs, legend=ax_acc is None)
    if ax_acc is not None:  # one legend for both panels, below them: the curves keep the whole panels
        n_ex = int(pd.to_numeric(points.get("n_examples"), errors="coerce").max())
        fig.suptitle(f"{title}: sparsity cliff of a classifier over {n_ex} held-out labeled examples "
                     f"({n_tokens} real tokens)")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.13, 1, 1))
        return save(fig, folder, "cliff")
    else:
        n_win = (int(pd.to_numeric(cliffs["n_windows"], errors="coerce").max())
                 if bars and cliffs is not None and "n_windows" in cliffs and cliffs["n_windows"].notna().any()
                 else None)
        ax.set_title(f"{title}: sparsity cliff over {n_tokens} held-out tokens"
                     + (f" ({n_win} windows)" if n_win else ""))
    fig.tight_layout()
    return save(fig, folder, "cliff")


def _families(points: pd.DataFrame):
    for i, (fam, g) in enumerate(points.groupby("family", sort=False)):
        g = g.sort_values("mean_sparsity")
        post = bool(g["post_hoc"].iloc[0]) if "post_hoc" in g else False
        lab = str(g["label"].iloc[0]) if "label" in g else str(fam)
        yield fam, g, post, lab, f"C{i}"


def _cliff_row(cliffs: pd.DataFrame | None, fam: str):
    if cliffs is None or not len(cliffs):
        return None
    c = cliffs[cliffs["family"] == fam]
    return c.iloc[0] if len(c) else None


def _sparsity_axis(ax, points: pd.DataFrame, cliffs: pd.DataFrame | None) -> None:
    xmin, xmax = float(100 * points["mean_sparsity"].min()), float(100 * points["mean_sparsity"].max())
    lo, hi = max(0.0, xmin - 3), min(100.0, xmax + 2)
    ax.set_xlim(lo, hi)
    if cliffs is not None and len(cliffs) and cliffs["dense_sparsity"].notna().any():
        d = 100 * float(cliffs["dense_sparsity"].iloc[0])
        ax.axvline(d, color="k", ls=":", lw=0.9)
        left = d - lo < 0.05 * (hi - lo)  # at the axis' left edge: label on the line's right, off the y axis
        ax.text(d, 0.3, " dense run (natural zeros)" if left else "dense run (natural zeros) ",
                transform=ax.get_xaxis_transform(), rotation=90, ha="left" if left else "right", va="center",
                fontsize=7)
    ax.set_xlabel("achieved activation sparsity at the MLP activation, % (mean over layers)")


def _accuracy_panel(ax, points: pd.DataFrame, cliffs: pd.DataFrame | None) -> None:
    """Accuracy (%) against achieved sparsity; the knee and the last point within 1 + p of the loss-ratio
    rules marked at their accuracy; the dense accuracy dotted; 95 % intervals over held-out examples."""
    for fam, g, post, lab, color in _families(points):
        x, y = 100 * g["mean_sparsity"].astype(float), 100 * g["accuracy"].astype(float)
        ax.plot(x, y, marker=_MARKERS.get(fam, "o"), ms=4, lw=1.3, ls="--" if post else "-", color=color,
                label=f"{fam}: {lab}")
        if {"accuracy_lo", "accuracy_hi"} <= set(g.columns):
            ax.errorbar(x, y, yerr=[(y - 100 * g["accuracy_lo"].astype(float)).clip(lower=0).fillna(0),
                                    (100 * g["accuracy_hi"].astype(float) - y).clip(lower=0).fillna(0)],
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.8)
        c = _cliff_row(cliffs, fam)
        if c is not None:
            if c["sparsity_within_p"] == c["sparsity_within_p"] and c.get("accuracy_within_p") == c.get(
                    "accuracy_within_p"):
                ax.plot(100 * c["sparsity_within_p"], 100 * c["accuracy_within_p"], "s", ms=10, mfc="none",
                        mec=color, mew=1.5)
            if c["knee_sparsity"] == c["knee_sparsity"] and c.get("knee_accuracy") == c.get("knee_accuracy"):
                ax.plot(100 * c["knee_sparsity"], 100 * c["knee_accuracy"], "v", ms=10, color=color, mec="k",
                        mew=0.6)
    dense = float(points["accuracy_dense"].iloc[0])
    ax.axhline(100 * dense, color="grey", ls="--", lw=0.9)
    ax.text(0.99, 100 * dense, f"dense accuracy {100 * dense:.1f} % ", transform=ax.get_yaxis_transform(),
            ha="right", va="bottom", fontsize=7, color="grey")
    _sparsity_axis(ax, points, cliffs)
    ax.set_ylabel("accuracy on held-out examples, %")
    cols = [c for c in ("accuracy", "accuracy_lo", "accuracy_hi") if c in points.columns]
    vals = 100 * pd.concat([points[c].astype(float) for c in cols]).dropna()
    lo, hi = min(float(vals.min()), 100 * dense), max(float(vals.max()), 100 * dense)
    ax.set_ylim(max(0.0, lo - 3), min(101.0, hi + 3))
    ax.set_title("accuracy (squares, triangles: the loss-ratio rules' points)")
    ax.grid(alpha=0.3, which="both")


def _ratio_panel(ax, points: pd.DataFrame, cliffs: pd.DataFrame | None, legend: bool = True) -> bool:
    """The quality ratio (log) against achieved sparsity with each family's cliff marked; True when error
    bars were drawn."""
    q = quality_column(points)
    name = "loss ratio" if q == "loss_ratio" else "PPL ratio"
    p = float(cliffs["p"].iloc[0]) if cliffs is not None and len(cliffs) else 1.0
    bars = False
    for fam, g, post, lab, color in _families(points):
        ax.plot(100 * g["mean_sparsity"].astype(float), g[q].astype(float), marker=_MARKERS.get(fam, "o"),
                ms=4, lw=1.3, ls="--" if post else "-", color=color, label=f"{fam}: {lab}")
        if {f"{q}_lo", f"{q}_hi"} <= set(g.columns):  # 95 % interval of each point's ratio over windows
            bars = True
            r = g[q].astype(float)
            ax.errorbar(100 * g["mean_sparsity"].astype(float), r,
                        yerr=[(r - g[f"{q}_lo"].astype(float)).clip(lower=0).fillna(0),
                              (g[f"{q}_hi"].astype(float) - r).clip(lower=0).fillna(0)],
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.8)
        c = _cliff_row(cliffs, fam)
        if c is not None:
            if c["sparsity_within_p"] == c["sparsity_within_p"]:
                ax.plot(100 * c["sparsity_within_p"], c["ratio_within_p"], "s", ms=10, mfc="none", mec=color,
                        mew=1.5)
            if c["knee_sparsity"] == c["knee_sparsity"]:
                ax.plot(100 * c["knee_sparsity"], c["knee_ratio"], "v", ms=10, color=color, mec="k", mew=0.6)
                lo, hi = c.get("knee_sparsity_lo", float("nan")), c.get("knee_sparsity_hi", float("nan"))
                if lo == lo and hi == hi:  # the knee's bootstrap interval, drawn at the knee's ratio
                    ax.plot([100 * lo, 100 * hi], [c["knee_ratio"]] * 2, color=color, lw=3, alpha=0.45,
                            solid_capstyle="butt")
    ax.set_yscale("log")
    ax.axhline(1 + p / 100, color="grey", ls="--", lw=0.9)
    ax.text(0.01, 1 + p / 100, f" {name} 1 + {p:g} %", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=7, color="grey")
    _sparsity_axis(ax, points, cliffs)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    top, bottom = float(points[q].max()), float(points[q].min())
    if bottom >= 0.99:  # ratios at or above 1 (an LM's PPL ratio): fine steps just above 1
        steps = (1, 1.01, 1.02, 1.05, 1.1, 1.2) if top < 1.25 else (1, 1.05, 1.1, 1.2)
        ticks = [t for t in steps + (1.5, 2, 3, 5, 10, 20, 50, 100, 1000) if t <= top * 1.05]
    else:  # a classifier's loss can fall below the dense one: ticks on both sides of 1, thinned in log space
        import math

        cands = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1, 1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3,
                 5, 10, 20, 50, 100, 1000)
        gap = 0.08 * math.log(max(top, 1.0) / bottom)
        ticks = [1.0]
        for t in sorted(cands, key=lambda t: abs(math.log(t))):  # outward from 1
            if bottom / 1.05 <= t <= max(top, 1.0) * 1.05 and all(abs(math.log(t / u)) >= gap for u in ticks):
                ticks.append(t)
        ticks.sort()
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.plot([], [], "s", ms=8, mfc="none", mec="0.3", label=f"last point within 1 + {p:g} %")
    ax.plot([], [], "v", ms=8, color="0.5", mec="k", mew=0.6, label="knee (Kneedle: max curvature)")
    unit = "examples" if q == "loss_ratio" else "windows"
    if bars:
        ax.plot([], [], color="0.5", lw=3, alpha=0.45, label=f"knee: 95 % bootstrap interval over {unit}")
        ax.errorbar([], [], yerr=[], fmt="none", ecolor="0.4", elinewidth=0.8, capsize=2,
                    label=f"{name}: 95 % interval over {unit}")
    if q == "loss_ratio":
        ax.set_ylabel("loss ratio exp(mean CE sparse - dense) (log)")
        ax.set_title("loss ratio (the cliff rules read it)")
    else:
        ax.set_ylabel("PPL ratio, sparse / dense (log)")
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=7, loc="upper left")
    return bars


def draw_cliff_sparling(table, folder, title, manifest) -> list[str]:
    return plot_sparling(table("cliff_sparling"), folder, title)


def plot_sparling(df: pd.DataFrame | None, folder: str | Path, title: str) -> list[str]:
    """Per layer: the density the post-hoc SPARLING thresholds reach on held-out windows against the target
    density (mean over channels, 5th-95th percentile band), with the diagonal."""
    if df is None or df.empty:
        return []
    from reports.figures import layer_colors

    plt = pyplot()
    fig, ax = plt.subplots(figsize=panel_size(1.3, 1.1))
    layers = sorted(df["layer"].dropna().unique())
    colors = layer_colors(len(layers))
    for c, (layer, g) in zip(colors, ((v, df[df["layer"] == v]) for v in layers)):
        g = g.sort_values("target_density")
        x = 100 * g["target_density"].astype(float)
        ax.plot(x, 100 * g["density_mean"].astype(float), "o-", ms=3, lw=1.2, color=c, label=f"layer {int(layer)}")
        ax.fill_between(x, 100 * g["density_p05"].astype(float), 100 * g["density_p95"].astype(float), color=c,
                        alpha=0.12, lw=0)
    hi = float(100 * df["target_density"].max())
    ax.plot([0, hi], [0, hi], color="grey", ls="--", lw=0.9, label="reached = target")
    ax.set_xlim(0, hi * 1.02)
    ax.set_ylim(0, max(hi, float(100 * df["density_p95"].max())) * 1.05)
    ax.set_xlabel("target density per channel, % (1 - target sparsity)")
    ax.set_ylabel("density reached on held-out windows, %")
    ax.set_title(f"{title}: SPARLING thresholds post hoc\n(mean over channels, band: 5th-95th percentile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(layers) > 6 else 1, loc="upper left")
    fig.tight_layout()
    return save(fig, folder, "cliff_sparling")


def write_files(folder, result, title: str) -> list[str]:
    from reports.tables import write_tables

    tables = result.tables()
    files = write_tables(tables, folder)
    files += plot_cliff(tables["cliff_points"], tables["cliff"], folder, title, result.info["n_counted_tokens"])
    if "cliff_sparling" in tables:
        files += plot_sparling(tables["cliff_sparling"], folder, title)
    return files


def manifest_section(result) -> dict[str, Any]:
    # its warnings inside its own section: a top-level "warnings" would overwrite another analysis' in a bundle
    return {**result.info, "warnings": list(result.warnings)}


def summary_lines(result, options: dict[str, Any] | None = None) -> list[str]:
    """The cliff of each family as a markdown table."""
    from reports.markdown import md_escape

    info = result.info
    lines = [f"> **WARNING:** {md_escape(w)}" for w in result.warnings] + ([""] if result.warnings else [])
    cls = "heldout_examples" in info
    if cls:
        return lines + _classifier_summary(result)
    lines += [f"Enforced sparsity at the MLP activation; PPL ratio on {info['n_counted_tokens']} held-out tokens "
             f"(thresholds of the calibrated families from {info['calibration_tokens']} other tokens); dense "
             f"sparsity {pct(result.cliffs[0]['dense_sparsity']) if result.cliffs else '-'} %.", "",
             f"| family | post hoc | sparsity within 1 + {info['p']:g} % | crossing (interp.) | knee sparsity | "
             "knee PPL ratio | max PPL ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    def iv(c, col) -> str:  # " (lo–hi)": the 95 % bootstrap interval over held-out windows, when there is one
        lo, hi = c.get(f"{col}_lo", float("nan")), c.get(f"{col}_hi", float("nan"))
        return f" ({pct(lo)}–{pct(hi)})" if lo == lo and hi == hi else ""

    for c in result.cliffs:
        lines.append(f"| {md_escape(c['family'])} | {'yes' if c['post_hoc'] else 'no'} | "
                     f"{pct(c['sparsity_within_p'])} %{iv(c, 'sparsity_within_p')} | "
                     f"{pct(c['sparsity_within_p_interp'])} %{iv(c, 'sparsity_within_p_interp')} | "
                     f"{pct(c['knee_sparsity'])} %{iv(c, 'knee_sparsity')} | "
                     f"{fixed(c['knee_ratio'], 4)} | {fixed(c['max_ratio'], 4)} |")
    if any(c.get("knee_sparsity_lo", float("nan")) == c.get("knee_sparsity_lo") for c in result.cliffs):
        lines += ["", f"In brackets: 95 % bootstrap intervals over the {result.cliffs[0].get('n_windows')} held-out "
                      "windows (each resample recomputes every point and reapplies the rule; grid and thresholds "
                      "fixed)."]
    if result.learned:
        lines += ["", f"{len(result.learned)} SPARLING layer(s) in the checkpoint; learned thresholds in "
                      "`cliff_sparling_learned`."]
    return lines


def _iv(c, col, scale: float = 1.0) -> str:
    """" (lo–hi)": the 95 % bootstrap interval of a column, when there is one."""
    lo, hi = c.get(f"{col}_lo", float("nan")), c.get(f"{col}_hi", float("nan"))
    return f" ({pct(lo)}–{pct(hi)})" if lo == lo and hi == hi else ""


def _pc(v) -> str:
    """A percentage with its sign, or "-" alone where there is none."""
    return f"{pct(v)} %" if v == v and v is not None else "-"


def _classifier_summary(result) -> list[str]:
    """summary.md of a classifier's cliff: the quality measure named, the rules on the loss ratio, and the
    accuracy at the points they pick."""
    from reports.markdown import md_code, md_escape

    info = result.info
    c0 = result.cliffs[0] if result.cliffs else {}
    lines = [f"Sequence classifier (labels {md_code(info.get('labels_field'))}). Quality measure: the **loss ratio** "
             "exp(mean CE_sparse − mean CE_dense) over held-out labeled examples — Bug or Feature^2 scores "
             "validation loss (trainer.py `Trainer.validate`) and has no classifier — with **accuracy** beside it. "
             f"Sparsity enforced at the MLP activation; {info['heldout_examples']} held-out examples "
             f"({info['n_counted_tokens']} real tokens; padding never counted), thresholds of the calibrated "
             f"families from {info['calibration_examples']} other examples; dense accuracy "
             f"{_pc(info.get('dense_accuracy'))}, dense sparsity {_pc(c0.get('dense_sparsity'))}.", "",
             f"| family | post hoc | sparsity within 1 + {info['p']:g} % (loss ratio) | accuracy there | "
             "knee sparsity | knee loss ratio | knee accuracy | lowest accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in result.cliffs:
        lines.append(f"| {md_escape(c['family'])} | {'yes' if c['post_hoc'] else 'no'} | "
                     f"{_pc(c['sparsity_within_p'])}{_iv(c, 'sparsity_within_p')} | "
                     f"{_pc(c.get('accuracy_within_p'))} | {_pc(c['knee_sparsity'])}{_iv(c, 'knee_sparsity')} | "
                     f"{fixed(c['knee_ratio'], 4)} | {_pc(c.get('knee_accuracy'))} | {_pc(c.get('min_accuracy'))} |")
    lines += ["", f"In brackets: 95 % bootstrap intervals over the {c0.get('n_windows')} held-out examples (each "
                  "resample recomputes every point and reapplies the rule; grid and thresholds fixed). Per grid "
                  "point (`cliff_points`): `loss_ratio`, `accuracy`, `accuracy_dense`, `accuracy_drop` (points), "
                  "each with `_se`/`_lo`/`_hi`."]
    if result.learned:
        lines += ["", f"{len(result.learned)} SPARLING layer(s) in the checkpoint; learned thresholds in "
                      "`cliff_sparling_learned`."]
    return lines


def write_cliff_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    """The standalone ``actsparse cliff`` folder: tables, figures, summary.md, manifest.json."""
    from reports.bundle import atomic_output_dir
    from reports.manifest import build_manifest, model_section, short_name, write_manifest
    from reports.markdown import md_code, md_escape

    with atomic_output_dir(output, force) as tmp:
        files = write_files(tmp, result, short_name(options.get("checkpoint")))
        lines = [f"# actsparse cliff: {md_escape(options.get('checkpoint'))}", ""]
        dense_q = (f"dense mean CE {fixed(result.info['dense_ce'], 4)}" if "heldout_examples" in result.info
                   else f"dense PPL {fixed(result.info['dense_ppl'], 4)}")
        lines += [f"Corpus {md_code(result.info['corpus'])}; {dense_q}; "
                  f"{result.info['full_passes']} full passes.", ""] + summary_lines(result, options)
        (Path(tmp) / "summary.md").write_text("\n".join(lines) + "\n")
        files.append("summary.md")
        manifest = build_manifest("cliff", options, model=model_section(lm), cliff=manifest_section(result),
                                  warnings=list(result.warnings), files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def _caption_cliff(ctx: dict[str, Any]) -> str:
    return ("The sparsity cliff (Bug or Feature^2): PPL ratio (log) against the activation sparsity actually "
            "reached when sparsity is enforced at the MLP activation, one line per family (dashed: post hoc "
            "SPARLING thresholds); open squares: the last point within 1 + p; triangles: the knee (maximum "
            "curvature, found as Kneedle does); dotted: the dense run's natural sparsity. Error bars (when the "
            "tables carry them): each point's 95 % bootstrap interval of the PPL ratio over held-out windows, and "
            "the knee's interval (thick bar) from the rule reapplied to every resample. For a classifier "
            "(`cliff --labels`) the ratio is the loss ratio exp(mean CE_sparse - mean CE_dense) over held-out "
            "labeled examples, and a left panel shows accuracy against the same sparsity.")


SECTION = ReportSection(
    name="cliff",
    manifest_key="cliff",
    prefixes=(("cliff", "cliff"),),
    tables={
        "cliff": TableSpec(("family",), ("p", "n_points", "n_tokens", "n_examples", "knee_distance")),
        "cliff_points": TableSpec(("family", "target_sparsity"), ("n_tokens", "n_examples", "pass")),
        "cliff_layers": TableSpec(("family", "target_sparsity", "canonical_name", "layer"), ("width",)),
        "cliff_sparling": TableSpec(("target_sparsity", "canonical_name", "layer"),
                                    ("width", "calib_rows", "heldout_rows", "target_density")),
        "cliff_sparling_channels": TableSpec(("target_sparsity", "canonical_name", "layer", "channel"),
                                             ("target_density",)),
        "cliff_sparling_learned": TableSpec(("module_path",), ("channels",)),
    },
    figures=(
        FigureSpec("cliff", _caption_cliff, ("cliff_points",), "reports.sections.cliff:draw_cliff"),
        FigureSpec("cliff_sparling", lambda c: "SPARLING post hoc: per layer, the density each channel reaches on "
                   "held-out windows with per-channel k-th-value thresholds from the calibration windows, against "
                   "the target density (line: mean over channels; band: 5th-95th percentile; dashed: reached = "
                   "target). ReLU channels already sparser than the target stay below the diagonal.",
                   ("cliff_sparling",), "reports.sections.cliff:draw_cliff_sparling"),
    ),
    summary="reports.sections.cliff:summary_lines",
    write="reports.sections.cliff:write_files",
    manifest="reports.sections.cliff:manifest_section",
)
