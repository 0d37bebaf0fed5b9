"""Files of ``grad`` and ``drift`` runs: tables (Parquet + CSV), per-layer figures (PNG + SVG),
``summary.md`` and ``manifest.json``, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.bundle import atomic_output_dir
from reports.figures import panel_size, pyplot, save, tick_labels
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.numbers import fmt, pct
from reports.tables import write_tables


def _xlabels(g: pd.DataFrame) -> list[str]:
    """Layer numbers for transformer sites; short module names for conv / per-call / custom sites."""
    if g.kind.isin(["conv_act", "act", "custom"]).any() or g.canonical_name.str.contains(r"\.call\d+$").any():
        return [str(n).replace("conv.", "").replace("custom.", "").replace(".hook_act", "") for n in g.canonical_name]
    return [str(int(v)) if v is not None and v == v else str(i) for i, v in enumerate(g.layer)]


# ----------------------------------------------------------------------------- gradients

def grad_by_layer(df: pd.DataFrame, spikes: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Per site: derivative / effective-gradient sparsity, ||eta||_2^2 per token, and the
    down-projection input's spike_max. One x axis for every panel: the layer (0-based, as in the
    tables), or the site's short name where sites are not numbered layers."""
    if df.empty:
        return []
    plt = pyplot()
    taus = sorted((c for c in df.columns if c.startswith("eff_grad_sparsity@")), key=lambda c: float(c.split("@")[1]))
    down = spikes[spikes.is_down_proj] if len(spikes) and "is_down_proj" in spikes else pd.DataFrame()
    n_panels = 3 if len(down) else 2
    fig, axes = plt.subplots(1, n_panels, figsize=panel_size(n_panels), squeeze=False)
    x = list(range(len(df)))
    labels = _xlabels(df)
    xlabel = "layer" if all(lab.isdigit() for lab in labels) else "site"
    ax = axes[0][0]
    ax.plot(x, 100 * df.deriv_sparsity.astype(float), "o-", label="derivative: act'(h) = 0")
    for i, c in enumerate(taus):
        ax.plot(x, 100 * df[c].astype(float), ["s--", "^:", "v-."][i % 3], label=f"effective: |eta| < {c.split('@')[1]}")
    ax.set_ylim(0, 102)  # a line at 100 % stays visible above the frame's edge
    ax.set_ylabel("% of entries")
    ax.set_title("derivative and effective-gradient sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax = axes[0][1]
    v = df.eta_l2sq_per_token.astype(float)
    ax.bar(x, v.where(v > 0), color="C2")
    if (v > 0).any():
        ax.set_yscale("log")
    ax.set_ylabel("mean ||eta_t||^2 per token")
    ax.set_title("gradient energy at the activation (dL/dh)")
    ax.grid(axis="y", alpha=0.3)
    for ax in axes[0][:2]:
        tick_labels(ax, labels)
        ax.set_xlabel(xlabel)
    if len(down):
        ax = axes[0][2]
        d = down.sort_values("layer", kind="stable")
        xs = list(range(len(d)))
        ax.bar(xs, d.spike_max.astype(float), color="C3")
        tick_labels(ax, [str(int(v)) if v == v else "-" for v in d.layer])
        ax.set_xlabel("layer")
        ax.set_ylabel("max |x| at the down-projection input")
        ax.set_title("spike_max (Bug-or-Feature^2)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, folder, "grad_by_layer")


def write_grad_files(folder: str | Path, result, title: str) -> list[str]:
    """Tables and the figure of a gradient run into an existing folder (also for ``measure --grad``)."""
    folder = Path(folder)
    tables = result.tables()  # spikes only when there are any
    files = write_tables(tables, folder)
    files += grad_by_layer(tables["gradients"], tables.get("spikes", pd.DataFrame()), folder,
                           f"{title}: gradient sparsity ({result.info.get('loss')} loss)")
    return files


def grad_summary_md(folder: str | Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    lines = [f"# actsparse grad: {md_escape(options.get('checkpoint'))}", ""] + grad_summary_lines(result)
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


def grad_summary_lines(result) -> list[str]:
    """The gradient section of a summary.md (loss, per-site table, down-projection spikes), without a title."""
    from reports.markdown import md_code, md_escape

    info = result.info
    taus = [f"eff_grad_sparsity@{t:g}" for t in info.get("taus", [])]
    per_batch = info.get("loss_targets_per_batch") or {}
    lines = [f"Loss: {info['loss']} ({info['loss_definition']}), reduction `{info['loss_reduction']}`, "
             f"{info['n_loss_targets']} loss targets"
             + (f" ({per_batch['min']}-{per_batch['max']} per batch: eta and eff_grad_sparsity depend on the reduction "
                f"and on this count)" if per_batch.get("n_batches") else "")
             + f", mean loss per target {fmt(info.get('mean_loss_per_target'))}; "
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
                     f"{pct(r['deriv_sparsity'])} | {fmt(r['deriv_sq_mean'])} | "
                     + " | ".join(pct(r.get(t)) for t in taus)
                     + f" | {fmt(r['eta_l1_per_token'])} | {fmt(r['eta_l2sq_per_token'])} |")
    down = [r for r in result.spike_rows if r.get("is_down_proj")]
    if down:
        lines += ["", "Down-projection inputs (spikes; median = exact per-batch median of |x|, averaged):", "",
                  "| module | spike_max | median | max/median | median (non-zero) | max/median (non-zero) | zero % |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in down:
            lines.append(f"| {md_code(r['module_path'])} | {fmt(r['spike_max'])} | "
                         f"{fmt(r['median_abs_batchmean'])} | "
                         f"{fmt(r['spike_ratio_batchmedian'])} | {fmt(r['median_abs_nonzero_batchmean'])} | "
                         f"{fmt(r['spike_ratio_nonzero_batchmedian'])} | {pct(r['zero_frac'])} |")
    return lines


def write_grad_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_grad_files(tmp, result, short_name(options.get("checkpoint")))
        files.append(grad_summary_md(tmp, result, options))
        manifest = build_manifest("grad", options, model=model_section(lm), gradients=result.info,
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)
