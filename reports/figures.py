"""Matplotlib figures: the one style, the one saver (PNG + SVG), and the measure figures.

Every figure of every command is made after ``pyplot()`` or ``new_figure()`` (which apply ``STYLE``)
and written by ``save`` (PNG at ``DPI`` and SVG, tight bounding box), so sizes, fonts, colours and
resolution agree between commands and bundles. Colours: the Okabe-Ito palette (safe for the common
colour-vision deficiencies) as the colour cycle, so ``"C0"``, ``"C1"``... name its colours; ordered
series (layers) use viridis, magnitudes magma.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DPI = 120
# One panel, in inches; a figure of n panels side by side is n panel widths wide (``panel_size``).
PANEL = (5.2, 3.8)
# Okabe & Ito (2008), ordered so that C0-C3 keep the roles of matplotlib's defaults (blue, orange,
# green, red); yellow and black last.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
STYLE = {
    "figure.figsize": PANEL,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 10,
    "grid.alpha": 0.3,
    "image.cmap": "viridis",
    "svg.hashsalt": "actsparse",  # the same figure gives the same SVG ids from run to run
}


def apply_style() -> None:
    """Set ``STYLE`` (and the Okabe-Ito colour cycle) in matplotlib's rcParams."""
    import matplotlib
    from cycler import cycler

    matplotlib.rcParams.update(STYLE)
    matplotlib.rcParams["axes.prop_cycle"] = cycler(color=list(OKABE_ITO))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), with ``STYLE`` applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apply_style()
    return plt


def new_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` outside pyplot's figure list (nothing to close), with ``STYLE`` applied."""
    from matplotlib.figure import Figure

    apply_style()
    return Figure(**kwargs)


def panel_size(ncols: int = 1, nrows: int = 1, extra_width: float = 0.0) -> tuple[float, float]:
    """Figure size for ``nrows`` x ``ncols`` panels of ``PANEL`` size, plus ``extra_width`` inches (a legend)."""
    return (PANEL[0] * ncols + extra_width, PANEL[1] * nrows)


def save_into(fig, folder: str | Path, stem: str) -> list[str]:
    """``save`` into ``folder``, made first if it does not exist."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return save(fig, folder, stem)


def save(fig, folder: str | Path, stem: str) -> list[str]:
    """The one figure writer: ``stem``.png (``DPI``) and ``stem``.svg in ``folder``; closes ``fig``."""
    folder = Path(folder)
    try:
        fig.savefig(folder / f"{stem}.png", dpi=DPI, bbox_inches="tight")
        fig.savefig(folder / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None})
    finally:
        if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: drop it from pyplot's list
            pyplot().close(fig)
    return [f"{stem}.png", f"{stem}.svg"]


def sparsity_by_layer(df: pd.DataFrame, folder: str | Path, title: str, n_tokens: int) -> list[str]:
    """Per-layer exact-zero and near-zero fractions, one panel per site kind."""
    plt = pyplot()
    kinds = [k for k in ("mlp_post", "mlp_gate_act", "mlp_pre", "custom") if k in set(df.kind)]
    if not kinds:
        return []
    near = sorted((c for c in df.columns if c.startswith("near_zero_frac@")), key=lambda c: float(c.split("@")[1]))
    fig, axes = plt.subplots(1, len(kinds), figsize=panel_size(len(kinds)), squeeze=False)
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
    axes[0][0].legend()
    fig.suptitle(f"{title}: activation sparsity per layer over {n_tokens} counted tokens")
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


# ---- helpers shared by the per-site figures of every section
def layer_labels(g: pd.DataFrame) -> list[str]:
    if "layer" in g and g["layer"].notna().all():
        return [str(int(v)) for v in g["layer"]]
    return [str(n) for n in g.get("canonical_name", pd.Series(range(len(g))))]


def site_kinds(df: pd.DataFrame) -> list[str]:
    if "kind" not in df:
        return ["all"]
    return list(dict.fromkeys(str(k) for k in df["kind"]))


def kind_rows(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    return df if kind == "all" else df[df["kind"].astype(str) == kind]


def tick_labels(ax, labels: list[str]) -> None:
    long = len(labels) > 16 or max((len(x) for x in labels), default=0) > 4
    ax.set_xticks(range(len(labels)), labels, rotation=90 if long else 0, fontsize=7 if long else 9)
    if len(labels) > 40:  # keep every k-th label readable
        k = -(-len(labels) // 40)
        for i, t in enumerate(ax.get_xticklabels()):
            t.set_visible(i % k == 0)
