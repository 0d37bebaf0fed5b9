"""``probes.lapack``'s two-stage eigenvalues (``dsytrd_sy2sb``, ``dsytrd_sb2st``, ``dsterf``) for Gram matrices from
``TWO_STAGE_MIN`` wide: the same eigenvalues as numpy's ``eigvalsh`` to the rounding of either, as accurate against
the SVD, taken by ``svals_cpu`` and ``gram_eigvalsh`` where wide enough and found, and numpy's ``eigvalsh`` where
not."""

import numpy as np
import pytest

from probes import lapack, spectrum_fit

pytestmark = pytest.mark.skipif(lapack.two_stage() is None, reason="no two-stage LAPACK entry points found here")


def _gram(n, N, seed=0, spread=None):
    rng = np.random.default_rng(seed)
    if spread is None:
        W = rng.standard_normal((N, n))
    else:  # singular values log-spaced from 1 down to ``spread``
        U, _ = np.linalg.qr(rng.standard_normal((N, n)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        W = (U * np.logspace(0, np.log10(spread), n)) @ V.T
    W = W.astype(np.float32).astype(np.float64)
    return W, W.T @ W


@pytest.mark.parametrize("n, kd", [(2, None), (7, 3), (64, 8), (300, 32), (520, None)])  # (1030: svals_cpu's test)
def test_the_same_eigenvalues_as_eigvalsh(n, kd):
    _, G = _gram(n, 2 * n + 1, seed=n)
    want = np.linalg.eigvalsh(G)
    got = lapack.eigvalsh_two_stage(np.array(G, order="F"), kd=kd)
    assert got is not None and got.shape == (n,) and np.all(np.diff(got) >= 0)
    assert np.max(np.abs(got - want)) <= 1e-13 * want[-1]


def test_as_accurate_against_the_svd_as_eigvalsh():
    """A near-square 400-wide weight whose eigenvalues span 1e-7 lambda_max: for those >= 1e-6 lambda_max (the
    ones the Gram path keeps) the relative error against the SVD's squares stays at eigvalsh's own (~1e-10)."""
    W, G = _gram(400, 440, seed=5, spread=3e-4)
    true = np.linalg.svd(W, compute_uv=False)[::-1] ** 2
    keep = true >= 1e-6 * true[-1]
    rel_np = np.max(np.abs(np.linalg.eigvalsh(G)[keep] - true[keep]) / true[keep])
    rel_two = np.max(np.abs(lapack.eigvalsh_two_stage(np.array(G, order="F"), kd=32)[keep] - true[keep]) / true[keep])
    assert rel_two <= max(1e-9, 10 * rel_np)


def test_inputs_it_does_not_take_and_what_it_overwrites():
    _, G = _gram(40, 90)
    assert lapack.eigvalsh_two_stage(np.ascontiguousarray(G)) is None  # C-ordered: not taken
    assert lapack.eigvalsh_two_stage(np.asfortranarray(G.astype(np.float32))) is None
    C = np.ascontiguousarray(np.eye(lapack.TWO_STAGE_MIN) * 2.0)
    before = C.copy()
    assert np.array_equal(lapack.eigvalsh_lower(C), np.full(lapack.TWO_STAGE_MIN, 2.0))
    assert np.array_equal(C, before)  # a C-ordered matrix is copied, not overwritten
    assert [lapack.two_stage_band(n) for n in (1024, 2048, 3072, 4096)] == [32, 32, 48, 64]


def test_svals_cpu_and_gram_eigvalsh_take_it_from_the_threshold(monkeypatch):
    """Square and tall weights from ``TWO_STAGE_MIN`` wide go through the two-stage reduction and agree with the
    SVD; narrower ones, or all of them when the entry points are not found, through numpy's eigvalsh."""
    calls = []
    real = lapack.eigvalsh_two_stage
    monkeypatch.setattr(lapack, "eigvalsh_two_stage", lambda G, *a, **k: calls.append(G.shape[0]) or real(G, *a, **k))
    n = lapack.TWO_STAGE_MIN + 6
    W, _ = _gram(n, n, seed=2, spread=0.05)
    sv = spectrum_fit.svals_cpu(W[None])
    assert calls == [n]
    np.testing.assert_allclose(sv[0], np.linalg.svd(W, compute_uv=False), rtol=1e-10)
    T, G = _gram(n, 3 * n, seed=3)
    lam = spectrum_fit.gram_eigvalsh(T.astype(np.float32))
    assert calls == [n, n]
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(G), rtol=0, atol=1e-13 * lam[-1])
    narrow, _ = _gram(200, 200, seed=4)
    spectrum_fit.svals_cpu(narrow[None])
    assert calls == [n, n]
    monkeypatch.setitem(lapack._FOUND, "two_stage", None)  # not found: numpy's eigvalsh, the same values
    np.testing.assert_allclose(spectrum_fit.svals_cpu(W[None])[0], sv[0], rtol=1e-10)
    assert calls == [n, n]


def test_a_tridiagonal_step_that_does_not_converge_falls_back_to_numpy_on_the_same_matrix():
    """``dsterf`` reporting no convergence (info > 0; stood in for here): the tridiagonal matrix the reductions made
    goes to numpy's eigvalsh, so the eigenvalues are still G's. A reduction's own error is raised (G is overwritten
    by then, so there is no quiet fallback)."""
    from types import SimpleNamespace

    real = lapack.two_stage()

    def no_convergence(n, d, e, info):
        info._obj.value = 1

    _, G = _gram(120, 300, seed=9)
    fake = SimpleNamespace(**{**vars(real), "sterf": no_convergence})
    got = lapack.eigvalsh_two_stage(np.array(G, order="F"), kd=8, fns=fake)
    np.testing.assert_allclose(got, np.linalg.eigvalsh(G), rtol=0, atol=1e-12 * np.abs(G).max())

    def refuses(*args):
        args[-4]._obj.value = -3  # the INFO argument (before the three hidden string lengths)

    broken = SimpleNamespace(**{**vars(real), "sb2st": refuses})
    with pytest.raises(RuntimeError, match="dsytrd_sb2st: info = -3"):
        lapack.eigvalsh_two_stage(np.array(G, order="F"), kd=8, fns=broken)
