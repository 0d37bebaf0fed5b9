"""Figures for ``actsparse spectrum``: per-layer ESDs and alpha / sigma_mp against depth.

Each figure is written as PNG and SVG by ``reports.figures.save`` in the common style. We draw on
``matplotlib.figure.Figure`` (``new_figure``), outside pyplot's list of open figures, so a model with
hundreds of matrices leaves no figure open.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from probes.spectrum_fit import mp_density
from reports.figures import new_figure, save_into


def file_stem(name: str) -> str:
    """A file-name-safe version of a tensor name: the name itself when it is safe; otherwise its safe
    characters plus a short hash of the name, so that two tensors ("a/b", "a_b") never share a file and
    no file is hidden (a leading dot) or leaves the folder ("../")."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "layer"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def plot_esd(row: dict[str, Any], evals: np.ndarray, folder: str | Path) -> list[str]:
    """Two panels for one layer: the log-log ESD with the power-law fit from xmin, and the
    rescaled ESD (x = lambda W_scale^2) with the fitted Marchenko-Pastur density and bulk edge
    (for Q = 1, WW's quarter-circle fit on sqrt(x)). Returns the written file names."""
    fig = new_figure(figsize=(11, 4.2))
    fig.subplots_adjust(left=0.085, right=0.98, bottom=0.13, top=0.86, wspace=0.22)
    ax_pl, ax_mp = fig.subplots(1, 2)
    name = row["name"]
    nz = evals[evals > 0]
    if nz.size > 1 and nz.max() > nz.min():
        bins = np.logspace(np.log10(nz.min()), np.log10(nz.max()), 60)
        ax_pl.hist(nz, bins=bins, density=True, histtype="stepfilled", color="C0", alpha=0.6, label="ESD")
    ax_pl.set_xscale("log")
    ax_pl.set_yscale("log")
    alpha, xmin, xmax = row.get("alpha"), row.get("xmin"), row.get("xmax")
    if _finite(alpha) and _finite(xmin) and _finite(xmax) and xmax > xmin:
        # p(x) = (alpha - 1)/xmin (x/xmin)^-alpha, scaled by the tail's share of the ESD.
        x = np.logspace(np.log10(xmin), np.log10(xmax), 100)
        share = np.count_nonzero(nz >= xmin) / max(nz.size, 1)
        ax_pl.plot(x, share * (alpha - 1) / xmin * (x / xmin) ** -alpha, "--", color="C3",
                   label=rf"PL fit $\alpha$={alpha:.3f}, $D$={row.get('D', math.nan):.3f}")
        ax_pl.axvline(xmin, color="C3", lw=1, label=rf"$\lambda_{{min}}$={xmin:.3g}")
    ax_pl.set_xlabel(r"eigenvalue $\lambda$ of $W^TW$")
    ax_pl.set_ylabel("density")
    ax_pl.set_title("log-log ESD")
    ax_pl.legend()

    scale, sigma, Q = row.get("W_scale"), row.get("sigma_mp"), row.get("Q")
    if _finite(scale) and _finite(sigma) and _finite(Q):
        x = evals * scale * scale
        if Q == 1:
            x, label = np.sqrt(x), r"$\sqrt{\lambda}\,W_{scale}$"
        else:
            label = r"$\lambda\,W_{scale}^2$"
        ax_mp.hist(x, bins=100, density=True, histtype="stepfilled", color="C0", alpha=0.6, label="ESD")
        grid = np.linspace(0, x.max(), 500)
        ax_mp.plot(grid, mp_density(grid, sigma, Q), "-", color="C3",
                   label=("quarter circle" if Q == 1 else "MP") + rf" $\sigma_{{mp}}$={sigma:.3f}")
        edge = row["bulk_max"] * scale * scale
        ax_mp.axvline(math.sqrt(edge) if Q == 1 else edge, color="C1", ls="--",
                      label=f"bulk edge, {row.get('num_spikes')} spikes")
        ax_mp.set_xlabel(label)
        ax_mp.legend()
    else:
        ax_mp.text(0.5, 0.5, "no MP fit", ha="center", va="center", transform=ax_mp.transAxes)
    ax_mp.set_title("ESD and Marchenko-Pastur fit")
    fig.suptitle(f"{name}  (N={row['N']}, M={row['M']}, Q={row['Q']:.3g})")
    return [f"esd/{f}" for f in save_into(fig, Path(folder) / "esd", file_stem(name))]


