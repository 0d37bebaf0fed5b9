"""Error bars from the data: per-window values, a standard error over windows and a bootstrap interval.

None of the seed papers gives an uncertainty for its numbers. actsparse treats the corpus windows
(one row of a batch: a token window, an image, a sample) as the independent units: statistics
of tokens of one window are correlated, windows much less so. Every helper here is generic: a
probe (or an analysis) keeps a few numbers per window, and these functions turn them into

- ``*_se``: an analytic standard error over windows (no randomness);
- ``*_lo`` / ``*_hi``: a percentile bootstrap interval over windows (seeded, ``DEFAULT_RESAMPLES``
  resamples, level ``DEFAULT_LEVEL``).

The estimators
--------------
Most headline numbers are **ratios of sums over windows**: ``R = sum_i y_i / sum_i n_i`` (zero
entries over entries, chunk sparsity sum over chunks). Its standard error is the cluster
(linearisation, delta-method) one, the ratio estimator's textbook variance (Cochran, *Sampling
Techniques*, 3rd ed., section 6.4, with the m/(m-1) small-sample factor)::

    se(R) = sqrt( m/(m-1) * sum_i (y_i - R n_i)^2 ) / sum_i n_i

over the m windows with ``n_i > 0``. With equal ``n_i`` it is the sample standard deviation of
the per-window ratios over sqrt(m). A **weighted sum of ratios** ``M = sum_l w_l R_l`` (the mean
of a metric over layers, each layer measured on the same windows) has the linearised per-window
influence ``e_i = sum_l w_l (y_il - R_l n_il) / N_l`` (``N_l = sum_i n_il``) and
``se(M) = sqrt(m/(m-1) * sum_i e_i^2)``: layers measured on the same windows are correlated, and
this keeps the correlation. A **plain mean** of per-window values is the ratio with ``n_i = 1``.

The bootstrap resamples windows with replacement (``numpy.random.default_rng(seed)``, a
multinomial count vector per resample, in blocks of ``BLOCK`` resamples so that memory stays
O(BLOCK x windows)), recomputes the statistic from the resampled sums, and reports the
``(1 - level)/2`` and ``(1 + level)/2`` percentiles (numpy's linear interpolation) of the
resampled statistics. Resamples whose statistic is undefined (a zero denominator) are dropped.
With few windows (the goldens use 4) the percentile interval is too narrow; the se has the
m/(m-1) factor but is rough too: read error bars from runs with tens of windows or more.

Merging (shards, torchrun ranks)
--------------------------------
``WindowValues`` keeps the values keyed by a **global window index**: ``merge`` concatenates, and
``arrays()`` sorts by index and adds up entries of the same index (a site called twice in one
forward). So a run split over shards gives the same arrays, the same se and the same bootstrap
interval (same seed) as one pass, whatever the order in which the shards were merged. A probe
that is not told the global index (``WindowTags``) numbers windows in the order it sees them;
merging then appends the other probe's windows after its own.

Memory: 8 bytes per field per window per site (a float64 row per window), O(windows), not O(tokens).

How another analysis uses it (gradients, massive, pplp, curve/cliff): keep a ``WindowValues``
(numerator and denominator fields of each headline ratio, or one value per window) in the probe
state, tag windows with ``WindowTags`` where the batches are made, and call ``ratio_se`` /
``bootstrap_ratios`` (or ``bootstrap`` with any statistic of resample counts) in ``to_row``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_Z = 1.96  # two-sided 95 % normal quantile: compare's "within noise" rule
BLOCK = 100  # resamples drawn at a time
SUFFIXES = ("_se", "_lo", "_hi")


# --------------------------------------------------------------------------------------------- storage
class WindowTags:
    """The global window indices of the batch being run (set by ``follow``, read by probes' ``update``).

    Hooks run inside the model's forward of one batch, so while a batch is being run ``ids`` are its
    rows' global indices. ``follow(batches, ids, batch_size)`` yields the batches unchanged and sets
    ``ids`` before each one (``batch_size`` rows a batch, the last may be short).
    """

    def __init__(self) -> None:
        self.ids: list[int] | None = None

    def follow(self, batches: Iterable[Any], ids: Sequence[int], batch_size: int) -> Iterator[Any]:
        bs = max(1, int(batch_size))
        for k, batch in enumerate(batches):
            self.ids = list(ids[k * bs:(k + 1) * bs])
            yield batch
        self.ids = None


class WindowValues:
    """Mergeable per-window values: a float64 row of ``fields`` per window, keyed by a window index.

    ``add(ids, values)``: ``ids`` ``[B]`` (ints or a tensor), ``values`` ``[B, F]`` (torch or numpy,
    any device; kept as given until ``arrays()``). ``ids=None``: the next indices in arrival order.
    The state is a plain dict of lists (``state``; pass a probe's own dict to share it), so
    ``probes.distributed.probe_to_cpu`` moves it to the CPU with the rest of a probe.
    """

    def __init__(self, fields: Sequence[str], state: dict[str, Any] | None = None):
        self.fields = tuple(fields)
        self.state: dict[str, Any] = state if state is not None else new_state()

    def __len__(self) -> int:
        return len(self.arrays()[0])

    def add(self, ids, values) -> None:
        import numpy as np

        n = int(values.shape[0])
        if n == 0:
            return
        if values.shape[1] != len(self.fields):
            raise ValueError(f"{values.shape[1]} values per window, expected {len(self.fields)} ({self.fields})")
        if ids is None:
            ids = np.arange(self.state["next"], self.state["next"] + n, dtype=np.int64)
        elif len(ids) != n:
            raise ValueError(f"{len(ids)} window ids for {n} windows")
        else:
            ids = np.asarray([int(i) for i in ids], dtype=np.int64) if not hasattr(ids, "detach") \
                else ids.detach().cpu().numpy().astype(np.int64)
        self.state["ids"].append(ids)
        self.state["values"].append(values.detach() if hasattr(values, "detach") else np.asarray(values, float))
        self.state["next"] = max(self.state["next"], int(ids.max()) + 1)

    def merge(self, other: "WindowValues", offset_arrival: bool = False) -> "WindowValues":
        """Append ``other``'s windows. ``offset_arrival``: both numbered by arrival order, so shift
        ``other``'s indices past this one's (concatenation); else indices are global and kept."""
        import numpy as np

        if other.fields != self.fields:
            raise ValueError(f"cannot merge window values of fields {other.fields} into {self.fields}")
        shift = self.state["next"] if offset_arrival else 0
        for ids, vals in zip(other.state["ids"], other.state["values"]):
            self.state["ids"].append(np.asarray(ids, dtype=np.int64) + shift)
            self.state["values"].append(vals)
        self.state["next"] = max(self.state["next"], other.state["next"] + shift)
        return self

    def arrays(self):
        """``(ids [m], values [m, F])`` as numpy, sorted by window index, rows of one index added up."""
        import numpy as np

        if not self.state["ids"]:
            return np.zeros(0, dtype=np.int64), np.zeros((0, len(self.fields)))
        ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in self.state["ids"]])
        vals = np.concatenate([_numpy(v) for v in self.state["values"]], axis=0)
        uniq, inv = np.unique(ids, return_inverse=True)
        if len(uniq) == len(ids):
            order = np.argsort(ids, kind="stable")
            return ids[order], vals[order]
        out = np.zeros((len(uniq), vals.shape[1]))
        np.add.at(out, inv, vals)
        return uniq, out

    def column(self, name: str):
        return self.arrays()[1][:, self.fields.index(name)]


def new_state() -> dict[str, Any]:
    """An empty ``WindowValues`` state: window indices and value rows per ``add``, the next arrival index."""
    return {"ids": [], "values": [], "next": 0}


def _numpy(v):
    import numpy as np

    if hasattr(v, "detach"):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=float)


def align(ids_list: Sequence[Any], values_list: Sequence[Any]):
    """Per-window arrays of several sites on the union of their window indices (0 where a site has
    none): ``(ids [m], [values [m, ...] per site])``, e.g. to bootstrap a mean over layers."""
    import numpy as np

    if not ids_list:
        return np.zeros(0, dtype=np.int64), []
    union = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in ids_list]))
    out = []
    for ids, vals in zip(ids_list, values_list):
        vals = np.asarray(vals, dtype=float)
        full = np.zeros((len(union),) + vals.shape[1:])
        full[np.searchsorted(union, ids)] = vals
        out.append(full)
    return union, out


# --------------------------------------------------------------------------------------------- analytic
def ratio_se(num, den) -> float:
    """Standard error of ``sum(num) / sum(den)`` over windows (linearised ratio estimator, see the
    module docstring). Windows with ``den == 0`` carry no information and are left out; NaN with
    fewer than 2 windows left."""
    import numpy as np

    y, n = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    keep = n != 0
    y, n = y[keep], n[keep]
    m = len(n)
    if m < 2:
        return math.nan
    big_n = n.sum()
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite window values (fp16 overflow): NaN, quietly
        r = y.sum() / big_n
        resid = y - r * n
        return math.sqrt(m / (m - 1) * float(np.dot(resid, resid))) / abs(big_n)


def mean_se(values) -> float:
    """Standard error of the mean of per-window values: sample sd (ddof 1) / sqrt(m); NaN values dropped."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return math.nan
    return float(v.std(ddof=1) / math.sqrt(len(v)))


def weighted_ratios_se(nums, dens, weights) -> float:
    """Standard error of ``sum_l w_l * sum_i nums[i, l] / sum_i dens[i, l]`` over windows i, the rows
    of ``nums``/``dens`` (``[m, L]``, aligned by window: ``align``). Layers whose total denominator
    is 0 must have weight 0."""
    import numpy as np

    y, n = np.asarray(nums, dtype=float), np.asarray(dens, dtype=float)
    w = np.asarray(weights, dtype=float)
    keep = (n != 0).any(axis=1)
    y, n = y[keep], n[keep]
    m = len(n)
    if m < 2:
        return math.nan
    big_n = n.sum(axis=0)
    safe = np.where(big_n != 0, big_n, 1.0)
    r = y.sum(axis=0) / safe
    e = ((y - r * n) / safe) @ np.where(big_n != 0, w, 0.0)
    return math.sqrt(m / (m - 1) * float(np.dot(e, e)))


def within_noise(diff: float, se_a: float, se_b: float, z: float = DEFAULT_Z) -> bool | None:
    """``|diff| <= z * sqrt(se_a^2 + se_b^2)``; None when either se is missing (NaN)."""
    if diff is None or se_a is None or se_b is None:
        return None
    if any(isinstance(v, float) and math.isnan(v) for v in (diff, se_a, se_b)):
        return None
    return abs(diff) <= z * math.sqrt(se_a * se_a + se_b * se_b)


# --------------------------------------------------------------------------------------------- bootstrap
def resample_counts(m: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    block: int = BLOCK) -> Iterator[Any]:
    """Blocks of bootstrap count matrices ``[b, m]`` (how often each window is drawn; rows sum to m),
    ``n_resamples`` rows in all, from ``numpy.random.default_rng(seed)``: the same seed and m give
    the same resamples."""
    for c in _count_blocks(int(m), int(n_resamples), int(seed), int(block)):
        yield c.astype(float)


@functools.lru_cache(maxsize=2)
def _count_blocks(m: int, n_resamples: int, seed: int, block: int) -> tuple[Any, ...]:
    # Cached: every column (and every layer) of one run is resampled with the same windows, and
    # drawing the counts costs far more than using them (uint32: 4 bytes x n_resamples x m).
    import numpy as np

    rng = np.random.default_rng(seed)
    out, done = [], 0
    p = np.full(m, 1.0 / m) if m else np.zeros(0)
    while done < n_resamples:
        b = min(block, n_resamples - done)
        out.append(rng.multinomial(m, p, size=b).astype(np.uint32))
        done += b
    return tuple(out)


def bootstrap(m: int, statistic: Callable[[Any], Any], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
    """The bootstrap replicates of ``statistic(counts [b, m]) -> [b] or [b, K]`` (counts from
    ``resample_counts``): ``[n_resamples]`` or ``[n_resamples, K]``. A statistic of weighted sums,
    e.g. ``lambda w: (w @ y) / (w @ n)``, runs on a whole block at once."""
    import numpy as np

    if m < 2 or n_resamples < 1:
        return np.zeros((0,))
    return np.concatenate([np.asarray(statistic(w), dtype=float) for w in resample_counts(m, n_resamples, seed)],
                          axis=0)


@dataclass(frozen=True)
class Interval:
    se: float  # the analytic standard error
    lo: float
    hi: float


def percentile_interval(replicates, level: float = DEFAULT_LEVEL):
    """``(lo, hi, sd)`` per column of ``replicates`` ``[B]`` or ``[B, K]``: the (1-level)/2 and (1+level)/2
    percentiles and the sd over finite replicates (NaN where fewer than 2 are finite)."""
    import numpy as np

    r = np.asarray(replicates, dtype=float)
    squeeze = r.ndim == 1
    if squeeze:
        r = r[:, None]
    lo, hi, sd = [], [], []
    for j in range(r.shape[1]):
        v = r[:, j]
        v = v[np.isfinite(v)]
        if len(v) < 2:
            lo.append(math.nan), hi.append(math.nan), sd.append(math.nan)
            continue
        q = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
        lo.append(float(q[0])), hi.append(float(q[1])), sd.append(float(v.std(ddof=1)))
    if squeeze:
        return lo[0], hi[0], sd[0]
    return np.array(lo), np.array(hi), np.array(sd)


def bootstrap_ratios(nums, dens, weights: Sequence[Sequence[float]] = (), n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, level: float = DEFAULT_LEVEL):
    """Percentile intervals of the ratios ``sum_i nums[i, l] / sum_i dens[i, l]`` (one per column l of
    ``[m, L]`` arrays aligned by window) and of weighted sums of them (one per row of ``weights``),
    all from the same resamples of the windows.

    Returns ``(lo [L], hi [L], lo_w [W], hi_w [W])`` (NaN with fewer than 2 windows)."""
    import numpy as np

    y, n = np.asarray(nums, dtype=float), np.asarray(dens, dtype=float)
    if y.ndim == 1:
        y, n = y[:, None], n[:, None]
    w = np.asarray(weights, dtype=float).reshape(-1, y.shape[1]) if len(weights) else np.zeros((0, y.shape[1]))
    keep = (n != 0).any(axis=1)
    y, n = y[keep], n[keep]
    m, L = y.shape
    nan_l, nan_w = np.full(L, math.nan), np.full(len(w), math.nan)
    if m < 2 or n_resamples < 1:
        return nan_l, nan_l.copy(), nan_w, nan_w.copy()

    def stat(c):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (c @ y) / (c @ n)  # [b, L]; a layer with no denominator in a resample: NaN
        if len(w):
            # a weighted sum over layers is undefined in a resample where a weighted layer is
            rw = np.where(np.isnan(r), 0.0, r) @ w.T
            bad = np.isnan(r) @ (w.T != 0)
            rw[bad > 0] = math.nan
            return np.concatenate([r, rw], axis=1)
        return r

    reps = bootstrap(m, stat, n_resamples, seed)
    lo, hi, _ = percentile_interval(reps, level)
    return lo[:L], hi[:L], lo[L:], hi[L:]


def interval_of_mean(values, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = DEFAULT_LEVEL) -> Interval:
    """Analytic se and percentile bootstrap interval of the mean of per-window values (NaN dropped):
    for analyses with one number per window (a perplexity ratio, a threshold found per window)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    se = mean_se(v)
    lo, hi, _, _ = bootstrap_ratios(v[:, None], np.ones((len(v), 1)), n_resamples=n_resamples, seed=seed,
                                    level=level)
    return Interval(se, float(lo[0]), float(hi[0]))


def bar_column(col: str, suffix: str) -> str:
    """The error-bar column of ``col``: ``zero_frac_se``; before a parameter: ``near_zero_frac_se@0.01``,
    ``chunk_sparsity_lo@8`` (so that code reading ``near_zero_frac@EPS`` columns never takes one for a metric)."""
    if "@" in col:
        head, tail = col.split("@", 1)
        return f"{head}{suffix}@{tail}"
    return f"{col}{suffix}"


def bar_base(col: str) -> tuple[str, str] | None:
    """``(metric column, suffix)`` of an error-bar column name, or None (``bar_column`` inverted)."""
    head, at, tail = col.partition("@")
    for s in SUFFIXES:
        if head.endswith(s) and len(head) > len(s):
            return head[:-len(s)] + at + tail, s
    return None


def is_uncertainty_column(col: str, columns: Iterable[str]) -> bool:
    """``X_se`` / ``X_lo`` / ``X_hi`` (``bar_column``) whose ``X`` is also a column: an error bar, not a
    metric (compare attaches it to X instead of diffing it)."""
    b = bar_base(str(col))
    return b is not None and b[0] in set(columns)
