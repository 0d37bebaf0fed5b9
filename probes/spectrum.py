"""Weight spectra: WeightWatcher 0.7.7's ``analyze(mp_fit=True)`` columns, streamed.

Definitions follow WeightWatcher 0.7.7 (CalculatedContent/WeightWatcher: weightwatcher.py,
RMT_Util.py, WW_powerlaw.py; Martin & Mahoney, JMLR 2021, arXiv 1810.01075) so that every
column can be put next to WW's; see docs METRICS.md section 7. The code is our own:

* the ESD is lambda = sigma^2 of the raw W (conv kernels: one slice per kernel position,
  scaled by sqrt(1/2), eigenvalues pooled);
* the power-law fit gets alpha for every candidate xmin in O(n) from suffix sums and the KS
  distances in vectorised row blocks;
* the Marchenko-Pastur fit computes its kernel density once per layer, not once per sigma.

``analyze_checkpoint`` reads each tensor once (safetensors and GGUF straight into numpy, no torch),
upcasts it alone, and batches same-shape matrices into one batched eigenvalue or SVD call
under a byte budget, so peak memory follows the largest tensor rather than the model.
Failed fits are NaN (WW writes -1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from probes.errors import DeviceError, ModelError
from probes.arrays import iter_arrays
from probes.formats import Sniffed, count_tensors, sniff

# WeightWatcher 0.7.7 constants (constants.py, WW_powerlaw.py, RMT_Util.py).
EVALS_THRESH = 1e-5  # eigenvalues kept for the power-law fit
WEAK_RANK_TOL = 1e-6  # weak_rank_loss counts eigenvalues below this
ENTROPY_EPS = 1e-10  # added to p and to the rank in the matrix entropy
MIN_EVALS, MAX_EVALS, MAX_N = 8, 15000, 50000  # WW's layer-size limits (M*rf and N)
SMALL_N = 20  # fewer eigenvalues than this: WW's bias-corrected small-sample fit
SMALL_N_MIN_TAIL = 8
OVER_TRAINED, UNDER_TRAINED = 2.0, 6.0  # alpha thresholds of WW's warning column
CONV2D_SCALE = math.sqrt(1 / 2.0)  # WW's conv2d_norm, sqrt(conv2d_count / 2) with count 1
KDE_BANDWIDTH, KDE_POINTS, KDE_MIN_DENSITY = 0.1, 1000, 0.01
MP_PENALTY = 1000.0  # residual when the MP edge falls outside the data
EPS32 = float(np.finfo(np.float32).eps)

WW_SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm",
                      "stable_rank", "mp_softrank")
INT_COLUMNS = ("N", "M", "rf", "num_evals", "rank_loss", "weak_rank_loss", "num_pl_spikes", "matrix_rank",
               "num_spikes", "rand_num_spikes", "num_traps")
# Column order of the table: identity, WW's details columns, then ours.
COLUMNS = (
    "name", "module", "part", "layer_type", "shape", "dtype", "N", "M", "rf", "Q", "num_evals",
    "sv_max", "sv_min", "rank_loss", "weak_rank_loss", "lambda_max",
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min",
    "norm", "log_norm", "spectral_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm",
    "stable_rank", "matrix_rank", "entropy",
    "kappa", "kappa_nz", "kappa_nz_tol", "kappa_mp", "kappa_ratio",
    "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_num_spikes", "num_traps",
    "rand_sigma_mp", "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min",
    "status", "warning", "ww_skipped", "ww_skip_reason", "non_ww",
)
RANDOM_COLUMNS = COLUMNS[COLUMNS.index("max_rand_eval"):COLUMNS.index("status")]


# --------------------------------------------------------------------------- matrices

def ww_dims(shape) -> tuple[int, int, int, str]:
    """WW's ``(N, M, rf, layer_type)`` for a 2-D or 4-D weight shape.

    2-D: N >= M. 4-D conv ``[c0, c1, kh, kw]``: rf = kh*kw and WW's quirk kept: when c0 < c1
    it swaps N and M once per kernel slice, so only an odd rf ends with N >= M.
    """
    if len(shape) == 2:
        return max(shape), min(shape), 1, "dense"
    if len(shape) != 4:
        raise ValueError(f"WW analyses 2-D and 4-D weights, got shape {tuple(shape)}")
    c0, c1, kh, kw = shape
    rf = kh * kw
    if c0 + c1 >= kh + kw and c0 < c1 and rf % 2 == 1:
        return c1, c0, rf, "conv2d"
    return c0, c1, rf, "conv2d"


def _to_numpy(W) -> np.ndarray:
    """A numpy array for a weight: numpy as is; a torch tensor via ``.numpy()`` (bfloat16 and
    float8 through float32, which holds them exactly). Only a torch input imports torch."""
    if isinstance(W, np.ndarray):
        return W
    import torch

    if W.is_floating_point() and W.dtype not in (torch.float16, torch.float32, torch.float64):
        W = W.float()
    return W.detach().cpu().numpy()


def _is_float(W) -> bool:
    if isinstance(W, np.ndarray):
        return bool(np.issubdtype(W.dtype, np.floating))
    return bool(W.is_floating_point())


def dtype_name(W) -> str:
    """The stored dtype of a tensor, as written in the table (``float32``, ``bfloat16`` ...)."""
    return str(W.dtype).replace("torch.", "")


def check_finite(W, name: str) -> None:
    """Raise ModelError naming the tensor if it holds NaN or Inf values."""
    W = _to_numpy(W)
    # A float64-accumulated sum is finite when every entry is (it can also overflow), so the
    # entries are only counted when the sum is not.
    if not _is_float(W):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(W.sum(dtype=np.float64)):
            return
    bad = int(W.size - np.count_nonzero(np.isfinite(W)))
    if bad:
        raise ModelError(f"weight {name!r} has {bad} non-finite values (NaN/Inf)",
                         "check the checkpoint; a diverged run or a bad conversion leaves NaN/Inf weights")


def weight_slices(W, name: str = "weight", dtype=np.float64) -> np.ndarray:
    """The matrices WW analyses for one weight, in WW's orientation, as a numpy ``dtype`` stack.

    Returns a ``[k, a, b]`` stack: a 2-D weight is one slice as stored; a 4-D conv kernel
    ``[c0, c1, kh, kw]`` gives one slice per kernel position ``W[:, :, i, j]`` (transposed when
    c0 < c1), scaled by sqrt(1/2) after the upcast. Raises ModelError naming the tensor if it
    has NaN/Inf values.
    """
    W = _to_numpy(W)
    check_finite(W, name)
    ww_dims(W.shape)
    W = W.astype(dtype)
    if W.ndim == 2:
        return W[None]
    c0, c1, kh, kw = W.shape
    slices = W.transpose(2, 3, 0, 1).reshape(kh * kw, c0, c1) * CONV2D_SCALE  # order (i, j) as WW loops
    return slices.transpose(0, 2, 1) if c0 < c1 else slices


def _row_blocks(W, block_bytes: int):
    """Row blocks of a tall 2-D weight (wide ones transposed), each upcast to float64 alone."""
    W = _to_numpy(W)
    if W.shape[0] < W.shape[1]:
        W = W.T
    M = W.shape[1]
    rows = max(M, block_bytes // (M * 8))
    for r0 in range(0, W.shape[0], rows):
        yield W[r0:r0 + rows].astype(np.float64)


def r_factor(W, block_bytes: int = 8 << 20) -> np.ndarray:
    """The M x M triangular factor R of a tall (or, transposed, wide) 2-D W = QR, as ``[1, M, M]``.

    svdvals(R) = svdvals(W), which is how LAPACK's gesdd starts on such shapes anyway. R is
    accumulated over row blocks upcast one at a time (TSQR: R = qr([R; block]).R, Demmel et
    al. 2012), so the extra memory is one block and R, not a float64 copy of W and LAPACK's
    own copy of that.
    """
    R = None
    for block in _row_blocks(W, block_bytes):
        R = np.linalg.qr(block if R is None else np.concatenate([R, block]), mode="r")
    return R[None]


def gram_matrix(W, block_bytes: int = 8 << 20) -> np.ndarray:
    """W^T W (W tall; a wide W is transposed) in float64, summed over upcast row blocks."""
    G = None
    for block in _row_blocks(W, block_bytes):
        G = block.T @ block if G is None else G + block.T @ block
    return G


# The ESD from eigenvalues of the Gram matrix W^T W instead of an SVD of W: 3-5x faster on
# tall matrices, with an absolute error of a few eps * lambda_max per eigenvalue, i.e. a
# relative error near eps * kappa^2 on the smallest one. It is used only where that is small:
# on shapes with N >= GRAM_MIN_Q * M (near-square weights usually have a large kappa) and
# only when the computed lambda_min >= GRAM_MIN_RATIO * lambda_max (kappa <= 1e3, relative
# error <~ 1e-10); any other slice gets the SVD (``--svd exact`` forces it everywhere).
GRAM_MIN_Q = 1.2
GRAM_MIN_RATIO = 1e-6


def gram_evals_ok(lam: np.ndarray) -> np.ndarray:
    """Which rows of ascending Gram eigenvalues ``[k, m]`` are accurate enough to use."""
    return (lam[..., 0] >= GRAM_MIN_RATIO * lam[..., -1]) & (lam[..., -1] > 0)


def svals_cpu(stack: np.ndarray, method: str = "auto") -> np.ndarray:
    """Singular values ``[k, b]`` (descending) of a float64 stack ``[k, a, b]`` with a >= b."""
    k, a, b = stack.shape
    if method == "auto" and a >= GRAM_MIN_Q * b and b > 1:
        lam = np.linalg.eigvalsh(np.matmul(stack.transpose(0, 2, 1), stack))  # ascending
        ok = gram_evals_ok(lam)
        out = np.empty((k, b))
        out[ok] = np.sqrt(lam[ok, ::-1])
        if not ok.all():
            out[~ok] = np.linalg.svd(stack[~ok], compute_uv=False)
        return out
    return np.linalg.svd(stack, compute_uv=False)


def ww_skip_reason(name: str, N: int, M: int, rf: int) -> str:
    """Why WW 0.7.7 (state-dict path, default limits) would not analyse this weight; '' if it would."""
    if not name.endswith(".weight"):
        return "name does not end in .weight"
    if M * rf < MIN_EVALS:
        return f"M*rf={M * rf} < {MIN_EVALS}"
    if M * rf > MAX_EVALS:
        return f"M*rf={M * rf} > {MAX_EVALS}"
    if N > MAX_N:
        return f"N={N} > {MAX_N}"
    return ""


def _too_large(N: int, M: int, rf: int) -> bool:
    return M * rf > MAX_EVALS or N > MAX_N


# --------------------------------------------------------------------------- ESD columns

def esd_columns(svals: np.ndarray, N: int, eps: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Pooled ESD and WW's apply_esd columns from singular values ``[slices, m]``.

    ``rank_loss`` sums, per slice, the singular values at or below sv_max_slice * N * eps
    (numpy's matrix_rank tolerance, eps of the SVD dtype); ``sv_min`` is WW's: the largest of
    the per-slice minima.
    """
    svals = np.asarray(svals, dtype=np.float64).reshape(len(svals), -1)
    evals = np.sort((svals * svals).ravel())
    rank_loss = sum(int(s.size - np.count_nonzero(s > s.max() * N * eps)) for s in svals)
    return evals, {
        "num_evals": int(evals.size),
        "sv_max": float(svals.max()),
        "sv_min": float(svals.min(axis=1).max()),
        "rank_loss": rank_loss,
        "weak_rank_loss": int(np.count_nonzero(evals < WEAK_RANK_TOL)),
        "lambda_max": float(evals.max()),
    }


