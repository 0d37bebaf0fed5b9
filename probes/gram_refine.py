"""Singular values of a near-square matrix from its Gram eigenvalues, with the small ones recomputed.

``eigvalsh(W^T W)`` costs about a third of an SVD on a square float64 matrix (one core, 768 x 768: 8 ms
to form the Gram matrix and 34 ms for its eigenvalues, against 114 ms for numpy's SVD; 2048 x 2048: 0.89 s
against 2.2 s), but every eigenvalue it gives carries an absolute error of a few eps * lambda_max, so the
small eigenvalues of a square weight (kappa^2 of 1e6-1e10 is common) lose their relative accuracy. That is
why the Gram path of ``svals_cpu`` was kept to shapes with N >= 1.2 M and lambda_min >= 1e-6 lambda_max.

Here the eigenvalues >= ``GRAM_MIN_RATIO`` * lambda_max are kept as they are (relative error <~ 1e-10: the
rule the Gram path already uses) and the k below it are recomputed:

1. block inverse iteration on p = k + max(8, k) vectors with the Cholesky factor of the computed Gram
   matrix (LAPACK ``potrf`` / ``potrs`` from the BLAS library numpy itself loaded, reached with ctypes;
   numpy has no triangular solve). The computed Gram matrix differs from the exact one by ~eps *
   lambda_max, which tilts the block's subspace, but the next step's error is quadratic in that tilt;
2. a Rayleigh-Ritz step on W itself: the singular values of the n x p matrix W X (X orthonormal), whose
   squares are upper bounds of the p smallest eigenvalues of W^T W;
3. a certificate: with the residual R = W^T W V - V Theta of the k target Ritz pairs and the gap
   delta = lambda_{k+1} - theta_k (lambda_{k+1} from the Gram values, less their error bound), each of
   the k smallest eigenvalues lies within ||R||_F^2 / delta of its Ritz value (the quadratic residual
   bound for Hermitian matrices); iteration stops when that is <= ``REFINE_RTOL`` * theta_1.

Anything else returns None and the caller takes the SVD: no LAPACK symbols found, the Gram matrix not
numerically positive definite (W near-singular), too many small eigenvalues (k > m / 8), no certificate
within ``MAX_ITER`` iterations, or Ritz values that disagree with the Gram values by more than the Gram
values' own error bound. The start block is drawn from a fixed seed, so a matrix always gives the same
numbers on the same machine and library.
"""

from __future__ import annotations

import numpy as np

from probes import lapack

GRAM_MIN_RATIO = 1e-6  # eigenvalues >= this * lambda_max are taken from the Gram matrix as they are
REFINE_MIN = 512  # below this width numpy's SVD is as fast as Gram eigenvalues plus the refinement
REFINE_RTOL = 1e-12  # certified relative accuracy of each recomputed eigenvalue
MAX_ITER = 12
# Each iteration shrinks the block's error by about lambda_k / lambda_{p+1}; a spectrum with no gap there (a
# smooth log-spaced one) would take tens of iterations, so the SVD is taken at once.
SLOW_RATIO = 0.25


def available() -> bool:
    """Whether the refinement can run here (LAPACK's potrf/potrs were found: ``probes.lapack``)."""
    return lapack.functions() is not None


def refined_svals(W: np.ndarray, G: np.ndarray, lam: np.ndarray, overwrite_g: bool = False) -> np.ndarray | None:
    """Descending singular values of ``W`` ([n, m] float64, n >= m) from ``lam``, the ascending eigenvalues
    of its computed Gram matrix ``G`` = W^T W, with those below ``GRAM_MIN_RATIO`` * lambda_max
    recomputed and certified (module docstring); None where the SVD is needed. With ``overwrite_g`` a
    contiguous ``G`` is overwritten by its Cholesky factor instead of copied."""
    m = W.shape[1]
    lmax = float(lam[-1])
    if not (np.isfinite(lmax) and lmax > 0):
        return None
    k = int(np.count_nonzero(lam < GRAM_MIN_RATIO * lmax))
    if k == 0:
        return np.sqrt(lam[::-1])
    p = k + max(8, k)
    if 8 * k > m or p >= m or lam[k - 1] > SLOW_RATIO * lam[p]:
        return None  # too many to recompute, or no gap for the iteration to converge on in a few steps
    f = lapack.functions()
    if f is None:
        return None
    # G is symmetric: a C-contiguous one is also its own Fortran-ordered transpose
    contiguous = G.dtype == np.float64 and (G.flags.c_contiguous or G.flags.f_contiguous)
    L = G if overwrite_g and contiguous else np.array(G, dtype=np.float64, order="F", copy=True)
    if f.potrf(lapack.COL_MAJOR, b"L", m, L.ctypes.data, m) != 0:
        return None  # not numerically positive definite (or a bad argument): the SVD
    gram_err = 4.0 * m * np.finfo(np.float64).eps * lmax  # bound on each Gram eigenvalue's absolute error
    X = np.random.default_rng(0).standard_normal((m, p))
    for _ in range(MAX_ITER):
        Y = np.asfortranarray(X)
        if f.potrs(lapack.COL_MAJOR, b"L", m, p, L.ctypes.data, m, Y.ctypes.data, m) != 0:
            return None
        X, _ = np.linalg.qr(Y)
        _, s, Vt = np.linalg.svd(W @ X, full_matrices=False)  # Rayleigh-Ritz with W itself
        theta = s[::-1] ** 2  # ascending Ritz values
        X = X @ Vt[::-1].T  # their Ritz vectors, in that order
        Vk = X[:, :k]
        R = W.T @ (W @ Vk) - Vk * theta[:k]
        delta = (lam[k] - gram_err) - theta[k - 1]
        if delta > 0 and np.einsum("ij,ij->", R, R) / delta <= REFINE_RTOL * theta[0]:
            if np.any(np.abs(theta[:k] - lam[:k]) > gram_err):
                return None
            out = lam.copy()
            out[:k] = theta[:k]
            return np.sqrt(out[::-1])
    return None
