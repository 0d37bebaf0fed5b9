"""ActivationSparsityProbe: every column of ``to_row()`` by hand on small tensors, and merge invariance.

Values are dyadic (powers of two) wherever a sum is checked, so the hand-computed sums are
exact in float64 and the comparisons can be exact too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.sparsity import HIST_BINS, ActivationSparsityProbe

A = 2.0 ** -24  # ~6e-8: non-zero, but <= 1e-6
B = 2.0 ** -11  # ~4.9e-4: > 1e-6, <= 1e-3
D = 2.0 ** -8  # ~3.9e-3: > 1e-3, <= 1e-2
E = 2.0 ** -5  # 0.03125: > 1e-2
NZ = -0.0

# Two sequences of 5 positions, 6 channels. Rows marked "pad" are outside the mask: their
# values (9, -50, 7, ...) would change max_abs, dead/always-on and the sums if they counted.
#          ch0    ch1   ch2   ch3   ch4    ch5
SEQ0 = [[0.0,   1.0,  NZ,   2.0,  0.25,  0.0],   # t0: nz ch1 ch3 ch4        (3 zeros)
        [0.0,   0.0,  B,   -3.0,  0.25,  0.0],   # t1: nz ch2 ch3 ch4        (3 zeros)
        [A,     0.0,  0.0,  0.0, -0.25,  0.0],   # t2: nz ch0 ch4            (4 zeros)
        [4.0,   0.0,  0.0,  0.0,  0.25,  0.0],   # t3: nz ch0 ch4            (4 zeros)
        [9.0,   9.0,  9.0,  9.0,  0.0,   9.0]]   # pad
SEQ1 = [[-1.0,  0.0,  0.0,  D,    0.25,  0.0],   # u0: nz ch0 ch3 ch4        (3 zeros)
        [0.0,   0.0,  0.0,  0.0,  0.25,  0.0],   # u1: nz ch4                (5 zeros)
        [E,     NZ,   0.0,  0.0,  0.25,  0.0],   # u2: nz ch0 ch4            (4 zeros)
        [-50.0, 0.0,  0.0,  0.0,  0.0,   7.0],   # pad
        [-50.0, 0.0,  0.0,  0.0,  0.0,   7.0]]   # pad
MASK = [[True, True, True, True, False], [True, True, True, False, False]]
N_TOK, WIDTH = 7, 6
ENTRIES = N_TOK * WIDTH  # 42


def _x(dtype=torch.float32):
    return torch.tensor([SEQ0, SEQ1], dtype=torch.float32).to(dtype)


def _mask():
    return torch.tensor(MASK)


@pytest.fixture
def row():
    p = ActivationSparsityProbe(WIDTH, chunk_k=2)
    p.update(_x(), _mask())
    return p.to_row()


def test_counts_and_zero_fractions(row):
    assert row["n_tokens"] == 7 and row["width"] == 6
    # zeros per valid token: 3 + 3 + 4 + 4 + 3 + 5 + 4 = 26 (both -0.0 entries are zeros)
    assert row["zero_frac"] == 26 / 42


def test_negative_zero_counts_as_zero():
    p = ActivationSparsityProbe(3, chunk_k=1)
    p.update(torch.tensor([[-0.0, -0.0, 1.0]]))
    r = p.to_row()
    assert r["zero_frac"] == 2 / 3
    assert r["neg_frac"] == 0.0  # -0.0 is not negative either
    assert r["dead_neurons"] == 2


def test_near_zero_grid(row):
    # |a| <= 1e-6 adds A; <= 1e-3 adds B; <= 1e-2 adds D; E = 0.03125 is above every eps.
    assert row["near_zero_frac@1e-06"] == 27 / 42
    assert row["near_zero_frac@0.001"] == 28 / 42
    assert row["near_zero_frac@0.01"] == 29 / 42


def test_near_zero_custom_grid_and_boundary():
    p = ActivationSparsityProbe(4, eps_grid=(0.5, 0.25), chunk_k=1)
    p.update(torch.tensor([[0.25, -0.25, 0.5, 0.75]]))  # |a| <= eps is inclusive
    r = p.to_row()
    assert r["near_zero_frac@0.5"] == 3 / 4
    assert r["near_zero_frac@0.25"] == 2 / 4


def test_nonzero_pct_per_token(row):
    # non-zero entries per token: 3, 3, 2, 2, 3, 1, 2 of 6 -> mean 16/42
    assert row["nonzero_pct_per_token"] == pytest.approx(100 * 16 / 42, rel=1e-15)


def test_nonzero_pct_histogram_quantiles(row):
    # per-token fractions sorted: 1/6, 1/3, 1/3, 1/3, 1/2, 1/2, 1/2
    bin_width_pct = 100 / HIST_BINS
    assert abs(row["nonzero_pct_per_token_p05_hist"] - 100 / 6) <= bin_width_pct
    assert abs(row["nonzero_pct_per_token_p50_hist"] - 100 / 3) <= bin_width_pct
    assert abs(row["nonzero_pct_per_token_p95_hist"] - 50.0) <= bin_width_pct


def test_histogram_quantiles_spread_out():
    # 100 tokens of width 100 with k non-zero entries on token k (k = 1..100): fractions 1%..100%
    x = (torch.arange(100)[None, :] < torch.arange(1, 101)[:, None]).float()  # [tokens, channels]
    p = ActivationSparsityProbe(100, chunk_k=1)
    p.update(x)
    r = p.to_row()
    bw = 100 / HIST_BINS
    for q, name in ((5, "p05"), (50, "p50"), (95, "p95")):
        want = np.percentile(np.arange(1, 101), q, method="inverted_cdf")
        assert abs(r[f"nonzero_pct_per_token_{name}_hist"] - want) <= 1 + bw  # one token step + one bin
    assert r["nonzero_pct_per_token"] == pytest.approx(50.5)


def test_dead_and_always_on(row):
    # ch5 is zero on every valid token (non-zero only on padding): dead.
    # ch4 is non-zero on every valid token (zero only on padding): always on.
    assert row["dead_neurons"] == 1 and row["dead_frac"] == 1 / 6
    assert row["always_on_neurons"] == 1 and row["always_on_frac"] == 1 / 6


def test_neg_frac(row):
    # -3 (t1), -0.25 (t2), -1 (u0); -0.0 is not negative; -50 is padding
    assert row["neg_frac"] == 3 / 42


def test_moments_and_max(row):
    s = 4.25 + A + B + D + E
    s_abs = 12.75 + A + B + D + E
    s_sq = 31.4375 + A * A + B * B + D * D + E * E
    # Sums are float32 within a token and float64 across tokens (METRICS.md conventions).
    assert row["mean"] == pytest.approx(s / 42, rel=1e-6)
    assert row["mean_abs"] == pytest.approx(s_abs / 42, rel=1e-6)
    assert row["rms"] == pytest.approx(math.sqrt(s_sq / 42), rel=1e-6)
    assert row["max_abs"] == 4.0  # 9 and -50 sit on padding
    assert row["nonfinite"] == 0


def test_chunk_sparsity_main_fixture(row):
    # k = 2. seq0: (t0,t1) -> {1,2,3,4}: 1 - 4/6; (t2,t3) -> {0,4}: 1 - 2/6.
    # seq1: (u0,u1) -> {0,3,4}: 1 - 3/6; u2 is a partial chunk and is dropped.
    assert row["n_chunks"] == 3
    assert row["chunk_sparsity@2"] == pytest.approx((2 / 6 + 4 / 6 + 3 / 6) / 3, rel=1e-15)


def _onehot(*chs, c=4):
    v = [0.0] * c
    for ch in chs:
        v[ch] = 1.0
    return v


def test_chunk_sparsity_respects_sequences_masks_and_padding():
    ALL = [1.0, 1.0, 1.0, 1.0]
    x = torch.tensor([
        # seq A: uncounted context first (as in a rolling window), then 3 valid tokens, then padding
        [ALL, _onehot(0), _onehot(1), _onehot(1), ALL, ALL],
        # seq B: 3 valid tokens, then padding
        [_onehot(3), _onehot(3), _onehot(0, 1, 2), ALL, ALL, ALL],
        # seq C: a masked hole between valid tokens 0 and 2
        [_onehot(0), ALL, _onehot(2), _onehot(), ALL, ALL],
    ])
    mask = torch.tensor([[False, True, True, True, False, False],
                         [True, True, True, False, False, False],
                         [True, False, True, True, False, False]])
    p = ActivationSparsityProbe(4, chunk_k=2)
    p.update(x, mask)
    r = p.to_row()
    # A: (a1,a2) -> {0,1}: 1/2, a3 partial.  B: (b0,b1) -> {3}: 3/4, b2 partial.
    # C: (c0,c2) are consecutive valid tokens -> {0,2}: 1/2, c3 partial.
    # Had chunks crossed sequences, the 9 valid tokens would have made 4 full chunks.
    assert r["n_chunks"] == 3
    assert r["chunk_sparsity@2"] == pytest.approx((1 / 2 + 3 / 4 + 1 / 2) / 3, rel=1e-15)
    assert r["n_tokens"] == 9


def test_chunk_sparsity_k1_equals_one_minus_nonzero_fraction(row):
    p = ActivationSparsityProbe(WIDTH, chunk_k=1)
    p.update(_x(), _mask())
    r = p.to_row()
    assert r["n_chunks"] == 7
    assert r["chunk_sparsity@1"] == pytest.approx(r["zero_frac"], rel=1e-15)


def test_chunk_sparsity_no_full_chunk_is_nan():
    p = ActivationSparsityProbe(4, chunk_k=8)
    p.update(torch.ones(2, 7, 4))  # sequences of 7 < k
    r = p.to_row()
    assert r["n_chunks"] == 0 and math.isnan(r["chunk_sparsity@8"])


def test_two_d_input_is_one_token_per_sample():
    p = ActivationSparsityProbe(3, chunk_k=2)
    p.update(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))  # [tokens, channels]
    r = p.to_row()
    assert r["n_tokens"] == 2 and r["zero_frac"] == 3 / 6
    assert r["n_chunks"] == 0  # every sample is its own sequence of one token


def test_nonfinite_counted():
    p = ActivationSparsityProbe(3, chunk_k=1)
    p.update(torch.tensor([[1.0, float("inf"), 0.0], [float("nan"), -2.0, 0.0]]))
    r = p.to_row()
    assert r["nonfinite"] == 2
    assert r["zero_frac"] == 2 / 6  # NaN and Inf are non-zero entries
    p2 = ActivationSparsityProbe(2, chunk_k=1)
    p2.update(torch.tensor([[1.0, -float("inf")]]))
    assert p2.to_row()["nonfinite"] == 1 and p2.to_row()["max_abs"] == math.inf


def test_empty_probe_row():
    p = ActivationSparsityProbe(4)
    p.update(torch.ones(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))  # nothing valid
    r = p.to_row()
    assert r["n_tokens"] == 0 and r["n_chunks"] == 0 and r["dead_neurons"] == 0 and r["nonfinite"] == 0
    for k in ("zero_frac", "near_zero_frac@0.01", "nonzero_pct_per_token", "neg_frac", "mean", "rms", "max_abs",
              "dead_frac", "chunk_sparsity@8", "nonzero_pct_per_token_p50_hist"):
        assert math.isnan(r[k]), k


def test_width_mismatch_raises():
    p = ActivationSparsityProbe(4)
    with pytest.raises(ValueError, match="width 4"):
        p.update(torch.ones(1, 2, 5))


def test_integer_mask_means_the_same_as_bool_mask():
    a, b = ActivationSparsityProbe(WIDTH, chunk_k=2), ActivationSparsityProbe(WIDTH, chunk_k=2)
    a.update(_x(), _mask())
    b.update(_x(), _mask().long())
    assert b.to_row() == a.to_row()


def test_merge_rejects_different_configuration():
    with pytest.raises(ValueError):
        ActivationSparsityProbe(4).merge(ActivationSparsityProbe(4, chunk_k=4))
    with pytest.raises(ValueError):
        ActivationSparsityProbe(4).merge(ActivationSparsityProbe(5))
    with pytest.raises(ValueError):
        ActivationSparsityProbe(4).merge(ActivationSparsityProbe(4, eps_grid=(0.1,)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32_statistics(dtype):
    # The same values (exactly representable in both half formats) as float32 and as bf16/fp16.
    ref = ActivationSparsityProbe(WIDTH, chunk_k=2)
    ref.update(_x(), _mask())
    half = ActivationSparsityProbe(WIDTH, chunk_k=2)
    half.update(_x(dtype), _mask())
    assert half.to_row() == ref.to_row()
    assert half.state["sum"].dtype == torch.float64 and half.state["zero"].dtype == torch.int64


def test_fp16_squares_do_not_overflow():
    # 60000^2 overflows float16 (max 65504) and 256 * 60000 overflows a float16 sum.
    x = torch.full((1, 256, 2), 60000.0, dtype=torch.float16)
    p = ActivationSparsityProbe(2, chunk_k=1)
    p.update(x)
    r = p.to_row()
    assert r["mean"] == 60000.0 and r["rms"] == 60000.0 and r["max_abs"] == 60000.0
    assert r["nonfinite"] == 0


def test_bf16_many_small_values_sum_exactly():
    # 4096 entries of 2^-10 in bf16: a bf16 accumulator would stall; float64 sums are exact.
    x = torch.full((1, 1024, 4), 2.0 ** -10, dtype=torch.bfloat16)
    p = ActivationSparsityProbe(4, chunk_k=1)
    p.update(x)
    r = p.to_row()
    assert r["mean"] == 2.0 ** -10 and r["mean_abs"] == 2.0 ** -10
    assert r["near_zero_frac@0.001"] == 1.0 and r["near_zero_frac@1e-06"] == 0.0


def test_two_updates_equal_one_update():
    # Streaming: two batches through one probe give what one batch with both does.
    a, b = ActivationSparsityProbe(WIDTH, chunk_k=2), ActivationSparsityProbe(WIDTH, chunk_k=2)
    a.update(_x()[:1], _mask()[:1])
    a.update(_x()[1:], _mask()[1:])
    b.update(_x(), _mask())
    _same(b.to_row(), a.to_row(), 2)


# ---------------------------------------------------------------------------------------------
# A brute-force reference for every column, and merge invariance (hypothesis).

COUNT_COLUMNS = ("n_tokens", "width", "zero_frac", "near_zero_frac@1e-06", "near_zero_frac@0.001",
                 "near_zero_frac@0.01", "nonzero_pct_per_token_p05_hist", "nonzero_pct_per_token_p50_hist",
                 "nonzero_pct_per_token_p95_hist", "dead_neurons", "dead_frac", "always_on_neurons",
                 "always_on_frac", "neg_frac", "max_abs", "nonfinite")
FLOAT_COLUMNS = ("nonzero_pct_per_token", "mean_abs", "rms")
CHUNK_COUNT, CHUNK_FLOAT = "n_chunks", "chunk_sparsity@{k}"

VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, A, -B, D, E, -0.5, 1.0, 3.0]),
    st.floats(-1e3, 1e3, width=32, allow_nan=False),
)


@st.composite
def batches(draw, max_b=5, max_t=7, max_c=5):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    c = draw(st.integers(1, max_c))
    vals = draw(st.lists(VALUES, min_size=b * t * c, max_size=b * t * c))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    x = torch.tensor(vals, dtype=torch.float32).view(b, t, c)
    m = torch.tensor(mask).view(b, t)
    return x, m


def _same(r1, r2, k, chunks=True):
    for col in COUNT_COLUMNS:
        v1, v2 = r1[col], r2[col]
        assert (v1 == v2) or (isinstance(v1, float) and math.isnan(v1) and math.isnan(v2)), col
    cols = FLOAT_COLUMNS + ((CHUNK_FLOAT.format(k=k),) if chunks else ())
    for col in cols:
        v1, v2 = r1[col], r2[col]
        if isinstance(v1, float) and math.isnan(v1):
            assert math.isnan(v2), col
        else:
            assert v2 == pytest.approx(v1, rel=1e-12, abs=0), col
    # mean can cancel to ~0: relative to the mean magnitude instead
    if not math.isnan(r1["mean"]):
        assert abs(r1["mean"] - r2["mean"]) <= 1e-12 * r1["mean_abs"], "mean"
    if chunks:
        assert r1[CHUNK_COUNT] == r2[CHUNK_COUNT]


def _reference_row(x: torch.Tensor, m: torch.Tensor, k: int) -> dict:
    """Plain-Python loops over valid tokens (float64), independent of the probe's vectorised code."""
    xs = x.double().numpy()
    ms = m.numpy()
    c = xs.shape[-1]
    toks = [xs[i, j] for i in range(xs.shape[0]) for j in range(xs.shape[1]) if ms[i, j]]
    n = len(toks)
    ent = n * c
    out = {"n_tokens": n, "width": c}
    zeros = sum(int(v == 0) for t in toks for v in t)
    out["zero_frac"] = zeros / ent if ent else math.nan
    for eps, lab in ((1e-6, "1e-06"), (1e-3, "0.001"), (1e-2, "0.01")):
        e32 = float(np.float32(eps))
        out[f"near_zero_frac@{lab}"] = sum(int(abs(v) <= e32) for t in toks for v in t) / ent if ent else math.nan
    out["nonzero_pct_per_token"] = 100 * sum(sum(v != 0 for v in t) / c for t in toks) / n if n else math.nan
    active = [sum(int(t[ch] != 0) for t in toks) for ch in range(c)]
    out["dead_neurons"] = sum(a == 0 for a in active) if n else 0
    out["always_on_neurons"] = sum(a == n for a in active) if n else 0
    out["neg_frac"] = sum(int(v < 0) for t in toks for v in t) / ent if ent else math.nan
    out["mean"] = sum(float(v) for t in toks for v in t) / ent if ent else math.nan
    out["mean_abs"] = sum(abs(float(v)) for t in toks for v in t) / ent if ent else math.nan
    # squares are float32 (statistics in float32, METRICS.md), summed in float64
    sq = sum(float(np.float32(v) * np.float32(v)) for t in toks for v in t)
    out["rms"] = math.sqrt(sq / ent) if ent else math.nan
    out["max_abs"] = max((abs(float(v)) for t in toks for v in t), default=math.nan)
    chunks = []
    for i in range(xs.shape[0]):
        seq = [xs[i, j] for j in range(xs.shape[1]) if ms[i, j]]
        for s in range(0, len(seq) - k + 1, k):
            union = sum(any(seq[s + q][ch] != 0 for q in range(k)) for ch in range(c))
            chunks.append(1 - union / c)
    out["n_chunks"] = len(chunks)
    out[f"chunk_sparsity@{k}"] = sum(chunks) / len(chunks) if chunks else math.nan
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=batches(), k=st.integers(1, 3))
def test_probe_matches_brute_force_reference(data, k):
    x, m = data
    p = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
    p.update(x, m)
    got, want = p.to_row(), _reference_row(x, m, k)
    for col, v in want.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(got[col]), col
        elif col == "mean":  # float32 within a token: relative to the mean magnitude
            assert abs(got[col] - v) <= 1e-6 * want["mean_abs"] + 1e-300, col
        elif col in ("mean_abs", "rms"):
            assert got[col] == pytest.approx(v, rel=1e-6, abs=0), col
        else:
            assert got[col] == pytest.approx(v, rel=1e-12, abs=0), col


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=batches(), k=st.integers(1, 3), cuts=st.lists(st.integers(0, 5), max_size=4),
       order=st.randoms(use_true_random=False))
