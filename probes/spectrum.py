"""Weight spectra: WeightWatcher 0.7.7's ``analyze(mp_fit=True)`` columns, streamed.

Definitions follow WeightWatcher 0.7.7 (CalculatedContent/WeightWatcher: weightwatcher.py,
RMT_Util.py, WW_powerlaw.py; Martin & Mahoney, JMLR 2021, arXiv 1810.01075) so that every
column can be put next to WW's; see docs METRICS.md section 7. The code is our own:

* the ESD is lambda = sigma^2 of the raw W (conv kernels: one slice per kernel position,
  scaled by sqrt(1/2), eigenvalues pooled);
* the power-law fit gets alpha for every candidate xmin in O(n) from suffix sums and the KS
  distances in vectorised row blocks;
* the Marchenko-Pastur fit computes its kernel density once per layer, not once per sigma.

``analyze_checkpoint`` reads each tensor once (memory-mapped where the format allows),
upcasts it alone, and batches same-shape matrices into one ``torch.linalg.svdvals`` call
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
from probes.formats import Kind, Sniffed, iter_tensors, safetensors_header, sniff

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


def check_finite(W, name: str) -> None:
    """Raise ModelError naming the tensor if it holds NaN or Inf values."""
    import torch

    # A float64-accumulated sum is finite when every entry is (it can also overflow), so the
    # entries are only counted when the sum is not.
    if not W.is_floating_point() or bool(torch.isfinite(W.sum(dtype=torch.float64))):
        return
    bad = int((~torch.isfinite(W)).sum())
    if bad:
        raise ModelError(f"weight {name!r} has {bad} non-finite values (NaN/Inf)",
                         "check the checkpoint; a diverged run or a bad conversion leaves NaN/Inf weights")


def weight_slices(W, name: str = "weight", dtype=None, device=None):
    """The matrices WW analyses for one weight, in WW's orientation, as ``dtype`` on ``device``.

    Returns a ``[k, a, b]`` stack: a 2-D weight is one slice as stored; a 4-D conv kernel
    ``[c0, c1, kh, kw]`` gives one slice per kernel position ``W[:, :, i, j]`` (transposed when
    c0 < c1), scaled by sqrt(1/2) after the upcast. Raises ModelError naming the tensor if it
    has NaN/Inf values.
    """
    import torch

    check_finite(W, name)
    ww_dims(W.shape)
    W = W.to(device=device, dtype=dtype or torch.float64)
    if W.ndim == 2:
        return W.unsqueeze(0)
    c0, c1, kh, kw = W.shape
    slices = W.permute(2, 3, 0, 1).reshape(kh * kw, c0, c1) * CONV2D_SCALE  # order (i, j) as WW loops
    return slices.transpose(1, 2) if c0 < c1 else slices


def r_factor(W, dtype=None, device=None, block_bytes: int = 8 << 20):
    """The M x M triangular factor R of a tall (or, transposed, wide) 2-D W = QR, as ``[1, M, M]``.

    svdvals(R) = svdvals(W), which is how LAPACK's gesdd starts on such shapes anyway. R is
    accumulated over row blocks upcast one at a time (TSQR: R = qr([R; block]).R, Demmel et
    al. 2012), so the extra memory is one block and R, not a float64 copy of W and LAPACK's
    own copy of that.
    """
    import torch

    dtype = dtype or torch.float64
    if W.shape[0] < W.shape[1]:
        W = W.T
    M = W.shape[1]
    rows = max(M, block_bytes // (M * torch.finfo(dtype).bits // 8))
    R = None
    for r0 in range(0, W.shape[0], rows):
        block = W[r0:r0 + rows].to(device=device, dtype=dtype)
        R = torch.linalg.qr(block if R is None else torch.cat([R, block]), mode="r").R
    return R.unsqueeze(0)


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
            ratio = data[None, r0:] / data[r0:r1, None]  # [rows, n - r0]
            k = np.arange(n - r0)[None, :] - np.arange(r1 - r0)[:, None]  # offset j - i
            dev = np.abs(1 - ratio ** (1 - alphas[r0:r1, None]) - k / n_i[r0:r1, None])
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
    ``[]`` when the name is not a fused one.
    """
    import torch

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
            return [(p, W.index_select(axis, torch.arange(i, size, 2, device=W.device)))
                    for i, p in enumerate(("gate", "up"))]
        return [("gate", W.narrow(axis, 0, size // 2)), ("up", W.narrow(axis, size // 2, size // 2))]
    if not name.endswith(_QKV_SUFFIXES):
        return []
    # GPT-2's Conv1D stores [in, 3 out]; nn.Linear stores [out, in].
    a, b = W.shape
    axis = 1 if b == 3 * a else 0
    labels = _qkv_labels(name, W.shape[axis], cfg)
    if isinstance(labels, str):
        return labels
    idx = torch.from_numpy(labels).to(W.device)
    return [(p, W.index_select(axis, torch.nonzero(idx == i).flatten())) for i, p in enumerate("qkv")]


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


class _SvdBatcher:
    """Collects [k, a, b] matrix stacks and runs one ``svdvals`` per shape when the budget fills.

    Pending stacks never exceed ``budget`` bytes (a larger stack runs on its own), so memory
    stays near one tensor. Wide slices are transposed (same singular values, faster LAPACK).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.pending: dict[tuple[int, int], list[tuple[_Job, str, Any]]] = {}
        self.bytes = 0

    def add(self, job: _Job, key: str, stack) -> list[_Job]:
        """Queue one stack; returns the jobs whose last stack got its singular values."""
        size = stack.numel() * stack.element_size()
        if size >= self.budget:
            return self._run([(job, key, stack)])
        done = self.flush() if self.bytes + size > self.budget else []
        self.pending.setdefault(tuple(stack.shape[1:]), []).append((job, key, stack))
        self.bytes += size
        return done

    def flush(self) -> list[_Job]:
        groups, self.pending, self.bytes = self.pending, {}, 0
        return [job for group in groups.values() for job in self._run(group)]

    @staticmethod
    def _run(group: list[tuple[_Job, str, Any]]) -> list[_Job]:
        import torch

        stack = group[0][2] if len(group) == 1 else torch.cat([s for _, _, s in group])
        if stack.shape[1] < stack.shape[2]:
            stack = stack.transpose(1, 2)
        svals = torch.linalg.svdvals(stack).to("cpu", torch.float64).numpy()
        done, start = [], 0
        for job, key, s in group:
            job.svals[key] = svals[start:start + s.shape[0]]
            start += s.shape[0]
            job.waiting -= 1
            if job.waiting == 0:
                done.append(job)
        return done


def resolve_device(device: str | None):
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` -> torch.device; DeviceError if unavailable."""
    import torch

    d = (device or "cpu").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} asked for CUDA but no GPU is available",
                              "use --device cpu (float64 SVD, WW-identical numbers)")
        dev = torch.device(d)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present",
                              "pick an existing index, e.g. --device cuda:0")
        return dev
    raise DeviceError(f"spectrum runs on cpu or cuda, not {device!r}", "use --device cpu or --device cuda")


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


