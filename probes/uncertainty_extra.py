"""Error-bar helpers shared by massive, pplp and cliff (issue 15 part 5), on ``probes.uncertainty``'s public API.

``ratio_bars`` turns per-window numerators and denominators of several ratio columns into the
``X_se`` (analytic, ``ratio_se``: the linearised ratio estimator) and ``X_lo`` / ``X_hi`` (percentile
bootstrap over windows, ``bootstrap_ratios``: every column from the same seeded resamples) columns
that ``reports.compare`` reads. A plain mean of per-window values is the ratio with denominator 1.
``exp_ratio_bars`` does the same for exp(sum y / sum n) (a perplexity ratio from per-window loss
differences): se by the delta method, interval by the bootstrap of the exponentiated resampled ratio.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from probes.uncertainty import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, bar_column, bootstrap, bootstrap_ratios,
                                percentile_interval, ratio_se, weighted_ratios_se)


def ratio_bars(names: Sequence[str], nums, dens, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
               level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """``{bar_column(X, '_se'|'_lo'|'_hi'): value}`` for each X of ``names``: X = sum_i nums[i, j] / sum_i
    dens[i, j] over windows i (``[m, J]`` arrays aligned by window). NaN with fewer than 2 windows."""
    import numpy as np

    y = np.asarray(nums, dtype=float).reshape(len(nums), -1) if len(nums) else np.zeros((0, len(names)))
    n = np.asarray(dens, dtype=float).reshape(len(dens), -1) if len(dens) else np.zeros((0, len(names)))
    lo, hi, _, _ = bootstrap_ratios(y, n, n_resamples=n_resamples, seed=seed, level=level)
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        out[bar_column(name, "_se")] = float(ratio_se(y[:, j], n[:, j])) if len(y) else math.nan
        out[bar_column(name, "_lo")] = float(lo[j]) if len(lo) else math.nan
        out[bar_column(name, "_hi")] = float(hi[j]) if len(hi) else math.nan
    return out


def mean_of_ratios_bars(name: str, nums, dens, weights, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                        level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """Error bars of ``sum_l w_l sum_i nums[i, l] / sum_i dens[i, l]`` (a mean over layers measured on the
    same windows; ``weighted_ratios_se`` keeps their correlation) and of each layer's ratio from the same
    resamples: ``({X_se, X_lo, X_hi}, per-layer (se [L], lo [L], hi [L]))``."""
    import numpy as np

    y, n = np.asarray(nums, dtype=float), np.asarray(dens, dtype=float)
    w = np.asarray(weights, dtype=float)
    lo, hi, lo_w, hi_w = bootstrap_ratios(y, n, [w], n_resamples=n_resamples, seed=seed, level=level)
    out = {bar_column(name, "_se"): float(weighted_ratios_se(y, n, w)),
           bar_column(name, "_lo"): float(lo_w[0]), bar_column(name, "_hi"): float(hi_w[0])}
    se = np.array([ratio_se(y[:, j], n[:, j]) for j in range(y.shape[1])])
    return out, (se, lo, hi)


def exp_ratio_bars(name: str, y, n, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """Error bars of R = exp(sum_i y_i / sum_i n_i) over windows i: ``X_se`` = R se(sum y / sum n) (delta
    method, ``ratio_se``), ``X_lo`` / ``X_hi`` the percentile interval of exp(resampled ratio)."""
    import numpy as np

    y, n = np.asarray(y, dtype=float), np.asarray(n, dtype=float)
    keep = n != 0
    y, n = y[keep], n[keep]
    nan = {bar_column(name, s): math.nan for s in ("_se", "_lo", "_hi")}
    if len(n) < 2:
        return nan
    r = math.exp(float(y.sum() / n.sum()))

    def stat(c):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.exp((c @ y) / (c @ n))

    lo, hi, _ = percentile_interval(bootstrap(len(n), stat, n_resamples, seed), level)
    return {bar_column(name, "_se"): r * float(ratio_se(y, n)), bar_column(name, "_lo"): float(lo),
            bar_column(name, "_hi"): float(hi)}


def interval(replicates, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """``(lo, hi)``: the percentile interval of finite bootstrap replicates (NaN with fewer than 2)."""
    lo, hi, _ = percentile_interval(replicates, level)
    return float(lo), float(hi)


def replicate_counts(m: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Any:
    """The bootstrap count matrix ``[n_resamples, m]`` (``probes.uncertainty.bootstrap``'s resamples, the same
    for the same m and seed), for statistics that must be recomputed resample by resample."""
    import numpy as np

    if m < 2 or n_resamples < 1:
        return np.zeros((0, m))
    return bootstrap(m, lambda c: c, n_resamples, seed).reshape(-1, m)