def test_merge_of_batch_splits_equals_one_probe(data, k, cuts, order):
    """Splits along the batch dimension respect sequence boundaries: every column is invariant."""
    x, m = data
    full = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
    full.update(x, m)
    bounds = sorted({0, x.shape[0], *[min(c, x.shape[0]) for c in cuts]})
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        p = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
        p.update(x[lo:hi], m[lo:hi])
        parts.append(p)
    order.shuffle(parts)  # merging order does not matter either
    merged = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
    for p in parts:
        merged.merge(p)
    _same(full.to_row(), merged.to_row(), k, chunks=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=batches(), k=st.integers(1, 3), n_parts=st.integers(2, 4), pos_cut=st.integers(0, 7),
       assign_seed=st.integers(0, 2 ** 31 - 1))
def test_merge_of_arbitrary_splits_equals_one_probe(data, k, n_parts, pos_cut, assign_seed):
    """Any split (through sequences, by arbitrary masks): all columns but chunk sparsity are invariant.

    Chunk sparsity takes unions over consecutive valid tokens of a sequence, so a split through a
    sequence changes which tokens share a chunk; it is only split-invariant at sequence boundaries.
    """
    x, m = data
    full = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
    full.update(x, m)
    # every valid position goes to one of n_parts probes; each probe also splits along positions
    gen = torch.Generator().manual_seed(assign_seed)
    owner = torch.randint(0, n_parts, m.shape, generator=gen)
    cut = min(pos_cut, x.shape[1])
    merged = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
    for i in range(n_parts):
        p = ActivationSparsityProbe(x.shape[-1], chunk_k=k)
        mi = m & (owner == i)
        p.update(x[:, :cut], mi[:, :cut])
        p.update(x[:, cut:], mi[:, cut:])
        merged.merge(p)
    _same(full.to_row(), merged.to_row(), k, chunks=False)
    # the state tensors that do not depend on chunking are identical, element by element
    for key in ("n_tokens", "zero", "near_zero", "neg", "channel_active", "token_hist", "nonfinite", "max_abs"):
        assert torch.equal(full.state[key], merged.state[key]), key