def _shuffled(stack, reps: int, rng: np.random.RandomState):
    """``reps`` copies of every slice with its entries permuted (np.random.shuffle's draws, in order)."""
    import torch

    out = []
    for _ in range(reps):
        for s in stack:
            perm = torch.from_numpy(rng.permutation(s.numel())).to(s.device)
            out.append(s.reshape(-1)[perm].reshape(s.shape))
    return torch.stack(out)


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
):
    """Spectrum table for ``(name, tensor)`` pairs; see :func:`analyze_checkpoint`."""
    import pandas as pd
    import torch

    dev = resolve_device(device)
    svd_dtype = torch.float64 if dev.type == "cpu" else torch.float32
    eps = float(torch.finfo(svd_dtype).eps)
    item_bytes = torch.finfo(svd_dtype).bits // 8
    # WW draws from the global numpy RNG for the layers it analyses; the same stream in the
    # same order reproduces its rand_* columns after np.random.seed(seed). Rows WW does not
    # analyse draw from a second stream so they leave that one untouched.
    rng_ww, rng_extra = np.random.RandomState(seed), np.random.RandomState(seed + 1)
    batcher = _SvdBatcher(batch_bytes)
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
        try:
            # A large tall or wide matrix goes in as its R factor (same singular values, far
            # less memory); randomize needs the entries themselves, so it keeps the full slices.
            tall = W.ndim == 2 and N >= 2 * M and N * M * item_bytes >= batch_bytes and not randomize
            if tall:
                check_finite(W, name)
            slices = r_factor(W, svd_dtype, dev, batch_bytes) if tall else weight_slices(W, name, svd_dtype, dev)
        except ModelError as e:
            row.update(status="non-finite", warning=e.problem)
            return []
        job = _Job(order, row, N, M, eps, waiting=3 if randomize else 1)
        done = batcher.add(job, "main", slices)
        if randomize:
            rng = rng_extra if (non_ww or reason) else rng_ww
            reps = 5 if M * rf < 100 else 1  # WW: five replicas when there are few eigenvalues
            done += batcher.add(job, "rand", _shuffled(slices, reps, rng))
            done += batcher.add(job, "rand2", _shuffled(slices, 1, rng))
        return done

    def complete(jobs):
        for job in jobs:
            rows[job.order] = _finish(job, randomize, on_layer)

    for t_index, (name, t) in enumerate(tensors):
        seen += 1
        dtype = str(t.dtype).replace("torch.", "")
        # Scalars, norms, biases and integer buffers (position ids) are skipped silently, as WW does.
        if t.ndim >= 2 and t.is_floating_point() and not _is_bias(name):
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
    df.attrs["svd"] = {"device": str(dev), "dtype": str(svd_dtype).replace("torch.", "")}
    return df


