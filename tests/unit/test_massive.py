"""Massive-activation probes on hand-built tensors: medians, top-k, thresholds, coordinates, merge, INT8."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.massive import (AbsLogHistogram, BatchContext, Int8ErrorProbe, MassiveProbe, int8_fake_quant,
                            lower_median)
from probes.residual import ATTN_OUT, EMBED, FINAL_NORM, MLP_OUT, RESID_POST, find_residual_sites


def np_lower_median(x: np.ndarray) -> float:
    s = np.sort(np.asarray(x, dtype=np.float64).reshape(-1))
    return float(s[(s.size - 1) // 2])


# ------------------------------------------------------------------------------------------- medians
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 11])
def test_lower_median_matches_torch_median_and_numpy(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    assert float(lower_median(x)) == float(torch.median(x)) == np_lower_median(x.numpy())


def test_lower_median_of_even_count_is_the_lower_middle_value():
    x = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
    assert float(lower_median(x)) == 2.0  # numpy's average median would say 2.5
    assert float(np.median(x.numpy())) == 2.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=60))
def test_lower_median_property(vals):
    x = torch.tensor(vals, dtype=torch.float32)
    assert float(lower_median(x)) == np_lower_median(x.numpy())


# ------------------------------------------------------------------------------------------- the probe
def _ref_sequence_stats(x: torch.Tensor, mask: torch.Tensor):
    """Per sequence: (top1, top2, top3, lower median) of |x| over counted positions, with numpy."""
    out = []
    for b in range(x.shape[0]):
        a = x[b][mask[b]].abs().numpy().reshape(-1)
        if a.size == 0:
            continue
        s = np.sort(a)[::-1]
        out.append((s[0], s[1], s[2], np_lower_median(a)))
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("ragged", [False, True])
def test_probe_sun_statistics_match_numpy(ragged):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 6, generator=g)
    mask = torch.ones(4, 9, dtype=torch.bool)
    if ragged:  # padding: rows of different lengths take the per-row path
        mask[1, 5:] = False
        mask[3, 2:] = False
        x[~mask] = 1e6  # padding values must never count
    p = MassiveProbe(6)
    p.update(x, mask)
    row = p.to_row()
    ref = _ref_sequence_stats(x, mask)
    assert row["n_sequences"] == 4 and row["n_tokens"] == int(mask.sum())
    for j, col in enumerate(("top1_mean", "top2_mean", "top3_mean", "median_mean")):
        assert row[col] == pytest.approx(ref[:, j].mean(), rel=1e-6)
    assert row["ratio_top1_median"] == pytest.approx(ref[:, 0].mean() / ref[:, 3].mean(), rel=1e-6)
    assert row["seq_ratio_max"] == pytest.approx((ref[:, 0] / ref[:, 3]).max(), rel=1e-6)
    valid = x[mask]
    assert row["max"] == pytest.approx(float(valid.max()))
    assert row["min"] == pytest.approx(float(valid.min()))
    assert row["n_massive"] == 0 and row["massive_channels"] == ""


def test_per_token_statistics_match_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=g)
    x[0, 2, 3] = 500.0  # a token with max 500 over a median ~0.7: ratio < 1000, not massive per token
    x[1, 4, 6] = -5000.0  # ratio > 1000 and |a| > 100: massive per token
    p = MassiveProbe(8)
    p.update(x)
    row = p.to_row()
    a = x.abs().numpy()
    tok_max = a.max(-1)
    tok_med = np.array([[np_lower_median(a[b, t]) for t in range(5)] for b in range(2)])
    ratio = tok_max / tok_med
    assert row["token_median_mean"] == pytest.approx(tok_med.mean(), rel=1e-6)
    assert row["token_ratio_mean"] == pytest.approx(ratio.mean(), rel=1e-5)
    assert row["token_ratio_max"] == pytest.approx(ratio.max(), rel=1e-5)
    assert row["token_ratio_max_abs"] == pytest.approx(5000.0)
    assert row["n_massive_tokens"] == int(((tok_max > 100) & (ratio > 1000)).sum()) == 1
    # The peak entry's own token median and ratio (Max_act_llm's sun_peak_token_ratio).
    assert row["token_median_at_peak"] == pytest.approx(tok_med[1, 4], rel=1e-6)
    assert row["token_ratio_at_peak"] == pytest.approx(ratio[1, 4], rel=1e-5)


def _spiky_batch():
    """Two sequences of 6 tokens x 8 channels, |values| <= 1 except the planted massive entries."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 6, 8, generator=g) * 2 - 1
    x[0, 0, 5] = -2000.0  # first token, channel 5 (negative, as LLaMA-2's dim 1415)
    x[1, 0, 5] = -1500.0
    x[0, 3, 2] = 2500.0  # first delimiter of sequence 0 is at position 3
    x[1, 4, 7] = 150.0  # |a| > 100 but below 1000 x median? median ~0.5 -> 150 < 500: not massive
    x[1, 2, 2] = 99.0  # below the absolute threshold
    return x


