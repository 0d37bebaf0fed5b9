"""Activation sparsity (``measure``): Lazy Neuron, ProSparse, Bug-or-Feature^2 (README "Activation sparsity columns")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import (is_smooth, kind_rows, layer_key, layer_labels, percent_ylim, pyplot, save_into, site_kinds,
                             smooth_note, tick_labels)
from probes.uncertainty import bar_column
from reports.sections import FigureSpec, ReportSection, TableSpec

SUMMARY = TableSpec(("kind", "metric"), ("n_layers",), value_cols=("mean_over_layers", "width_weighted_mean"))


def eps_list(df: pd.DataFrame | None) -> str:
    if df is None:
        return "the eps grid"
    eps = sorted((float(c.split("@")[1]) for c in df.columns if c.startswith("near_zero_frac@")))
    return "{" + ", ".join(f"{e:g}" for e in eps) + "}" if eps else "the eps grid"


def _n_tokens(manifest: dict[str, Any]) -> int:
    n = (manifest.get("measurement") or {}).get("n_counted_tokens")
    return int(n) if isinstance(n, (int, float)) else 0


def draw_sparsity_by_layer(table, folder, title, manifest) -> list[str]:
    from reports.figures import sparsity_by_layer

    return sparsity_by_layer(table("sparsity"), folder, title, _n_tokens(manifest))


def draw_sparsity_vs_threshold(table, folder, title, manifest) -> list[str]:
    return plot_sparsity_vs_threshold(table("sparsity"), Path(folder), title)


def draw_nonzero_per_token(table, folder, title, manifest) -> list[str]:
    return plot_nonzero_per_token(table("sparsity"), Path(folder), title)


def plot_sparsity_vs_threshold(df: pd.DataFrame, folder: Path, title: str) -> list[str]:
    """% of entries with |a| <= eps against eps (log), one line per layer; exact zeros at the left."""
    near = sorted((c for c in df.columns if c.startswith("near_zero_frac@")), key=lambda c: float(c.split("@")[1]))
    if not near or "zero_frac" not in df:
        return []
    import numpy as np

    plt = pyplot()
    kinds = site_kinds(df)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds) + 1.6, 3.9), squeeze=False)
    eps = np.array([float(c.split("@")[1]) for c in near])
    x0 = eps.min() / 10  # where the exact-zero marker sits
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        g = df if kind == "all" else df[df["kind"].astype(str) == kind]
        g = g.reset_index(drop=True)
        labels = layer_labels(g)
        for i, r in g.iterrows():
            col = cmap(i / max(1, len(g) - 1))
            y = 100 * np.array([float(r[c]) for c in near])
            ax.plot(eps, y, "o-", color=col, ms=3.5, lw=1.2, label=f"layer {labels[i]}")
            ax.plot([x0], [100 * float(r["zero_frac"])], "o", mfc="none", color=col, ms=5)
            ax.plot([x0, eps[0]], [100 * float(r["zero_frac"]), y[0]], ":", color=col, lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(x0 / 2, eps.max() * 2)
        ticks = [x0, *eps]
        ax.set_xticks(ticks, ["= 0"] + [f"{e:g}" for e in eps], fontsize=8)
        ax.minorticks_off()
        percent_ylim(ax, [100 * g["zero_frac"].astype(float)] + [100 * g[c].astype(float) for c in near])
        ax.set_xlabel("threshold eps on |a|")
        ax.set_ylabel("% of entries with |a| <= eps")
        ax.set_title(kind, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: sparsity vs threshold", fontsize=10)
    fig.tight_layout()
    if is_smooth(df):
        smooth_note(fig)
    layer_key(fig, axes[0], max(len(kind_rows(df, k)) for k in kinds))
    return save_into(fig, folder, "sparsity_vs_threshold")


def plot_nonzero_per_token(df: pd.DataFrame, folder: Path, title: str) -> list[str]:
    """Mean % non-zero per token per layer with the p05-p95 band, and dead / always-on shares."""
    if "nonzero_pct_per_token" not in df:
        return []
    plt = pyplot()
    kinds = site_kinds(df)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        g = (df if kind == "all" else df[df["kind"].astype(str) == kind]).reset_index(drop=True)
        x = list(range(len(g)))
        y = g["nonzero_pct_per_token"].astype(float)
        ax.plot(x, y, "o-", color="C0", label="mean % non-zero per token", clip_on=False, zorder=3)
        visible = 0.5  # % on a 0-100 axis: anything smaller is not seen, so it gets no legend entry
        lo, hi = bar_column("nonzero_pct_per_token", "_lo"), bar_column("nonzero_pct_per_token", "_hi")
        if lo in g and hi in g:  # the mean's bootstrap interval over windows (probes.uncertainty)
            err = [(y - g[lo].astype(float)).clip(lower=0).fillna(0), (g[hi].astype(float) - y).clip(lower=0).fillna(0)]
            if float(max(err[0].max(), err[1].max())) >= visible / 2:
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.1", elinewidth=0.9, capsize=2.5,
                            label="interval of the mean over windows")
        lo, hi = "nonzero_pct_per_token_p05_hist", "nonzero_pct_per_token_p95_hist"
        if lo in g and hi in g and float((g[hi].astype(float) - g[lo].astype(float)).max()) >= visible:
            ax.fill_between(x, g[lo].astype(float), g[hi].astype(float), color="C0", alpha=0.2,
                            label="5th-95th percentile over tokens")
        hidden = []
        for col, dx, color, name in (("dead_frac", -0.15, "C3", "dead neurons %"),
                                     ("always_on_frac", 0.15, "C2", "always-on neurons %")):
            if col not in g:
                continue
            v = 100 * g[col].astype(float)
            if float(v.max()) >= visible:
                ax.bar([i + dx for i in x], v, 0.3, color=color, alpha=0.7, label=name)
            else:
                hidden.append(f"{name.replace(' %', '')}: {'none' if float(v.max()) == 0 else 'below 0.5 %'}")
        if hidden:
            ax.text(0.01, 0.01, "; ".join(hidden), transform=ax.transAxes, fontsize=7, color="0.3", va="bottom")
        tick_labels(ax, layer_labels(g))
        ax.set_xlabel("layer")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(kind, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: non-zero activations per token", fontsize=10)
    fig.tight_layout()
    seen: dict = {}
    for ax in axes[0]:  # every panel's entries, once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(seen), 3), fontsize=7, frameon=False)
    return save_into(fig, folder, "nonzero_per_token")


SECTION = ReportSection(
    name="sparsity",
    manifest_key="measurement",
    prefixes=(("sparsity", "measurement"), ("nonzero", "measurement"), ("summary", "measurement")),
    tables={"sparsity": TableSpec(("canonical_name", "kind", "layer"), ("width", "n_chunks", "n_windows")),
            "summary": SUMMARY},
    figures=(
        FigureSpec("sparsity_by_layer", lambda c: "Activation sparsity per layer at each MLP activation site (the "
                   "input of the output projection; one panel per site kind): % of entries exactly 0 and with "
                   f"|a| <= eps for eps in {c.get('eps', 'the eps grid')}. Error bars (outputs that have them): "
                   "percentile bootstrap interval over windows (level and resamples in the manifest's "
                   "measurement.uncertainty).", ("sparsity",),
                   "reports.sections.sparsity:draw_sparsity_by_layer"),
        FigureSpec("sparsity_vs_threshold", lambda c: "Sparsity against the threshold: % of activation entries with "
                   f"|a| <= eps for eps in {c.get('eps', 'the eps grid')} (log x axis), one line per layer; the "
                   "open marker on the left axis is the exact-zero fraction.", ("sparsity",),
                   "reports.sections.sparsity:draw_sparsity_vs_threshold"),
        FigureSpec("nonzero_per_token", lambda c: "Per-token activation density (Lazy Neuron): mean % of non-zero "
                   "entries per token at each layer, with the 5th-95th percentile range over tokens (from a fixed "
                   "1000-bin histogram), the bootstrap interval over windows of the mean (error bars, where the "
                   "output has them), and the dead / always-on neuron shares.", ("sparsity",),
                   "reports.sections.sparsity:draw_nonzero_per_token"),
    ),
)
