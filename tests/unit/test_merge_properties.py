"""Merge invariance of every streaming probe (issue 8, fuzzing): merging the states of any split of the
data equals one pass over all of it. This is what data-parallel runs (``probes.distributed``: rank r
measures batches r, r + N, ...) and per-shard work rely on.

For each probe: random batches (hypothesis draws shapes, masks, seeds and the split), one probe over
everything, and k probes over k pieces merged (1) left to right, (2) in another grouping
(p1 + (p2 + (... + pk))), and (3) for the batch-level probes, over a round-robin assignment of
batches as ``torchrun`` ranks get them. Pieces may be empty (a rank with no batches). Counts must be
equal exactly, float sums to 1e-12 relative (only the summation order differs), maxima exactly.

Where a probe defines a statistic per batch or per sequence (LinearInputProbe's batch medians,
MassiveProbe's per-sequence medians), the split runs along batch / sequence boundaries, as the
definition needs; entry-level probes (GradientSparsityProbe, AbsLogHistogram, Int8ErrorProbe) are
also split through the rows of a batch.

Already covered elsewhere, not repeated: ActivationSparsityProbe's splits and merge orders
(tests/unit/test_sparsity_probe.py; only a regrouping is added here). ``probes.pplp``'s
``LogHistogram`` and ``CettGrid`` have no ``merge`` (they are used within one process; CettGrid's grid
is fixed by its first batch, so it is not split-invariant by design): for LogHistogram the streaming
property (updating piece by piece equals one update) is checked instead.
"""

from __future__ import annotations

import copy
import math
from functools import reduce

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.gradients import GradientSparsityProbe, LinearInputProbe
from probes.massive import AbsLogHistogram, BatchContext, Int8ErrorProbe, MassiveProbe
from probes.pplp import LogHistogram
from probes.sparsity import ActivationSparsityProbe

# derandomized: the suite is reproducible in CI (stress runs with 10-25x the examples, random, found nothing more)
PROPS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-12


# --------------------------------------------------------------------------------------------- data
@st.composite
def batch_specs(draw, max_batches=6, max_b=4, max_t=8):
    """A list of (B, T) shapes (T varies between batches, as windows of different length do), a width,
    a value seed and the probability that an entry is exactly zero (ReLU-like sparsity)."""
    n = draw(st.integers(1, max_batches))
    shapes = [(draw(st.integers(1, max_b)), draw(st.integers(1, max_t))) for _ in range(n)]
    width = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    zero_p = draw(st.sampled_from([0.0, 0.3, 0.9]))
    masked = draw(st.booleans())
    return shapes, width, seed, zero_p, masked


def make_batches(spec, scale_massive: bool = False):
    """``[(x [B,T,C], mask [B,T] bool)]``: distinct continuous values (no ties), exact zeros, -0.0, padding."""
    shapes, width, seed, zero_p, masked = spec
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in shapes:
        x = torch.randn(B, T, width, generator=g)
        if zero_p:
            x[torch.rand(B, T, width, generator=g) < zero_p] = 0.0
            x[torch.rand(B, T, width, generator=g) < 0.05] = -0.0
        if scale_massive:  # a few entries 100x-10000x larger: massive activations, distinct values
            big = torch.rand(B, T, width, generator=g) < 0.05
            x = torch.where(big, x.sign() * (200 + 1e4 * torch.rand(B, T, width, generator=g)), x)
        mask = torch.rand(B, T, generator=g) < 0.7 if masked else torch.ones(B, T, dtype=torch.bool)
        out.append((x, mask))
    return out


def split_rows(batches, cuts):
    """Cut batches through their rows (sequences) at the drawn points: a finer list of batches."""
    out = []
    for i, (x, m) in enumerate(batches):
        c = cuts[i % len(cuts)] % (x.shape[0] + 1) if cuts else 0
        out += [(x[:c], m[:c]), (x[c:], m[c:])] if 0 < c < x.shape[0] else [(x, m)]
    return out


def contiguous_pieces(items, cut_points):
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cut_points)})
    pieces = [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    return pieces + [[]]  # one empty piece: a rank that got no batches


def round_robin(items, k):
    return [items[r::k] for r in range(k)]


def merged_three_ways(new_probe, feed, pieces):
    """(left fold, right fold) of probes fed piece by piece; each probe is built fresh."""
    probes = []
    for piece in pieces:
        p = new_probe()
        for item in piece:
            feed(p, item)
        probes.append(p)
    left = reduce(lambda a, b: a.merge(b), copy.deepcopy(probes), new_probe())
    right = reduce(lambda acc, p: p.merge(acc), reversed(copy.deepcopy(probes)), new_probe())
    return left, right


def one_pass(new_probe, feed, items):
    p = new_probe()
    for item in items:
        feed(p, item)
    return p


def assert_same_row(want: dict, got: dict, exact=()):
    assert want.keys() == got.keys()
    for k, a in want.items():
        b = got[k]
        if isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), (k, a, b)
        elif isinstance(a, float) and k not in exact:
            assert a == b or math.isclose(a, b, rel_tol=REL, abs_tol=1e-300), (k, a, b)
        else:
            assert a == b, (k, a, b)