def count_tensors(sn: Sniffed) -> int | None:
    """Number of tensors when the headers say it cheaply (safetensors), else None."""
    if sn.kind is Kind.GGUF or not sn.files or not all(f.endswith(".safetensors") for f in sn.files):
        return None
    return sum(len([k for k in safetensors_header(f) if k != "__metadata__"]) for f in sn.files)


def load_config(sn: Sniffed) -> dict[str, Any] | None:
    """The checkpoint's config.json (used only to split fused tensors), if there is one."""
    if not sn.config_path:
        return None
    try:
        cfg = json.loads(Path(sn.config_path).read_text())
    except (OSError, json.JSONDecodeError):
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
):
    """One row per weight matrix of a checkpoint, with WW's column names and ours.

    Reads every tensor once through ``probes.formats.iter_tensors``. Rows WW would skip
    (size limits, names not ending in ``.weight``) are kept with ``ww_skipped``; those past
    WW's size limits are not computed (status ``skipped``). ``split_fused`` adds ``non_ww``
    rows for the parts of fused tensors. ``randomize`` adds WW's rand_* columns, seeded.
    The SVD is float64 on CPU, float32 on CUDA; fits are always float64.
    ``progress(done, total, name)`` is called per tensor, ``on_layer(row, evals)`` per row.
    Notes on tensors not analysed are in ``df.attrs['notes']``.
    """
    sn = source if isinstance(source, Sniffed) else sniff(source)
    return analyze_tensors(
        iter_tensors(sn, unsafe_pickle=unsafe_pickle), device=device, split_fused=split_fused,
        randomize=randomize, seed=seed, config=load_config(sn) if split_fused else None,
        total=count_tensors(sn), progress=progress, on_layer=on_layer, batch_bytes=batch_bytes)


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

