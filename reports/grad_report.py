"""Files of ``grad`` and ``drift`` runs: tables (Parquet + CSV), per-layer figures (PNG + SVG),
``summary.md`` and ``manifest.json``, written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from reports.bundle import atomic_output_dir
from reports.figures import pyplot, save
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.tables import write_table


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"


def _xlabels(g: pd.DataFrame) -> list[str]:
    """Layer numbers for transformer sites; short module names for conv / per-call / custom sites."""
    if g.kind.isin(["conv_act", "act", "custom"]).any() or g.canonical_name.str.contains(r"\.call\d+$").any():
        return [str(n).replace("conv.", "").replace("custom.", "").replace(".hook_act", "") for n in g.canonical_name]
    return [str(int(v)) if v is not None and v == v else str(i) for i, v in enumerate(g.layer)]


# ----------------------------------------------------------------------------- gradients

def grad_by_layer(df: pd.DataFrame, spikes: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Per site: derivative / effective-gradient sparsity, ||eta||_2^2 per token, and the
    down-projection input's spike_max."""
    if df.empty:
        return []
    plt = pyplot()
    taus = sorted((c for c in df.columns if c.startswith("eff_grad_sparsity@")), key=lambda c: float(c.split("@")[1]))
    down = spikes[spikes.is_down_proj] if len(spikes) and "is_down_proj" in spikes else pd.DataFrame()
    n_panels = 3 if len(down) else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.9), squeeze=False)
    ax = axes[0][0]
    x = list(range(len(df)))
    labels = _xlabels(df)
    ax.plot(x, 100 * df.deriv_sparsity.astype(float), "o-", label="deriv_sparsity (act'(h)=0 or |act'|<=eps_d)")
    for c in taus:
        ax.plot(x, 100 * df[c].astype(float), ".--", label=f"|eta| < {c.split('@')[1]}")
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of entries")
    ax.set_xlabel("site (layer)")
    ax.set_xticks(x, labels, rotation=90 if len(x) > 16 or max(map(len, labels)) > 4 else 0, fontsize=7)
    ax.set_title("derivative and effective-gradient sparsity", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    v = df.eta_l2sq_per_token.astype(float)
    ax.bar(x, v.where(v > 0), color="C2")
    if (v > 0).any():
        ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=90 if len(x) > 16 or max(map(len, labels)) > 4 else 0, fontsize=7)
    ax.set_ylabel("mean ||eta_t||_2^2 per token")
    ax.set_title("gradient energy at the activation (dL/dh)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(down):
        ax = axes[0][2]
        d = down.sort_values("layer", kind="stable")
        xs = list(range(len(d)))
        ax.bar(xs, d.spike_max.astype(float), color="C3")
        ax.set_xticks(xs, [str(int(v)) if v == v else "-" for v in d.layer], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("max |x| at the down-projection input")
        ax.set_title("spike_max (Bug-or-Feature^2)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "grad_by_layer")


def write_grad_files(folder: str | Path, result, title: str) -> list[str]:
    """Tables and the figure of a gradient run into an existing folder (also for ``measure --grad``)."""
    folder = Path(folder)
    df, spikes = result.table(), result.spikes_table()
    files = write_table(df, folder, "gradients")
    files += write_table(result.summary(), folder, "gradients_summary")
    if len(spikes):
        files += write_table(spikes, folder, "spikes")
    files += grad_by_layer(df, spikes, folder, f"{title}: gradient sparsity ({result.info.get('loss')} loss)")
    return files


def grad_summary_md(folder: str | Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_code, md_escape

    info = result.info
    taus = [f"eff_grad_sparsity@{t:g}" for t in info.get("taus", [])]
    lines = [f"# actsparse grad: {md_escape(options.get('checkpoint'))}", "",
             f"Loss: {info['loss']} ({info['loss_definition']}), reduction `{info['loss_reduction']}`, "
             f"{info['n_loss_targets']} loss targets, mean loss per target {_fmt(info.get('mean_loss_per_target'))}; "
             f"data {md_code(info.get('corpus') or info.get('data'))}; model dtype {info['model_dtype']}, "
             f"device {info['device']}.", "",
             "| site | module | act | tokens | deriv_sparsity % | deriv_sq_mean | "
             # the pipes of |eta| and ||eta|| escaped: bare, they split the header into more cells than the
             # delimiter row has, and the table does not render at all
             + " | ".join(md_escape(f"|eta|<{t.split('@')[1]} %") for t in taus)
             + f" | {md_escape('mean ||eta||_1')} | {md_escape('mean ||eta||_2^2')} |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(taus) + "---:|---:|"]
    for r in result.rows:
        lines.append(f"| {md_escape(r['canonical_name'])} | {md_code(r['module_path'])} | {md_escape(r['act'])} | "
                     f"{r['n_tokens']} | "
                     f"{_pct(r['deriv_sparsity'])} | {_fmt(r['deriv_sq_mean'])} | "
                     + " | ".join(_pct(r.get(t)) for t in taus)
                     + f" | {_fmt(r['eta_l1_per_token'])} | {_fmt(r['eta_l2sq_per_token'])} |")
    down = [r for r in result.spike_rows if r.get("is_down_proj")]
    if down:
        lines += ["", "Down-projection inputs (spikes; median = exact per-batch median of |x|, averaged):", "",
                  "| module | spike_max | median | max/median | median (non-zero) | max/median (non-zero) | zero % |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in down:
            lines.append(f"| {md_code(r['module_path'])} | {_fmt(r['spike_max'])} | "
                         f"{_fmt(r['median_abs_batchmean'])} | "
                         f"{_fmt(r['spike_ratio_batchmedian'])} | {_fmt(r['median_abs_nonzero_batchmean'])} | "
                         f"{_fmt(r['spike_ratio_nonzero_batchmedian'])} | {_pct(r['zero_frac'])} |")
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


def write_grad_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_grad_files(tmp, result, short_name(options.get("checkpoint")))
        files.append(grad_summary_md(tmp, result, options))
        manifest = build_manifest("grad", options, model=model_section(lm), gradients=result.info,
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


# ----------------------------------------------------------------------------- drift

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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ci, g in lin.groupby("checkpoint_index", sort=True):
        g = g.reset_index(drop=True)
        label = short_name(g.checkpoint.iloc[0])
        for ax, (col, _) in zip(axes[0], panels):
            ax.plot(range(len(g)), g[col].astype(float), ".-", markersize=3, linewidth=0.8, label=label)
    first = lin[lin.checkpoint_index == lin.checkpoint_index.min()].reset_index(drop=True)
    layer_starts = [(i, int(v)) for i, v in enumerate(first.layer)
                    if v == v and (i == 0 or first.layer.iloc[i - 1] != v)]
    for ax, (col, lab) in zip(axes[0], panels):
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("weight tensor (file order); ticks: layer starts")
        if layer_starts:
            step = max(1, len(layer_starts) // 12)
            ticks = layer_starts[::step]
            ax.set_xticks([i for i, _ in ticks], [str(v) for _, v in ticks], fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].axhline(0, color="0.5", linewidth=0.8)
    axes[0][1].axhline(50, color="0.5", linewidth=0.8, linestyle=":")
    if lin.checkpoint_index.nunique() > 1:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "drift_by_layer")


def drift_summary_md(folder: str | Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    summ = result.summary()
    lines = [f"# actsparse drift: {md_escape(', '.join(str(c) for c in options.get('checkpoints', [])))}", "",
             f"{result.info['n_tensors_measured']} weight tensors (2+ dims), {result.info['n_tensors_skipped']} "
             f"skipped (biases, norms, integer buffers). extreme = |w| >= exact 99.9th percentile of |W|.", "",
             "| checkpoint | kind | tensors | weights | mean (weighted) | % negative (weighted) | mean std | "
             "mean extreme frac |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in summ.iterrows():
        lines.append(f"| {md_escape(short_name(r.checkpoint))} | {md_escape(r.kind)} | {r.n_tensors} | {r.n_weights} | "
                     f"{_fmt(r.mean_weighted)} | {_fmt(r.neg_pct_weighted)} | {_fmt(r.std_mean)} | "
                     f"{_fmt(r.extreme_frac_mean)} |")
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


def write_drift_outputs(output: str | Path, result, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_table(result.table(), tmp, "drift")
        files += write_table(result.summary(), tmp, "drift_summary")
        cks = options.get("checkpoints") or []
        files += drift_by_layer(result.table(), tmp, f"{', '.join(short_name(c) for c in cks)}: weight drift per tensor")
        files.append(drift_summary_md(tmp, result, options))
        manifest = build_manifest("drift", options, drift=result.info, skipped=result.skipped[:200],
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)
