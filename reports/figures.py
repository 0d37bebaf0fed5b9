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


# Below this largest exact-zero fraction the activation is taken as smooth (GELU, SiLU): exact zeros
# are then rounding accidents and the near-zero fractions are what the sparsity figures should show.
SMOOTH_ZERO_FRAC = 0.01
SMOOTH_NOTE = "smooth activation: exact zeros mean little here; read the near-zero (|a| <= eps) bars"


def is_smooth(df: pd.DataFrame) -> bool:
    """True when no layer has as much as ``SMOOTH_ZERO_FRAC`` exact zeros (a smooth activation)."""
    z = pd.to_numeric(df.get("zero_frac", pd.Series(dtype=float)), errors="coerce").dropna()
    return not z.empty and float(z.max()) < SMOOTH_ZERO_FRAC


def percent_ylim(ax, values_pct) -> None:
    """y from 0 to the largest of ``values_pct`` (in %) plus 15 % headroom, at least 1 % and at most 100 %."""
    import numpy as np

    v = np.asarray(pd.to_numeric(pd.Series(np.ravel(values_pct)), errors="coerce").dropna(), dtype=float)
    top = float(v.max()) * 1.15 if v.size else 100.0
    ax.set_ylim(0, min(100.0, max(1.0, top)))


def smooth_note(fig) -> None:
    """The ``SMOOTH_NOTE`` under the panels of ``fig``."""
    fig.text(0.5, -0.01, SMOOTH_NOTE, ha="center", va="top", fontsize=8, style="italic", color="0.25")


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
        bars = dict(error_kw={"ecolor": "0.1", "elinewidth": 0.9, "capsize": 2})  # bootstrap intervals, if any
        ax.bar([i - 0.4 + width / 2 for i in x], 100 * g.zero_frac, width, label="exactly 0",
               yerr=interval_err(g, "zero_frac"), **bars)
        for j, c in enumerate(near):
            ax.bar([i - 0.4 + width * (j + 1.5) for i in x], 100 * g[c], width, label=f"|a| <= {c.split('@')[1]}",
                   yerr=interval_err(g, c), **bars)
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("layer")
        ax.set_ylabel("% of entries")
        percent_ylim(ax, [100 * g.zero_frac] + [100 * g[c] for c in near])
        ax.set_title(kind)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    if is_smooth(df):
        smooth_note(fig)
    n_win = pd.to_numeric(df.get("n_windows", pd.Series(dtype=float)), errors="coerce").max()
    bars_note = (f"\nerror bars: bootstrap interval over {int(n_win)} windows"
                 if interval_err(df, "zero_frac") is not None and pd.notna(n_win) else "")
    fig.suptitle(f"{title}: activation sparsity per layer over {n_tokens} counted tokens{bars_note}")
    fig.tight_layout()
    return save(fig, folder, "sparsity_by_layer")


def interval_err(g: pd.DataFrame, col: str):
    """Error bars in % (``[below, above]``) from ``col``'s interval columns (``probes.uncertainty.bar_column``:
    ``zero_frac_lo``/``_hi``), or None when the table has none (older outputs)."""
    from probes.uncertainty import bar_column

    lo, hi = bar_column(col, "_lo"), bar_column(col, "_hi")
    if lo not in g or hi not in g:
        return None
    v = 100 * pd.to_numeric(g[col], errors="coerce")
    below = (v - 100 * pd.to_numeric(g[lo], errors="coerce")).clip(lower=0).fillna(0)
    above = (100 * pd.to_numeric(g[hi], errors="coerce") - v).clip(lower=0).fillna(0)
    return [below.to_numpy(float), above.to_numpy(float)]


# Colours of layer lines on white: Okabe-Ito without its yellow (low contrast) for a few layers, and for
# more a sequential map with a dark end and no light end (viridis cut at 0.72, before its light green and yellow).
LAYER_COLORS = tuple(c for c in OKABE_ITO if c != "#F0E442")


def layer_cmap():
    """viridis from 0 to 0.72 (dark violet to green, no light green or yellow): every colour reads on white."""
    import matplotlib as mpl
    import numpy as np

    return mpl.colors.ListedColormap(mpl.colormaps["viridis"](np.linspace(0.0, 0.72, 256)), name="viridis_dark")


def layer_colors(n: int) -> list:
    """``n`` layer colours: ``LAYER_COLORS`` when they suffice, else ``layer_cmap`` in layer order."""
    if n <= len(LAYER_COLORS):
        return list(LAYER_COLORS[:n])
    cmap = layer_cmap()
    return [cmap(j / max(1, n - 1)) for j in range(n)]


def layer_key(fig, axes, n_lines: int, max_legend: int = 12, label: str = "layer", cmap=None) -> None:
    """A legend beside the panels for a few lines; a 'layer' colour bar (``cmap``, default viridis) for many."""
    if n_lines <= max_legend:
        handles, labels = axes[-1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        return
    import matplotlib as mpl

    sm = mpl.cm.ScalarMappable(cmap=cmap or "viridis", norm=mpl.colors.Normalize(0, n_lines - 1))
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


def log_colorbar(cb, vmin: float, vmax: float, n: int = 5) -> None:
    """Ticks of a colour bar on a log scale as plain numbers (``3``, ``40``, ``1e+03``), about ``n`` of
    them spread over [vmin, vmax], instead of matplotlib's minor labels such as ``6x10^0``."""
    import numpy as np
    from matplotlib.ticker import NullFormatter, NullLocator

    from reports.numbers import fmt

    if not (vmin > 0 and vmax > vmin):
        return
    ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(vmin, vmax, n)} | {float(f"{vmax:.2g}")})
    ticks = [t for t in ticks if vmin <= t <= vmax * 1.0001] or [vmin, vmax]
    cb.set_ticks(ticks)
    cb.set_ticklabels([fmt(t, 2) for t in ticks])
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.ax.yaxis.set_minor_formatter(NullFormatter())