# ---------------------------------------------------------------------------------------------
# The fused counting path (issue 16 goal 3): comparison planes, reused work buffers, the per-batch
# mask cache and the GPU's sync-free finite plane give exactly the counts of plain boolean code.

def _bool_counts(x: torch.Tensor, m: torch.Tensor | None, eps=(1e-6, 1e-3, 1e-2), k: int = 2) -> dict:
    """Counts from boolean tensors (independent of the probe's planes): zero, near-zero, neg, channel
    activity, nonfinite, chunk unions per window and per-window rows."""
    if m is None:
        m = torch.ones(x.shape[:2], dtype=torch.bool)
    m = m.bool()
    v = x[m].float()
    e32 = torch.tensor(eps, dtype=torch.float32)
    out = {"zero": int((v == 0).sum()), "neg": int((v < 0).sum()),
           "near": [int((v.abs() <= e).sum()) for e in e32], "active": (v != 0).sum(0).tolist(),
           "nonfinite": int((~torch.isfinite(v)).sum())}
    rows = []
    for i in range(x.shape[0]):
        seq = x[i][m[i]].float()
        if not len(seq):
            continue
        unions = [int((seq[s:s + k] != 0).any(0).sum()) for s in range(0, len(seq) - k + 1, k)]
        rows.append([len(seq), int((seq == 0).sum()), int((seq < 0).sum()),
                     *[int((seq.abs() <= e).sum()) for e in e32],
                     sum(1 - u / x.shape[-1] for u in unions), len(unions)])
    out["rows"] = rows
    return out