def assert_same_state(want: dict, got: dict, float_keys=()):
    for k, a in want.items():
        b = got[k]
        if k in float_keys:
            torch.testing.assert_close(b, a, rtol=REL, atol=0, equal_nan=True, msg=k)
        else:
            assert a.shape == b.shape and torch.equal(a, b), k


# ------------------------------------------------------------------------------------ gradient sparsity
def _grad_items(batches, seed):
    """Per batch: act'(h) (float, or bool for ReLU), eta = dL/dh, and the mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x, m in batches:
        d = (x > 0) if seed % 2 else torch.sigmoid(x) * (1 - torch.sigmoid(x)) * (x > -1)
        eta = torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < 0.6)
        eta[torch.rand(x.shape, generator=g) < 0.02] = 1e-5  # below the smallest tau
        out.append((d, eta, m))
    return out


def _grad_feed(p, item):
    d, eta, m = item
    p.update_forward(d, m)
    p.update_backward(eta, m)


@PROPS
@given(spec=batch_specs(), row_cuts=st.lists(st.integers(0, 8), max_size=6),
       piece_cuts=st.lists(st.integers(0, 20), max_size=4), exact_zero=st.booleans())
def test_gradient_sparsity_probe_merge_of_any_split(spec, row_cuts, piece_cuts, exact_zero):
    width = spec[1]
    items = _grad_items(split_rows(make_batches(spec), row_cuts), spec[2])

    def new():
        return GradientSparsityProbe(width, taus=(1e-4, 1e-2, 1.0), exact_zero_region=exact_zero)

    one = one_pass(new, _grad_feed, items)
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, 3)):
        for merged in merged_three_ways(new, _grad_feed, pieces):
            assert_same_row(one.to_row(), merged.to_row())
            assert_same_state(one.state, merged.state, float_keys=("deriv_sq_sum", "eta_l1_sum", "eta_l2sq_sum"))


# ------------------------------------------------------------------------------------- linear input
def _linear_feed(p, item):
    p.update(*item)


@PROPS
@given(spec=batch_specs(), piece_cuts=st.lists(st.integers(0, 20), max_size=4), k=st.integers(1, 4))
def test_linear_input_probe_merge_of_batch_splits(spec, piece_cuts, k):
    """Spike ratios average exact per-batch medians, so pieces are whole batches (as ranks get them)."""
    items = make_batches(spec)
    width = spec[1]

    def new():
        return LinearInputProbe(width)

    one = one_pass(new, _linear_feed, items)
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, k)):
        for merged in merged_three_ways(new, _linear_feed, pieces):
            assert_same_row(one.to_row(), merged.to_row(), exact=("spike_max", "max_input_value", "min_input_value"))
            assert_same_state(one.state, merged.state, float_keys=("median_sum", "median_nz_sum"))


# -------------------------------------------------------------------------------------------- massive
def _massive_items(batches, seed):
    """Batches with the context a real run sets: global sample ids, token ids, first delimiters."""
    g = torch.Generator().manual_seed(seed)
    out, sample = [], 0
    for x, m in batches:
        B, T = m.shape
        ids = torch.arange(sample, sample + B)
        sample += B
        out.append((x, m, ids, torch.randint(0, 50, (B, T), generator=g), torch.randint(-1, T, (B,), generator=g)))
    return out


def _massive_feed(p, item):
    x, m, ids, tok, delim = item
    p.ctx.set(ids, tok, delim)
    p.update(x, m)


# Ties in |a| are broken by (sample, position, channel), so the top-K and the per-channel maxima are
# the same however the data is split. The token-ratio maximum keeps no coordinates to break a tie
# by: which (max, median) pair goes with a tied ratio is compared only on data without ties.
_TIE_COORDS = ("token_ratio_max_abs", "token_ratio_max_median")


@settings(PROPS, max_examples=25)
@given(spec=batch_specs(max_batches=5), piece_cuts=st.lists(st.integers(0, 20), max_size=4), k=st.integers(1, 4),
       top_k=st.sampled_from([1, 3, 10, 1000]), ties=st.booleans())
def test_massive_probe_merge_of_sequence_splits(spec, piece_cuts, k, top_k, ties):
    """Sun et al.'s statistics are per sequence, so pieces are whole batches (rows keep their context)."""
    if not ties:
        spec = (*spec[:3], 0.0, spec[4])  # no exact zeros: every |a| distinct
    items = _massive_items(make_batches(spec, scale_massive=True), spec[2])
    width = spec[1]

    def new():
        return MassiveProbe(width, top_k=top_k, ctx=BatchContext())

    one = one_pass(new, _massive_feed, items)
    want = one.to_row()
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, k)):
        for merged in merged_three_ways(new, _massive_feed, pieces):
            got, ref = merged.to_row(), dict(want)
            if ties:
                for c in _TIE_COORDS:
                    ref.pop(c), got.pop(c)
            assert_same_row(ref, got, exact=("max", "min", "max_abs", "peak_value", "token_ratio_max",
                                              "seq_ratio_max"))
            float_keys = ("sum_top1", "sum_top2", "sum_top3", "sum_median", "sum_token_ratio", "sum_token_median")
            if ties:
                assert one.topk() == merged.topk()
                keys = [k_ for k_ in one.state if not k_.startswith("topk_") and k_ not in (
                    "max_token_ratio_abs", "max_token_ratio_median")]
                assert_same_state({k_: one.state[k_] for k_ in keys}, merged.state, float_keys=float_keys)
            else:
                assert one.topk() == merged.topk()  # topk(): the filled slots (abs >= 0), largest first
                keys = [k_ for k_ in one.state if not k_.startswith("topk_")]
                assert_same_state({k_: one.state[k_] for k_ in keys}, merged.state, float_keys=float_keys)