def test_massive_entries_channels_positions_and_first_delimiter():
    x = _spiky_batch()
    ctx = BatchContext()
    tokens = torch.arange(12).view(2, 6) + 100
    ctx.set(torch.tensor([7, 8]), tokens, torch.tensor([3, -1]))
    p = MassiveProbe(8, ctx=ctx)
    p.update(x)
    row = p.to_row()
    med = [np_lower_median(x[b].abs().numpy()) for b in range(2)]
    expect = [(b, t, c) for b in range(2) for t in range(6) for c in range(8)
              if abs(float(x[b, t, c])) > 100 and abs(float(x[b, t, c])) >= 1000 * med[b]]
    assert sorted(expect) == [(0, 0, 5), (0, 3, 2), (1, 0, 5)]
    assert row["n_massive"] == 3
    assert row["n_massive_first_token"] == 2 and row["n_massive_first_delim"] == 1 and row["n_massive_other"] == 0
    assert row["n_seq_with_massive"] == 2
    assert row["massive_channels"] == "5,2"  # by count, then id
    assert row["massive_positions"] == "0:2,3:1"
    # The peak with its coordinates: sample id from the context, token id at that position.
    assert (row["peak_value"], row["peak_sample"], row["peak_position"], row["peak_channel"], row["peak_token_id"]) \
        == (2500.0, 7, 3, 2, 103)
    top = p.topk()
    assert [(e["value"], e["sample"], e["position"], e["channel"]) for e in top[:3]] == \
        [(2500.0, 7, 3, 2), (-2000.0, 7, 0, 5), (-1500.0, 8, 0, 5)]
    assert top[0]["ratio_to_seq_median"] == pytest.approx(2500.0 / med[0], rel=1e-6)
    assert [e["massive_sun"] for e in top[:5]] == [True, True, True, False, False]
    ch = p.channel_arrays()
    assert ch["max_abs"][5] == 2000.0 and ch["value"][5] == -2000.0 and ch["sample"][5] == 7
    assert ch["massive"][5] == 2 and ch["massive_first_token"][5] == 2 and ch["massive_first_delim"][2] == 1


def test_topk_is_sorted_and_covers_every_entry_when_small():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, generator=g)
    p = MassiveProbe(4, top_k=100)
    p.update(x)
    top = p.topk()
    assert len(top) == 12
    absv = [e["abs"] for e in top]
    assert absv == sorted(absv, reverse=True)
    for e in top:
        assert x[0, e["position"], e["channel"]].item() == e["value"]


def _rows_equal(r1: dict, r2: dict):
    assert r1.keys() == r2.keys()
    for k in r1:
        a, b = r1[k], r2[k]
        if isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-9, nan_ok=True), k
        else:
            assert a == b, k


