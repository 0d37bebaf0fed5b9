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


def plot_alpha_by_layer(df, folder: str | Path) -> list[str]:
    """alpha and sigma_mp of each analysed matrix in checkpoint order (depth), one panel each."""
    fig = new_figure(figsize=(max(6.0, min(18.0, 0.12 * len(df) + 4)), 6))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.93, hspace=0.08)
    ax_a, ax_s = fig.subplots(2, 1, sharex=True)
    depth = np.arange(len(df))
    for flag, marker, label in ((False, "o", "WW layers"), (True, "x", "skipped by WW / split parts")):
        mask = (df["ww_skipped"].astype(bool) | df["non_ww"].astype(bool)).to_numpy() == flag
        if mask.any():
            ax_a.plot(depth[mask], df["alpha"].astype(float).to_numpy()[mask], marker, ms=4, ls="", label=label)
            ax_s.plot(depth[mask], df["sigma_mp"].astype(float).to_numpy()[mask], marker, ms=4, ls="", label=label)
    for y in (2.0, 6.0):
        ax_a.axhline(y, color="grey", lw=0.8, ls=":")
    ax_a.set_ylabel(r"$\alpha$ (power-law exponent)")
    ax_s.set_ylabel(r"$\sigma_{mp}$")
    ax_s.set_xlabel("matrix index in checkpoint order")
    ax_a.legend()
    ax_a.set_title("alpha and sigma_mp by layer (dotted: WW's over/under-trained thresholds)")
    return save_into(fig, Path(folder), "alpha_by_layer")
