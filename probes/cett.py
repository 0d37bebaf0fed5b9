"""CETT calibration and the search for the CETT value of a PPL target (PPL-p%, ``probes.pplp``).

Formulas (Sparsing Law arXiv 2411.02335; thunlp/SparsingLaw src/model_utils.py): n_i = |x_i| *
||W_down[:, i]||_2 is neuron i's output norm; CETT(t) = mean over counted tokens of
||sum_{i: n_i <= t} x_i W_down[:, i]||_2 / ||sum_i x_i W_down[:, i]||_2; a layer's threshold for a
CETT value c is the largest t with CETT(t) <= c.

Calibration with bounded memory. The reference keeps every token's activations and
binary-searches 65,536 linspace candidates per layer. We stream instead: the first batch fixes
a per-layer grid of candidate thresholds (``cett_grid`` quantiles of the positive n_i of that
batch, plus log-spaced extensions 4 decades below and 3 above, plus t = 0), and the per-token
CETT is evaluated EXACTLY at every grid point for every counted token (per-bucket partial sums
from one sparse-dense product, a cumulative sum over the grid, a norm per grid point: O(grid x
d_model) work per token; the calibration pass of SmolLM2-135M (GLU, dense activations, 30 layers)
costs about 4 dense passes, benchmarks/README.md) and summed in float64. State is O(layers x
grid). Between grid points the threshold is linearly interpolated in t. CETT at grid points is
exact; only the placement of the grid depends on the first batch. Quantile thresholds of ``absq_down`` and ``cats`` come from
fixed log-spaced histograms (``LogHistogram``); TEAL and CHESS use their references' own rules
(``probes.teal``, ``probes.chess``).

Search for c (``search_cett``): plain bisection on [0, 1] is the reference. The default is a
safeguarded secant search on log(PPL ratio) against log(c) (the curve is close to a power law),
kept inside a bracket, with a bisection step whenever a proposal leaves the bracket, lands too
close to its ends, or two steps fail to halve it (Brent/Dekker-style safeguards). c = 0 needs
no pass: its thresholds remove no neuron with a non-zero output, so its ratio is exactly 1.
Unreachable targets (even zeroing every MLP neuron stays under 1 + p) are reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from probes.errors import ModelError

DEFAULT_TOL = 1e-3
DEFAULT_CETT_GRID = 128
DEFAULT_MAX_PASSES = 40  # sparse passes per target before giving up (status not_reached)
SEARCH_METHODS = ("secant", "bisection")
C_TOL = 1e-9  # a bracket narrower than this in c cannot be refined further
SECANT_START = 0.2  # first probe when nothing is known yet: c ~ 0.2 is near PPL-1% for ReLU-like LMs
# Fixed log-spaced histogram for the per-layer quantile thresholds of absq_down and cats.
LAYER_HIST = (1e-10, 1e6, 4096)
_SPARSE_CHUNK_ELEMS = 1 << 22  # bound on tokens x grid x d_model floats in one CETT chunk


# --------------------------------------------------------------------------------------- formulas
def down_weight_io(module):
    """The output projection's weight as ``[in, out]`` float32, so that ``y = x @ W`` (bias left out).

    nn.Linear stores ``[out, in]``; transformers' GPT-2 Conv1D stores ``[in, out]``.
    """
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise ModelError(f"output projection {type(module).__name__} has no 2-D weight",
                         "PPL-p% needs a linear output projection; pick one with --site PATH:input")
    if type(module).__name__ == "Conv1D":
        return w.detach().float()
    return w.detach().float().t()


def down_column_norms(module):
    """||W_down[:, i]||_2 for every input channel i of the projection, in the weight's dtype ``[in]``: summed in
    float64 and rounded once, so every machine gets the same float32 norms (a float32 sum rounds by its CPU's kernels,
    and one ulp of a norm flips a neuron that sits on the threshold)."""
    import torch

    w = down_weight_io(module)
    return torch.linalg.vector_norm(w.double(), dim=1).to(w.dtype)


def neuron_output_norms(x, col_norms):
    """n_i = |x_i| * ||W_down[:, i]||_2, in float32 (``x`` ``[..., in]``)."""
    return x.float().abs() * col_norms


def cett(x, weight_io, threshold: float, col_norms=None) -> float:
    """CETT(t) of activations ``x`` ``[tokens, in]`` (all counted) under ``y = x @ weight_io``.

    Mean over tokens of ||sum_{i: n_i <= t} x_i w_i|| / ||sum_i x_i w_i|| (0 for a token whose
    output is exactly 0). The streaming calibration evaluates the same formula on a grid.
    """
    import torch

    x = x.float()
    w = weight_io.float()
    cn = torch.linalg.vector_norm(w, dim=1) if col_norms is None else col_norms
    small = torch.where(neuron_output_norms(x, cn) <= threshold, x, torch.zeros_like(x))
    num = torch.linalg.vector_norm(small @ w, dim=-1).double()
    den = torch.linalg.vector_norm(x @ w, dim=-1).double()
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return float(ratio.mean()) if ratio.numel() else math.nan


def threshold_for_cett(grid: Sequence[float], cett_values: Sequence[float], c: float) -> float:
    """The largest t with CETT(t) <= c, from CETT known on an increasing grid of t.

    ``grid[0]`` must be 0 (CETT(0) = 0). Between the last grid point with CETT <= c and the
    next one, t is interpolated linearly. ``c >= 1`` gives +inf (every neuron inactive). The
    result is rounded to float32, the precision of the comparison in the sparse run.
    """
    import numpy as np

    if c >= 1.0:
        return math.inf
    g = np.asarray(grid, dtype=np.float64)
    v = np.asarray(cett_values, dtype=np.float64)
    ok = np.nonzero(v <= c)[0]
    k = int(ok[-1]) if ok.size else 0
    if k >= len(g) - 1:
        t = g[-1]
    else:
        lo, hi = v[k], v[k + 1]  # hi > c by maximality of k
        frac = 0.0 if hi <= lo else min(1.0, max(0.0, (c - lo) / (hi - lo)))
        t = g[k] + frac * (g[k + 1] - g[k])
    t32 = float(np.float32(t))
    return t32 if t32 <= g[-1] else float(np.nextafter(np.float32(t32), np.float32(0)))


def ppl_ratio(ce_sparse: float, ce_dense: float) -> float:
    """exp(CE_sparse - CE_dense): the sparse run's perplexity over the dense one's."""
    return math.exp(ce_sparse - ce_dense)


# ----------------------------------------------------------------------------- streaming accumulators
def _sorted_float64(v):
    """``v`` (1-D float32) sorted ascending, as float64 (exact: every float32 is a float64). On the CPU numpy's
    sort, 15-20x faster than torch's on a few million values (16 ms vs 0.28 s for 3M)."""
    import torch

    if v.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sort(v.detach().float().numpy())).double()
    return torch.sort(v.float()).values.double()


