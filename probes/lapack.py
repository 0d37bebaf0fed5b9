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


# ----------------------------------------------------------------------------------------- two-stage eigenvalues
# numpy's ``eigvalsh`` is LAPACK's one-stage ``dsyevd``: its reduction to tridiagonal form (``dsytrd``) does half of
# its work as matrix-vector products that stream the whole trailing matrix from memory for every column. From 1024
# wide, reducing to a band first with matrix-matrix products (``dsytrd_sy2sb``), then the band to tridiagonal form
# (``dsytrd_sb2st``), then the tridiagonal eigenvalues (``dsterf``, as ``dsyevd`` does) is faster on one core (one
# BLAS thread, 3x-wide Gram matrices): 1024: 94 -> 73 ms, 1536: 325 -> 205 ms, 2048: 705 -> 422 ms, 3072: 2.28 ->
# 1.30 s, 4096: 5.22 -> 3.13 s; at 768 it is slower (35-56 ms against 32 ms). Both reductions are Householder
# transformations, backward stable to a few eps * ||G||; their eigenvalues agree to ~1e-14 lambda_max, not bit
# for bit (``benchmarks/README.md``, 2026-12-05).
TWO_STAGE_MIN = 1024


def two_stage_band(n: int) -> int:
    """The band width of the first stage for an ``n``-wide matrix (measured best: 32 up to 2048, 48 at 3072,
    64 at 4096)."""
    return 32 if n < 2560 else 48 if n < 3584 else 64


def two_stage() -> SimpleNamespace | None:
    """``sy2sb``, ``sb2st``, ``sterf`` (LAPACK, double, Fortran calling convention) of the library numpy loaded,
    or None where they are not found or do not get a small problem right."""
    if "two_stage" in _FOUND:
        return _FOUND["two_stage"]
    functions()  # found first: it takes the same lock
    with _LOCK:
        if "two_stage" not in _FOUND:
            _FOUND["two_stage"] = _find_two_stage()
    return _FOUND["two_stage"]


def _find_two_stage() -> SimpleNamespace | None:
    f = functions()  # the library whose entry points already proved right, and its integer width
    if f is None:
        return None
    try:
        import ctypes

        lib = ctypes.CDLL(f.library)
        for pre, suf in (("scipy_", "64_"), ("", "64_"), ("", "")):
            try:
                sy2sb, sb2st, sterf = (getattr(lib, f"{pre}{name}_{suf}") for name in ("dsytrd_sy2sb",
                                                                                        "dsytrd_sb2st", "dsterf"))
            except AttributeError:
                continue
            for fn in (sy2sb, sb2st, sterf):
                fn.restype = None
            t = SimpleNamespace(sy2sb=sy2sb, sb2st=sb2st, sterf=sterf,
                                int=ctypes.c_int64 if suf else ctypes.c_int32, library=f.library)
            if _two_stage_works(t):
                return t
    except Exception:  # an unexpected ABI: numpy's eigvalsh everywhere
        return None
    return None


def _two_stage_works(t: SimpleNamespace) -> bool:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 40))
    G = X.T @ X
    lam = eigvalsh_two_stage(np.asfortranarray(G), kd=4, fns=t)
    return lam is not None and bool(np.allclose(lam, np.linalg.eigvalsh(G), rtol=0, atol=1e-10 * np.abs(G).max()))


def eigvalsh_two_stage(G: np.ndarray, kd: int | None = None, fns: SimpleNamespace | None = None) -> np.ndarray | None:
    """Ascending eigenvalues of the symmetric ``G`` (``[n, n]`` float64, Fortran-ordered; its lower triangle is
    read, as ``numpy.linalg.eigvalsh`` reads it, and overwritten) by the two-stage reduction; None, with ``G``
    untouched, where the entry points are missing or refuse the problem (the caller then takes
    ``numpy.linalg.eigvalsh``). Should ``dsterf`` not converge, the tridiagonal matrix's eigenvalues come from
    numpy instead; an error of the reductions themselves (only ever a wrong argument) is raised."""
    t = fns if fns is not None else two_stage()
    if t is None or not G.flags.f_contiguous or G.dtype != np.float64 or G.ndim != 2 or G.shape[0] != G.shape[1]:
        return None
    import ctypes

    n = G.shape[0]
    kd = max(1, min(int(kd if kd is not None else two_stage_band(n)), n - 1))
    Int, vp, one = t.int, ctypes.c_void_p, ctypes.c_size_t(1)  # (the trailing 1s: Fortran's hidden string lengths)
    info = Int(0)
    ldab = kd + 1
    AB = np.zeros((ldab, n), order="F")
    tau = np.empty(max(1, n - kd))
    query = np.empty(2)

    def sy2sb(work: np.ndarray, lwork: int) -> int:
        t.sy2sb(b"L", ctypes.byref(Int(n)), ctypes.byref(Int(kd)), vp(G.ctypes.data), ctypes.byref(Int(n)),
                vp(AB.ctypes.data), ctypes.byref(Int(ldab)), vp(tau.ctypes.data), vp(work.ctypes.data),
                ctypes.byref(Int(lwork)), ctypes.byref(info), one)
        return info.value

    if sy2sb(query, -1) != 0:  # the workspace query: G untouched
        return None
    work = np.empty(max(1, int(query[0])))
    if sy2sb(work, work.size) != 0:  # G is overwritten from here on: no quiet fallback
        raise RuntimeError(f"LAPACK dsytrd_sy2sb: info = {info.value} (n = {n}, kd = {kd})")
    d, e = np.empty(n), np.empty(max(1, n - 1))
    hq, wq = np.empty(2), np.empty(2)
    args = (ctypes.byref(Int(n)), ctypes.byref(Int(kd)), vp(AB.ctypes.data), ctypes.byref(Int(ldab)),
            vp(d.ctypes.data), vp(e.ctypes.data))
    for lw in (-1, None):  # a workspace query, then the call
        if lw is None:
            hous, work = np.empty(max(1, int(hq[0]))), np.empty(max(1, int(wq[0])))
        else:
            hous, work = hq, wq
        t.sb2st(b"Y", b"N", b"L", *args, vp(hous.ctypes.data), ctypes.byref(Int(lw or hous.size)),
                vp(work.ctypes.data), ctypes.byref(Int(lw or work.size)), ctypes.byref(info), one, one, one)
        if info.value != 0:
            raise RuntimeError(f"LAPACK dsytrd_sb2st: info = {info.value} (n = {n}, kd = {kd})")
    d0, e0 = d.copy(), e[:n - 1].copy()
    t.sterf(ctypes.byref(Int(n)), vp(d.ctypes.data), vp(e.ctypes.data), ctypes.byref(info))
    if info.value != 0:  # no convergence: the same tridiagonal matrix through numpy
        return np.linalg.eigvalsh(np.diag(d0) + np.diag(e0, -1))
    return d  # dsterf sorts ascending


def eigvalsh_lower(G: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric ``G`` from its lower triangle: the two-stage reduction from
    ``TWO_STAGE_MIN`` wide where found (a Fortran-ordered ``G`` is overwritten, any other is copied), else
    ``numpy.linalg.eigvalsh`` (``G`` left as it is)."""
    if G.ndim == 2 and G.shape[0] >= TWO_STAGE_MIN and two_stage() is not None:
        lam = eigvalsh_two_stage(G if G.flags.f_contiguous else np.array(G, order="F"))
        if lam is not None:
            return lam
    return np.linalg.eigvalsh(G)
