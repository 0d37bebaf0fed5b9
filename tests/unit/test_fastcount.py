"""The fused CPU counting kernel (``probes.fastcount``) against the probe's torch path and hand counts.

Every count the kernel makes is an integer, so the kernel path must give exactly the torch path's state
(zero / near-zero / negative counts, per-channel activity, chunk counts, maximum, histogram, window rows). The
float sums (``sum``, ``sum_abs``, ``sum_sq``, ``token_nz_sum``, ``chunk_sum``) are accumulated in another
(fixed) order, so they agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes import fastcount
from probes.sparsity import ActivationSparsityProbe, window_fields

pytestmark = pytest.mark.skipif(fastcount.kernel() is None, reason=f"no native kernel here: {fastcount.status()}")

FLOAT_SUMS = ("sum", "sum_abs", "sum_sq", "token_nz_sum", "chunk_sum")


def _probe_run(monkeypatch, native: bool, batches, width, **kw):
    monkeypatch.setattr("probes.sparsity._native_ok", lambda valid, g: native and fastcount.supports(valid, g))
    p = ActivationSparsityProbe(width, **kw)
    with torch.inference_mode():
        for x, m in batches:
            p.update(x, m)
    return p


def _assert_same(a: ActivationSparsityProbe, b: ActivationSparsityProbe) -> None:
    for k in a.state:
        ta, tb = a.state[k], b.state[k]
        if k in FLOAT_SUMS:
            assert torch.allclose(ta, tb, rtol=1e-6, atol=1e-9, equal_nan=True), (k, ta, tb)
        else:
            assert torch.equal(ta, tb) or (torch.isnan(ta).all() and torch.isnan(tb).all()), (k, ta, tb)
    ia, va = a._window_values().arrays()
    ib, vb = b._window_values().arrays()
    assert np.array_equal(np.asarray(ia), np.asarray(ib))
    va, vb = np.asarray(va), np.asarray(vb)
    chunk = list(window_fields(a.eps_grid)).index("chunk_sum")  # a float sum: equal to rounding
    assert np.array_equal(np.delete(va, chunk, axis=1), np.delete(vb, chunk, axis=1))
    assert np.allclose(va[:, chunk], vb[:, chunk], rtol=1e-12, atol=1e-12)


def _awkward(shape, seed=0):
    """Zeros, -0, tiny values at and around each threshold, NaN, +-inf, denormals and negatives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.4] = 0.0
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=g)
    specials = [-0.0, 1e-6, -1e-6, 1e-3, np.nextafter(np.float32(1e-3), np.float32(1)), -1e-2, 1e-2, 5e-7, 1e-40,
                -1e-40, float("inf"), float("-inf"), float("nan"), -float("nan"), 3e38, -3e38]
    for j, v in enumerate(specials):
        flat[idx[j * 7:(j + 1) * 7]] = float(v)
    return x


@pytest.mark.parametrize("chunk_k", [0, 3, 8])
@pytest.mark.parametrize("eps_grid", [(), (0.0,), (1e-6, 1e-3, 1e-2), (-0.0, 1e-6, 1e-3, 0.05), (1e-2, 1e-6)])
def test_kernel_matches_the_torch_path_on_awkward_values(monkeypatch, chunk_k, eps_grid):
    x = _awkward((3, 29, 70))
    mask = torch.ones(3, 29, dtype=torch.bool)
    mask[1, 20:] = False  # padding
    mask[2, :4] = False  # uncounted context
    batches = [(x, mask), (x[:, :10], None), (x.reshape(-1, 70)[:50], None)]
    kw = dict(eps_grid=eps_grid, chunk_k=chunk_k)
    _assert_same(_probe_run(monkeypatch, True, batches, 70, **kw), _probe_run(monkeypatch, False, batches, 70, **kw))