def _quantiles_of_sorted(srt, q):
    """``torch.quantile(values, q)`` (linear interpolation) from the values sorted ascending (``srt``, float64),
    with torch's own arithmetic: rank q (n - 1), the values below and above it, ``lerp`` between them. Bit for bit
    equal to ``torch.quantile`` on the unsorted values (tests/unit/test_pplp.py)."""
    ranks = q.to(srt.device) * (srt.numel() - 1)
    below = ranks.long()
    above = ranks.ceil().long()
    return srt[below].lerp(srt[above], ranks - below)


class CettGrid:
    """Exact per-token CETT at a fixed grid of candidate thresholds, summed over tokens (one layer).

    The grid is fixed by the first batch (``n_quantiles`` quantiles of its positive n_i, at most one
    per positive value, log extensions 4 decades below and 3 above, and 0). State: the grid and a
    float64 sum per grid point, O(grid) whatever the number of tokens.
    """

    def __init__(self, n_quantiles: int = DEFAULT_CETT_GRID):
        self.n_quantiles = int(n_quantiles)
        self.grid = None  # float32 [K], increasing, grid[0] == 0
        self.sums = None  # float64 [K]
        self.n_tokens = 0

    def _init_grid(self, n):
        import torch

        pos = n[n > 0].flatten()
        if pos.numel() > (1 << 24):  # torch.quantile's input limit; an even subsample is plenty
            pos = pos[:: math.ceil(pos.numel() / (1 << 24))]
        if pos.numel() == 0:
            body = torch.logspace(-8, 4, min(self.n_quantiles, DEFAULT_CETT_GRID), dtype=torch.float64)
        else:
            srt = _sorted_float64(pos)
            lo, hi = float(srt[0]), float(srt[-1])
            # No more quantiles than positive values to take them from: the grid follows the data, not the option.
            n_q = min(self.n_quantiles, pos.numel())
            q = _quantiles_of_sorted(srt, torch.linspace(0, 1, n_q, dtype=torch.float64))
            below = torch.logspace(math.log10(lo) - 4, math.log10(lo), 9, dtype=torch.float64)[:-1]
            above = torch.logspace(math.log10(hi), math.log10(hi) + 3, 7, dtype=torch.float64)[1:]
            body = torch.cat([below, q, above])
        grid = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), body]).float())  # sorted
        self.grid = grid.to(n.device)
        self.sums = torch.zeros(len(grid), dtype=torch.float64, device=n.device)

    def update(self, x, weight_io, col_norms) -> None:
        """Add counted tokens ``x`` ``[tokens, in]`` (float32) of a projection ``y = x @ weight_io``."""
        import torch

        if x.numel() == 0:
            return
        # The sparse-dense product reads weight_io row by row: on a transposed view (nn.Linear's [out, in]
        # weight, .t()) it ran 4.8x slower than on a contiguous copy (3.5 MB for a 1536 x 576 projection).
        weight_io = weight_io.contiguous()
        n = neuron_output_norms(x, col_norms)
        if self.grid is None:
            self._init_grid(n)
        # Bucket b_i = first grid index with grid[b] >= n_i: neuron i counts in CETT(grid[k]) iff b_i <= k.
        bucket = torch.bucketize(n, self.grid, right=False)
        full = torch.linalg.vector_norm(x @ weight_io, dim=-1)  # [tokens]
        tok, ch = torch.nonzero(x, as_tuple=True)  # zero activations contribute nothing
        self._accumulate(x, weight_io, full, bucket, tok, ch)
        self.n_tokens += int(x.shape[0])

    def _accumulate(self, x, w, full, bucket, tok, ch) -> None:
        """Per-bucket output sums as one sparse-dense product (bucket-major rows), then a cumulative
        sum over the grid and a norm per grid point: O(grid x d_model) per token."""
        import torch

        K = len(self.grid)
        D = w.shape[1]
        step = max(1, _SPARSE_CHUNK_ELEMS // ((K + 1) * D))
        N = x.shape[0]
        bounds = torch.searchsorted(tok, torch.arange(0, N + step, step, device=x.device).clamp_max(N)).tolist()
        for j, s in enumerate(range(0, N, step)):
            nc = min(step, N - s)
            lo, hi = bounds[j], bounds[j + 1]
            t, c = tok[lo:hi], ch[lo:hi]
            rows = bucket[t, c] * nc + (t - s)  # bucket-major, so the cumulative sum runs over contiguous rows
            a = torch.sparse_coo_tensor(torch.stack([rows, c]), x[t, c], ((K + 1) * nc, x.shape[1]),
                                        check_invariants=False)
            parts = torch.sparse.mm(a, w).view(K + 1, nc * D)
            # in place: the same sums, without a second buffer of the chunk's size (3-5x faster on the CPU)
            partial = torch.linalg.vector_norm(parts.cumsum_(0).view(K + 1, nc, D)[:K], dim=-1)  # [K, nc]
            fs = full[s:s + nc]
            ratio = torch.where(fs > 0, partial / fs.clamp_min(1e-30), torch.zeros_like(partial))
            self.sums += ratio.sum(dim=1, dtype=torch.float64)

    def values(self):
        """CETT at each grid point (float64 numpy), and the grid (float64 numpy)."""
        import numpy as np

        if self.grid is None or self.n_tokens == 0:
            return np.zeros(1), np.zeros(1)
        v = (self.sums / self.n_tokens).cpu().numpy()
        v[0] = 0.0  # t = 0: only neurons with n_i = 0, whose contribution is the zero vector
        return self.grid.double().cpu().numpy(), v

    def threshold(self, c: float) -> float:
        g, v = self.values()
        return threshold_for_cett(g, v, c)


class LogHistogram:
    """Counts of non-negative values in fixed log-spaced bins, per layer or per channel.

    Bins: an exact-zero count, (0, lo], ``bins`` log-spaced bins up to ``hi``, and (hi, max].
    Quantiles interpolate geometrically inside a bin (linearly in the (0, lo] bin).
    """

    def __init__(self, lo: float, hi: float, bins: int, channels: int | None = None, device: Any = "cpu"):
        import torch

        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.channels = channels
        self.edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
        self._edges32 = self.edges.float().to(device)
        shape = (channels or 1, bins + 3)  # [zero, underflow, bins..., overflow]
        self.counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self.max = torch.zeros(channels or 1, dtype=torch.float64, device=device)

    def update(self, a) -> None:
        """Add values ``a`` ``[tokens, channels]`` (absolute values, float32)."""
        import torch

        if a.numel() == 0:
            return
        C = self.counts.shape[0]
        a2 = a.reshape(-1, a.shape[-1]) if self.channels else a.reshape(-1, 1)
        idx = torch.bucketize(a2, self._edges32, right=False) + 1  # 1: (0, lo]; bins+2: > hi
        idx = torch.where(a2 == 0, torch.zeros_like(idx), idx)
        flat = idx + torch.arange(C, device=a.device)[None, :] * (self.bins + 3)
        self.counts += torch.bincount(flat.flatten(), minlength=C * (self.bins + 3)).view(C, self.bins + 3)
        self.max = torch.maximum(self.max, a2.amax(dim=0).double())

    def _bin_bounds(self):
        import numpy as np

        e = self.edges.numpy()
        lows = np.concatenate([[0.0, 0.0], e[:-1], [e[-1]]])
        highs = np.concatenate([[0.0, e[0]], e[1:], [np.nan]])
        return lows, highs

    def quantile(self, q: float, channel: int = 0) -> float:
        """The q-quantile of the values seen (0 when it falls inside the exact zeros)."""
        import numpy as np

        cnt = self.counts[channel].double().cpu().numpy()
        total = cnt.sum()
        if total == 0:
            return math.nan
        target = q * total
        cum = np.cumsum(cnt)
        if target <= cum[0]:
            return 0.0
        j = int(np.searchsorted(cum, target, side="left"))
        j = min(j, len(cnt) - 1)
        frac = (target - (cum[j - 1] if j > 0 else 0.0)) / max(cnt[j], 1.0)
        lows, highs = self._bin_bounds()
        lo = lows[j]
        hi = highs[j] if j < len(cnt) - 1 else max(float(self.max[channel]), lows[j])
        if j == 1 or lo <= 0:
            return float(lo + frac * (hi - lo))
        return float(lo * (hi / lo) ** frac)

    def scaled_counter(self, scales) -> Callable[[float], float]:
        """f(t) = number of values v_ic with v_ic * scales[c] < t over all channels (per-channel hist).

        Inside a bin the values are taken as log-uniform (uniform in the (0, lo] bin).
        """
        import numpy as np

        cnt = self.counts.double().cpu().numpy()  # [C, B]
        s = np.asarray(scales, dtype=np.float64)
        lows, highs = self._bin_bounds()
        L = np.broadcast_to(lows[1:], (cnt.shape[0], len(lows) - 1))
        H = np.tile(highs[1:], (cnt.shape[0], 1))
        H[:, -1] = np.maximum(self.max.cpu().numpy(), lows[-1])
        body, zeros = cnt[:, 1:], cnt[:, 0]
        logL = np.log(np.where(L > 0, L, 1.0))
        span = np.log(np.where(H > L, H, L + 1.0)) - logL
        span = np.where((L > 0) & (H > L), span, 1.0)

        def count(t: float) -> float:
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.where(s > 0, t / s, np.inf)[:, None]
                frac = np.where(L > 0, (np.log(np.maximum(u, 1e-300)) - logL) / span,
                                np.where(H > 0, u / np.where(H > 0, H, 1.0), 1.0))
            frac = np.where(H <= u, 1.0, np.where(L >= u, 0.0, np.clip(frac, 0.0, 1.0)))
            return float((zeros * (u[:, 0] > 0)).sum() + (body * frac).sum())

        return count

    @property
    def total(self) -> int:
        return int(self.counts.sum())


# ------------------------------------------------------------------------------------------ search
@dataclass
class SearchOutcome:
    status: str  # reached | not_reached | unreachable
    c: float | None
    ratio: float | None
    n_evals: int  # evaluations that were new passes
    trace: list[tuple[float, float]]  # (c, ratio) in evaluation order, new passes only
    reason: str = ""
    bound_ratio: float | None = None  # for unreachable: the ratio at the extreme that misses


def search_cett(evaluate: Callable[[float], float], target: float, tol: float = DEFAULT_TOL,
                method: str = "secant", max_evals: int = DEFAULT_MAX_PASSES,
                known: dict[float, float] | None = None) -> SearchOutcome:
    """Find c in [0, 1] with |ratio(c) - target| <= tol.

    ``evaluate(c)`` costs a full pass; ``known`` holds ratios already measured (c = 0 has ratio
    1 by construction). Both methods keep a bracket lo < hi with ratio(lo) < target <
    ratio(hi) (hi = 1 is assumed until measured), so they converge to a crossing even when the
    curve is not monotone; the ratio actually achieved is returned, never the target.
    ``bisection`` halves the bracket. ``secant`` interpolates log(ratio) against log(c) (a power
    law; a straight line in ratio when logs are undefined), with bisection as the safeguard.
    """
    pts: dict[float, float] = dict(known or {0.0: 1.0})
    pts.setdefault(0.0, 1.0)
    trace: list[tuple[float, float]] = []
    n_new = 0

    def measure(c: float) -> float:
        nonlocal n_new
        if c not in pts:
            pts[c] = float(evaluate(c))
            n_new += 1
            trace.append((c, pts[c]))
        return pts[c]

    def done(c: float, status="reached", reason="") -> SearchOutcome:
        return SearchOutcome(status, c, pts[c], n_new, trace, reason)

    def best_point() -> float:
        # Closest ratio; among equals, the larger c (more sparsity for the same perplexity).
        return min(pts, key=lambda c: (abs(pts[c] - target), -c))

    if target <= 1.0:
        if abs(1.0 - target) <= tol:
            return done(0.0)
        return SearchOutcome("unreachable", None, None, 0, trace,
                             f"target ratio {target:.6g} is below 1: the dense model (ratio 1) already exceeds it",
                             bound_ratio=1.0)
    hits = [c for c, r in pts.items() if abs(r - target) <= tol]
    if hits:
        return done(min(hits, key=lambda c: abs(pts[c] - target)))

    def bracket() -> tuple[float, float | None]:
        above = [c for c, r in pts.items() if r > target]
        hi = min(above) if above else None
        lo = max(c for c, r in pts.items() if r < target and (hi is None or c < hi))
        return lo, hi

    widths: list[float] = []  # widths of measured brackets (both ends evaluated), one per step
    sides: list[int] = []  # -1 below the target, +1 above, per new evaluation
    while n_new < max_evals:
        lo, hi = bracket()
        hi_v = 1.0 if hi is None else hi
        w = hi_v - lo
        if hi is None and lo >= 0.999:
            c = 1.0  # nothing below 1 reaches the target: check zero density itself
        elif w < C_TOL:
            break
        elif method == "bisection":
            c = 0.5 * (lo + hi_v)
        else:
            # Two steps from the same side: aim at the far part of the tolerance band so that the
            # next step either lands in it or brackets the target tightly (Illinois-style).
            aim = target
            if len(sides) >= 2 and sides[-1] == sides[-2]:
                aim = target - sides[-1] * 0.6 * tol
            c = _secant_proposal(pts, lo, hi, aim)
            # Safeguards: inside the bracket, not hugging an end, and a bisection whenever two
            # steps on a measured bracket failed to halve it (Brent/Dekker).
            stalled = hi is not None and len(widths) >= 2 and w > 0.5 * widths[-2]
            if hi is None and c is not None and c >= 1.0:
                c = 1.0  # the model says the target lies beyond c = 1: measure zero density first
            elif c is None or not math.isfinite(c) or not (lo < c < hi_v) or stalled:
                c = 0.5 * (lo + hi_v)
            else:
                c = min(max(c, lo + 0.01 * w), hi_v - 0.01 * w)
            if hi is not None:
                widths.append(w)
        r = measure(c)
        sides.append(-1 if r < target else 1)
        if abs(r - target) <= tol:
            return done(c)
        if c == 1.0 and r < target:
            return SearchOutcome("unreachable", None, None, n_new, trace,
                                 f"even zeroing every MLP neuron (c = 1) gives PPL ratio {r:.6g} < {target:.6g}",
                                 bound_ratio=r)
    c = best_point()
    return SearchOutcome("not_reached", c, pts[c], n_new, trace,
                         f"no c within tol {tol:g} of {target:.6g} after {n_new} passes (the curve jumps there); "
                         f"closest ratio {pts[c]:.6g}")


def _secant_proposal(pts: dict[float, float], lo: float, hi: float | None, aim: float) -> float | None:
    """Next c, modelling log(log ratio) as a smooth function of log c (a power law, locally).

    Inside a measured bracket: inverse quadratic interpolation through the three usable points
    nearest the aim when it stays in the bracket, else the secant through the bracket ends.
    One-sided: a least-squares line through up to three points nearest the aim (slope kept in
    [0.5, 20]; slope 2, a quadratic loss response, from a single point).
    """
    V = math.log(math.log(aim))
    usable = {c: (math.log(c), math.log(math.log(r))) for c, r in pts.items() if c > 0 and r > 1.0}
    if not usable:
        return SECANT_START if lo < SECANT_START and (hi is None or SECANT_START < hi) else None
    near = sorted(usable.values(), key=lambda uv: abs(uv[1] - V))[:3]
    if hi is not None and lo in usable and hi in usable:
        (u1, v1), (u2, v2) = usable[lo], usable[hi]
        if len(near) == 3 and len({v for _, v in near}) == 3:
            u = _inverse_quadratic(near, V)
            if u is not None and u1 < u < u2:
                return math.exp(u)
        return math.exp(u1 + (V - v1) * (u2 - u1) / (v2 - v1)) if v2 != v1 else None
    if len(near) == 1:
        slope = 2.0
    else:
        mu = sum(u for u, _ in near) / len(near)
        mv = sum(v for _, v in near) / len(near)
        suu = sum((u - mu) ** 2 for u, _ in near)
        slope = sum((u - mu) * (v - mv) for u, v in near) / suu if suu > 0 else 2.0
        slope = min(max(slope, 0.5), 20.0)
    u0, v0 = near[0]
    return math.exp(u0 + (V - v0) / slope)


def _inverse_quadratic(points: Sequence[tuple[float, float]], v: float) -> float | None:
    """u at ``v`` on the quadratic u(v) through three (u, v) points (Brent's inverse interpolation)."""
    (a, fa), (b, fb), (c, fc) = points
    try:
        return (a * (v - fb) * (v - fc) / ((fa - fb) * (fa - fc)) + b * (v - fa) * (v - fc) / ((fb - fa) * (fb - fc))
                + c * (v - fa) * (v - fb) / ((fc - fa) * (fc - fb)))
    except ZeroDivisionError:
        return None