def _probe_counts(p: ActivationSparsityProbe) -> dict:
    s = p.state
    _, vals = p._window_values().arrays()
    return {"zero": int(s["zero"]), "neg": int(s["neg"]), "near": s["near_zero"].tolist(),
            "active": s["channel_active"].tolist(), "nonfinite": int(s["nonfinite"]), "rows": vals.tolist()}


def _messy(seed: int, b=3, t=11, c=7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, generator=g) * 1e-2
    x[torch.rand(b, t, c, generator=g) < 0.4] = 0.0
    x[torch.rand(b, t, c, generator=g) < 0.1] = -0.0
    x[0, 0, 0], x[0, 1, 1], x[1, 2, 2] = float("nan"), float("inf"), -float("inf")
    x[1, 0, :3] = torch.tensor([1e-3, -1e-3, 1e-2], dtype=torch.float32)  # on the thresholds
    m = torch.rand(b, t, generator=g) < 0.7
    return x, m


@pytest.mark.parametrize("seed", range(4))
def test_counts_equal_boolean_counts_with_nan_inf_and_boundaries(seed):
    x, m = _messy(seed)
    p = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    p.update(x, m)
    got, want = _probe_counts(p), _bool_counts(x, m)
    np.testing.assert_allclose(np.array(got.pop("rows")), np.array(want.pop("rows")), rtol=0, atol=1e-12)
    assert got == want


