"""Files of a massive-activation run: tables, figures (PNG + SVG), summary.md and the manifest.

Figures follow Sun et al. 2024 (locuslab/massive-activations lib/plot_utils_llm.py): the
layer-wise top-1/2/3 and median of |h| on a log scale (``plot_layer_ax``), the 3D magnitude
plot of one layer's tokens x channels for a prompt (``plot_3d_feat``), plus a layer x channel
heat map of max |a| that shows which channels carry the massive activations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from reports.bundle import atomic_output_dir
from reports.figures import pyplot, save
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.tables import write_table

PLOTS = ("layers", "heatmap", "3d")
TABLES = ("layers", "topk", "channels", "int8")


def _stack(canonical: str) -> str:
    """Stack prefix of a canonical name ('' for single-stack models, 'encoder.' / 'decoder.' for T5)."""
    head = canonical.split("blocks.")[0] if "blocks." in canonical else canonical.split("ln_final")[0]
    return head


def plot_layers(layers: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Sun et al. Fig. 2 style: top-1/2/3 and median of |h| per layer (1-based), log scale."""
    from matplotlib.ticker import MaxNLocator

    r = layers[layers.kind == "resid_post"] if not layers.empty else layers
    if r.empty:
        return []
    plt = pyplot()
    stacks = list(dict.fromkeys(r.canonical_name.map(_stack)))
    fig, axes = plt.subplots(1, len(stacks), figsize=(6.5 * len(stacks), 4.0), squeeze=False)
    colors = ["cornflowerblue", "mediumseagreen", "C4", "dimgrey"]
    for ax, st in zip(axes[0], stacks):
        g = r[r.canonical_name.map(_stack) == st].sort_values("layer")
        x = g.layer_1based.astype(int).to_list()
        for j, (col, lab) in enumerate((("top1_mean", "Top 1"), ("top2_mean", "Top 2"), ("top3_mean", "Top 3"),
                                        ("median_mean", "Median"))):
            ax.plot(x, g[col].to_numpy(float), label=lab, color=colors[j], marker="v" if col == "median_mean" else "o",
                    markerfacecolor="none", markersize=5)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(100, color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel("layer (1-based)")
        ax.set_ylabel("|activation|")
        ax.set_title(f"{st.rstrip('.') or 'residual stream'}", fontsize=10)
        ax.grid(axis="x", color="0.85")
        ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.suptitle(f"{title}: top-1/2/3 and median of |h| per layer (mean over sequences)", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "massive_layers")


def plot_heatmap(layers: pd.DataFrame, channel_max: dict[str, Any], folder: str | Path, title: str) -> list[str]:
    """Layer x channel heat map of max |a| over the run (residual stream after each block)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    r = layers[layers.kind == "resid_post"] if not layers.empty else layers
    names = [n for n in r.sort_values("layer", kind="stable").canonical_name if n in channel_max]
    if not names:
        return []
    widths = {len(channel_max[n]) for n in names}
    if len(widths) != 1:
        return []
    mat = np.stack([np.clip(np.asarray(channel_max[n], dtype=float), 0, None) for n in names])
    pos = mat[mat > 0]
    if pos.size == 0:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(names) + 2.0))
    vmin = max(float(pos.min()), float(pos.max()) * 1e-6)
    im = ax.imshow(np.where(mat > 0, mat, vmin), aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=vmin, vmax=float(pos.max())))
    ax.set_yticks(range(len(names)), [_short_site(n) for n in names], fontsize=7)
    top = np.argsort(-mat.max(0))[:5]
    for c in top:
        ax.axvline(c, color="cyan", linewidth=0.4, alpha=0.5)
    ax.set_xlabel("channel (strongest: " + ", ".join(str(int(c)) for c in top) + ")")
    fig.colorbar(im, ax=ax, label="max |a|", pad=0.01)
    ax.set_title(f"{title}: max |a| per layer and channel", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "massive_heatmap")


def _short_site(name: str) -> str:
    return name.replace(".hook_resid_post", "").replace("blocks.", "L")


def pick_capture_layer(capture, layer: int | None) -> str | None:
    """Canonical name of the captured site to draw: ``layer`` (0-based) or the one with the largest |h|."""
    names = list(capture.tensors)
    if not names:
        return None
    if layer is not None:
        hits = [n for n in names if capture.layers.get(n) == layer]
        return hits[0] if hits else None
    return max(names, key=lambda n: float(abs(capture.tensors[n]).max()))


def plot_3d(capture, layer: int | None, folder: str | Path, title: str) -> list[str]:
    """Sun et al. Fig. 1 style: |h| of one layer over tokens x channels for a prompt (wireframe)."""
    import numpy as np

    name = pick_capture_layer(capture, layer)
    if name is None:
        return []
    z = np.abs(capture.tensors[name]).T  # [channels, tokens]
    C, T = z.shape
    plt = pyplot()
    fig = plt.figure(figsize=(12, 6))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    xs = np.tile(np.arange(T), (C, 1))
    ys = np.tile(np.arange(C)[:, None], (1, T))
    ax.plot_wireframe(xs, ys, z, rstride=0, cstride=1, color="royalblue", linewidth=1.2)
    toks = [t.replace("\n", "\\n") if t.strip() else repr(t) for t in capture.tokens]
    ax.set_xticks(range(T), toks, rotation=50, fontsize=8, ha="right")
    top = [int(c) for c in np.argsort(-z.max(1))[:2]]
    ax.set_yticks(sorted(top), [str(c) for c in sorted(top)], fontsize=8, fontweight="bold")
    ax.set_ylabel("channel")
    ax.set_zlabel("|h|")
    lay = capture.layers.get(name)
    ax.set_title(f"{title}: {name} (layer {lay}, 1-based {lay + 1 if lay is not None else '-'})", fontsize=10)
    return save(fig, folder, "massive_3d")


def write_massive_files(folder: str | Path, result, title: str, plots: Iterable[str] | None = None,
                        layer: int | None = None) -> list[str]:
    """Tables (Parquet + CSV) and figures of ``result`` into an existing ``folder``; returns file names.

    ``plots``: any of ``layers``, ``heatmap``, ``3d`` (None: layers and heatmap, plus 3d when a prompt
    was captured). Used by ``actsparse massive`` and by ``measure --massive``.
    """
    folder = Path(folder)
    files: list[str] = []
    layers = pd.DataFrame(result.layers)
    files += write_table(layers, folder, "massive_layers")
    files += write_table(pd.DataFrame(result.topk), folder, "massive_topk")
    files += write_table(pd.DataFrame(result.channels), folder, "massive_channels")
    if result.int8:
        files += write_table(pd.DataFrame(result.int8), folder, "massive_int8")
    wanted = set(plots) if plots is not None else {"layers", "heatmap"} | ({"3d"} if result.capture else set())
    if "layers" in wanted:
        files += plot_layers(layers, folder, title)
    if "heatmap" in wanted:
        files += plot_heatmap(layers, result.channel_max, folder, title)
    if "3d" in wanted and result.capture is not None:
        files += plot_3d(result.capture, layer, folder, title)
    return files


def massive_manifest_section(result) -> dict[str, Any]:
    return {**result.info, "global_max": result.global_max}


def write_massive_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False,
                          plots: Iterable[str] | None = None, layer: int | None = None) -> Path:

    with atomic_output_dir(output, force) as tmp:
        files = write_massive_files(tmp, result, short_name(options.get("checkpoint")), plots, layer)
        files.append(write_summary_md(tmp, result, options))
        manifest = build_manifest("massive", options, model=model_section(lm),
                                  massive=massive_manifest_section(result), files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


def write_summary_md(folder: Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"# actsparse massive: {md_escape(options.get('checkpoint'))}", "",
             f"Preset `{info['preset']}`: {info['n_sequences']} sequences, {info['n_counted_tokens']} counted tokens, "
             f"max_length {info.get('max_length')}, BOS {'yes' if info.get('bos') else 'no'}, model dtype "
             f"{info['model_dtype']}, device {info['device']}.", "",
             "Sun et al.: top-k and the lower median of |h| over each sequence's whole token x channel tensor, "
             "averaged over sequences; massive = |a| > 100 and >= 1000 x that median. Max_act_llm: each token's max "
             "over its own median across channels.", "",
             "| site | layer (1-based) | top1_mean | top2_mean | top3_mean | median_mean | top1/median | n_massive | "
             "massive channels | positions | token_ratio_max | n_massive_tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in result.layers:
        if r["kind"] not in ("resid_post", "embed", "final_norm"):
            continue
        lines.append(f"| {md_escape(r['canonical_name'])} | {_fmt(r['layer_1based'])} | {_fmt(r['top1_mean'])} | "
                     f"{_fmt(r['top2_mean'])} | {_fmt(r['top3_mean'])} | {_fmt(r['median_mean'])} | "
                     f"{_fmt(r['ratio_top1_median'])} | {r['n_massive']} | {r['massive_channels'] or '-'} | "
                     f"{r['massive_positions'] or '-'} | {_fmt(r['token_ratio_max'])} | {r['n_massive_tokens']} |")
    g = result.global_max
    if g:
        lines += ["", f"Global max: {_fmt(g['value'], 6)} at {md_escape(g['canonical_name'])} "
                      f"({md_code(g['module_path'])}), sample {g['sample']}, position {g['position']}, channel "
                      f"{g['channel']}, token {md_code(repr(g['token']))}."]  # the token string comes from the corpus
    if info.get("overflow"):
        lines += ["", f"**Overflow:** {md_escape(info['overflow'])}: {md_escape(', '.join(info['nonfinite_sites']))}."]
    if result.int8:
        lines += ["", f"INT8 at {md_escape(result.int8[0]['canonical_name'])} (per-tensor symmetric, in-sample):", "",
                  "| policy | threshold | rel_rmse | SQNR dB | clip rate |", "|---|---:|---:|---:|---:|"]
        for r in result.int8:
            lines.append(f"| {r['policy']} | {_fmt(r['threshold'])} | {_fmt(r['rel_rmse'])} | {_fmt(r['sqnr_db'])} | "
                         f"{_fmt(r['clip_rate'])} |")
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"
