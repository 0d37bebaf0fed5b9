"""Why sparsity appears (``flatness``, ``measure --also flatness``): arXiv 2309.03004's flatness,
gradient-density and diagonality analyses (code cdgyp/sparsity, codes/modules/hooks.py). The metric is
``probes/flatness.py``; the command ``actsparse_cli/flatness_cmd.py``.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import layer_labels, panel_size, pyplot, save, tick_labels
from reports.numbers import fmt, pct
from reports.sections import FigureSpec, ReportSection, TableSpec
from reports.tables import write_tables


def _taus(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("eff_grad_sparsity@")), key=lambda c: float(c.split("@")[1]))


def flatness_by_layer(df: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """The paper's chain on one page, per MLP layer: (1) augmented flatness, (2) gradient density,
    (3) diagonality of g g^T and K K^T, (4) effective-gradient sparsity, (5) the effect of the
    activations, (6) activation sparsity."""
    if df is None or df.empty:
        return []
    plt = pyplot()
    df = df.reset_index(drop=True)
    x = list(range(len(df)))
    labels = layer_labels(df)
    fig, grid = plt.subplots(2, 3, figsize=panel_size(3, 2))
    axes = list(grid.flat)

    def col(c):
        return pd.to_numeric(df[c], errors="coerce") if c in df else pd.Series([float("nan")] * len(df))

    ax = axes[0]
    key, val = col("aug_flatness_key"), col("aug_flatness_value")
    total = (key + val).sum()
    ax.bar(x, 100 * key / total, label="key linear (dL/dh, x)", color="C0")
    ax.bar(x, 100 * val / total, bottom=100 * key / total, label="value linear (dL/dz, a)", color="C5")
    ax.set_ylabel("% of the summed augmented flatness")
    ax.set_title("1. augmented flatness: share per layer")
    ax.legend(fontsize=7)

    ax = axes[1]
    ax.plot(x, col("grad_density_g2"), "o-", label="E[g² | act] / E[g²]")
    ax.plot(x, col("grad_density_abs"), "s--", label="E[|g| | act] / E[|g|]")
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_ylabel("ratio (1 = no preference)")
    ax.set_title("2. gradient density on activated entries")
    ax.legend(fontsize=7)

    ax = axes[2]
    for c, lab, m in (("gg_diag_share_p1", "|g gᵀ| (per token)", "o-"), ("kkT_diag_share_p1", "|K Kᵀ|", "s--"),
                      ("ggkk_diag_share_p1", "|g gᵀ| ∘ |K Kᵀ|", "^:")):
        v = col(c)
        ax.plot(x, 100 * v.where(v > 0), m, label=lab)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_ylim()
    wide = hi > 0 and lo > 0 and math.log10(hi / lo) > 1.2  # over about a decade: label only 2x and 5x minors

    def minor(v, _):
        m = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) if v > 0 else 0
        return f"{v:g}" if not wide or m in (2, 5) else ""

    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("% of the mass on the diagonal (p = 1)")
    ax.set_title("3. diagonality")
    ax.legend(fontsize=7)

    ax = axes[3]
    for c in _taus(df):
        ax.plot(x, 100 * col(c), ".-", label=f"|eta| < {c.split('@')[1]}")
    ax.set_ylim(0, 103)  # a line at 100 % stays visible
    ax.set_ylabel("% of entries")
    ax.set_title("4. effective-gradient sparsity (eta = dL/dh)")
    ax.legend(fontsize=7)

    ax = axes[4]
    ax.plot(x, 100 * col("beneficial_frac"), "o-", color="C2", label="beneficial (eta < 0)")
    ax.plot(x, 100 * col("detrimental_frac"), "s--", color="C3", label="detrimental (eta > 0)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("% of entries")
    ax.set_title("5. effect of the activations")
    ax.legend(fontsize=7)

    ax = axes[5]
    z = 100 * col("act_zero_frac")
    ax.bar(x, z, color="C1")
    top = float(z.max()) if z.notna().any() else 0.0
    if top < 5:  # a smooth activation (GELU, SiLU): exact zeros are rare; a 0-100 axis would show nothing
        ax.set_ylim(0, max(0.5, 1.3 * top))
        ax.text(0.5, 0.92, f"few exact zeros (at most {top:.2g} %): a smooth activation", transform=ax.transAxes,
                ha="center", va="top", fontsize=8, color="0.35")
    else:
        ax.set_ylim(0, 100)
    ax.set_ylabel("% of entries with a = 0")
    ax.set_title("6. activation sparsity (value input)")

    for ax in axes:
        tick_labels(ax, labels)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, folder, "flatness_by_layer")


def draw_flatness_by_layer(table, folder, title, manifest) -> list[str]:
    return flatness_by_layer(table("flatness"), folder, f"{title}: flatness, gradient structure and sparsity")


def write_flatness_files(folder: str | Path, result, title: str) -> list[str]:
    """Tables and the figure of a flatness run into an existing folder (also for ``measure --also flatness``)."""
    tables = result.tables()
    files = write_tables(tables, folder)
    files += flatness_by_layer(tables["flatness"], folder,
                               f"{title}: flatness, gradient structure and sparsity ({result.info.get('loss')} loss, "
                               f"{result.info.get('loss_reduction')})")
    return files


def summary_lines(result, options: dict[str, Any] | None = None) -> list[str]:
    """The flatness section of a summary.md: the loss, then one row per MLP layer."""
    from reports.markdown import md_code, md_escape

    info = result.info
    per_batch = info.get("loss_targets_per_batch") or {}
    taus = [k for k in (result.rows[0] if result.rows else {}) if k.startswith("eff_grad_sparsity@")]
    tau = taus[1] if len(taus) > 1 else (taus[0] if taus else None)
    lines = [f"arXiv 2309.03004 (cdgyp/sparsity): loss {info['loss']}, reduction `{info['loss_reduction']}`, "
             f"{info['n_loss_targets']} loss targets ({per_batch.get('min')}-{per_batch.get('max')} per batch), "
             f"data {md_code(info.get('corpus'))}. Absolute values (flatness, coefficients) scale with the "
             "reduction; ratios and shares do not.", "",
             "| layer | key | act | flatness share % | E[g²·act]/E[g²] | diag share g gᵀ % | "
             "diag share K Kᵀ % | "
             + (md_escape(f"|eta|<{tau.split('@')[1]} %") + " | " if tau else "")
             + "beneficial % | detrimental % | a = 0 % | kappa_2309 |",
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if tau else "") + "---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {md_escape(r['canonical_name'])} | {md_code(r['key_module'])} | {md_escape(r['act'])} | "
                     f"{pct(r['aug_flatness_share'])} | {fmt(r['grad_density_g2'])} | {pct(r['gg_diag_share_p1'])} | "
                     f"{pct(r['kkT_diag_share_p1'])} | " + (f"{pct(r[tau])} | " if tau else "")
                     + f"{pct(r['beneficial_frac'])} | {pct(r['detrimental_frac'])} | {pct(r['act_zero_frac'])} | "
                       f"{fmt(r['kappa_2309'])} |")
    return lines


def manifest_section(result) -> dict[str, Any]:
    return result.info


SECTION = ReportSection(
    name="flatness",
    manifest_key="flatness",
    prefixes=(("flatness", "flatness"),),
    tables={
        "flatness": TableSpec(("canonical_name", "kind", "layer"),
                              ("width", "call", "n_tokens", "n_zero_g_tokens", "g_above_range",
                               "beneficial_count", "detrimental_count")),
        "flatness_hist": TableSpec(("canonical_name", "layer", "bin"), ("log10_lo", "log10_hi"),
                                   skip="histogram counts of log10|g| (they scale with the tokens measured); "
                                        "compare grad_density_* in the flatness table"),
    },
    figures=(
        FigureSpec("flatness_by_layer", lambda c: "arXiv 2309.03004's chain per MLP layer (0-based): (1) share of "
                   "the augmented flatness sum_t ||dL/d out||² ||in||² of the key and value linears, (2) gradient "
                   "density E[g² | activated] / E[g²] (and with |g|), (3) mass on the diagonal of |g gᵀ|, |K Kᵀ| "
                   "and their product (p = 1, log scale), (4) effective-gradient sparsity |dL/dh| < tau, (5) "
                   "beneficial (dL/dh < 0) and detrimental (dL/dh > 0) activations, (6) activation sparsity a = 0.",
                   ("flatness",), "reports.sections.flatness:draw_flatness_by_layer"),
    ),
    summary="reports.sections.flatness:summary_lines",
    write="reports.sections.flatness:write_flatness_files",
    manifest="reports.sections.flatness:manifest_section",
)


def write_flatness_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    """The folder of ``actsparse flatness -o``: tables, figure, summary.md and manifest.json, atomically."""
    from reports.bundle import atomic_output_dir
    from reports.manifest import build_manifest, model_section, short_name, write_manifest
    from reports.markdown import md_escape

    with atomic_output_dir(output, force) as tmp:
        files = write_flatness_files(tmp, result, short_name(options.get("checkpoint")))
        lines = [f"# actsparse flatness: {md_escape(options.get('checkpoint'))}", ""] + summary_lines(result, options)
        (Path(tmp) / "summary.md").write_text("\n".join(lines) + "\n")
        files.append("summary.md")
        manifest = build_manifest("flatness", options, model=model_section(lm), flatness=result.info,
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)