def test_merge_equals_one_pass():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 7, 5, generator=g) * (i + 1) for i in range(4)]
    batches[2][1, 0, 3] = 9000.0
    masks = [torch.ones(2, 7, dtype=torch.bool) for _ in batches]
    masks[1][0, 4:] = False
    one = MassiveProbe(5, top_k=10)
    for x, m in zip(batches, masks):
        one.update(x, m)
    a, b = MassiveProbe(5, top_k=10), MassiveProbe(5, top_k=10)
    for x, m in zip(batches[:2], masks[:2]):
        a.update(x, m)
    b._n_rows_seen = 4  # the second shard's samples are 4..7, as a data-parallel rank would number them
    for x, m in zip(batches[2:], masks[2:]):
        b.update(x, m)
    merged = a.merge(b)
    _rows_equal(one.to_row(), merged.to_row())
    assert one.topk() == merged.topk()
    for k, v in one.channel_arrays().items():
        np.testing.assert_array_equal(v, merged.channel_arrays()[k])


def test_memory_does_not_grow_with_sequences():
    p = MassiveProbe(16, top_k=20)
    size = lambda: sum(t.numel() for t in p.state.values())  # noqa: E731
    p.update(torch.randn(2, 10, 16))
    s0 = size()
    for _ in range(20):
        p.update(torch.randn(2, 10, 16))
    assert size() == s0


def test_fp16_overflow_is_reported():
    x = torch.randn(1, 4, 8).half()
    x[0, 1, 2] = 70000.0  # above float16's 65504: becomes inf
    assert torch.isinf(x).any()
    p = MassiveProbe(8)
    p.update(x)
    row = p.to_row()
    assert row["n_nonfinite"] == 1
    assert math.isinf(row["max"]) and math.isinf(row["top1_mean"])
    assert p.topk()[0]["position"] == 1 and p.topk()[0]["channel"] == 2


def test_two_dimensional_input_is_one_token_per_sample():
    p = MassiveProbe(3)
    p.update(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]]))
    row = p.to_row()
    assert row["n_sequences"] == 2 and row["n_tokens"] == 2
    assert row["top1_mean"] == pytest.approx(3.5) and row["median_mean"] == pytest.approx((2.0 + 0.5) / 2)


# ------------------------------------------------------------------------------------------- INT8
def test_int8_fake_quant_hand_values():
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0, -3.0])
    # threshold 1.27 -> scale 0.01: values inside are exact on the grid; outside clip to +-1.27.
    q = int8_fake_quant(x, 1.27)
    torch.testing.assert_close(q, torch.tensor([0.0, 1.0, -1.0, 0.5, 1.27, -1.27]))
    # scale 1 (threshold 127): round-half-to-even as torch.round
    torch.testing.assert_close(int8_fake_quant(torch.tensor([0.4, 0.6, 1.5, -2.5]), 127.0),
                               torch.tensor([0.0, 1.0, 2.0, -2.0]))


def test_int8_error_probe_matches_direct_computation():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 4, generator=g)
    x[0, 0, 0] = 300.0
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    v = x[mask].reshape(-1).double()
    thresholds = {"max_abs": float(v.abs().max()), "clip": 1.5}
    p = Int8ErrorProbe(4, thresholds)
    p.update(x[:2], mask[:2])
    q = Int8ErrorProbe(4, thresholds)
    q.update(x[2:], mask[2:])
    rows = {r["policy"]: r for r in p.merge(q).rows()}
    for pol, t in thresholds.items():
        err = int8_fake_quant(v.float(), t).double() - v
        sqnr = 10 * math.log10(float((v ** 2).sum() / (err ** 2).sum()))
        assert rows[pol]["sqnr_db"] == pytest.approx(sqnr, rel=1e-6)
        assert rows[pol]["rel_rmse"] == pytest.approx(math.sqrt(float((err ** 2).mean() / (v ** 2).mean())), rel=1e-6)
        assert rows[pol]["clip_rate"] == pytest.approx(float((v.abs() > t).double().mean()))
        assert rows[pol]["scale"] == pytest.approx(t / 127)
    assert rows["max_abs"]["clip_rate"] == 0.0
    assert rows["clip"]["sqnr_db"] < rows["max_abs"]["sqnr_db"] or rows["clip"]["clip_rate"] > 0


def test_log_histogram_quantile_close_to_exact():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4000, 8, generator=g)
    x[0, 0, 0] = 800.0
    upper = float(x.abs().max())
    h = AbsLogHistogram(8, upper)
    h.update(x[:, :2000])
    h2 = AbsLogHistogram(8, upper)
    h2.update(x[:, 2000:])
    h.merge(h2)
    a = np.sort(x.abs().numpy().reshape(-1))
    for q in (0.5, 0.99, 0.999):
        exact = a[math.ceil(q * a.size) - 1]
        assert h.quantile(q) == pytest.approx(exact, rel=5e-3)


