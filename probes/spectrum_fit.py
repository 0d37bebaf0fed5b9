"""WeightWatcher-parity numerics of one weight: its matrices, ESD, power-law and Marchenko-Pastur fits.

Definitions follow WeightWatcher 0.7.7 (CalculatedContent/WeightWatcher: weightwatcher.py,
RMT_Util.py, WW_powerlaw.py; Martin & Mahoney, JMLR 2021, arXiv 1810.01075) so that every
column can be put next to WW's; see docs METRICS.md section 7. The code is our own:

* the ESD is lambda = sigma^2 of the raw W (conv kernels: one slice per kernel position,
  scaled by sqrt(1/2), eigenvalues pooled), from Gram eigenvalues where they are as accurate
  as the SVD (``svals_cpu``), else the SVD;
* the power-law fit gets alpha for every candidate xmin in O(n) from suffix sums and the KS
  distances in vectorised row blocks;
* the Marchenko-Pastur fit computes its kernel density once per layer, not once per sigma, and
  only where the kernel is non-zero; its Nelder-Mead polish is ``nelder_mead_1d`` (scipy's fmin
  for one variable, to the last bit, without importing scipy.optimize).

Functions of arrays only: which tensors to read, how to batch them and where to run is the
driver's (``probes.spectrum``, which re-exports these names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes import gram_refine, lapack
from probes.errors import ModelError

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
    # A sum is finite only when every entry is (it can also overflow), so the entries are only
    # counted when the sum is not. float32/float64 are summed in their own type (no cast: 4x faster
    # than a float64-accumulated float32 sum; an overflow just takes the counting path), float16 in float32.
    if not _is_float(W):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(W.sum(dtype=None if W.dtype.itemsize >= 4 else np.float32)):
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


GRAM_BLOCK_BYTES = 2 << 20  # float64 row blocks accumulated by syrk (3072 x 768: 31.6-31.9 ms for 256-3072 rows)


def gram_eigvalsh(W, block_bytes: int = 8 << 20) -> np.ndarray:
    """Ascending eigenvalues of W^T W (W tall; a wide W is transposed), the Gram matrix summed over upcast row
    blocks: where ``probes.lapack`` found BLAS's ``syrk``, into one triangle in place (no product matrices, no
    mirrored triangle: 12 % less time on a 3072 x 768 weight than ``gram_matrix`` and ``eigvalsh``), in blocks
    of at most ``GRAM_BLOCK_BYTES`` (the time does not depend on it there, the memory does); else
    ``eigvalsh(gram_matrix(W))``."""
    f = lapack.functions()
    if f is None:
        return np.linalg.eigvalsh(gram_matrix(W, block_bytes))
    G = None
    for block in _row_blocks(W, min(block_bytes, GRAM_BLOCK_BYTES)):
        if G is None:
            G = np.zeros((block.shape[1], block.shape[1]), order="F")  # eigvalsh copies it without a stride
        lapack.syrk_lower_add(f, block, G)
    return lapack.eigvalsh_lower(G)  # reads the lower triangle, the one syrk wrote (two-stage from
    # lapack.TWO_STAGE_MIN wide)


def gram_matrix(W, block_bytes: int = 8 << 20) -> np.ndarray:
    """W^T W (W tall; a wide W is transposed) in float64, summed over upcast row blocks."""
    G = None
    for block in _row_blocks(W, block_bytes):
        G = block.T @ block if G is None else G + block.T @ block
    return G


# The ESD from eigenvalues of the Gram matrix W^T W instead of an SVD of W: 3-5x faster on
# tall matrices, ~2x on square ones, with an absolute error of a few eps * lambda_max per
# eigenvalue, i.e. a relative error near eps * kappa^2 on the smallest one. The Gram values
# >= GRAM_MIN_RATIO * lambda_max are used as they are (relative error <~ 1e-10). Below that:
# on shapes with N >= GRAM_MIN_Q * M the whole matrix takes the SVD (such shapes rarely have
# small eigenvalues); on near-square ones at least REFINE_MIN wide the few small eigenvalues are
# recomputed and certified to 1e-12 (``probes.gram_refine``), and a matrix where that cannot be
# done takes the SVD. ``--svd exact`` forces the SVD everywhere.
GRAM_MIN_Q = 1.2
GRAM_MIN_RATIO = gram_refine.GRAM_MIN_RATIO


def gram_evals_ok(lam: np.ndarray) -> np.ndarray:
    """Which rows of ascending Gram eigenvalues ``[k, m]`` are accurate enough to use as they are."""
    return (lam[..., 0] >= GRAM_MIN_RATIO * lam[..., -1]) & (lam[..., -1] > 0)


def svals_cpu(stack: np.ndarray, method: str = "auto") -> np.ndarray:
    """Singular values ``[k, b]`` (descending) of a float64 stack ``[k, a, b]`` with a >= b."""
    k, a, b = stack.shape
    if method != "auto" or b <= 1:
        return np.linalg.svd(stack, compute_uv=False)
    refine = a < GRAM_MIN_Q * b
    if refine and not (b >= gram_refine.REFINE_MIN and gram_refine.available()):
        return np.linalg.svd(stack, compute_uv=False)
    G = np.matmul(stack.transpose(0, 2, 1), stack)  # symmetric to the last bit (numpy's syrk, mirrored)
    Gt = G.transpose(0, 2, 1)  # the same matrices, each Fortran-ordered: numpy copies them for LAPACK without a
    # stride (2.6 ms less per 768 x 768)
    if b >= lapack.TWO_STAGE_MIN and lapack.two_stage() is not None:  # wide: the two-stage reduction, on copies
        lam = np.stack([lapack.eigvalsh_lower(np.array(g, order="F")) for g in Gt])  # (G is refined from below)
    else:
        lam = np.linalg.eigvalsh(Gt)  # ascending
    ok = gram_evals_ok(lam)
    out = np.empty((k, b))
    out[ok] = np.sqrt(lam[ok, ::-1])
    for i in np.flatnonzero(~ok):
        s = gram_refine.refined_svals(stack[i], G[i], lam[i], overwrite_g=True) if refine else None
        out[i] = np.linalg.svd(stack[i], compute_uv=False) if s is None else s
    return out


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


def _pl_candidates(data: np.ndarray, block_rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """alpha_i = 1 + n_i / sum_{j>=i} ln(x_j/x_i) and the KS distance D_i for every xmin = x_i.

    The sums come from one suffix sum (extended precision), so all alphas cost O(n). The KS distances
    D_i = max_{j>=i} |1 - exp((1 - alpha_i)(ln x_j - ln x_i)) - (j - i)/n_i| (the model CDF as one exp, no
    pow) are computed in blocks of ``block_rows`` candidates over the columns j >= the block's first i, in
    two reused buffers (the element-wise operations are the same for any block size, so the D_i do not
    depend on it; small blocks skip most of the j < i triangle); D_i = 1 where alpha_i <= 1 (as in WW).
    """
    n = data.size
    logs = np.log(data)
    suffix = np.cumsum(logs[::-1].astype(np.longdouble))[::-1]
    n_i = (n - np.arange(n - 1)).astype(np.float64)
    denom = (suffix[:-1] - n_i.astype(np.longdouble) * logs[:-1]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alphas = 1 + n_i / denom
        Ds = np.ones(n - 1)
        rows = max(1, min(block_rows, n - 1))
        buf = np.empty(rows * n)
        frac = np.empty(rows * n)
        offsets = np.arange(n, dtype=np.float64)  # j - i as a float: exact
        below = np.tri(rows, rows, -1, dtype=bool)  # j < i inside a block's first columns
        for r0 in range(0, n - 1, rows):
            r1 = min(n - 1, r0 + rows)
            b, w = r1 - r0, n - r0
            cdf = buf[:b * w].reshape(b, w)
            np.subtract(logs[None, r0:], logs[r0:r1, None], out=cdf)
            cdf *= 1 - alphas[r0:r1, None]
            np.exp(cdf, out=cdf)
            np.subtract(1, cdf, out=cdf)  # 1 - model CDF
            k = frac[:b * w].reshape(b, w)
            np.subtract(offsets[None, :w], offsets[:b, None], out=k)
            np.divide(k, n_i[r0:r1, None], out=k)
            cdf -= k
            np.abs(cdf, out=cdf)
            cdf[:, :b][below[:b, :b]] = 0.0
            Ds[r0:r1] = np.where(alphas[r0:r1] > 1, cdf.max(axis=1), 1.0)
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
    cond_nz_over_mp = kappa_nz / kappa_mp: how far the non-zero condition number is above that
    baseline. (Until 2026-12 this column was called ``kappa_ratio`` and described as arXiv
    2309.03004's spectral concentration; it is not that quantity: see ``kkt_columns``.)
    """
    s = np.asarray(svals, dtype=np.float64).ravel()
    s_max, s_min = float(s.max()), float(s.min())
    tol = s_max * max(N, M) * EPS32
    nz = s[s > tol]
    q = max(N, M) / min(N, M)
    kappa_mp = (math.sqrt(q) + 1) / (math.sqrt(q) - 1) if q > 1 else math.inf
    kappa_nz = s_max / float(nz.min()) if nz.size else math.nan
    return {"kappa": s_max / s_min if s_min > 0 else math.inf, "kappa_nz": kappa_nz, "kappa_nz_tol": tol,
            "kappa_mp": kappa_mp, "cond_nz_over_mp": kappa_nz / kappa_mp if q > 1 else math.nan}