@PROPS
@given(spec=batch_specs(), row_cuts=st.lists(st.integers(0, 8), max_size=6),
       piece_cuts=st.lists(st.integers(0, 20), max_size=4), bins=st.sampled_from([16, 8192]))
def test_abs_log_histogram_merge_of_any_split(spec, row_cuts, piece_cuts, bins):
    items = split_rows(make_batches(spec, scale_massive=True), row_cuts)
    width = spec[1]
    upper = max(float(x.abs().max()) for x, _ in items if x.numel()) * 0.9 if any(
        x.numel() for x, _ in items) else 1.0  # some entries above: the overflow count is exercised

    def new():
        return AbsLogHistogram(width, upper, bins=bins)

    one = one_pass(new, _linear_feed, items)
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, 3)):
        for merged in merged_three_ways(new, _linear_feed, pieces):
            assert_same_state(one.state, merged.state)  # all counts: exact
            for q in (0.5, 0.99, 0.999, 1.0):
                a, b = one.quantile(q), merged.quantile(q)
                assert a == b or (math.isnan(a) and math.isnan(b)), q  # NaN: nothing counted


@PROPS
@given(spec=batch_specs(), row_cuts=st.lists(st.integers(0, 8), max_size=6),
       piece_cuts=st.lists(st.integers(0, 20), max_size=4))
def test_int8_error_probe_merge_of_any_split(spec, row_cuts, piece_cuts):
    items = split_rows(make_batches(spec, scale_massive=True), row_cuts)
    width = spec[1]
    thresholds = {"max_abs": 1e4, "clip": 3.0, "zero": 0.0}

    def new():
        return Int8ErrorProbe(width, thresholds)

    one = one_pass(new, _linear_feed, items)
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, 3)):
        for merged in merged_three_ways(new, _linear_feed, pieces):
            for pol in thresholds:
                assert_same_state(one.state[pol], merged.state[pol],
                                  float_keys=("sum_sq", "sum_abs", "err_sq", "err_abs"))
            for a, b in zip(one.rows(), merged.rows()):
                assert_same_row(a, b)


# ------------------------------------------------------------------------------- activation sparsity
@PROPS
@given(spec=batch_specs(), piece_cuts=st.lists(st.integers(0, 20), max_size=4), k=st.integers(1, 3))
def test_activation_sparsity_probe_merge_grouping(spec, piece_cuts, k):
    """Only what test_sparsity_probe.py does not check: another grouping, empty pieces, round robin."""
    items = make_batches(spec)
    width = spec[1]

    def new():
        return ActivationSparsityProbe(width, chunk_k=k)

    one = one_pass(new, _linear_feed, items)
    for pieces in (contiguous_pieces(items, piece_cuts), round_robin(items, 3)):
        for merged in merged_three_ways(new, _linear_feed, pieces):
            assert_same_row(one.to_row(), merged.to_row())


# ------------------------------------------------------------------ pplp: streaming, no merge method
@PROPS
@given(spec=batch_specs(), row_cuts=st.lists(st.integers(0, 8), max_size=6), per_channel=st.booleans())
def test_pplp_log_histogram_streams_piece_by_piece(spec, row_cuts, per_channel):
    items = split_rows(make_batches(spec, scale_massive=True), row_cuts)
    width = spec[1]
    tokens = [x[m].abs() for x, m in items]  # [n, C] absolute values of counted tokens

    def new():
        return LogHistogram(1e-4, 1e3, 64, channels=width if per_channel else None)

    one = new()
    one.update(torch.cat(tokens))
    streamed = new()
    for t in tokens:
        streamed.update(t)
    assert torch.equal(one.counts, streamed.counts) and torch.equal(one.max, streamed.max)
    # a merge, were it added, is the sum of counts and the max of maxima
    halves = [new(), new()]
    for i, t in enumerate(tokens):
        halves[i % 2].update(t)
    assert torch.equal(halves[0].counts + halves[1].counts, one.counts)
    assert torch.equal(torch.maximum(halves[0].max, halves[1].max), one.max)