# Matrix roles for the alpha-by-block figure, in legend order: (role, name patterns), first match wins.
# GPT-2 (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), Llama (q/k/v/o/gate/up/down_proj), BERT
# (query, key, value, attention.output.dense, intermediate.dense, output.dense).
ROLE_PATTERNS = (
    ("q", (r"q_proj", r"\.query\b")),
    ("k", (r"k_proj", r"\.key\b")),
    ("v", (r"v_proj", r"\.value\b")),
    ("attn (qkv)", (r"c_attn", r"qkv", r"in_proj")),
    ("o", (r"o_proj", r"attn\.c_proj", r"attention\.output\.dense", r"out_proj")),
    ("gate", (r"gate_proj",)),
    ("up", (r"up_proj", r"mlp\.c_fc", r"intermediate\.dense", r"fc1")),
    ("down", (r"down_proj", r"mlp\.c_proj", r"output\.dense", r"fc2")),
    ("attn", (r"attn", r"attention")),
    ("mlp", (r"mlp", r"ffn", r"feed_forward")),
)
ROLE_MARKERS = {"q": "o", "k": "s", "v": "^", "attn (qkv)": "P", "o": "D", "gate": "v", "up": "<", "down": ">",
                "attn": "p", "mlp": "h", "other": "X"}
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)(?:\.|$)")


def matrix_role(name: str) -> str:
    """The role of a weight matrix by its name (q, k, v, attn (qkv), o, gate, up, down, attn, mlp, other)."""
    for role, patterns in ROLE_PATTERNS:
        if any(re.search(p, name) for p in patterns):
            return role
    return "other"


def block_index(name: str) -> int | None:
    """The transformer block of a tensor name (``h.3.``, ``layers.3.``, ``layer.3.``), None when it has none."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def plot_alpha_by_layer(df, folder: str | Path) -> list[str]:
    """alpha (and sigma_mp when present) of each analysed matrix by block, one marker and colour per role;
    tensors outside the blocks (embeddings, heads) at an "other" position right of the last block."""
    from reports.figures import LAYER_COLORS, panel_size  # Okabe-Ito without its low-contrast yellow

    names = [str(n) for n in df["name"]]
    blocks = [block_index(n) for n in names]
    roles = [matrix_role(n) for n in names]
    known = [b for b in blocks if b is not None]
    n_blocks = max(known) + 1 if known else 0
    other_x = n_blocks + (1 if n_blocks else 0)  # a gap between the last block and "other"
    order = [r for r, _ in ROLE_PATTERNS] + ["other"]
    present = [r for r in order if r in roles]
    # Dodge the roles of one block side by side so that markers do not hide each other.
    dodge = {r: (i - (len(present) - 1) / 2) * min(0.12, 0.7 / max(len(present), 1)) for i, r in enumerate(present)}
    x = np.array([(other_x if b is None else b) + dodge[r] for b, r in zip(blocks, roles)], dtype=float)
    role_arr = np.array(roles)
    skipped = np.zeros(len(df), dtype=bool)
    for col in ("ww_skipped", "non_ww"):
        if col in df:
            skipped |= df[col].fillna(False).astype(bool).to_numpy()
    has_sigma = "sigma_mp" in df and df["sigma_mp"].astype(float).notna().any()
    extra = 1.3 + min(8.0, max(0.0, 0.2 * (other_x + 1) - 2.5))  # the role legend, and room for many blocks
    fig = new_figure(figsize=panel_size(1, 2 if has_sigma else 1, extra_width=extra))
    axes = list(np.atleast_1d(fig.subplots(2 if has_sigma else 1, 1, sharex=True)))
    cols = [("alpha", r"alpha"), ("sigma_mp", r"$\sigma_{mp}$")][: len(axes)]
    for ax, (col, ylabel) in zip(axes, cols):
        y = df[col].astype(float).to_numpy()
        for i, role in enumerate(present):
            m = role_arr == role
            style = dict(marker=ROLE_MARKERS[role], color="0.4" if role == "other" else LAYER_COLORS[i % len(LAYER_COLORS)], ls="", ms=5)
            ax.plot(x[m & ~skipped], y[m & ~skipped], label=role, **style)
            if (m & skipped).any():
                ax.plot(x[m & skipped], y[m & skipped], mfc="none", **style)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhspan(2.0, 6.0, color="grey", alpha=0.12, lw=0, label="WW alpha band 2-6")
    ticks = list(range(n_blocks)) + ([other_x] if (np.array(blocks, dtype=object) == None).any() else [])  # noqa: E711
    labels = [str(t) for t in range(n_blocks)] + (["other"] if len(ticks) > n_blocks else [])
    axes[-1].set_xticks(ticks, labels)
    if len(ticks) > 24:
        k = -(-len(ticks) // 24)
        for i, t in enumerate(axes[-1].get_xticklabels()):
            t.set_visible(i % k == 0 or labels[i] == "other")
    axes[-1].set_xlabel("block (0-based)")
    handles, lab = axes[0].get_legend_handles_labels()
    if skipped.any():
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="o", mfc="none", color="grey", ls=""))
        lab.append("skipped by WW / split part")
    fig.legend(handles, lab, title="matrix role", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    axes[0].set_title("alpha" + (" and sigma_mp" if has_sigma else "") + " by block (shaded: WW alpha band 2-6)")
    fig.tight_layout()
    return save_into(fig, Path(folder), "alpha_by_layer")