@pytest.mark.parametrize("split", ["python", "openmp"])
def test_kernel_matches_on_wide_relu_tensors_split_over_threads(monkeypatch, split):
    torch.manual_seed(1)
    x = torch.relu(torch.randn(4, 128, 1536))
    fastcount.kernel()
    if split == "openmp" and fastcount._STATE["parts_fn"] is None:
        pytest.skip("no OpenMP build here (torch runs no GNU OpenMP runtime)")
    if split == "python":  # the Python thread pool, as where the OpenMP build is not available
        for name in ("parts_fn", "into_fn", "job_fn"):
            monkeypatch.setitem(fastcount._STATE, name, None)
    monkeypatch.setattr(fastcount, "MIN_SPLIT", 1 << 12)  # split even this tensor (786k entries) over the threads
    monkeypatch.setattr(fastcount, "MIN_SPLIT_OMP", 1 << 12)
    batches = [(x, None), (x, torch.rand(4, 128) > 0.3)]
    handoffs, real = [], fastcount._executor
    monkeypatch.setattr(fastcount, "_executor", lambda size: handoffs.append(size) or real(size))
    parts_calls = []
    for name in ("parts_fn", "into_fn"):  # the pass alone (launch), the pass and the merge (a probe's update)
        real_fn = fastcount._STATE[name]
        if real_fn is not None:
            monkeypatch.setitem(fastcount._STATE, name, lambda *a, _f=real_fn: parts_calls.append(a[10]) or _f(*a))
    real_job = fastcount._STATE["job_fn"]
    if real_job is not None:  # the same as into_fn, its arguments but three set up once (fastcount._Job)
        monkeypatch.setitem(fastcount._STATE, "job_fn",
                            lambda *a: parts_calls.append(fastcount._Job.from_address(a[0]).parts) or real_job(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    two = _probe_run(monkeypatch, True, batches, 1536)
    if split == "python":
        assert handoffs and not parts_calls  # the second part did run on the pool's thread
    else:
        assert parts_calls and set(parts_calls) == {2} and not handoffs  # two parts on the OpenMP team
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = _probe_run(monkeypatch, True, batches, 1536)
    _assert_same(two, _probe_run(monkeypatch, False, batches, 1536))
    for k in one.state:  # the split changes no count; float sums only by summation order
        if k in FLOAT_SUMS:
            assert torch.allclose(one.state[k], two.state[k], rtol=1e-12, atol=0), k
        else:
            assert torch.equal(one.state[k], two.state[k]), k


def test_hand_counted_small_tensor():
    x = torch.tensor([[0.0, -0.0, 5e-7, -2e-3, 0.5, float("nan")],
                      [1.0, 0.0, -1e-6, 1e-2, -0.0, -float("inf")],
                      [0.0, 0.0, 0.0, 2.0, 0.0, 0.0],
                      [0.0, 3.0, 0.0, 0.0, 0.0, -4.0]])
    r = fastcount.count(x, (1e-6, 1e-3), [3, 1], 2, 1, nbins=10)
    # per window: zero, neg, |x| <= 1e-6, |x| <= 1e-3, chunk_sum, n_chunks. Window 0 (rows 0-2): zeros 2+2+5,
    # negatives 1+2+0, |x| <= 1e-6: 3+3+5, |x| <= 1e-3: 3+3+5; one full chunk of 2 tokens (rows 0, 1) where
    # only channel 1 is zero (or -0) on both: 1 - 5/6. Window 1 (row 3): no full chunk.
    assert r["windows"].tolist() == [[9, 3, 11, 11, 1 - 5 / 6, 1], [4, 1, 4, 4, 0, 0]]
    assert r["zero_channel"].tolist() == [3, 3, 2, 1, 3, 1]
    # non-zero fractions 4/6, 4/6, 1/6, 2/6 into 10 bins: 6, 6, 1, 3
    assert r["hist"].tolist() == [0, 1, 0, 1, 0, 0, 2, 0, 0, 0]
    assert r["sums"][3] == pytest.approx(11 / 6)
    assert np.isnan(r["max_abs"])  # a NaN anywhere: the maximum is NaN, as torch.max
    r = fastcount.count(x[2:], (), [2], 0, 1)
    assert r["max_abs"] == 4.0 and r["sums"][:3].tolist() == [1.0, 9.0, 29.0]


def test_many_thresholds_and_other_dtypes_take_the_torch_path():
    x = torch.randn(4, 8)
    assert fastcount.supports(x, 4)
    assert not fastcount.supports(x, fastcount.MAX_EPS + 1)
    assert not fastcount.supports(x.double(), 1)
    assert not fastcount.supports(x.view(2, 2, 8), 1)


def test_switched_off_and_no_compiler_fall_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_NATIVE", "0")
    fastcount.reset_for_tests()
    try:
        assert fastcount.kernel() is None
        assert fastcount.status() == {"kernel": "torch", "detail": "ACTSPARSE_NATIVE=0"}
        monkeypatch.setenv("ACTSPARSE_NATIVE", "1")
        monkeypatch.setattr(fastcount, "_compiler", lambda: None)
        fastcount.reset_for_tests()
        assert fastcount.kernel() is None
        assert "no C compiler" in fastcount.status()["detail"]
        p = ActivationSparsityProbe(8)
        p.update(torch.randn(2, 3, 8))  # the torch path still counts
        assert int(p.state["n_tokens"]) == 6
    finally:
        monkeypatch.undo()
        fastcount.reset_for_tests()


def test_the_library_is_built_once_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path))
    fastcount.reset_for_tests()
    try:
        assert fastcount.kernel() is not None
        built = sorted(tmp_path.glob("actsparse_counts-*.so"))
        assert len(built) == 1 and str(built[0]) in fastcount.status()["detail"]
        stamp = built[0].stat().st_mtime_ns
        fastcount.reset_for_tests()
        assert fastcount.kernel() is not None  # loaded, not rebuilt
        assert built[0].stat().st_mtime_ns == stamp
        assert not list(tmp_path.glob(".build-*"))  # no temporary left behind
    finally:
        monkeypatch.undo()
        fastcount.reset_for_tests()