@dataclass(frozen=True)
class PowerLawFit:
    """WW's WWFit: the power law p(x) ~ x^-alpha on [xmin, xmax] with the KS-optimal xmin."""

    alpha: float
    D: float
    xmin: float
    xmax: float
    sigma: float
    num_pl_spikes: int
    xmins: np.ndarray = field(repr=False)  # candidate xmins (all but the largest eigenvalue)
    alphas: np.ndarray = field(repr=False)
    Ds: np.ndarray = field(repr=False)


def _ks_distance(tail: np.ndarray, alpha: float) -> float:
    """max_k |1 - (x_k/x_0)^(1-alpha) - k/n| over a sorted tail x_0..x_{n-1} (Clauset et al. 2009)."""
    n = tail.size
    return float(np.max(np.abs(1 - (tail / tail[0]) ** (1 - alpha) - np.arange(n) / float(n))))


def _pl_candidates(data: np.ndarray, block_elems: int = 1 << 19) -> tuple[np.ndarray, np.ndarray]:
    """alpha_i = 1 + n_i / sum_{j>=i} ln(x_j/x_i) and the KS distance D_i for every xmin = x_i.

    The sums come from one suffix sum (extended precision), so all alphas cost O(n); the KS
    distances are computed in row blocks, D_i = 1 where alpha_i <= 1 (as in WW).
    """
    n = data.size
    logs = np.log(data)
    suffix = np.cumsum(logs[::-1].astype(np.longdouble))[::-1]
    n_i = (n - np.arange(n - 1)).astype(np.float64)
    denom = (suffix[:-1] - n_i.astype(np.longdouble) * logs[:-1]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alphas = 1 + n_i / denom
        Ds = np.ones(n - 1)
        rows = max(1, block_elems // n)
        for r0 in range(0, n - 1, rows):
            r1 = min(n - 1, r0 + rows)
            # (x_j / x_i)^(1 - alpha_i) as exp((1 - alpha_i)(ln x_j - ln x_i)): one exp, no pow
            cdf = logs[None, r0:] - logs[r0:r1, None]  # [rows, n - r0]
            cdf *= 1 - alphas[r0:r1, None]
            np.exp(cdf, out=cdf)
            k = np.arange(n - r0)[None, :] - np.arange(r1 - r0)[:, None]  # offset j - i
            dev = np.abs(1 - cdf - k / n_i[r0:r1, None])
            dev[k < 0] = 0.0
            Ds[r0:r1] = np.where(alphas[r0:r1] > 1, dev.max(axis=1), 1.0)
    return alphas, Ds


def _pl_candidates_small_n(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WW's fit for n < 20: alpha_i = 1 + (n_i - 1)/sum ln(x_j/x_i) on tails of >= 8 values.

    Candidates with a degenerate tail keep alpha 0 and D 1; when none has alpha > 1 the
    whole sample is the tail. (WW then picks the minimal D like the standard fit.)
    """
    n = data.size
    logs = np.log(data)
    alphas, Ds = np.zeros(n - 1), np.ones(n - 1)
    found = False
    for i in range(n - 1):
        m = n - i
        s = np.sum(logs[i:]) - m * logs[i]
        if m < SMALL_N_MIN_TAIL or s <= 1e-12:
            continue
        alphas[i] = 1.0 + (m - 1.0) / s
        if alphas[i] > 1.0:
            Ds[i] = _ks_distance(data[i:], alphas[i])
            found = found or bool(np.isfinite(Ds[i]))
    if not found:
        s = np.sum(logs) - n * logs[0]
        if s > 1e-12:
            alphas[0] = 1.0 + (n - 1.0) / s
            Ds[0] = _ks_distance(data, alphas[0])
    return alphas, Ds


def fit_power_law(evals: np.ndarray) -> PowerLawFit:
    """WW's power-law fit (WWFit) on the eigenvalues above 1e-5.

    Picks xmin minimising the KS distance D; sigma = (alpha - 1)/sqrt(n_tail); xmax is the
    largest eigenvalue; num_pl_spikes counts eigenvalues >= xmin. Raises ValueError when
    there are fewer than two such eigenvalues or alpha is NaN.
    """
    evals = np.asarray(evals, dtype=np.float64)
    data = np.sort(evals[evals > EVALS_THRESH])
    n = data.size
    if n < 2:
        raise ValueError(f"{n} eigenvalue(s) above {EVALS_THRESH:g}; the fit needs 2")
    alphas, Ds = (_pl_candidates_small_n if n < SMALL_N else _pl_candidates)(data)
    i = int(np.argmin(Ds))
    alpha = float(alphas[i])
    if math.isnan(alpha):
        raise ValueError("alpha is NaN")
    xmin = float(data[i])
    return PowerLawFit(alpha=alpha, D=float(Ds[i]), xmin=xmin, xmax=float(data[-1]),
                       sigma=float((alphas[i] - 1) / np.sqrt(n - i)),
                       num_pl_spikes=int(np.count_nonzero(evals >= xmin)),
                       xmins=data[:-1], alphas=alphas, Ds=Ds)


def ww_warning(alpha: float) -> str:
    """WW's warning column: alpha < 2 over-trained, alpha > 6 under-trained."""
    if alpha < OVER_TRAINED:
        return "over-trained"
    if alpha > UNDER_TRAINED:
        return "under-trained"
    return ""


def norm_columns(evals: np.ndarray, alpha: float, N: int) -> dict[str, Any]:
    """WW's norm metrics (apply_norm_metrics) on the pooled ESD.

    norm = sum lambda, spectral_norm = lambda_max, alpha_weighted = alpha log10 lambda_max,
    log_alpha_norm = log10 sum lambda^alpha, stable_rank = norm / lambda_max, matrix_rank =
    #{s > s_max N eps64} with s = sqrt(lambda), entropy = -sum p ln p / ln(rank),
    p = s^2/sum s^2 + 1e-10 (Martin & Mahoney 2021).
    """
    evals = np.asarray(evals, dtype=np.float64)
    norm = np.sum(evals)
    spectral_norm = np.max(evals)
    log_spectral_norm = np.log10(spectral_norm)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_alpha_norm = np.log10(np.sum(evals ** alpha))
    s = np.sqrt(evals)
    rank = int(np.count_nonzero(s > np.max(s) * N * np.finfo(np.float64).eps))
    s2 = s * s
    p = s2 / np.sum(s2) + ENTROPY_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(p * np.log(p)) / np.log(rank + ENTROPY_EPS)
    return {
        "norm": float(norm), "log_norm": float(np.log10(norm)),
        "spectral_norm": float(spectral_norm), "log_spectral_norm": float(log_spectral_norm),
        "alpha_weighted": float(alpha * log_spectral_norm), "log_alpha_norm": float(log_alpha_norm),
        "stable_rank": float(norm / spectral_norm), "matrix_rank": rank, "entropy": float(entropy),
    }


def condition_columns(svals: np.ndarray, N: int, M: int) -> dict[str, float]:
    """kappa = s_max/s_min, kappa_nz over s > s_max max(N, M) eps32, and the MP baseline.

    kappa_mp = (sqrt Q + 1)/(sqrt Q - 1) is the condition number of a random N x M matrix's
    bulk (edges of the Marchenko-Pastur law), Q = max/min of the matrix dimensions;
    kappa_ratio = kappa_nz / kappa_mp is the spectral concentration of arXiv 2309.03004.
    """
    s = np.asarray(svals, dtype=np.float64).ravel()
    s_max, s_min = float(s.max()), float(s.min())
    tol = s_max * max(N, M) * EPS32
    nz = s[s > tol]
    q = max(N, M) / min(N, M)
    kappa_mp = (math.sqrt(q) + 1) / (math.sqrt(q) - 1) if q > 1 else math.inf
    kappa_nz = s_max / float(nz.min()) if nz.size else math.nan
    return {"kappa": s_max / s_min if s_min > 0 else math.inf, "kappa_nz": kappa_nz, "kappa_nz_tol": tol,
            "kappa_mp": kappa_mp, "kappa_ratio": kappa_nz / kappa_mp if q > 1 else math.nan}


# --------------------------------------------------------------------------- Marchenko-Pastur fit

@dataclass(frozen=True)
class MPFit:
    """WW's MP fit: sigma_mp, the bulk edges in the original scale, spikes and soft rank."""

    sigma_mp: float
    W_scale: float
    bulk_max: float
    bulk_min: float
    num_spikes: int
    mp_softrank: float


@dataclass(frozen=True)
class _KdeGrid:
    x: np.ndarray  # grid points where the density is > 0.01
    y: np.ndarray
    n_dropped: int  # grid points with density < 0.01 (they add zero residuals)


def kde_on_grid(data: np.ndarray, block: int = 2048) -> _KdeGrid:
    """Linear-kernel KDE (bandwidth 0.1) on 1000 points of [0, max + 0.5].

    f(x) = sum_i max(0, 1 - |x - x_i|/h) / (n h), the density sklearn's
    KernelDensity(kernel='linear') gives; it does not depend on sigma, so fit it once.
    """
    xs = np.linspace(0, np.max(data) + 0.5, KDE_POINTS)
    acc = np.zeros(KDE_POINTS)
    for b0 in range(0, data.size, block):
        d = np.abs(xs[:, None] - data[None, b0:b0 + block]) / KDE_BANDWIDTH
        acc += np.clip(1.0 - d, 0.0, None).sum(axis=1)
    ys = acc / (data.size * KDE_BANDWIDTH)
    good = ys > KDE_MIN_DENSITY
    return _KdeGrid(xs[good], ys[good], int(np.count_nonzero(ys < KDE_MIN_DENSITY)))


def mp_density(x, sigma, Q: float):
    """The density WW fits: Marchenko-Pastur rho(x) = sqrt((l+ - x)(x - l-)) / (2 pi sigma^2 x / Q),
    l+- = sigma^2 (1 +- sqrt(1/Q))^2, for Q != 1; for Q = 1 WW's quarter-circle curve
    sqrt(4 - x^2) / (pi sigma^2) on x = sqrt(lambda). Zero outside the support; broadcasts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if Q == 1:
            return np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x ** 2))
        lam_plus, lam_minus = _mp_edges(sigma, Q)
        return np.nan_to_num((1 / (2 * np.pi * sigma * sigma * x * (1 / Q))) * np.sqrt((lam_plus - x) * (x - lam_minus)))


def _mp_edges(sigma, Q: float):
    return np.power(sigma * (1 + np.sqrt(1 / Q)), 2), np.power(sigma * (1 - np.sqrt(1 / Q)), 2)


def _mp_sse(sigmas: np.ndarray, kde: _KdeGrid, Q: float) -> np.ndarray:
    """Squared gap between :func:`mp_density` and the KDE, one value per sigma.

    A sigma whose MP edges fall outside the data (lambda+ left of the KDE peak or right of
    its support, lambda- right of the peak) scores 1000 per point (no such check for Q = 1).
    """
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    resid = mp_density(kde.x[None, :], s, Q) - kde.y
    if Q != 1:
        lam_plus, lam_minus = _mp_edges(s, Q)
        x_peak = kde.x[np.argmax(kde.y)]
        outside = (lam_plus < x_peak) | (lam_plus > np.max(kde.x)) | (lam_minus > x_peak)
        resid = np.where(outside, MP_PENALTY, resid)
    # The dropped grid points contribute zeros; keep them so the sum rounds exactly as WW's.
    resid = np.concatenate([resid, np.zeros((resid.shape[0], kde.n_dropped))], axis=1)
    return np.sum(resid ** 2, axis=1)


def fit_marchenko_pastur(evals: np.ndarray, N: int, M: int) -> MPFit:
    """WW's mp_fit: rescale x = lambda n / sum(lambda) (W_scale^2 = n / sum lambda), then

    sigma_mp minimises the MP-vs-KDE gap over the grid [0.05 s0, 2 s0) step 0.01 s0,
    s0 = sqrt(max x)/(1 + 1/sqrt Q), polished by Nelder-Mead (scipy's brute + fmin). Q = 1
    fits the quarter-circle law to sqrt(x). bulk_max/min = sigma^2 (1 +- 1/sqrt Q)^2 / W_scale^2;
    num_spikes = #{x > lambda+ + sqrt(Q^-1/2 lambda+^(2/3) M^(-2/3))} (Tracy-Widom margin);
    mp_softrank = lambda+ / max x. Raises ValueError when the ESD is all zeros.
    """
    from scipy.optimize import fmin

    evals = np.asarray(evals, dtype=np.float64)
    Q = N / M
    total = np.sum(evals)
    if not total > 0:
        raise ValueError("all eigenvalues are zero")
    W_scale = np.sqrt(evals.size) / np.sqrt(total)
    x = (W_scale * W_scale) * evals
    x_max = np.max(x)
    s0 = np.sqrt(x_max / np.square(1 + 1.0 / np.sqrt(Q)))
    kde = kde_on_grid(np.sqrt(x) if Q == 1 else x)
    if kde.x.size == 0:
        raise ValueError("the kernel density is below 0.01 everywhere")
    grid = np.mgrid[0.05 * s0:2.0 * s0:0.01 * s0]
    start = grid[int(np.argmin(_mp_sse(grid, kde, Q)))]
    sigma = float(fmin(lambda p: _mp_sse(p, kde, Q)[0], start, full_output=True, disp=False)[0][0])
    lam_plus = (sigma * (1 + 1 / np.sqrt(Q))) ** 2
    lam_minus = (sigma * (1 - 1 / np.sqrt(Q))) ** 2
    tw = 1 / np.sqrt(Q) * np.power(lam_plus, 2 / 3) * np.power(M, -2 / 3)
    return MPFit(sigma_mp=sigma, W_scale=float(W_scale),
                 bulk_max=float(lam_plus / (W_scale * W_scale)), bulk_min=float(lam_minus / (W_scale * W_scale)),
                 num_spikes=int(np.count_nonzero(x > lam_plus + np.sqrt(tw))),
                 mp_softrank=float(lam_plus / x_max))


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt of the Jensen-Shannon divergence of two sorted ESDs read as distributions (WW's rand_distance)."""
    from scipy.special import rel_entr

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(rel_entr(a / np.sum(a), b / np.sum(b))))

    m = (p + q) / 2
    return float(np.sqrt((kl(p, m) + kl(q, m)) / 2))


# --------------------------------------------------------------------------- fused tensors

_QKV_SUFFIXES = ("c_attn.weight", "query_key_value.weight", "qkv_proj.weight", "Wqkv.weight",
                 "attn_qkv.weight", "qkv.weight")


def _qkv_labels(name: str, out: int, config: dict[str, Any]) -> np.ndarray | str:
    """Label (0=q, 1=k, 2=v) of every output row of a fused QKV weight, or why there is none."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("n_embed")
    head_dim = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    if name.endswith("query_key_value.weight"):
        # GPT-NeoX, Bloom and Falcon interleave heads, so the layout needs the config.
        if not head_dim:
            return "query_key_value needs num_attention_heads and hidden_size from config.json"
        if config.get("new_decoder_architecture"):  # Falcon-40B: per KV head, its q heads then k, v
            kv = config.get("num_kv_heads") or config.get("n_head_kv") or heads
            labels = np.repeat(np.tile([0] * (heads // kv) + [1, 2], kv), head_dim)
        elif config.get("multi_query"):  # Falcon-7B: all q heads, one k head, one v head
            labels = np.repeat([0] * heads + [1, 2], head_dim)
        else:  # NeoX, Bloom: q, k, v per head
            labels = np.repeat(np.tile([0, 1, 2], heads), head_dim)
        return labels if labels.size == out else f"{out} rows do not match the config's head layout"
    if head_dim:  # contiguous [q | k | v], k and v possibly grouped (GQA)
        q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
        if q + 2 * kv == out:
            return np.repeat([0, 1, 2], [q, kv, kv])
    if out % 3 == 0:
        return np.repeat([0, 1, 2], out // 3)
    return f"cannot split {out} rows into q, k, v without config.json"


def fused_parts(name: str, W, config: dict[str, Any] | None = None) -> list[tuple[str, Any]] | str:
    """Split a fused weight into the matrices it concatenates, or say why it cannot.

    Fused QKV (GPT-2 ``c_attn`` [in, 3 out], NeoX/Bloom/Falcon ``query_key_value``, Phi-3
    ``qkv_proj``, MPT ``Wqkv``, GGUF ``attn_qkv``) -> q, k, v; ``gate_up_proj`` -> gate, up
    (output halves; GPT-OSS interleaves them); 3-D MoE expert stacks (names with ``expert``
    or GGUF ``_exps``) -> one matrix per expert, then gate/up. Returns ``[(part, matrix)]``,
    ``[]`` when the name is not a fused one. Parts are numpy arrays.
    """
    W = _to_numpy(W)
    cfg = config or {}
    if W.ndim == 3:
        if "expert" not in name and "_exps" not in name:
            return []
        parts: list[tuple[str, Any]] = []
        for e in range(W.shape[0]):
            sub = fused_parts(name, W[e], cfg) if "gate_up" in name else [("", W[e])]
            if isinstance(sub, str):
                return sub
            parts.extend((f"e{e}.{p}" if p else f"e{e}", m) for p, m in sub)
        return parts
    if W.ndim != 2:
        return []
    if "gate_up" in name:
        # Output axis: rows of an nn.Linear weight, unless the rows are the hidden size (GPT-OSS).
        hidden = cfg.get("hidden_size")
        axis = 1 if (cfg.get("model_type") == "gpt_oss" or (hidden and W.shape[0] == hidden != W.shape[1])) else 0
        size = W.shape[axis]
        if size % 2:
            return f"gate_up has an odd size {size}"
        if cfg.get("model_type") == "gpt_oss":  # gate = even, up = odd outputs
            return [(p, np.take(W, np.arange(i, size, 2), axis=axis)) for i, p in enumerate(("gate", "up"))]
        half = size // 2
        return [("gate", np.take(W, np.arange(half), axis=axis)), ("up", np.take(W, np.arange(half, size), axis=axis))]
    if not name.endswith(_QKV_SUFFIXES):
        return []
    # GPT-2's Conv1D stores [in, 3 out]; nn.Linear stores [out, in].
    a, b = W.shape
    axis = 1 if b == 3 * a else 0
    labels = _qkv_labels(name, W.shape[axis], cfg)
    if isinstance(labels, str):
        return labels
    return [(p, np.take(W, np.flatnonzero(labels == i), axis=axis)) for i, p in enumerate("qkv")]


# --------------------------------------------------------------------------- streaming driver

@dataclass
class _Job:
    """One row being computed: identity columns plus the matrix stacks waiting for their SVD."""

    order: tuple[int, int]
    row: dict[str, Any]
    N: int
    M: int
    eps: float
    waiting: int  # stacks still without singular values; the row is finished at 0
    svals: dict[str, np.ndarray] = field(default_factory=dict)
    evals: np.ndarray | None = None  # set when a worker process already finished the row


def _finish_in_worker(job: _Job, stacks: dict[str, np.ndarray], method: str, randomize: bool) -> _Job:
    """A pool worker's task: the spectrum of every stack of one row, then the row itself."""
    for key, stack in stacks.items():
        job.svals[key] = svals_cpu(stack.transpose(0, 2, 1) if stack.shape[1] < stack.shape[2] else stack, method)
    kept: list[np.ndarray] = []
    _finish(job, randomize, lambda row, evals: kept.append(evals))
    job.evals, job.svals, job.waiting = kept[0], {}, 0
    return job


def _one_blas_thread() -> None:
    """Pool worker start-up: one BLAS/OpenMP thread per worker process (no oversubscription), and
    Ctrl-C left to the main process, which stops the pool (no traceback from every worker); SIGTERM
    ends a worker at once."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler (fork copies it): just end
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    threadpool_limits(1)


class _PoolRunner:
    """The ``_SvdBatcher`` interface over a process pool: each row (its stacks' spectra and its
    fits) is computed in a worker while the main process reads the next tensors. Workers use
    one BLAS thread each, and at most two rows per worker are in flight, so memory stays near a
    few tensors. Workers are forked where that is safe (POSIX, torch not loaded: the numpy path
    for safetensors and GGUF), else spawned (which needs a ``__main__`` guard in scripts)."""

    def __init__(self, workers: int, method: str, randomize: bool):
        import multiprocessing
        import os
        import sys
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        self.workers, self.method, self.randomize = workers, method, randomize
        fork = os.name == "posix" and "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_blas_thread)
        self.pending: dict[int, tuple[_Job, dict[str, np.ndarray]]] = {}
        self.futures = deque()

    def add(self, job: _Job, key: str, stack) -> list[_Job]:
        _, stacks = self.pending.setdefault(id(job), (job, {}))
        stacks[key] = stack
        done = []
        if len(stacks) == job.waiting:
            del self.pending[id(job)]
            self.futures.append(self.pool.submit(_finish_in_worker, job, stacks, self.method, self.randomize))
            while len(self.futures) > 2 * self.workers:
                done.append(self.futures.popleft().result())
        return done

    def flush(self) -> list[_Job]:
        done = [f.result() for f in self.futures]
        self.futures.clear()
        return done

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort`` (an error or Ctrl-C in the main process) stops the workers
        at once instead of letting running rows finish."""
        if abort:
            for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class _SvdBatcher:
    """Collects [k, a, b] matrix stacks and computes one batched spectrum per shape when the budget fills.

    Pending stacks never exceed ``budget`` bytes (a larger stack runs on its own), so memory
    stays near one tensor. Wide slices are transposed (same singular values, faster LAPACK).
    On CPU: numpy float64 (Gram eigenvalues where accurate, else the SVD; see ``svals_cpu``);
    on CUDA: one float32 ``torch.linalg.svdvals`` call per group.
    """

    def __init__(self, budget: int, device: str = "cpu", method: str = "auto"):
        self.budget = budget
        self.device = device
        self.method = method
        self.pending: dict[tuple[int, int], list[tuple[_Job, str, Any]]] = {}
        self.bytes = 0

    def add(self, job: _Job, key: str, stack) -> list[_Job]:
        """Queue one stack; returns the jobs whose last stack got its singular values."""
        size = stack.nbytes
        if size >= self.budget:
            return self._run([(job, key, stack)])
        done = self.flush() if self.bytes + size > self.budget else []
        self.pending.setdefault(tuple(stack.shape[1:]), []).append((job, key, stack))
        self.bytes += size
        return done

    def flush(self) -> list[_Job]:
        groups, self.pending, self.bytes = self.pending, {}, 0
        return [job for group in groups.values() for job in self._run(group)]

    def _run(self, group: list[tuple[_Job, str, Any]]) -> list[_Job]:
        stack = group[0][2] if len(group) == 1 else np.concatenate([s for _, _, s in group])
        if stack.shape[1] < stack.shape[2]:
            stack = stack.transpose(0, 2, 1)
        if self.device == "cpu":
            svals = svals_cpu(stack, self.method)
        else:
            import torch

            t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device, torch.float32)
            svals = torch.linalg.svdvals(t).to("cpu", torch.float64).numpy()
        done, start = [], 0
        for job, key, s in group:
            job.svals[key] = svals[start:start + s.shape[0]]
            start += s.shape[0]
            job.waiting -= 1
            if job.waiting == 0:
                done.append(job)
        return done


def resolve_device(device: str | None) -> str:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` -> ``"cpu"`` or ``"cuda:N"``; DeviceError if unavailable.

    Only a CUDA request (or ``auto``) imports torch: the CPU path is numpy and scipy alone.
    """
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu"
    if d != "auto" and not d.startswith("cuda"):
        raise DeviceError(f"spectrum runs on cpu or cuda, not {device!r}", "use --device cpu or --device cuda")
    from probes.loading import resolve_device as resolve_model_device  # the same CUDA checks as model loading

    dev = resolve_model_device(d)
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"


def _is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _empty_row(**identity: Any) -> dict[str, Any]:
    row = {c: math.nan for c in COLUMNS}
    row.update(part="", status="", warning="", ww_skipped=False, ww_skip_reason="", non_ww=False)
    row.update(identity)
    return row


def _finish(job: _Job, randomize: bool, on_layer: Callable[[dict, np.ndarray], None] | None) -> dict[str, Any]:
    """Turn a job's singular values into its row: WW's columns, then ours."""
    row, N, M = job.row, job.N, job.M
    evals, esd = esd_columns(job.svals["main"], N, job.eps)
    row.update(esd)
    notes = []
    try:
        fit = fit_power_law(evals)
        row.update(alpha=fit.alpha, xmin=fit.xmin, xmax=fit.xmax, D=fit.D, sigma=fit.sigma,
                   num_pl_spikes=fit.num_pl_spikes, status="success")
        alpha = fit.alpha
    except ValueError as e:
        row["status"], alpha = "failed", math.nan
        notes.append(f"power-law fit failed: {e}")
    try:
        mp = fit_marchenko_pastur(evals, N, M)
        row.update(num_spikes=mp.num_spikes, sigma_mp=mp.sigma_mp, mp_softrank=mp.mp_softrank,
                   W_scale=mp.W_scale, bulk_max=mp.bulk_max, bulk_min=mp.bulk_min)
    except (ValueError, FloatingPointError) as e:
        notes.append(f"MP fit failed: {e}")
    with np.errstate(divide="ignore", invalid="ignore"):
        row.update(norm_columns(evals, alpha, N))
        row.update(condition_columns(job.svals["main"], N, M))
    if randomize:
        row.update(_random_columns(evals, job, N, M, notes))
    row["warning"] = "; ".join(notes) if notes else ww_warning(alpha)
    if on_layer is not None:
        on_layer(row, evals)
    return row


def _random_columns(evals: np.ndarray, job: _Job, N: int, M: int, notes: list[str]) -> dict[str, Any]:
    """WW's randomize=True columns: the ESD of W with its entries shuffled, and its MP fit."""
    rand = np.sort(np.square(job.svals["rand"]).ravel())
    rand2 = np.sort(np.square(job.svals["rand2"]).ravel())
    out = {"max_rand_eval": float(rand.max()), "rand_distance": jensen_shannon_distance(evals, rand2),
           "ww_softrank": float(rand2.max() / evals.max()), "ww_maxdist": float(evals.max() - rand2.max())}
    try:
        mp = fit_marchenko_pastur(rand, N, M)
        out.update(rand_num_spikes=mp.num_spikes, num_traps=mp.num_spikes, rand_sigma_mp=mp.sigma_mp,
                   rand_mp_softrank=mp.mp_softrank, rand_W_scale=mp.W_scale, rand_bulk_max=mp.bulk_max,
                   rand_bulk_min=mp.bulk_min)
    except ValueError as e:
        notes.append(f"randomized MP fit failed: {e}")
    return out


def _shuffled(stack: np.ndarray, reps: int, rng: np.random.RandomState) -> np.ndarray:
    """``reps`` copies of every slice with its entries permuted (np.random.shuffle's draws, in order)."""
    out = []
    for _ in range(reps):
        for s in stack:
            out.append(s.reshape(-1)[rng.permutation(s.size)].reshape(s.shape))
    return np.stack(out)


def analyze_tensors(
    tensors: Iterable[tuple[str, Any]],
    *,
    device: str = "cpu",
    split_fused: bool = False,
    randomize: bool = False,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    total: int | None = None,
    progress: Callable[[int, int | None, str], None] | None = None,
    on_layer: Callable[[dict, np.ndarray], None] | None = None,
    batch_bytes: int = 8 << 20,
    svd: str = "auto",
    workers: int = 1,
):
    """Spectrum table for ``(name, tensor)`` pairs (torch tensors or numpy arrays); see
    :func:`analyze_checkpoint`."""
    if svd not in ("auto", "exact"):
        raise ValueError(f"svd must be 'auto' or 'exact', not {svd!r}")
    dev = resolve_device(device)
    if workers > 1 and dev != "cpu":
        raise DeviceError(f"--workers {workers} runs CPU processes, but the SVDs are on {dev}",
                          "use --workers 1 with --device cuda")
    runner = _PoolRunner(workers, svd, randomize) if workers > 1 else None
    try:
        df = _analyze(tensors, dev, split_fused, randomize, seed, config, total, progress, on_layer, batch_bytes, svd,
                      runner)
    except BaseException:
        if runner is not None:
            runner.close(abort=True)
        raise
    if runner is not None:
        runner.close()
    return df


def _analyze(tensors, dev, split_fused, randomize, seed, config, total, progress, on_layer, batch_bytes, svd, runner):
    import pandas as pd

    svd_dtype = np.dtype(np.float64 if dev == "cpu" else np.float32)
    eps = float(np.finfo(svd_dtype).eps)
    item_bytes = svd_dtype.itemsize
    # WW draws from the global numpy RNG for the layers it analyses; the same stream in the
    # same order reproduces its rand_* columns after np.random.seed(seed). Rows WW does not
    # analyse draw from a second stream so they leave that one untouched.
    rng_ww, rng_extra = np.random.RandomState(seed), np.random.RandomState(seed + 1)
    batcher = runner or _SvdBatcher(batch_bytes, dev, svd)
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    notes: dict[str, list[str]] = {}
    seen = 0

    def submit(order, name, part, W, source_dtype, non_ww):
        N, M, rf, layer_type = ww_dims(W.shape)
        reason = "" if non_ww else ww_skip_reason(name, N, M, rf)
        row = _empty_row(name=name + (f"[{part}]" if part else ""), module=_module(name), part=part,
                         layer_type=layer_type, shape="x".join(map(str, W.shape)), dtype=source_dtype,
                         N=N, M=M, rf=rf, Q=N / M, ww_skipped=bool(reason), ww_skip_reason=reason, non_ww=non_ww)
        rows[order] = row
        if _too_large(N, M, rf):
            row.update(status="skipped", warning="not computed: beyond WeightWatcher's size limits "
                                                 f"(M*rf <= {MAX_EVALS}, N <= {MAX_N})")
            return []
        job = _Job(order, row, N, M, eps, waiting=3 if randomize else 1)
        try:
            # A large tall or wide matrix is reduced to its Gram matrix or R factor one row block
            # at a time (same spectrum, far less memory); randomize needs the entries themselves,
            # so it keeps the full slices.
            tall = W.ndim == 2 and N >= 2 * M and N * M * item_bytes >= batch_bytes and not randomize
            if tall:
                check_finite(W, name)
                if dev == "cpu" and svd == "auto":
                    lam = np.linalg.eigvalsh(gram_matrix(W, batch_bytes))
                    if gram_evals_ok(lam):
                        job.svals["main"] = np.sqrt(lam[::-1])[None]
                        job.waiting = 0
                        return [job]
            slices = r_factor(W, batch_bytes) if tall else weight_slices(W, name, svd_dtype)
        except ModelError as e:
            row.update(status="non-finite", warning=e.problem)
            return []
        done = batcher.add(job, "main", slices)
        if randomize:
            rng = rng_extra if (non_ww or reason) else rng_ww
            reps = 5 if M * rf < 100 else 1  # WW: five replicas when there are few eigenvalues
            done += batcher.add(job, "rand", _shuffled(slices, reps, rng))
            done += batcher.add(job, "rand2", _shuffled(slices, 1, rng))
        return done

    def complete(jobs):
        for job in jobs:
            if job.evals is None:
                rows[job.order] = _finish(job, randomize, on_layer)
            else:  # finished by a pool worker
                rows[job.order] = job.row
                if on_layer is not None:
                    on_layer(job.row, job.evals)

    for t_index, item in enumerate(tensors):
        name, t = item[0], item[1]
        seen += 1
        dtype = item[2] if len(item) > 2 else dtype_name(t)  # readers that upcast say what was stored
        # Scalars, norms, biases and integer buffers (position ids) are skipped silently, as WW does.
        weight = t.ndim >= 2 and _is_float(t) and not _is_bias(name)
        if weight and 0 in t.shape:  # a checkpoint can hold an empty one
            notes.setdefault("empty tensors (a dimension of 0) not analysed", []).append(name)
        elif weight:
            t = _to_numpy(t)
            parts = fused_parts(name, t, config) if split_fused and t.ndim in (2, 3) else []
            if isinstance(parts, str):
                notes.setdefault(f"not split: {parts}", []).append(name)
                parts = []
            if t.ndim in (2, 4):
                complete(submit((t_index, 0), name, "", t, dtype, False))
            elif not parts:
                hint = " (--split-fused splits MoE expert stacks)" if t.ndim == 3 and not split_fused else ""
                notes.setdefault(f"{t.ndim}-D tensors not analysed{hint}", []).append(name)
            for p_index, (part, W) in enumerate(parts, start=1):
                complete(submit((t_index, p_index), name, part, W, dtype, True))
        del t
        if progress is not None:
            progress(t_index + 1, total, name)
    complete(batcher.flush())

    if not rows:
        raise ModelError(f"no weight matrices found among {seen} tensor(s)",
                         "spectrum needs 2-D or 4-D weights (or 3-D MoE experts with --split-fused)")
    df = pd.DataFrame([rows[k] for k in sorted(rows)], columns=list(COLUMNS))
    if not randomize:
        df = df.drop(columns=list(RANDOM_COLUMNS))
    for c in INT_COLUMNS:
        if c in df:
            df[c] = df[c].astype("Int64")
    df.attrs["notes"] = [f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''} ({len(v)})" for k, v in notes.items()]
    df.attrs["svd"] = {"device": dev, "dtype": str(svd_dtype), "method": svd, "workers": runner.workers if runner else 1,
                       "gram": "eigenvalues of W^T W where N >= %.1f M and lambda_min >= %g lambda_max, "
                               "else the SVD" % (GRAM_MIN_Q, GRAM_MIN_RATIO) if svd == "auto" and dev == "cpu"
                       else "SVD"}
    return df


def load_config(sn: Sniffed) -> dict[str, Any] | None:
    """The checkpoint's config.json (used only to split fused tensors), if there is one."""
    if not sn.config_path:
        return None
    try:
        cfg = json.loads(Path(sn.config_path).read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 / JSON, nested too deep: no split
        return None
    return cfg if isinstance(cfg, dict) else None


def analyze_checkpoint(
    source: str | Path | Sniffed,
    *,
    device: str = "cpu",
    split_fused: bool = False,
    randomize: bool = False,
    seed: int = 0,
    unsafe_pickle: bool = False,
    progress: Callable[[int, int | None, str], None] | None = None,
    on_layer: Callable[[dict, np.ndarray], None] | None = None,
    batch_bytes: int = 8 << 20,
    svd: str = "auto",
    workers: int = 1,
):
    """One row per weight matrix of a checkpoint, with WW's column names and ours.

    Reads every tensor once through ``probes.arrays.iter_arrays`` (numpy, no torch, for
    safetensors and GGUF). Rows WW would skip
    (size limits, names not ending in ``.weight``) are kept with ``ww_skipped``; those past
    WW's size limits are not computed (status ``skipped``). ``split_fused`` adds ``non_ww``
    rows for the parts of fused tensors. ``randomize`` adds WW's rand_* columns, seeded.
    On CPU everything is numpy float64 (``svd="auto"``: Gram eigenvalues where they are as
    accurate as the SVD, see ``svals_cpu``; ``"exact"``: the SVD everywhere); on CUDA the SVD is
    float32; fits are always float64. ``workers > 1`` computes rows in that many processes.
    ``progress(done, total, name)`` is called per tensor, ``on_layer(row, evals)`` per row.
    Notes on tensors not analysed are in ``df.attrs['notes']``.
    """
    sn = source if isinstance(source, Sniffed) else sniff(source)
    return analyze_tensors(
        iter_arrays(sn, unsafe_pickle=unsafe_pickle), device=device, split_fused=split_fused,
        randomize=randomize, seed=seed, config=load_config(sn) if split_fused else None,
        total=count_tensors(sn), progress=progress, on_layer=on_layer, batch_bytes=batch_bytes, svd=svd,
        workers=workers)


def ww_rows(df):
    """The rows WeightWatcher itself would report (not skipped, not split parts)."""
    return df[~df["ww_skipped"].astype(bool) & ~df["non_ww"].astype(bool)]


def summarize(df) -> dict[str, float | None]:
    """WW's get_summary: means over WW's layers of its seven metrics, skipping NaN (failed fits)."""
    rows = ww_rows(df)
    out: dict[str, float | None] = {}
    for metric in WW_SUMMARY_METRICS:
        vals = rows[metric].astype(float)
        vals = vals[np.isfinite(vals)]
        out[metric] = float(vals.mean()) if len(vals) else None
    return out