def test_finite_plane_gives_the_same_state_as_the_host_check():
    """On a GPU the probe counts non-finite entries with an extra plane (no host sync); forced here on the CPU."""
    x, m = _messy(7)
    a, b = ActivationSparsityProbe(x.shape[-1], chunk_k=3), ActivationSparsityProbe(x.shape[-1], chunk_k=3)
    b._thr_cache = {"cpu": torch.tensor([0.0, *b.eps_grid, torch.finfo(torch.float32).max])}
    for probe in (a, b):
        probe.update(x, m)
        probe.update(x[:, :4], None)
    assert b.state["nonfinite"].item() == a.state["nonfinite"].item() == _bool_counts(x, m)["nonfinite"] + 3
    for key in a.state:
        assert torch.allclose(a.state[key], b.state[key], rtol=0, atol=0, equal_nan=True), key
    assert np.array_equal(a._window_values().arrays()[1], b._window_values().arrays()[1])


def test_reused_work_buffers_do_not_leak_between_probes():
    """Probes of different widths updated in turn (the scratch buffers shrink and grow) give the rows of
    probes updated alone."""
    xs = [_messy(s, c=c) for s, c in ((1, 7), (2, 40), (3, 7), (4, 3))]
    shared = {c: ActivationSparsityProbe(c, chunk_k=2) for c in (7, 40, 3)}
    for x, m in xs:
        shared[x.shape[-1]].update(x, m)
    for c in (7, 40, 3):
        alone = ActivationSparsityProbe(c, chunk_k=2)
        for x, m in xs:
            if x.shape[-1] == c:
                alone.update(x, m)
        assert _probe_counts(alone) == _probe_counts(shared[c]), c