def test_every_build_gives_the_same_bits(monkeypatch, tmp_path):
    """The vector width (-mprefer-vector-width=512, AVX2, portable; on an AVX-512 CPU the first two take the
    AVX-512 loop) changes no count and no sum: the sums' order is LANES' and there is no fused multiply-add."""
    torch.manual_seed(1)
    xs = [torch.randn(n, c) for n, c in [(2048, 512), (777, 1531), (100, 7)]]
    for x in xs:
        x[x.abs() < 0.3] = 0
        x[3, 1] = -0.0
    outs = []
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path))
    sets = fastcount._flag_sets()
    try:
        for flags in sets:
            monkeypatch.setattr(fastcount, "_flag_sets", lambda flags=flags: [flags])
            fastcount.reset_for_tests()
            assert fastcount.kernel() is not None, fastcount.status()
            outs.append([fastcount.count(x, [1e-3, 1e-2, 0.5], [x.shape[0] - 5, 5], 16) for x in xs]
                        # no chunks: one unit per window, thousands of rows; a threshold that counts nothing
                        + [fastcount.count(x, [0.5, -1.0, 1e-3, 0.0], [x.shape[0]], 0) for x in xs])
    finally:
        monkeypatch.undo()
        fastcount.reset_for_tests()
    assert len(outs) == len(sets) >= 3 and len(set(p.name for p in tmp_path.glob("actsparse_counts-*.so"))) == len(sets)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.keys() == b.keys()
            for k in a:
                assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True), k


