"""The sparsity cliff (probes/cliff.py) and SPARLING post hoc (probes/sparling.py).

Hand-computed values on tiny tensors; Bug or Feature^2's top-k rule and SPARLING's
``EnforceSparsityPerChannel`` re-implemented here from their code (not from ours); and on a tiny GPT-2
an independent sparse pass (own hooks, own thresholds, own loss) against ``cliff``'s PPL ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

from probes.cliff import (CliffOptions, calib_split, cliff, cliff_location, layer_abs_thresholds, topk_sample_mask,
                          topk_token_mask)
from probes.sparling import (SparlingCalibration, channel_thresholds, drop_mask, learned_thresholds,
                             reached_density, sparling_masker)


# ------------------------------------------------------------------- references, from their code
def bof_topk_reference(x, sparsity_level):
    """On-Point-RND/BugOrFeature modifiers/decorators.py ``topk_sparse_module.forward`` (post_sparsity):
    per batch element, flatten, ``n_keep = int((1 - s) * n)``, zero ``x < kthvalue(x_flat, n_keep)``."""
    b = x.size(0)
    flat = x.reshape(b, -1)
    n_keep = int((1.0 - sparsity_level) * flat.size(-1))
    kth = torch.kthvalue(flat, n_keep, dim=-1).values.view(b, *([1] * (x.dim() - 1)))
    return x.masked_fill(x < kth, 0.0)


class RefEnforceSparsityPerChannel(torch.nn.Module):
    """kavigupta/sparling sparling/sparsity.py ``EnforceSparsityPerChannel`` (training update + forward)."""

    def __init__(self, sparsity, channels, momentum=0.1):
        super().__init__()
        self.sparsity = sparsity
        self.thresholds = torch.nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.momentum = momentum

    def update_with_batch(self, x):
        n, _ = x.shape
        to_drop = max(1, int(n * self.sparsity))
        t, _ = torch.kthvalue(x, k=to_drop, dim=0)
        self.thresholds.data = self.thresholds.data * (1 - self.momentum) + t * self.momentum

    def forward(self, x):
        if self.training:
            self.update_with_batch(x)
        return torch.relu(x - self.thresholds)


# ----------------------------------------------------------------------------------- tiny tensors
def test_topk_token_by_hand():
    v = torch.tensor([[[0.5, -3.0, 1.0, 2.0], [4.0, 0.0, -0.1, 0.2]]])
    # s = 0.5, C = 4: drop int(2) = 2 smallest |v| per token
    assert topk_token_mask(v, 0.5).tolist() == [[[True, False, True, False], [False, True, True, False]]]
    assert not topk_token_mask(v, 0.2).any()  # int(0.8) = 0 dropped
    assert topk_token_mask(v, 0.75).sum() == 6


def test_topk_sample_by_hand_and_against_bug_or_feature():
    v = torch.tensor([[[3.0, -1.0, 0.5], [2.0, 0.0, -4.0]], [[1.0, 1.5, 2.5], [9.0, -9.0, 0.1]]])
    # s = 0.5, n = 6 per sequence: drop int(3) = 3 smallest signed values
    d = topk_sample_mask(v, None, 0.5)
    assert d.tolist() == [[[False, True, False], [False, True, True]], [[True, False, False], [False, True, True]]]
    # mask: sequence 0 counts only its first position -> n = 3, drop int(1.5) = 1: the -1
    m = torch.tensor([[True, False], [True, True]])
    d = topk_sample_mask(v, m, 0.5)
    assert d[0].tolist() == [[False, True, False], [False, True, True]]  # -4 and 0 fall below kth = 0.5 too
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g)  # n = 24 per sample
    for s_ref in (0.1, 0.5, 0.75, 0.9):
        ref = bof_topk_reference(x, s_ref)
        n_drop = int((1 - s_ref) * 24) - 1  # their rule zeroes n_keep - 1 entries
        ours = x.masked_fill(topk_sample_mask(x, None, (n_drop + 0.5) / 24), 0.0)
        assert torch.equal(ours, ref), s_ref
        assert int((ref == 0).sum()) == 3 * n_drop


def test_sparling_thresholds_by_hand():
    v = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 5.0], [0.0, 1.0]])
    # N = 4, s = 0.5: k = 2 -> 2nd smallest of [1,3,2,0] = 1 and of [-2,0,5,1] = 0
    t = channel_thresholds(v, 0.5)
    assert t.tolist() == [1.0, 0.0]
    assert drop_mask(v, t).tolist() == [[True, True], [False, True], [False, False], [True, False]]
    kept, n = reached_density(v, t)
    assert (kept / n).tolist() == [0.5, 0.5] and n == 4
    # s = 0.1: k = max(1, int(0.4)) = 1 -> the minimum; s = 0: nothing dropped
    assert channel_thresholds(v, 0.1).tolist() == [0.0, -2.0]
    assert not drop_mask(v, channel_thresholds(v, 0.0)).any()


def test_sparling_matches_reference_layer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 7, generator=g) * torch.linspace(0.1, 3, 7) + torch.linspace(-1, 1, 7)
    for s in (0.3, 0.9, 0.99):
        ref = RefEnforceSparsityPerChannel(s, 7, momentum=1.0)  # one batch, no moving average
        out = ref.train()(x)
        t = channel_thresholds(x, s)
        assert torch.allclose(t, ref.thresholds.data)
        assert torch.equal(drop_mask(x, t), out == 0)
        cal = SparlingCalibration(1, max_rows=10_000)
        cal.update(0, x[:120].reshape(4, 30, 7), None)  # [batch, pos, C] in two updates
        cal.update(0, x[120:].reshape(2, 40, 7), torch.ones(2, 40, dtype=torch.bool))
        assert torch.equal(cal.thresholds(s)[0], t)
        masker, ts = cal.masker(s)
        layer = type("L", (), {"index": 0})()
        assert torch.equal(masker(layer, x.reshape(1, 200, 7), None, None), drop_mask(x, t).reshape(1, 200, 7))
        # the density reached on the calibration rows themselves is 1 - s up to one row per channel
        kept, n = reached_density(x, t)
        assert torch.all((kept / n - (1 - s)).abs() <= 1 / n + 1e-12)
    # GLU: the masker thresholds g3 (act(gate)), not x3
    m, _ = sparling_masker([torch.tensor([0.5, 0.5])])
    layer = type("L", (), {"index": 0})()
    x3 = torch.tensor([[[9.0, 9.0]]])
    g3 = torch.tensor([[[0.1, 0.9]]])
    assert m(layer, x3, g3, None).tolist() == [[[True, False]]]


def test_calibration_row_cap_and_layer_thresholds():
    cal = SparlingCalibration(1, max_rows=5)
    cal.update(0, torch.arange(12.0).reshape(1, 4, 3))
    cal.update(0, torch.full((1, 4, 3), -1.0))
    assert cal.n_rows == [5] and cal.sample(0)[-1].tolist() == [-1.0, -1.0, -1.0]
    # |v| over the 15 sampled entries: 0..11 and three 1s -> sorted 0,1,1,1,1,2,...; s = 0.4: k = 6 -> 2
    assert layer_abs_thresholds(cal, 0.4) == [2.0]
    assert layer_abs_thresholds(cal, 0.0) == [-math.inf]


def test_learned_thresholds_found():
    class EnforceSparsityPerChannel(RefEnforceSparsityPerChannel):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), EnforceSparsityPerChannel(0.95, 4))
    model[1].thresholds.data = torch.tensor([0.5, 1.0, 1.5, 2.0])
    rows = learned_thresholds(model)
    assert len(rows) == 1 and rows[0]["module_path"] == "1" and rows[0]["channels"] == 4
    assert rows[0]["declared_sparsity"] == 0.95 and rows[0]["threshold_mean"] == 1.25
    assert rows[0]["threshold_min"] == 0.5 and rows[0]["threshold_max"] == 2.0
    assert learned_thresholds(torch.nn.Sequential(torch.nn.Linear(3, 4))) == []


# ------------------------------------------------------------------------------------- cliff rules
def test_cliff_location_by_hand():
    pts = [(0.5, 1.0), (0.6, 1.001), (0.7, 1.005), (0.8, 1.02), (0.9, 1.5)]
    c = cliff_location(pts, p=1.0)
    assert c["sparsity_within_p"] == 0.7 and c["ratio_within_p"] == 1.005 and c["p_exceeded"]
    y0, y1 = math.log(1.005), math.log(1.02)
    assert c["sparsity_within_p_interp"] == pytest.approx(0.7 + 0.1 * (math.log(1.01) - y0) / (y1 - y0))
    # Kneedle: x -> (x - .5)/.4, y = ln r / ln 1.5; chord from (0,0) to (1,1); gap = xn - yn
    gaps = [(x - 0.5) / 0.4 - math.log(r) / math.log(1.5) for x, r in pts[1:-1]]
    k = max(range(3), key=lambda i: gaps[i])
    assert c["knee_sparsity"] == pts[1 + k][0] == 0.8 and c["knee_distance"] == pytest.approx(gaps[k])
    # the rule stops at the first point above 1 + p, even if a later one is back below
    c = cliff_location([(0.1, 1.0), (0.2, 1.05), (0.3, 1.001), (0.4, 2.0)], p=1.0)
    assert c["sparsity_within_p"] == 0.1
    # duplicates in sparsity keep the first; never exceeded: no crossing; the first point above: NaN
    c = cliff_location([(0.1, 1.0), (0.1, 3.0), (0.2, 1.001)], p=1.0)
    assert c["sparsity_within_p"] == 0.2 and not c["p_exceeded"] and math.isnan(c["sparsity_within_p_interp"])
    assert math.isnan(cliff_location([(0.5, 1.2), (0.6, 1.3)], p=1.0)["sparsity_within_p"])
    assert math.isnan(cliff_location([(0.5, 1.0), (0.6, 1.0), (0.7, 1.0)])["knee_sparsity"])  # flat: no knee


def test_calib_split():
    cal, held = calib_split(8, 0.25)
    assert cal == [0, 4] and held == [1, 2, 3, 5, 6, 7]
    cal, held = calib_split(2, 0.9)
    assert cal == [0] and held == [1]
    from probes.errors import DataError

    with pytest.raises(DataError):
        calib_split(1, 0.25)


# --------------------------------------------------------------------------------- a tiny model
WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients of relu nets".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, word_lm):
    from probes.loading import load_checkpoint

    d = tmp_path_factory.mktemp("cliff")
    word_lm.save_gpt2(d / "m", WORDS, max_len=16, n_layer=2, n_embd=16, n_inner=32)
    word_lm.corpus(d / "c.txt", WORDS, 900, seed=3)
    return load_checkpoint(str(d / "m")), str(d / "c.txt")


def _independent_ratio(lm, corpus, thresholds_of, rule, opts):
    """PPL ratio of a sparse run by hand: own hooks on each c_proj input, own loss, same windows."""
    import torch.nn.functional as F

    from probes.data import token_windows
    from probes.runner import forward_batch

    td = token_windows(lm, opts, causal=True)
    cal_i, held_i = calib_split(len(td.windows), opts.calib_share)
    projs = [blk.mlp.c_proj for blk in lm.model.transformer.h]
    rows = [[] for _ in projs]

    def grab(i):
        def pre(mod, args):
            x = args[0]
            rows[i].append(x.reshape(-1, x.shape[-1]))
        return pre

    def masked(i, t):
        def pre(mod, args):
            x = args[0]
            return (x.masked_fill(rule(x, t), 0.0),)
        return pre

    def ce(batches):
        tot, n = 0.0, 0
        for b in batches:
            logits = forward_batch(lm.model, b, need_logits=True).logits
            keep = b.labels != -100
            tot += float(F.cross_entropy(logits[keep].double(), b.labels[keep], reduction="sum"))
            n += int(keep.sum())
        return tot / n

    cal_b = list(td.batches([td.windows[i] for i in cal_i]))
    held_b = list(td.batches([td.windows[i] for i in held_i]))
    with torch.no_grad():
        hs = [p.register_forward_pre_hook(grab(i)) for i, p in enumerate(projs)]
        for b in cal_b:  # calibration rows: only counted positions
            rows_before = [len(r) for r in rows]
            forward_batch(lm.model, b)
            m = b.count_mask.reshape(-1)
            for i, r in enumerate(rows):
                r[rows_before[i]] = r[rows_before[i]][m]
        for h in hs:
            h.remove()
        samples = [torch.cat(r) for r in rows]
        dense = ce(held_b)
        hs = [p.register_forward_pre_hook(masked(i, thresholds_of(samples[i]))) for i, p in enumerate(projs)]
        sparse = ce(held_b)
        for h in hs:
            h.remove()
    return math.exp(sparse - dense)


def test_cliff_against_independent_pass(tiny):
    lm, corpus = tiny
    opts = CliffOptions(data=corpus, max_length=16, max_tokens=640, batch_size=4, grid=(0.0, 0.6, 0.9),
                        refine=0, families=("topk_sample", "topk_token", "magnitude_layer", "sparling_posthoc"))
    res = cliff(lm, opts)
    pts = {(r["family"], r["target_sparsity"]): r for r in res.points}
    for fam in opts.families:
        assert pts[(fam, 0.0)]["ppl_ratio"] == 1.0 and pts[(fam, 0.0)]["pass"] == 0
    # the reference formulas, applied by hand on the same windows
    for s in (0.6, 0.9):
        def sparling_t(v, s=s):  # SPARLING: k-th smallest signed value per channel over the sample
            return torch.kthvalue(v, max(1, int(v.shape[0] * s)), dim=0).values

        def mag_t(v, s=s):
            a = v.abs().reshape(-1)
            return torch.kthvalue(a, max(1, int(a.numel() * s))).values

        r_sp = _independent_ratio(lm, corpus, sparling_t, lambda x, t: x <= t, opts)
        r_mag = _independent_ratio(lm, corpus, mag_t, lambda x, t: x.abs() <= t, opts)
        assert pts[("sparling_posthoc", s)]["ppl_ratio"] == pytest.approx(r_sp, rel=1e-6)
        assert pts[("magnitude_layer", s)]["ppl_ratio"] == pytest.approx(r_mag, rel=1e-6)
    # achieved sparsity of the per-sequence and per-token rules is at least int(s n) / n (C = 32 channels)
    for fam in ("topk_sample", "topk_token"):
        for s in (0.6, 0.9):
            assert pts[(fam, s)]["mean_sparsity"] >= int(s * 32) / 32 - 1e-9
    t = res.tables()
    assert set(t) >= {"cliff", "cliff_points", "cliff_layers", "cliff_sparling", "cliff_sparling_channels"}
    sp = t["cliff_sparling"]
    assert set(sp.target_sparsity) == {0.6, 0.9} and (sp.density_max <= 1).all()
    ch = t["cliff_sparling_channels"]
    assert len(ch) == 2 * 32 and set(ch.target_sparsity) == {0.9}
    assert res.info["calibration_windows"] >= 1 and res.info["n_counted_tokens"] > 0
    assert len(res.cliffs) == 4 and {"sparsity_within_p", "knee_sparsity"} <= set(res.cliffs[0])


def test_cliff_refuses_bad_input(tiny):
    from probes.cliff import check_cliff
    from probes.errors import ActsparseError

    lm, _ = tiny
    with pytest.raises(ActsparseError, match="did you mean"):
        check_cliff(lm, CliffOptions(families=("sparling",)))
    with pytest.raises(ActsparseError, match="outside"):
        check_cliff(lm, CliffOptions(grid=(0.5, 1.0)))