def test_mask_read_again_when_changed_in_place():
    """Sites of one batch share the mask object and its layout is worked out once; a mask changed in place
    in between is read again."""
    x, m = _messy(5)
    p1, p2, ref = (ActivationSparsityProbe(x.shape[-1], chunk_k=2) for _ in range(3))
    p1.update(x, m)
    m[0, :] = False
    m[1, :] = True
    p2.update(x, m)
    ref.update(x, m.clone())
    assert _probe_counts(p2) == _probe_counts(ref)
    assert _probe_counts(p1) != _probe_counts(p2)


def test_float64_accumulation_path_is_exact(monkeypatch):
    """Past 2^24 channels (or tokens in a batch) the plane sums switch to float64; forced here with a tiny limit."""
    import probes.sparsity as sp

    x, m = _messy(9)
    want = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    want.update(x, m)
    monkeypatch.setattr(sp, "_EXACT_F32", 2)
    got = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    got.update(x, m)
    assert _probe_counts(got) == _probe_counts(want)
    for key in want.state:
        assert torch.equal(want.state[key], got.state[key]), key


def test_mask_made_in_inference_mode():
    """Inference tensors have no version counter: the mask cache must still work (measure's batches)."""
    x, m = _messy(6)
    with torch.inference_mode():
        mi = m.clone()
        p = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
        p.update(x, mi)
        p.update(x, mi)
    ref = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    ref.update(x, m)
    ref.update(x, m)
    assert _probe_counts(p) == _probe_counts(ref)