# arXiv 2309.03004's spectral concentration of K K^T (cdgyp/sparsity, codes/modules/hooks.py,
# ``SpectralObservationPlugin.spectral_properties(g, K, ratio_threshold=0.1, eps=1e-32)``): an
# eigenvalue of K K^T is "non-zero" when it exceeds ratio_threshold x their mean. The after-training
# script that calls it on checkpoints (codes/scripts/after_training/spectral.py, ``--threshold-ratio``,
# and spectral.ipynb, ``threshold_ratio=10``) passes 10; the function's own default is 0.1.
KKT_RATIO_THRESHOLD = 10.0  # spectral.py / spectral.ipynb: the value the reference's analysis runs with
KKT_RATIO_THRESHOLD_DEFAULT = 0.1  # spectral_properties' signature default
KKT_EPS = 1e-32
KKT_COLUMNS = ("kappa_2309", "kappa_2309@0.1", "kkT_max_eigenvalue", "kkT_min_nonzero_eigenvalue",
               "kkT_zero_rate", "kkT_max_pseudo_zero", "kkT_average_eigenvalue", "kkT_average_nonzero_eigenvalue")


def kkt_eigenvalues(svals: np.ndarray, rows: int) -> np.ndarray:
    """The ``rows`` eigenvalues of K K^T (ascending) from the singular values of K (``rows`` x cols):
    s^2, and rows - len(s) exact zeros when K has more rows than columns."""
    s = np.asarray(svals, dtype=np.float64).ravel()
    lam = np.concatenate([np.zeros(max(0, rows - s.size)), s * s])
    return np.sort(lam)


