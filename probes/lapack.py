"""A few BLAS/LAPACK entry points of the library numpy itself loaded, reached with ctypes.

numpy exposes no Cholesky solve and no accumulating ``syrk``; importing ``scipy.linalg`` for them costs
~0.14 s of a ~1 s ``actsparse spectrum``. numpy's wheels ship OpenBLAS as ``scipy_openblas64_`` (ILP64,
names prefixed ``scipy_`` and suffixed ``64_``); other builds link an OpenBLAS or MKL with plain names.
threadpoolctl (a dependency) lists the loaded libraries; numpy's own is tried first, then the others, and a
set of entry points is used only if it solves a small known problem right (a wrong integer width would
not). Where none is found every caller has its numpy-only path: ``functions()`` is then None.

ctypes releases the GIL during the calls, and they run with the BLAS thread count the process set
(threadpoolctl limits the same library), so the spectrum's compute threads use them as they use numpy.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

COL_MAJOR = 102  # LAPACKE / CBLAS column-major layout
CBLAS_UPPER, CBLAS_LOWER, CBLAS_NO_TRANS, CBLAS_TRANS = 121, 122, 111, 112

_FOUND: dict = {}
_LOCK = threading.Lock()


def functions() -> SimpleNamespace | None:
    """``potrf``, ``potrs`` (LAPACKE, double) and ``syrk`` (CBLAS, double) as ctypes functions, or None."""
    if "fns" in _FOUND:
        return _FOUND["fns"]
    with _LOCK:  # compute threads may ask at once
        if "fns" not in _FOUND:
            _FOUND["fns"] = _find()
    return _FOUND["fns"]


def _find() -> SimpleNamespace | None:
    try:
        import ctypes
        import os

        from threadpoolctl import ThreadpoolController

        np_dir = os.path.realpath(os.path.dirname(np.__file__))  # its wheels: numpy.libs/ or numpy/.dylibs/
        libs = [lc for lc in ThreadpoolController().lib_controllers if lc.internal_api in ("openblas", "mkl")]
        libs.sort(key=lambda lc: not os.path.realpath(lc.filepath).startswith((np_dir + os.sep, np_dir + ".libs")))
        for lc in libs:
            for pre, suf in (("scipy_", "64_"), ("", "64_"), ("", "")):
                try:
                    potrf = getattr(lc.dynlib, f"{pre}LAPACKE_dpotrf{suf}")
                    potrs = getattr(lc.dynlib, f"{pre}LAPACKE_dpotrs{suf}")
                    syrk = getattr(lc.dynlib, f"{pre}cblas_dsyrk{suf}")
                except AttributeError:
                    continue
                i, p, c, e = (ctypes.c_int64 if suf else ctypes.c_int32), ctypes.c_void_p, ctypes.c_char, ctypes.c_int
                potrf.argtypes, potrf.restype = [e, c, i, p, i], i
                potrs.argtypes, potrs.restype = [e, c, i, i, p, i, p, i], i
                syrk.argtypes, syrk.restype = [e, e, e, i, i, ctypes.c_double, p, i, ctypes.c_double, p, i], None
                fns = SimpleNamespace(potrf=potrf, potrs=potrs, syrk=syrk, library=lc.filepath)
                if _works(fns):
                    return fns
    except Exception:  # no threadpoolctl, no library, an unexpected ABI: the numpy-only paths
        return None
    return None


def _works(f: SimpleNamespace) -> bool:
    """Whether the entry points get a small SPD system and a small Gram matrix right."""
    A = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.25], [0.5, 0.25, 2.0]], order="F")
    B = np.asfortranarray(np.arange(6.0).reshape(3, 2))
    want = np.linalg.solve(A, B)
    L = A.copy(order="F")
    if f.potrf(COL_MAJOR, b"L", 3, L.ctypes.data, 3) != 0 or f.potrs(COL_MAJOR, b"L", 3, 2, L.ctypes.data, 3,
                                                                      B.ctypes.data, 3) != 0:
        return False
    X = np.arange(12.0).reshape(4, 3) - 5.0
    G = np.full((3, 3), 7.0)
    syrk_lower_add(f, X, G)
    return bool(np.allclose(B, want, rtol=1e-12, atol=1e-12)
                and np.array_equal(np.tril(G), np.tril(X.T @ X + 7.0)))


def syrk_lower_add(f: SimpleNamespace, block: np.ndarray, G: np.ndarray) -> None:
    """``G += block^T block`` on the lower triangle of ``G`` (``G[i, j]``, i >= j; the other triangle is left
    as it was: ``numpy.linalg.eigvalsh`` reads the lower one). ``G``: ``[M, M]`` float64, C-ordered (LAPACK's
    column-major upper triangle) or Fortran-ordered (its lower one; ``eigvalsh`` then copies it contiguously
    instead of column by column with a stride, 2.6 ms less on a 768 x 768 matrix). ``block``: ``[rows, M]``
    float64, C- or Fortran-contiguous (a row block of a transposed weight is the latter; copied if neither)."""
    rows, M = block.shape
    if block.flags.c_contiguous:  # column-major, block is the M x rows matrix A: G += A A^T
        trans, lda = CBLAS_NO_TRANS, M
    elif block.flags.f_contiguous:  # column-major, block is the rows x M matrix A: G += A^T A
        trans, lda = CBLAS_TRANS, rows
    else:
        block, trans, lda = np.ascontiguousarray(block), CBLAS_NO_TRANS, M
    if G.flags.c_contiguous:
        uplo = CBLAS_UPPER
    elif G.flags.f_contiguous:
        uplo = CBLAS_LOWER
    else:
        raise ValueError("syrk_lower_add needs a contiguous G")
    f.syrk(COL_MAJOR, uplo, trans, M, rows, 1.0, block.ctypes.data, lda, 1.0, G.ctypes.data, M)