# ------------------------------------------------------------------------------------------- residual sites
class ToyBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.attn = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.ReLU(), torch.nn.Linear(4 * d, d))

    def forward(self, h):
        h = h + self.attn(self.ln(h))
        return h + self.mlp(h)


class ToyLM(torch.nn.Module):
    """Hand-built decoder with no known family: the structural fallback must find its residual stream."""

    def __init__(self, vocab: int = 50, d: int = 8, n: int = 3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for blk in self.layers:
            h = blk(h)
        return self.norm(h)


def test_structural_residual_sites_of_a_hand_built_model():
    m = ToyLM()
    sites = find_residual_sites(m, "module")
    got = [(s.canonical_name, s.module_path, s.kind, s.hook) for s in sites]
    assert got[0] == ("blocks.0.hook_resid_pre", "layers.0", EMBED, "input")
    assert ("blocks.1.hook_attn_out", "layers.1.attn", ATTN_OUT, "output") in got
    assert ("blocks.2.hook_mlp_out", "layers.2.mlp", MLP_OUT, "output") in got
    assert [g[1] for g in got if g[2] == RESID_POST] == ["layers.0", "layers.1", "layers.2"]
    assert got[-1] == ("ln_final.hook_normalized", "norm", FINAL_NORM, "output")
    assert all(s.family == "structural" for s in sites)
    only = find_residual_sites(m, None, kinds=(RESID_POST,))
    assert [s.layer for s in only] == [0, 1, 2]


class MoEBlock(torch.nn.Module):
    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.attn = torch.nn.Linear(d, d)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d))
                                           for _ in range(n_experts))

    def forward(self, h):
        h = h + self.attn(h)
        return h + sum(e(h) for e in self.experts) / len(self.experts)


def test_structural_fallback_skips_expert_lists_longer_than_the_block_list():
    m = torch.nn.Module()
    m.embed = torch.nn.Embedding(10, 4)
    m.layers = torch.nn.ModuleList(MoEBlock(4, n_experts=6) for _ in range(2))
    resid = find_residual_sites(m, None, kinds=(RESID_POST,))
    assert [s.module_path for s in resid] == ["layers.0", "layers.1"]


def test_model_without_block_list_fails_with_a_fix():
    from probes.errors import ModelError

    with pytest.raises(ModelError) as e:
        find_residual_sites(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))
    assert "--site" in e.value.one_line()


def test_maxact_abs_bins_is_the_reference_formula_at_every_bin_edge():
    """Max_act_llm's bin floor((log10 |x| + 8) / 16 x 512), clamped to [0, 511], with NaN and inf in the last bin:
    checked against that formula written out in float64 on both sides of every bin edge, on subnormals and
    on values far outside the histogram's range, and against hand-picked bins."""
    from probes.massive import maxact_abs_bins

    edges = torch.tensor([10 ** (-8 + b / 32) for b in range(513)], dtype=torch.float64).float()
    zero, inf = torch.tensor(0.0), torch.tensor(math.inf)
    x = torch.cat([edges, torch.nextafter(edges, zero), torch.nextafter(edges, inf),
                   torch.tensor([1e-45, 1e-38, 1e-12, 0.5, 1.0, 99.0, 1e8, 3e38, math.inf, math.nan])])
    torch.manual_seed(0)
    x = torch.cat([x, (torch.randn(20000) * torch.exp(torch.randn(20000) * 8)).abs()])
    lg = [math.log10(float(v)) if math.isfinite(float(v)) else 8.0 for v in x.double()]
    by_hand = [min(max(math.floor((v + 8.0) / 16.0 * 512), 0), 511) for v in lg]
    assert maxact_abs_bins(x).tolist() == by_hand
    assert maxact_abs_bins(torch.tensor([1.0, 1e-9, 1e9, math.nan])).tolist() == [256, 0, 511, 511]
