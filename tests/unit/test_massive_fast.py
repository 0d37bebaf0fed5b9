"""The massive probe's faster routes give torch's numbers exactly: numpy's selection (``probes.selection``), the
|x| bin tables (``maxact_abs_bins_table``), counting massive entries by their coordinates, and the per-channel
maximum without ``max(0)``. Each is compared with torch's own call, and the whole probe with
``probes.massive._FAST_PATHS`` off (torch throughout) on data with ties, zeros, padding and massive entries."""

from __future__ import annotations

import math

import pytest
import torch

from probes import massive
from probes import selection as sel
from probes.massive import BatchContext, MassiveProbe, maxact_abs_bins, maxact_abs_bins_table


def _ties(shape, seed):
    """Values with many ties: small integers over 4 (repeats everywhere), zeros included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, shape, generator=g).float() / 4


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 8), (5, 33), (2, 4096)])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_rows_is_kthvalue(shape, ties):
    a = _ties(shape, 1) if ties else torch.randn(shape, generator=torch.Generator().manual_seed(2)).abs()
    n = shape[1]
    for k in sorted({1, (n + 1) // 2, n}):
        assert torch.equal(sel.kth_smallest_rows(a, k, True), a.kthvalue(k, dim=1).values)
        med, top = sel.kth_smallest_and_top_rows(a, k, min(3, n), True)
        assert torch.equal(med, a.kthvalue(k, dim=1).values)
        assert torch.equal(top, a.topk(min(3, n), dim=1).values)
    assert torch.equal(sel.kth_smallest_rows(a, (n + 1) // 2, True), a.median(1).values)  # the lower median


def _torch_largest(flat, k):
    """The rule the probe always had: topk, then entries tied with the k-th value first in index order."""
    vals, idx = flat.topk(k)
    v = vals[-1]
    above = (flat > v).nonzero().squeeze(1)
    tied = (flat == v).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, tied])


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (10, 10), (500, 100), (5000, 7)])
@pytest.mark.parametrize("ties", [False, True])
def test_largest_entries_is_the_same_set_with_the_same_tie_rule(n, k, ties):
    flat = _ties((n,), 3) if ties else torch.randn(n, generator=torch.Generator().manual_seed(4))
    for nan_free in (True, False):  # numpy's selection, torch's topk
        vals, idx = sel.largest_entries(flat, k, nan_free)
        assert sorted(idx.tolist()) == sorted(_torch_largest(flat, k).tolist())
        assert torch.equal(vals, flat[idx])
    assert sel.largest_entries(flat, 0, True)[1].numel() == 0


@pytest.mark.parametrize("ties", [False, True])
def test_column_max_first_is_max_dim0(ties):
    a = _ties((300, 17), 5) if ties else torch.randn(300, 17, generator=torch.Generator().manual_seed(6))
    v, i = sel.column_max_first(a, True)
    ref = a.max(0)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    if ties:  # every column has its maximum 2.0 in many rows: the first one is returned
        assert torch.equal(i, (a == 2.0).float().argmax(0))


def test_nan_takes_torch_calls():
    a = torch.tensor([[1.0, math.nan, 3.0, 2.0]])
    assert not sel.numpy_ok(a, False)
    assert torch.equal(sel.kth_smallest_rows(a, 2, False), a.kthvalue(2, dim=1).values)


def test_the_bin_tables_are_the_reference_bins_at_every_cell_and_edge():
    """Every 2^16-pattern cell's first and last value, every bin edge +-2 ulp, 2M random non-negative float32
    patterns (NaN, inf and subnormals among them), zeros. (All 2^31 patterns were compared once, by hand.)"""
    first, edge = massive._abs_bin_tables("cpu")
    cells = torch.arange(1 << 15, dtype=torch.int64) << 16
    edges = edge[~torch.isnan(edge)].view(torch.int32).to(torch.int64)
    assert 500 <= edges.numel() <= 511  # one per bin boundary inside float32's range
    g = torch.Generator().manual_seed(0)
    bits = torch.cat([cells, cells | 0xFFFF, *[edges + d for d in range(-2, 3)],
                      torch.randint(0, 1 << 31, (2_000_000,), generator=g), torch.tensor([0, 1, 0x7F800000])])
    v = bits.to(torch.int32).view(torch.float32)
    assert torch.isnan(v).any() and torch.isinf(v).any() and (v == 0).any()
    assert torch.equal(maxact_abs_bins_table(v).long(), maxact_abs_bins(v))


def _context(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = BatchContext()
    ctx.set(torch.arange(B) * 3 + seed, torch.randint(0, 50, (B, T), generator=g),
            torch.tensor([2, -1, 5, 0][:B] + [3] * max(0, B - 4)))
    return ctx


def _batch(B, T, C, seed, massive_entries=True, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = (_ties((B, T, C), seed) - 1) if ties else torch.randn(B, T, C, generator=g) * 0.3
    x[:, :, 1] = 0.0
    if massive_entries:
        x[:, 0, 3] = 2.5e4
        x[0, 2, 5] = -1.2e4
        x[-1, T - 1, 0] = 150.0  # above 100 but not 1000 x the median: not massive
        x[:, 4, 7] = 777.0  # ties at the top-K boundary
    return x


@pytest.mark.parametrize("B,T,C,top_k", [(1, 40, 32, 100), (1, 40, 32, 2), (3, 20, 16, 5), (4, 9, 24, 100)])
@pytest.mark.parametrize("masked", ["none", "same", "ragged"])
@pytest.mark.parametrize("massive_entries", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_the_probe_is_the_same_with_and_without_the_fast_paths(monkeypatch, B, T, C, top_k, masked,
                                                               massive_entries, ties):
    mask = None
    if masked == "same":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, T - 3:] = False
    elif masked == "ragged":
        mask = torch.arange(T)[None] < torch.tensor([T, T - 5, 1, 0][:B])[:, None]
    probes = {}
    for fast in (True, False):
        monkeypatch.setattr(massive, "_FAST_PATHS", fast)
        ctx = BatchContext()
        p = MassiveProbe(C, top_k=top_k, ctx=ctx)
        for seed in (0, 1):
            ctx.set(*vars(_context(B, T, seed)).values())
            p.update(_batch(B, T, C, seed, massive_entries, ties), mask)
        probes[fast] = p
    fast, slow = probes[True].state, probes[False].state
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key
    assert probes[True].to_row() == probes[False].to_row() or _same_row(probes[True].to_row(), probes[False].to_row())
    if massive_entries and masked != "ragged":
        assert int(fast["n_massive"]) > 0


def _same_row(a, b):
    return a.keys() == b.keys() and all(x == y or (x != x and y != y) for x, y in zip(a.values(), b.values()))


def test_nan_and_inf_are_counted_the_same_way(monkeypatch):
    x = _batch(2, 12, 16, 0)
    x[0, 3, 2] = math.inf
    x[1, 5, 4] = -math.inf
    states = []
    for fast in (True, False):
        monkeypatch.setattr(massive, "_FAST_PATHS", fast)
        p = MassiveProbe(16)
        p.update(x)
        states.append(p.state)
    assert int(states[0]["n_nonfinite"]) == 2
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    y = x.clone()
    y[1, 1, 1] = math.nan  # NaN: torch's calls in both
    p = MassiveProbe(16)
    p.update(y)
    assert int(p.state["n_nonfinite"]) == 3


@pytest.mark.parametrize("ties", [False, True])
def test_topk_sample_mask_through_numpy_is_the_kthvalue_rule(ties):
    """cliff's per-sample rule takes its k-th values from numpy's selection now: the drop mask is the one of
    ``v < torch.kthvalue(v_b, n_drop + 1)`` per sequence over its counted entries (signed values, ties, zeros of
    both signs, padding)."""
    from probes.cliff import topk_sample_mask

    g = torch.Generator().manual_seed(7)
    v = (_ties((3, 10, 8), 7) - 1) if ties else torch.randn(3, 10, 8, generator=g)
    v[0, 0, :4] = -0.0
    mask = torch.arange(10)[None] < torch.tensor([10, 6, 9])[:, None]
    for s in (0.0, 0.1, 0.5, 0.93, 1.0):
        got = topk_sample_mask(v, mask, s)
        for b in range(3):
            counted = v[b][mask[b]].reshape(-1)
            n_drop = int(s * counted.numel())
            if n_drop <= 0:
                want = torch.zeros_like(v[b], dtype=torch.bool)
            elif n_drop >= counted.numel():
                want = torch.ones_like(v[b], dtype=torch.bool)
            else:
                want = v[b] < counted.kthvalue(n_drop + 1).values
            assert torch.equal(got[b], want), (s, b)