@pytest.mark.skipif(fastcount.torch_libgomp() is None, reason="torch runs no GNU OpenMP runtime here")
def test_parts_on_torchs_openmp_threads_count_the_same(monkeypatch):
    """The OpenMP build splits a tensor over torch's own thread team: one OpenMP runtime in the process, and
    the same counts, maximum and (to float64 rounding of the parts' sums) sums as one part."""
    import os

    fastcount.reset_for_tests()
    before = fastcount._gomp_files()
    assert os.path.realpath(os.path.join(fastcount.torch_libgomp(), "libgomp.so.1")) in map(os.path.realpath, before)
    try:
        assert fastcount.kernel() is not None and fastcount._STATE["parts_fn"] is not None, fastcount.status()
        assert "OpenMP" in fastcount.status()["detail"]
        assert fastcount._gomp_files() == before  # torch's libgomp, shared: no runtime of its own came in
        monkeypatch.setattr(fastcount, "MIN_SPLIT_OMP", 64)  # split even small tensors
        torch.manual_seed(3)
        for n, c, lens, k in [(2048, 512, [256] * 8, 16), (301, 129, [100, 1, 200], 7), (9, 33, [9], 4)]:
            x = torch.randn(n, c)
            x[x.abs() < 0.5] = 0
            x[0, 0], x[-1, -1] = float("inf"), -0.0
            one = fastcount.count(x, [1e-3, 0.25, 0.6], lens, k, threads=1)
            for threads in (2, 3):
                split = fastcount.count(x, [1e-3, 0.25, 0.6], lens, k, threads=threads)
                for key in ("hist", "zero_channel"):
                    assert np.array_equal(one[key], split[key]), key
                assert one["max_abs"] == split["max_abs"]
                counts = [0, 1, 2, 3, 4, 6]  # windows' zero, neg, grid and n_chunks columns: integers
                assert np.array_equal(one["windows"][:, counts], split["windows"][:, counts])
                np.testing.assert_allclose(split["windows"][:, 5], one["windows"][:, 5], rtol=1e-12)
                np.testing.assert_allclose(split["sums"], one["sums"], rtol=1e-12)
    finally:
        fastcount.reset_for_tests()


def test_measure_records_which_kernel_counted():
    from probes.embedded import default_checkpoint
    from probes.loading import load_checkpoint
    from probes.measure import MeasureOptions, measure

    lm = load_checkpoint(default_checkpoint(), device="cpu", dtype="float32")
    res = measure(lm, MeasureOptions(max_tokens=300, max_length=64, batch_size=2, n_resamples=0))
    assert res.info["statistics_kernel"]["kernel"] == "native"


def test_a_library_others_can_write_is_not_loaded(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a folder anyone may write to: its library could be anybody's code
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(shared))
    monkeypatch.setattr(fastcount.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    fastcount.reset_for_tests()
    try:
        assert fastcount.kernel() is not None  # built in the private fallback folder instead
        assert str(tmp_path / "tmp") in fastcount.status()["detail"]
        assert not list(shared.glob("*.so"))
    finally:
        monkeypatch.undo()
        fastcount.reset_for_tests()


def test_pooled_buffers_never_show_through_results():
    """``launch`` reuses per-part buffers from a pool and ``finish`` gives them back: results already handed out
    stay as they were when later passes write the same buffers, and a pass gives the same results whether its
    buffers are new or reused."""
    if fastcount.kernel() is None:
        pytest.skip(f"no native kernel here: {fastcount.status()}")
    g = torch.Generator().manual_seed(5)
    a = torch.relu(torch.randn(96, 40, generator=g))
    b = torch.randn(96, 40, generator=g)
    lens = [32, 32, 32]
    first = fastcount.count(a, (1e-3, 0.1), lens, 4, 1, 50)
    kept = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in first.items()}
    raw = fastcount.launch(b, (1e-3, 0.1), lens, 4, 1, 50)
    assert raw.bufs is not None
    fastcount.finish(raw)
    again = fastcount.count(a, (1e-3, 0.1), lens, 4, 1, 50)  # buffers from the pool, written by b's pass before
    for k, v in kept.items():
        assert np.array_equal(first[k], v) and np.array_equal(again[k], v), k


def test_a_busy_job_takes_the_general_path_with_the_same_bits():
    """``accumulate`` keeps the last batch layout's plan and buffers as a C struct (one call converts four
    arguments); a second thread that finds it in use takes the general path, with the same results."""
    from probes.sparsity import ActivationSparsityProbe

    fastcount.kernel()
    if fastcount._STATE["job_fn"] is None:
        pytest.skip("no OpenMP build here")
    torch.manual_seed(5)
    x = torch.relu(torch.randn(4, 50, 96))
    a, b = ActivationSparsityProbe(96), ActivationSparsityProbe(96)
    a.update(x)
    job = fastcount._JOB[0][1]
    assert fastcount._JOB[0][0][:3] == (200, 96, (50, 50, 50, 50))
    with job.lock:  # held: as if another thread ran it
        b.update(x)
    assert fastcount._JOB[0][1] is job  # the same job, not rebuilt
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    assert all(np.array_equal(u, v) for u, v in zip(a.windows["values"], b.windows["values"]))