def kkt_columns(svals: np.ndarray, rows: int) -> dict[str, float]:
    """arXiv 2309.03004's statistics of K K^T for a weight K stored as ``[rows, cols]`` (an
    ``nn.Linear`` weight ``[out, in]``: rows are the neurons; for the MLP key weight, the d_ff neurons).

    From cdgyp's ``SpectralObservationPlugin.spectral_properties`` ['kkT'], eigenvalues clamped at 0,
    threshold t = ratio x mean(eigenvalues), non-zero = eigenvalue > t:

    - ``kappa_2309``: max eigenvalue / (smallest non-zero eigenvalue + 1e-32), ratio 10 (the value the
      reference's after-training script ``spectral.py`` runs with); 0 when no eigenvalue exceeds t
      (their code then divides 0 by eps);
    - ``kappa_2309@0.1``: the same with the function's default ratio 0.1;
    - ``kkT_max_eigenvalue``, ``kkT_min_nonzero_eigenvalue`` (their ``max_eigenvalue`` and
      ``min_nonzero_eigenvalue``, ratio 10), ``kkT_zero_rate`` (fraction of eigenvalues <= t),
      ``kkT_max_pseudo_zero`` (the largest eigenvalue <= t), ``kkT_average_eigenvalue`` (their
      ``average_eigenvalues``, = trace / rows) and ``kkT_average_nonzero_eigenvalue``.

    The eigenvalues are s^2 of K in float64 (their code: ``torch.linalg.eigvals`` of K K^T in float32,
    real part clamped at 0; the two agree except for eigenvalues within float32 rounding of t).
    """
    lam = kkt_eigenvalues(svals, rows)
    out: dict[str, float] = {}
    mean = float(lam.mean())
    for ratio, key in ((KKT_RATIO_THRESHOLD, "kappa_2309"), (KKT_RATIO_THRESHOLD_DEFAULT, "kappa_2309@0.1")):
        nz = lam > mean * ratio
        top = float(lam[nz].max()) if nz.any() else 0.0
        low = float(lam[nz].min()) if nz.any() else 0.0
        out[key] = top / (low + KKT_EPS)
        if ratio == KKT_RATIO_THRESHOLD:
            out.update(kkT_max_eigenvalue=top, kkT_min_nonzero_eigenvalue=low,
                       kkT_zero_rate=float(np.count_nonzero(~nz)) / lam.size,
                       kkT_max_pseudo_zero=float(lam[~nz].max()) if (~nz).any() else 0.0,
                       kkT_average_eigenvalue=mean,
                       kkT_average_nonzero_eigenvalue=float(lam[nz].mean()) if nz.any() else math.nan)
    return out


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

    Each x_i reaches only the grid points within h of it (about 40 of the 1000), so the kernel values
    are computed there only and placed into a zero matrix [grid, data] that is summed along the data
    axis: the same matrix, value for value, as the dense max(0, 1 - |x - x_i|/h) (every entry outside
    a window is an exact 0 there too), summed in the same order (data in blocks of ``block``), so the
    density is the dense computation's to the last bit at a tenth of its cost.
    """
    data = np.asarray(data, dtype=np.float64)
    xs = np.linspace(0, np.max(data) + 0.5, KDE_POINTS)
    step = xs[1] - xs[0]
    # window of grid points per data point: every point within h, plus two on each side (the kernel is
    # exactly 0 there: the rounding of |x - x_i| / h is far below one grid step)
    width = int(math.ceil(2 * KDE_BANDWIDTH / step)) + 5
    acc = np.zeros(KDE_POINTS)
    for b0 in range(0, data.size, block):
        part = data[b0:b0 + block]
        lo = np.clip(np.searchsorted(xs, part - KDE_BANDWIDTH) - 2, 0, max(0, KDE_POINTS - width))
        rows = lo[:, None] + np.arange(width)[None, :]  # [part, width] grid indices
        rows = np.minimum(rows, KDE_POINTS - 1)
        vals = np.abs(xs[rows] - part[:, None])
        vals /= KDE_BANDWIDTH
        np.subtract(1.0, vals, out=vals)
        np.maximum(vals, 0.0, out=vals)
        dense = np.zeros((KDE_POINTS, part.size))
        dense[rows, np.arange(part.size)[:, None]] = vals
        acc += dense.sum(axis=1)
    ys = acc / (data.size * KDE_BANDWIDTH)
    good = ys > KDE_MIN_DENSITY
    return _KdeGrid(xs[good], ys[good], int(np.count_nonzero(ys < KDE_MIN_DENSITY)))


def _kde_on_grid_dense(data: np.ndarray, block: int = 2048) -> _KdeGrid:
    """``kde_on_grid`` computed densely over every (grid point, data point) pair: the reference the
    windowed one is tested against."""
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
    if Q == 1:
        return _sse_rows(mp_density(kde.x[None, :], s, Q) - kde.y, kde.n_dropped)
    lam_plus, lam_minus = _mp_edges(s[:, 0], Q)
    x_peak = kde.x[np.argmax(kde.y)]
    outside = (lam_plus < x_peak) | (lam_plus > np.max(kde.x)) | (lam_minus > x_peak)
    # A sigma outside scores the same penalty row whatever it is: its sum is computed once, and the density
    # only for the sigmas inside (most of the brute-force grid is outside). Each row's values, and so its
    # sum, are those of computing every row.
    out = np.empty(s.shape[0])
    if outside.any():
        out[outside] = _sse_rows(np.full((1, kde.x.size), MP_PENALTY), kde.n_dropped)[0]
    inside = ~outside
    if inside.any():
        out[inside] = _sse_rows(mp_density(kde.x[None, :], s[inside], Q) - kde.y, kde.n_dropped)
    return out


def _sse_rows(resid: np.ndarray, n_dropped: int) -> np.ndarray:
    """The sum of squares of each row of ``resid`` ``[rows, points]`` followed by ``n_dropped`` zeros (the
    dropped grid points contribute zeros; kept so the sum rounds exactly as WW's)."""
    resid = np.concatenate([resid, np.zeros((resid.shape[0], n_dropped))], axis=1)
    return np.sum(resid ** 2, axis=1)


# Nelder-Mead's coefficients (reflection, expansion, contraction, shrink) and the stopping rule of
# WeightWatcher's polish step, scipy.optimize.fmin with its defaults: the second vertex 5 % away from the
# start, stop when both the vertices and their values are within 1e-4, at most 200 steps and 200 values.
NM_RHO, NM_CHI, NM_GAMMA, NM_SIGMA = 1.0, 2.0, 0.5, 0.5
NM_STEP, NM_ZERO_STEP, NM_XTOL, NM_FTOL, NM_MAX = 0.05, 0.00025, 1e-4, 1e-4, 200


class _OutOfEvaluations(Exception):
    pass


def nelder_mead_1d(f, x0: float) -> float:
    """The minimiser of a function of one variable by the Nelder-Mead simplex method, as WeightWatcher's
    ``mp_fit`` polishes sigma_mp (``scipy.optimize.fmin(f, x0)`` with its defaults), without importing
    scipy.optimize (0.3-0.8 s of a 2 s ``actsparse spectrum``).

    Written from the method's description in Lagarias, Reeds, Wright & Wright, "Convergence properties of
    the Nelder-Mead simplex method in low dimensions", SIAM J. Optim. 9(1), 1998, section 2, for n = 1: the
    simplex is two points ordered by value, ``best`` and ``worst`` (a tie keeps the order they had); the
    centroid of the best n = 1 points is ``best``; one step tries the reflection
    x_r = (1 + rho) best - rho worst, then, when f(x_r) < f(best), the expansion
    x_e = (1 + rho chi) best - rho chi worst (kept when f(x_e) < f(x_r), else x_r); otherwise (in one
    dimension f(x_r) >= f(best) leaves no plain reflection) the outside contraction
    x_c = (1 + rho gamma) best - rho gamma worst when f(x_r) < f(worst) (kept when f(x_c) <= f(x_r)), else
    the inside contraction x_cc = (1 - gamma) best + gamma worst (kept when f(x_cc) < f(worst)); a rejected
    contraction shrinks worst to best + sigma (worst - best). Coefficients 1, 2, 1/2, 1/2. The start's
    second vertex, the stopping rule (|worst - best| <= 1e-4 and |f(worst) - f(best)| <= 1e-4, checked
    before each step) and the budgets (200 steps, 200 values of f; a step that would need a 201st value is
    abandoned) are fmin's defaults. Every point is computed with the formula above in that order of
    operations, so the result is fmin's to the last bit (``tests/unit/test_spectrum_fast.py`` checks it
    against scipy on the MP objectives of real checkpoints and on awkward functions). Returns ``best``.
    """
    calls = 0

    def value(x: float) -> float:
        nonlocal calls
        if calls >= NM_MAX:
            raise _OutOfEvaluations
        calls += 1
        return f(x)

    def before(fa: float, fb: float) -> bool:
        """Whether a vertex valued ``fa`` sorts before one valued ``fb`` (NaN last, ties keep their order)."""
        return fa < fb or (fb != fb and fa == fa)

    best, worst = x0, (1 + NM_STEP) * x0 if x0 != 0 else NM_ZERO_STEP
    f_best, f_worst = value(best), value(worst)
    if before(f_worst, f_best):
        best, worst, f_best, f_worst = worst, best, f_worst, f_best
    steps = 0
    try:
        while calls < NM_MAX and steps < NM_MAX:
            if abs(worst - best) <= NM_XTOL and abs(f_best - f_worst) <= NM_FTOL:
                break
            x_r = (1 + NM_RHO) * best - NM_RHO * worst
            f_r = value(x_r)
            if f_r < f_best:
                x_e = (1 + NM_RHO * NM_CHI) * best - NM_RHO * NM_CHI * worst
                f_e = value(x_e)
                worst, f_worst = (x_e, f_e) if f_e < f_r else (x_r, f_r)
            elif f_r < f_worst:
                x_c = (1 + NM_RHO * NM_GAMMA) * best - NM_RHO * NM_GAMMA * worst
                f_c = value(x_c)
                if f_c <= f_r:
                    worst, f_worst = x_c, f_c
                else:
                    worst = best + NM_SIGMA * (worst - best)
                    f_worst = value(worst)
            else:
                x_cc = (1 - NM_GAMMA) * best + NM_GAMMA * worst
                f_cc = value(x_cc)
                if f_cc < f_worst:
                    worst, f_worst = x_cc, f_cc
                else:
                    worst = best + NM_SIGMA * (worst - best)
                    f_worst = value(worst)
            steps += 1
            if before(f_worst, f_best):
                best, worst, f_best, f_worst = worst, best, f_worst, f_best
    except _OutOfEvaluations:
        pass
    return float(best)


def fit_marchenko_pastur(evals: np.ndarray, N: int, M: int) -> MPFit:
    """WW's mp_fit: rescale x = lambda n / sum(lambda) (W_scale^2 = n / sum lambda), then

    sigma_mp minimises the MP-vs-KDE gap over the grid [0.05 s0, 2 s0) step 0.01 s0,
    s0 = sqrt(max x)/(1 + 1/sqrt Q), polished by Nelder-Mead (WW: scipy's brute + fmin; here
    ``nelder_mead_1d``, fmin's steps and defaults to the last bit, without importing scipy.optimize). Q = 1
    fits the quarter-circle law to sqrt(x). bulk_max/min = sigma^2 (1 +- 1/sqrt Q)^2 / W_scale^2;
    num_spikes = #{x > lambda+ + sqrt(Q^-1/2 lambda+^(2/3) M^(-2/3))} (Tracy-Widom margin);
    mp_softrank = lambda+ / max x. Raises ValueError when the ESD is all zeros.
    """
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
    sigma = nelder_mead_1d(lambda p: _mp_sse(np.array([p]), kde, Q)[0], float(start))
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
