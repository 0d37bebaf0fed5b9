"""Matplotlib figures (Agg backend, PNG + SVG) for measure outputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, folder: str | Path, stem: str) -> list[str]:
    folder = Path(folder)
    fig.savefig(folder / f"{stem}.png", dpi=120, bbox_inches="tight")
    fig.savefig(folder / f"{stem}.svg", bbox_inches="tight")
    pyplot().close(fig)
    return [f"{stem}.png", f"{stem}.svg"]


def sparsity_by_layer(df: pd.DataFrame, folder: str | Path, title: str, n_tokens: int) -> list[str]:
    """Per-layer exact-zero and near-zero fractions, one panel per site kind."""
    plt = pyplot()
    kinds = [k for k in ("mlp_post", "mlp_gate_act", "mlp_pre", "custom") if k in set(df.kind)]
    if not kinds:
        return []
    near = sorted((c for c in df.columns if c.startswith("near_zero_frac@")), key=lambda c: float(c.split("@")[1]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        g = df[df.kind == kind].reset_index(drop=True)
        x = range(len(g))
        labels = [str(int(v)) if pd.notna(v) else str(i) for i, v in enumerate(g.layer)]
        width = 0.8 / (1 + len(near))
        ax.bar([i - 0.4 + width / 2 for i in x], 100 * g.zero_frac, width, label="exactly 0")
        for j, c in enumerate(near):
            ax.bar([i - 0.4 + width * (j + 1.5) for i in x], 100 * g[c], width, label=f"|a| <= {c.split('@')[1]}")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("layer")
        ax.set_ylabel("% of entries")
        ax.set_ylim(0, 100)
        ax.set_title(kind)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: activation sparsity per layer over {n_tokens} counted tokens", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "sparsity_by_layer")


def layer_key(fig, axes, n_lines: int, max_legend: int = 12, label: str = "layer") -> None:
    """A legend beside the panels for a few lines; a 'layer' colour bar (viridis order) for many."""
    if n_lines <= max_legend:
        handles, labels = axes[-1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        return
    import matplotlib as mpl

    sm = mpl.cm.ScalarMappable(cmap="viridis", norm=mpl.colors.Normalize(0, n_lines - 1))
    fig.colorbar(sm, ax=list(axes), label=label, fraction=0.03, pad=0.02)