def test_inference_mode_grad_mode_and_plain_calls_mix():
    """The CPU work buffers outlive one update: a probe updated inside ``torch.inference_mode`` (measure) and then
    outside it, or on a tensor that requires grad, must work and count the same."""
    import probes.sparsity as sp

    x, m = _messy(8)
    sp._SCRATCH.clear()
    p = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    with torch.inference_mode():
        p.update(x, m)
    p.update(x.clone().requires_grad_(True), m)
    with torch.no_grad():
        p.update(x, m)
    ref = ActivationSparsityProbe(x.shape[-1], chunk_k=2)
    for _ in range(3):
        ref.update(x, m.clone())
    assert _probe_counts(p) == _probe_counts(ref)


# ----------------------------------------------------------------------------- deferred bookkeeping (issue 16)
def _native_or_skip():
    from probes import fastcount

    if fastcount.kernel() is None:
        pytest.skip(f"no native kernel here: {fastcount.status()}")


def _state_numbers(p) -> dict:
    return {k: v.clone() for k, v in p.state.items()}


def test_window_rows_wait_for_flush_and_every_read_sees_them():
    """With the native kernel, ``update`` adds the pass to the state at once and leaves its window rows for
    ``flush`` (run_probes calls it after each forward); reading ``windows``, copying or merging the probe flushes
    first, so every reader sees every update, in update order, the same as a probe flushed after each update."""
    import copy

    from probes import distributed
    from probes.uncertainty import WindowTags

    _native_or_skip()
    g = torch.Generator().manual_seed(3)
    xs = [torch.relu(torch.randn(2, 7, 24, generator=g)) for _ in range(3)]
    xs[1][0, 2, 5] = float("nan")
    tags = WindowTags()
    lazy = ActivationSparsityProbe(24, chunk_k=3, tags=tags)
    eager = ActivationSparsityProbe(24, chunk_k=3, tags=tags)
    for i, x in enumerate(xs):
        tags.ids = [10 * i, 10 * i + 1]
        lazy.update(x)
        eager.update(x)
        eager.flush()
        if i == 1:
            x.zero_()  # the hook's tensor may change after the hook: the NaN was counted when it was seen
    assert len(lazy._pending) == 3 and not eager._pending
    cp = copy.deepcopy(lazy)  # flushes first: the copy has everything, nothing pending
    assert not lazy._pending and not cp._pending
    on_cpu = distributed.probe_to_cpu(lazy)
    for q in (lazy, cp, on_cpu):
        for k, v in _state_numbers(eager).items():
            torch.testing.assert_close(q.state[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
        for part in ("ids", "values"):
            assert len(q.windows[part]) == len(eager.windows[part]) == 3
            assert all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                       for a, b in zip(q.windows[part], eager.windows[part])), part
    assert int(lazy.state["nonfinite"]) == 1
    _same(lazy.to_row(), eager.to_row(), 3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_state_merged_in_c_is_the_numpy_merge_bit_for_bit(monkeypatch, threads):
    """``fastcount.accumulate`` adds a pass to the state in C; the numpy merge (``_update_from_kernel``, taken when
    the state does not suit the C one) must give the same bits: counts, float sums, max, histogram, window rows,
    over several passes, padded and NaN/inf batches, and a pass split in 1-3 parts."""
    from probes import fastcount

    _native_or_skip()
    monkeypatch.setattr(fastcount, "MIN_SPLIT", 1 << 8)  # split even these small tensors
    monkeypatch.setattr(fastcount, "MIN_SPLIT_OMP", 1 << 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(threads)
    xs = []
    for _ in range(3):  # ReLU-like: exact zeros (chunk unions of every size), some small negatives, the rest > 0
        x = torch.relu(torch.randn(12, 40, 96, generator=g) - 1.0)
        xs.append(torch.where(torch.rand(12, 40, 96, generator=g) < 0.1, -0.01 * torch.rand(12, 40, 96), x))
    xs[1][3, 7, 11] = float("nan")
    xs[2][0, 0, 0] = float("inf")
    masks = [None, torch.rand(12, 40, generator=g) > 0.2, None]
    in_c, in_numpy = ActivationSparsityProbe(96, chunk_k=5), ActivationSparsityProbe(96, chunk_k=5)
    monkeypatch.setattr(in_numpy, "_state_addresses", lambda: None)
    calls, real = [], fastcount.accumulate
    monkeypatch.setattr(fastcount, "accumulate", lambda *a: calls.append(a) or real(*a))
    for x, m in zip(xs, masks):
        in_c.update(x, m)
        in_numpy.update(x, m)
    assert len(calls) == 3
    assert 0 < float(in_c.state["chunk_sum"]) != round(float(in_c.state["chunk_sum"]))  # a sum that rounds
    for k, v in _state_numbers(in_numpy).items():
        torch.testing.assert_close(in_c.state[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert int(in_c.state["nonfinite"]) == 2 and math.isnan(float(in_c.state["max_abs"]))
    for part in ("ids", "values"):
        assert len(in_c.windows[part]) == len(in_numpy.windows[part]) == 3
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(in_c.windows[part],
                                                                                 in_numpy.windows[part])), part


def test_state_addresses_follow_replaced_tensors():
    """The C merge writes where the state's tensors are: a tensor replaced by a caller is written at its new
    place; one the merge cannot write (another dtype) sends the pass through the numpy merge, same numbers."""
    _native_or_skip()
    x = torch.relu(torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)))
    p, ref = ActivationSparsityProbe(16), ActivationSparsityProbe(16)
    p.update(x)
    ref.update(x)
    old = p.state["zero"]
    p.state["zero"] = torch.zeros((), dtype=torch.int64) + old  # a new tensor object, a new address
    p.state["sum"] = p.state["sum"].clone()  # a copy
    p.update(x)
    ref.update(x)
    assert int(old) == int(ref.state["zero"]) // 2  # the replaced tensor is left alone
    for k, v in _state_numbers(ref).items():
        torch.testing.assert_close(p.state[k], v, rtol=0, atol=0, msg=k)
    p.state["sum_sq"] = p.state["sum_sq"].float()  # float32: the C merge does not write it
    assert p._state_addresses() is None
    p.update(x)
    ref.update(x)
    assert p.state["sum_sq"].dtype == torch.float32 and int(p.state["n_tokens"]) == int(ref.state["n_tokens"]) == 36
    torch.testing.assert_close(p.state["sum_sq"].double(), ref.state["sum_sq"], rtol=1e-6, atol=0)


def test_pending_passes_are_bounded():
    from probes import sparsity

    _native_or_skip()
    p = ActivationSparsityProbe(16)
    x = torch.relu(torch.randn(1, 4, 16))
    for i in range(2 * sparsity.MAX_PENDING + 1):
        p.update(x)
        assert len(p._pending) < sparsity.MAX_PENDING
    assert int(p.state["n_tokens"]) == 4 * (2 * sparsity.MAX_PENDING + 1)


def test_run_probes_flushes_after_each_forward():
    from probes.runner import run_probes
    from tests.unit.test_runner import Plain, PlainBatches, TinyMLP, _point

    _native_or_skip()
    model = TinyMLP()
    seen = []

    class Watch(ActivationSparsityProbe):
        def update(self, x, mask=None):
            seen.append(len(self._pending))  # nothing left from the previous forward when the next one starts
            super().update(x, mask)

    batches = [Plain(torch.randn(2, 3, 4)) for _ in range(3)]
    got = run_probes(model, batches, [_point(model, "act")], lambda s, w, d: Watch(w, chunk_k=0),
                     adapter=PlainBatches())
    assert seen == [0, 0, 0] and not got["act"]._pending and int(got["act"].state["n_tokens"]) == 18
