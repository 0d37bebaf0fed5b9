"""Files of a massive-activation run: tables, figures (PNG + SVG), summary.md and the manifest.

Figures follow Sun et al. 2024 (locuslab/massive-activations lib/plot_utils_llm.py): the
layer-wise top-1/2/3 and median of |h| on a log scale (``plot_layer_ax``), the 3D magnitude
plot of one layer's tokens x channels for a prompt (``plot_3d_feat``), plus a layer x channel
heat map of max |a| that shows which channels carry the massive activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from reports.bundle import atomic_output_dir
from reports.figures import log_colorbar, panel_size, pyplot, save
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.numbers import fmt
from reports.tables import write_tables

PLOTS = ("layers", "heatmap", "3d")
TABLES = ("layers", "topk", "channels", "int8")


def _stack(canonical: str) -> str:
    """Stack prefix of a canonical name ('' for single-stack models, 'encoder.' / 'decoder.' for T5)."""
    head = canonical.split("blocks.")[0] if "blocks." in canonical else canonical.split("ln_final")[0]
    return head


# What ``massive`` shows (terminal table, summary.md, figures) when no --kind is given: the residual stream
# itself, as Sun et al. plot it, and any --site sites. massive_layers holds every measured kind all the same.
SHOWN_BY_DEFAULT = ("embed", "resid_post", "final_norm", "custom")
# Kinds with one site per model (no layer axis to draw them on).
_ONE_SITE = ("embed", "final_norm")


def shown_kinds(present: Iterable[str], kinds: Iterable[str] | None = None) -> set[str]:
    """The kinds of massive_layers rows to show, given the kinds ``present`` in the table: ``kinds`` (the
    --kind the user gave) and custom (--site) sites; with no ``kinds``, ``SHOWN_BY_DEFAULT``, or every kind
    present when the table holds none of those (a run with --kind, read back from its folder)."""
    if kinds:
        return set(kinds) | {"custom"}
    present = set(present)
    return set(SHOWN_BY_DEFAULT) if present & set(SHOWN_BY_DEFAULT) else present


def shown_rows(layers: pd.DataFrame, kinds: Iterable[str] | None = None) -> pd.DataFrame:
    """The rows of a massive_layers table whose kind is shown (``shown_kinds``)."""
    if layers.empty or "kind" not in layers:
        return layers
    return layers[layers.kind.isin(shown_kinds(layers.kind, kinds))]


def layer_panels(layers: pd.DataFrame, kinds: Iterable[str] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """The panels of the massive_layers figure: (title, rows by layer) per kind and stack of the shown rows
    that have a layer; the default is one panel per stack of ``resid_post``."""
    r = shown_rows(layers, kinds)
    if r.empty:
        return []
    r = r[~r.kind.isin(_ONE_SITE) & r.layer.notna()]
    panels = []
    for kind in dict.fromkeys(r.kind):
        g = r[r.kind == kind]
        for st in dict.fromkeys(g.canonical_name.map(_stack)):
            name = st.rstrip(".")
            title = (name or "residual stream") if kind == "resid_post" else f"{name} {kind}".strip()
            panels.append((title, g[g.canonical_name.map(_stack) == st].sort_values("layer")))
    return panels


def plot_layers(layers: pd.DataFrame, folder: str | Path, title: str, kinds: Iterable[str] | None = None) -> list[str]:
    """Sun et al. Fig. 2 style: top-1/2/3 and median of |h| per layer (0-based, as in every table), log scale; one panel per
    kind and stack of the shown rows (``shown_rows``)."""
    from matplotlib.ticker import MaxNLocator

    panels = layer_panels(layers, kinds)
    if not panels:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=panel_size(len(panels), extra_width=1.3 * len(panels)),
                             squeeze=False)
    series = (("top1_mean", "Top 1", "C0", "o"), ("top2_mean", "Top 2", "C1", "s"), ("top3_mean", "Top 3", "C2", "^"),
              ("median_mean", "Median", "0.35", "v"))
    for ax, (panel, g) in zip(axes[0], panels):
        x = g.layer.astype(int).to_list()
        for col, lab, color, marker in series:
            ax.plot(x, g[col].to_numpy(float), label=lab, color=color, marker=marker, markerfacecolor="none",
                    markersize=5)
            lo, hi = f"{col}_lo", f"{col}_hi"  # bootstrap interval over sequences (top-1 and median)
            if lo in g and hi in g:
                ax.fill_between(x, pd.to_numeric(g[lo], errors="coerce").to_numpy(float),
                                pd.to_numeric(g[hi], errors="coerce").to_numpy(float), color=color, alpha=0.3,
                                linewidth=0)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(100, color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel("|activation|")
        ax.set_title(panel)
        ax.grid(axis="x")
        # below the axes: inside, it covered the |a| = 100 guide line
        ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.suptitle(f"{title}: top-1/2/3 and median of |h| per layer (mean over sequences)" + _bands_note(panels))
    fig.tight_layout()
    return save(fig, folder, "massive_layers")


def _bands_note(panels: list[tuple[str, pd.DataFrame]]) -> str:
    """The figure's line on its bands: what they are, over how many sequences, and their widest relative
    half-width (on a log axis a band of a few % is thinner than a line)."""
    import numpy as np

    widest, n_seq = [], []
    for _, g in panels:
        for col in ("top1_mean", "median_mean"):
            if f"{col}_lo" not in g or f"{col}_hi" not in g:
                return ""
            v = pd.to_numeric(g[col], errors="coerce").to_numpy(float)
            half = (pd.to_numeric(g[f"{col}_hi"], errors="coerce").to_numpy(float)
                    - pd.to_numeric(g[f"{col}_lo"], errors="coerce").to_numpy(float)) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                widest += [x for x in half / np.abs(v) if np.isfinite(x)]
        n_seq += [int(n) for n in pd.to_numeric(g.get("n_sequences", pd.Series(dtype=float)), errors="coerce").dropna()]
    if not widest or not n_seq:
        return ""
    return (f"\nbands: 95 % bootstrap interval of top-1 and median over {max(n_seq)} sequences "
            f"(at most ±{fmt(100 * max(widest), 2)} % of the value)")


def plot_heatmap(layers: pd.DataFrame, channel_max: dict[str, Any], folder: str | Path, title: str,
                 kinds: Iterable[str] | None = None) -> list[str]:
    """Layer x channel heat map of max |a| over the run, one panel per kind of the shown rows that have a
    layer (default: the residual stream after each block), on one colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    r = shown_rows(layers, kinds)
    if r.empty:
        return []
    r = r[~r.kind.isin(_ONE_SITE)]
    blocks = []  # (kind, site names, [sites, channels]) per panel
    for kind in dict.fromkeys(r.kind):
        names = [n for n in r[r.kind == kind].sort_values("layer", kind="stable").canonical_name if n in channel_max]
        if names and len({len(channel_max[n]) for n in names}) == 1:
            blocks.append((kind, names, np.stack([np.clip(np.asarray(channel_max[n], dtype=float), 0, None)
                                                  for n in names])))
    pos = np.concatenate([m[m > 0] for _, _, m in blocks]) if blocks else np.empty(0)
    if pos.size == 0:
        return []
    vmin, vmax = max(float(pos.min()), float(pos.max()) * 1e-6), float(pos.max())
    plt = pyplot()
    fig, axes = plt.subplots(len(blocks), 1, squeeze=False, figsize=(10, sum(0.35 * len(n) + 1.0 for _, n, _ in blocks)
                                                                       + 1.0),
                             gridspec_kw={"height_ratios": [len(n) + 2 for _, n, _ in blocks]})
    for ax, (kind, names, mat) in zip(axes[:, 0], blocks):
        im = ax.imshow(np.where(mat > 0, mat, vmin), aspect="auto", interpolation="nearest", cmap="magma",
                       norm=LogNorm(vmin=vmin, vmax=vmax))
        ax.set_yticks(range(len(names)), [_short_site(n) for n in names], fontsize=7)
        top = np.argsort(-mat.max(0))[:5]
        for c in top:
            ax.axvline(c, color="C5", linewidth=0.4, alpha=0.5)
        ax.set_xlabel("channel (strongest: " + ", ".join(str(int(c)) for c in top) + ")")
        if len(blocks) > 1:
            ax.set_title(kind)
        log_colorbar(fig.colorbar(im, ax=ax, label="max |a|", pad=0.01), vmin, vmax)
    fig.suptitle(f"{title}: max |a| per layer and channel")
    fig.tight_layout()
    return save(fig, folder, "massive_heatmap")


def _short_site(name: str) -> str:
    """'blocks.3.hook_resid_post' -> 'L3'; other kinds keep their hook: 'L3 mlp_out'."""
    return name.replace(".hook_resid_post", "").replace("blocks.", "L").replace(".hook_", " ")


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
    top = [int(c) for c in np.argsort(-z.max(1))[:2]]
    # every channel as a thin grey line over the tokens, the two largest drawn over them in colour
    ax.plot_wireframe(xs, ys, z, rstride=0, cstride=1, color="0.55", linewidth=0.5, alpha=0.7)
    for c, color in zip(top, ("C5", "C1")):
        ax.plot(np.arange(T), np.full(T, c), z[c], color=color, linewidth=2.0, label=f"channel {c}")
    ax.legend(loc="upper left", frameon=False)
    toks = [t.replace("\n", "\\n") if t.strip() else repr(t) for t in capture.tokens]
    step = max(1, -(-T // 24))  # at most ~24 token labels: more overlap
    ax.set_xticks(range(0, T, step), toks[::step], rotation=50, fontsize=8, ha="right")
    ax.set_yticks(sorted(top), [str(c) for c in sorted(top)], fontsize=8, fontweight="bold")
    ax.set_ylabel("channel")
    ax.set_zlabel("|h|")
    lay = capture.layers.get(name)
    ax.set_title(f"{title}: {name} (layer {lay if lay is not None else '-'}, 0-based)")
    return save(fig, folder, "massive_3d")


def write_massive_files(folder: str | Path, result, title: str, plots: Iterable[str] | None = None,
                        layer: int | None = None, kinds: Iterable[str] | None = None) -> list[str]:
    """Tables (Parquet + CSV) and figures of ``result`` into an existing ``folder``; returns file names.

    ``plots``: any of ``layers``, ``heatmap``, ``3d`` (None: layers and heatmap, plus 3d when a prompt
    was captured). ``kinds``: the site kinds the user asked for, drawn in the figures (None: the
    default, ``shown_kinds``). Used by ``actsparse massive`` and by ``measure --massive``.
    """
    folder = Path(folder)
    tables = result.tables()  # massive_int8 only when the INT8 check ran
    files = write_tables(tables, folder)
    layers = tables["massive_layers"]
    wanted = set(plots) if plots is not None else {"layers", "heatmap"} | ({"3d"} if result.capture else set())
    if "layers" in wanted:
        files += plot_layers(layers, folder, title, kinds)
    if "heatmap" in wanted:
        files += plot_heatmap(layers, result.channel_max, folder, title, kinds)
    if "3d" in wanted and result.capture is not None:
        files += plot_3d(result.capture, layer, folder, title)
    if "massive_intervene" in tables:
        files += plot_intervene(tables["massive_intervene"], folder, title)
    if "massive_attention" in tables:
        files += plot_attention_heads(tables["massive_attention"], folder, title)
    if "massive_attention_prompt" in tables:
        files += plot_attention_prompt(tables["massive_attention_prompt"], folder, title)
    return files


def massive_manifest_section(result) -> dict[str, Any]:
    return {**result.info, "global_max": result.global_max}


def write_massive_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False,
                          plots: Iterable[str] | None = None, layer: int | None = None,
                          kinds: Iterable[str] | None = None) -> Path:

    with atomic_output_dir(output, force) as tmp:
        files = write_massive_files(tmp, result, short_name(options.get("checkpoint")), plots, layer, kinds)
        files.append(write_summary_md(tmp, result, options, kinds))
        manifest = build_manifest("massive", options, model=model_section(lm),
                                  massive=massive_manifest_section(result), files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def write_summary_md(folder: Path, result, options: dict[str, Any], kinds: Iterable[str] | None = None) -> str:
    from reports.markdown import md_escape

    lines = ([f"# actsparse massive: {md_escape(options.get('checkpoint'))}", ""]
             + massive_summary_lines(result, kinds=kinds))
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


def massive_summary_lines(result, kinds: Iterable[str] | None = None) -> list[str]:
    """The massive-activation section of a summary.md (per-layer table of the shown kinds, global max, INT8),
    without a title. ``kinds``: the site kinds the user asked for (None: the default, ``shown_kinds``)."""
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"Preset `{info['preset']}`: {info['n_sequences']} sequences, {info['n_counted_tokens']} counted tokens, "
             f"max_length {info.get('max_length')}, BOS {'yes' if info.get('bos') else 'no'}, model dtype "
             f"{info['model_dtype']}, device {info['device']}.", "",
             "Sun et al.: top-k and the lower median of |h| over each sequence's whole token x channel tensor, "
             "averaged over sequences; massive = |a| > 100 and >= 1000 x that median. Max_act_llm: each token's max "
             "over its own median across channels.", "",
             "| site | layer (0-based) | top1_mean | top2_mean | top3_mean | median_mean | top1/median | n_massive | "
             "massive channels | positions | token_ratio_max | n_massive_tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    show = shown_kinds((r["kind"] for r in result.layers), kinds)
    for r in result.layers:
        if r["kind"] not in show:
            continue
        lines.append(f"| {md_escape(r['canonical_name'])} | {fmt(r['layer'])} | {fmt(r['top1_mean'])} | "
                     f"{fmt(r['top2_mean'])} | {fmt(r['top3_mean'])} | {fmt(r['median_mean'])} | "
                     f"{fmt(r['ratio_top1_median'])} | {r['n_massive']} | {r['massive_channels'] or '-'} | "
                     f"{r['massive_positions'] or '-'} | {fmt(r['token_ratio_max'])} | {r['n_massive_tokens']} |")
    g = result.global_max
    if g:
        lines += ["", f"Global max: {fmt(g['value'], 6)} at {md_escape(g['canonical_name'])} "
                      f"({md_code(g['module_path'])}), sample {g['sample']}, position {g['position']}, channel "
                      f"{g['channel']}, token {md_code(repr(g['token']))}."]  # the token string comes from the corpus
    if info.get("overflow"):
        lines += ["", f"**Overflow:** {md_escape(info['overflow'])}: {md_escape(', '.join(info['nonfinite_sites']))}."]
    lines += intervene_attention_summary_lines(result)
    if result.int8:
        i8 = info.get("int8") or {}
        lines += ["", f"INT8 at {md_escape(result.int8[0]['canonical_name'])} (per-tensor symmetric, "
                      f"{i8.get('calibration', 'in-sample')} calibration: scales from "
                      f"{i8.get('n_calibration_sequences', '?')} sequences, errors and clip rates on "
                      f"{i8.get('n_evaluation_sequences', '?')}):", "",
                  "| policy | threshold | rel_rmse | SQNR dB | clip rate |", "|---|---:|---:|---:|---:|"]
        for r in result.int8:
            lines.append(f"| {r['policy']} | {fmt(r['threshold'])} | {fmt(r['rel_rmse'])} | {fmt(r['sqnr_db'])} | "
                         f"{fmt(r['clip_rate'])} |")
    return lines


# ------------------------------------------------------- Sun et al.'s exp3 (intervention) and exp4 (attention)
def attention_by_layer(rows) -> list[dict[str, Any]]:
    """``massive_attention`` rows (one per layer and head) -> one row per layer: the mean over heads of each
    share, and the largest head's share on position 0."""
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    if df.empty:
        return []
    cols = ["attn_share_first", "attn_share_peak", "attn_share_massive", "uniform_share_first", "uniform_share_peak",
            "logit_first_mean", "logit_peak_mean", "logit_other_mean"]
    g = df.groupby("layer", sort=True)
    out = g[[c for c in cols if c in df]].mean()
    out["max_head_share_first"] = g["attn_share_first"].max()
    out["n_heads"] = g["head"].count()
    return out.reset_index().to_dict("records")


_MODE_LABELS = {"original": "original", "zero": "set to zero", "mean": "set to mean"}


def _mode_colors(modes: list[str]) -> list[str]:
    """The intervention bars' colours: original grey, zero red, mean blue."""
    return ["0.55" if m == "original" else ("C3" if m == "zero" else "C0") for m in modes]


_ERR_KW = {"ecolor": "0.2", "capsize": 3, "linewidth": 1}
_WHISKERS = "\nwhiskers: 95 % bootstrap interval over sequences"


def _bar_err(table: pd.DataFrame, col: str):
    """matplotlib ``xerr`` ([2, n]: below, above) from ``COL_lo`` / ``COL_hi`` (the bootstrap interval), or None."""
    import numpy as np

    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo not in table or hi not in table:
        return None
    v = table[col].to_numpy(float)
    err = np.stack([v - table[lo].to_numpy(float), table[hi].to_numpy(float) - v])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0)


def _ends(values, err):
    """Where a bar's label starts: after the bar, or after its error bar when it has one."""
    return values if err is None else values + err[1]


def plot_intervene(table: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Sun et al. 2024 Table 3 as bars: perplexity of the original model and of each intervention (log scale);
    for a sequence classifier (an ``accuracy`` column), accuracy and the loss ratio side by side."""
    if table is None or table.empty:
        return []
    if "accuracy" in table:
        return _plot_intervene_classifier(table, folder, title)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.55 * len(table)))
    modes = [str(m) for m in table["mode"]]
    ppl = table["ppl"].to_numpy(float)
    colors = _mode_colors(modes)
    y = list(range(len(modes)))[::-1]
    err = _bar_err(table, "ppl")
    ax.barh(y, ppl, color=colors, height=0.6, xerr=err, error_kw=_ERR_KW)
    for yi, v, r, end in zip(y, ppl, table["ppl_ratio"].to_numpy(float), _ends(ppl, err)):
        ax.text(end, yi, f" {fmt(v)}  ({fmt(r, 6)} x original)", va="center", fontsize=9)
    ax.set_yticks(y, [_MODE_LABELS.get(m, m) for m in modes])
    right = max(_ends(ppl, err))
    if max(ppl) > 3 * min(ppl):  # the paper's collapse (zero) spans decades
        ax.set_xscale("log")
        ax.set_xlim(min(ppl) / 1.5, right * 6)
        ax.set_xlabel("perplexity (log scale)" + _WHISKERS * (err is not None))
    else:
        ax.set_xlim(0, right * 1.75)
        ax.set_xlabel("perplexity" + _WHISKERS * (err is not None))
    first = table.iloc[0]
    ax.set_title(f"{title}: intervention at layer {int(first['layer'])} (0-based), channels {first['channels']}",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "massive_intervene")


def _plot_intervene_classifier(table: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """A classifier's intervention (Sun et al. 2024's ViT Table 5 measure, top-1 accuracy, plus the loss ratio):
    accuracy bars on [0, 1] on the left, exp(CE - CE original) on the right."""
    modes = [str(m) for m in table["mode"]]
    acc = table["accuracy"].to_numpy(float)
    ratio = table["loss_ratio"].to_numpy(float)
    colors = _mode_colors(modes)
    y = list(range(len(modes)))[::-1]
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 1.6 + 0.55 * len(table)), sharey=True)
    err = _bar_err(table, "accuracy")
    ax.barh(y, acc, color=colors, height=0.6, xerr=err, error_kw=_ERR_KW)
    for yi, v, d, end in zip(y, acc, table["accuracy_drop"].to_numpy(float), _ends(acc, err)):
        ax.text(end, yi, f" {fmt(v, 3)}" + (f" ({'-' if d > 0 else '+'}{fmt(100 * abs(d), 2)} points)" if d else ""),
                va="center", fontsize=9)
    ax.set_xlim(0, 1.35)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("accuracy (share of examples, argmax = label)" + _WHISKERS.replace("sequences", "examples")
                  * (err is not None))
    ax.set_yticks(y, [_MODE_LABELS.get(m, m) for m in modes])
    err = _bar_err(table, "loss_ratio")
    bx.barh(y, ratio, color=colors, height=0.6, xerr=err, error_kw=_ERR_KW)
    for yi, v, ce, end in zip(y, ratio, table["ce_mean"].to_numpy(float), _ends(ratio, err)):
        bx.text(end, yi, f" x{fmt(v, 6)} (CE {fmt(ce, 4)})", va="center", fontsize=9)
    right = max(_ends(ratio, err))
    if max(ratio) > 3 * min(ratio):
        bx.set_xscale("log")
        bx.set_xlim(min(ratio) / 1.5, right * 8)
        bx.set_xlabel("loss ratio exp(CE - CE original), log scale")
    else:
        bx.set_xlim(0, right * 1.75)
        bx.set_xlabel("loss ratio exp(CE - CE original)")
    bx.axvline(1.0, color="0.6", linestyle=":", linewidth=1)
    first = table.iloc[0]
    fig.suptitle(f"{title}: intervention at layer {int(first['layer'])} (0-based), channels {first['channels']}, "
                 f"{int(first['n_sequences'])} labelled examples", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "massive_intervene")


def plot_attention_heads(table: pd.DataFrame, folder: str | Path, title: str) -> list[str]:
    """Per layer and head: the attention share on position 0, on Sun's exp3 positions (0 and the peak) and, when
    any sequence has them, on the Sun-massive positions; one colour scale [0, 1]."""
    import numpy as np

    if table is None or table.empty:
        return []
    panels = [("attn_share_first", "share on position 0"), ("attn_share_peak", "share on 0 + peak position")]
    if table["attn_share_massive"].notna().any():
        panels.append(("attn_share_massive", "share on massive positions"))
    L, H = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    uni = float(table["uniform_share_first"].iloc[0])
    vmax = float(np.nanmax([np.nanmax(table[c].to_numpy(float)) for c, _ in panels] + [uni]))
    vmax = 1.0 if vmax > 0.5 else vmax  # sinks: the full [0, 1]; else the data's range, so small shares show
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(1.2 + len(panels) * max(3.2, 0.35 * H + 1.6), max(3.0, 0.3 * L + 2.0)))
    im = None
    for ax, (colname, lab) in zip(axes[0], panels):
        mat = np.full((L, H), np.nan)
        for r in table.itertuples():
            mat[int(r.layer), int(r.head)] = getattr(r, colname)
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="YlGnBu", vmin=0, vmax=vmax,
                       origin="lower")
        if L * H <= 64:  # small grids: the values themselves
            for (li, hi), v in np.ndenumerate(mat):
                if v == v:
                    ax.text(hi, li, fmt(v, 2), ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 * vmax else "black")
        ax.set_xlabel("head")
        ax.set_ylabel("layer (0-based)")
        ax.set_title(lab, fontsize=10)
        if L <= 40:
            ax.set_yticks(range(L))
        if H <= 40:
            ax.set_xticks(range(H))
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(top=0.80, wspace=0.35)
    fig.colorbar(im, ax=list(axes[0]), label="mean attention probability", pad=0.02)
    kind = str(table["attention_kind"].iloc[0]) if "attention_kind" in table else "causal"
    fig.suptitle(f"{title}: attention share per layer and head ({kind} attention)\n(uniform {kind} attention would "
                 f"put {fmt(uni, 3)} on position 0)", fontsize=10)
    return save(fig, folder, "massive_attention")


def plot_attention_prompt(table: pd.DataFrame, folder: str | Path, title: str, max_layers: int = 36) -> list[str]:
    """Sun et al. 2024 Fig. 6 style (lib/plot_utils_llm.py ``plot_attn``): per layer, the attention logits of one
    prompt averaged over heads, lower triangle for causal attention, the full square for bidirectional attention
    (the table holds every key then); query down, key across; one panel per layer."""
    import math as _math

    import numpy as np

    if table is None or table.empty:
        return []
    layers = sorted(int(v) for v in table.layer.unique())
    if len(layers) > max_layers:  # evenly spaced, always the first and the last
        idx = np.unique(np.linspace(0, len(layers) - 1, max_layers).round().astype(int))
        layers = [layers[i] for i in idx]
    T = int(table["query"].max()) + 1
    ncol = min(4, len(layers))
    nrow = _math.ceil(len(layers) / ncol)
    plt = pyplot()
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, figsize=(3.3 * ncol + 0.6, 3.1 * nrow + 0.8))
    toks = table[table.layer == layers[0]].drop_duplicates("query").sort_values("query")["query_token"].tolist()
    for ax, li in zip(axes.flat, layers):
        g = table[table.layer == li]
        mat = np.full((T, T), np.nan)
        mat[g["query"].to_numpy(int), g["key"].to_numpy(int)] = g["logit_mean"].to_numpy(float)
        im = ax.imshow(np.ma.masked_invalid(mat), cmap="YlGnBu", interpolation="nearest")
        ax.set_facecolor("whitesmoke")
        ax.set_title(f"layer {li}", fontsize=9)
        if T <= 24:  # short prompts: the tokens themselves
            labels = [t.replace("\n", "\\n") for t in toks]
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    first = toks[0].replace("\n", "\\n") if toks else ""
    square = bool((table["key"] > table["query"]).any())
    fig.suptitle(f"{title}: attention logits averaged over heads, {T} prompt tokens (first {first!r}); "
                 f"{'bidirectional attention, full square' if square else 'causal attention, lower triangle'}; "
                 "query down, key across, key 0 at the left", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "massive_attention_prompt")


INTERVENE_BARS_NOTE = ("± se: standard error over the sequences (examples for a classifier); every mode runs on the "
                       "same ones, so a ratio's error is that of the paired difference, much smaller than the PPL's "
                       "own. The `_lo`/`_hi` columns hold the 95 % bootstrap interval.")


def _se(row: dict, col: str, digits: int = 2) -> str:
    """A row's ``COL_se`` formatted, or an empty cell for results written before the error bars existed."""
    v = row.get(f"{col}_se")
    return fmt(v, digits) if v is not None and v == v else ""


def intervene_attention_summary_lines(result) -> list[str]:
    """summary.md lines of the intervention and attention analyses (empty when neither ran)."""
    from reports.markdown import md_code, md_escape

    lines: list[str] = []
    info = result.info
    intervene, attention = getattr(result, "intervene", None), getattr(result, "attention", None)  # older results
    if intervene and "accuracy" in intervene[0]:
        iv = info.get("intervene") or {}
        first = intervene[0]
        ex = iv.get("examples") or {}
        lines += ["", f"Intervention (Sun et al. 2024 exp3, on a sequence classifier) at layer {first['layer']} "
                      f"(0-based, {md_escape(first['canonical_name'])}; {md_escape(iv.get('layer_rule', ''))}), "
                      f"channels {first['channels']} ({md_escape(iv.get('channel_rule', ''))}), positions 0 and each "
                      f"example's largest-{md_escape('|h|')} position, on {first['n_sequences']} labelled examples "
                      f"({md_code(str(ex.get('labels_field', '')))} of {md_escape(str(ex.get('corpus', '')))}); "
                      "quality as their ViT experiment (top-1 accuracy) plus the cross-entropy against the labels:",
                  "", "| mode | CE | loss ratio | ± se | accuracy | accuracy drop | ± se |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in intervene:
            lines.append(f"| {r['mode']} | {fmt(r['ce_mean'])} | {fmt(r['loss_ratio'], 6)} | {_se(r, 'loss_ratio')} "
                         f"| {fmt(r['accuracy'], 4)} | {fmt(r['accuracy_drop'], 4)} | {_se(r, 'accuracy_drop')} |")
        lines += ["", INTERVENE_BARS_NOTE]
    elif intervene:
        iv = info.get("intervene") or {}
        first = intervene[0]
        lines += ["", f"Intervention (Sun et al. 2024 exp3) at layer {first['layer']} (0-based, "
                      f"{md_escape(first['canonical_name'])}; {md_escape(iv.get('layer_rule', ''))}), channels "
                      f"{first['channels']} ({md_escape(iv.get('channel_rule', ''))}), positions 0 and each "
                      f"sequence's largest-{md_escape('|h|')} position, on {first['n_sequences']} sequences "
                      f"({first['n_targets']} targets):", "",
                  "| mode | PPL | ± se | x original | ± se | mean NLL |", "|---|---:|---:|---:|---:|---:|"]
        for r in intervene:
            lines.append(f"| {r['mode']} | {fmt(r['ppl'])} | {_se(r, 'ppl')} | {fmt(r['ppl_ratio'], 6)} "
                         f"| {_se(r, 'ppl_ratio')} | {fmt(r['nll_mean'])} |")
        lines += ["", INTERVENE_BARS_NOTE]
    if attention:
        at = info.get("attention") or {}
        per = attention_by_layer(attention)
        bidir = at.get("attention_kind") == "bidirectional"
        queries = ("bidirectional attention (each query sees every real key of its sequence), every real query; "
                   f"position 0 is {md_escape(at.get('first_position', ''))}" if bidir
                   else "causal attention, every query at position >= 1")
        lines += ["", f"Attention (Sun et al. 2024 exp4): share of attention probability per layer, mean over heads "
                      f"(max head in brackets), {queries}; reference layer "
                      f"{at.get('reference_layer')} ({md_escape(at.get('layer_rule', ''))}); "
                      f"{at.get('n_seq_with_massive', 0)} of {at.get('n_sequences', 0)} sequences hold Sun-massive "
                      "positions there.", "",
                  "| layer | share pos 0 | uniform pos 0 | share 0 + peak | uniform 0 + peak | share massive | "
                  "logit pos 0 | logit other |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in per:
            lines.append(f"| {int(r['layer'])} | {fmt(r['attn_share_first'], 3)} ({fmt(r['max_head_share_first'], 3)})"
                         f" | {fmt(r['uniform_share_first'], 3)} | {fmt(r['attn_share_peak'], 3)} | "
                         f"{fmt(r['uniform_share_peak'], 3)} | {fmt(r['attn_share_massive'], 3)} | "
                         f"{fmt(r['logit_first_mean'], 3)} | {fmt(r['logit_other_mean'], 3)} |")
    return lines
