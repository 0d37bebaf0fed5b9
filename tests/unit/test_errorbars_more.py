"""Error bars of massive (top-1 / median), PPL-p% (the found threshold) and the cliff (issue 15 part 5).

Hand-computed standard errors on tiny inputs, and on a tiny word-level GPT-2 (``word_lm``) the
per-window values recomputed with our own hooks and loss, then the documented formulas written
here with numpy (sd / sqrt(m); the linearised ratio estimator; the delta method for exp of a
ratio; a percentile bootstrap from ``numpy.random.default_rng(seed).multinomial``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probes import uncertainty_extra as ux

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients of relu nets".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ratio_se_by_hand(y, n):
    y, n = np.asarray(y, float), np.asarray(n, float)
    m = len(y)
    r = y.sum() / n.sum()
    return math.sqrt(m / (m - 1) * float(((y - r * n) ** 2).sum())) / n.sum()


def _boot_counts(m, n_resamples, seed):
    """The resampling the docs state: rng = default_rng(seed), multinomial(m, 1/m) per resample (drawn in
    blocks of 100 rows, which gives the same stream as one row at a time)."""
    rng = np.random.default_rng(seed)
    out, done = [], 0
    while done < n_resamples:
        b = min(100, n_resamples - done)
        out.append(rng.multinomial(m, np.full(m, 1.0 / m), size=b))
        done += b
    return np.concatenate(out).astype(float)


# ------------------------------------------------------------------------------------------ hand values
def test_ratio_bars_hand_values():
    b = ux.ratio_bars(["a", "b"], [[1.0, 2.0], [2.0, 4.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 3.0], [1.0, 0.0]], seed=0)
    # a: mean of 1, 2, 3: sd 1 / sqrt(3)
    assert b["a_se"] == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    # b: R = 6 / 4 = 1.5 over the two windows with n > 0; residuals 0.5, -0.5; sqrt(2 * 0.5) / 4
    assert b["b_se"] == pytest.approx(0.25, rel=1e-12)
    assert b["a_lo"] <= 2.0 <= b["a_hi"] and 1.0 <= b["a_lo"] and b["a_hi"] <= 3.0
    assert set(b) == {"a_se", "a_lo", "a_hi", "b_se", "b_lo", "b_hi"}


def test_exp_ratio_bars_delta_method_and_interval():
    b = ux.exp_ratio_bars("r", [0.1, 0.3], [1.0, 1.0], seed=0)
    assert b["r_se"] == pytest.approx(math.exp(0.2) * 0.1, rel=1e-12)  # exp(0.2) x sd(0.1, 0.3) / sqrt(2)
    # two windows: the resampled exponent is 0.1, 0.2 or 0.3
    assert math.exp(0.1) - 1e-12 <= b["r_lo"] <= b["r_hi"] <= math.exp(0.3) + 1e-12
    assert all(math.isnan(v) for v in ux.exp_ratio_bars("r", [0.1], [1.0]).values())


def test_mean_of_ratios_bars_keeps_layers_correlated():
    z = np.array([[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])  # two identical layers
    e = np.full((3, 2), 4.0)
    bars, (se, lo, hi) = ux.mean_of_ratios_bars("s", z, e, [0.5, 0.5], seed=0)
    # the mean of two identical layers has the se of one layer (independent layers would give 1/sqrt(2) of it)
    assert bars["s_se"] == pytest.approx(_ratio_se_by_hand(z[:, 0], e[:, 0]), rel=1e-12)
    assert se[0] == pytest.approx(se[1])
    assert lo[0] == pytest.approx(bars["s_lo"]) and hi[1] == pytest.approx(bars["s_hi"])


def test_massive_probe_bars_by_hand_and_merge():
    from probes.massive import BatchContext, MassiveProbe

    x = torch.zeros(3, 2, 2)
    x[0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # top1 4, lower median 2
    x[1] = torch.tensor([[2.0, 2.0], [2.0, 8.0]])  # top1 8, median 2
    x[2] = torch.tensor([[1.0, 1.0], [1.0, 6.0]])  # top1 6, median 1
    ctx = BatchContext()
    p = MassiveProbe(2, ctx=ctx, seed=0)
    ctx.set(torch.tensor([0, 1, 2]), torch.zeros(3, 2, dtype=torch.long), torch.full((3,), -1))
    p.update(x)
    row = p.to_row()
    assert row["top1_mean"] == pytest.approx(6.0) and row["median_mean"] == pytest.approx(5 / 3)
    assert row["top1_mean_se"] == pytest.approx(2 / math.sqrt(3), rel=1e-12)  # sd(4, 8, 6) = 2
    assert row["median_mean_se"] == pytest.approx(np.std([2, 2, 1], ddof=1) / math.sqrt(3), rel=1e-12)
    assert row["ratio_top1_median_se"] == pytest.approx(_ratio_se_by_hand([4, 8, 6], [2, 2, 1]), rel=1e-12)
    assert row["ratio_top1_median"] == pytest.approx(18 / 5)
    assert row["top1_mean_lo"] <= 6.0 <= row["top1_mean_hi"]
    # the same sequences split over two probes and merged (sample ids are global): the same error bars
    a, b = MassiveProbe(2, ctx=ctx, seed=0), MassiveProbe(2, ctx=ctx, seed=0)
    ctx.set(torch.tensor([2]), torch.zeros(1, 2, dtype=torch.long), torch.full((1,), -1))
    a.update(x[2:])
    ctx.set(torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.long), torch.full((2,), -1))
    b.update(x[:2])
    merged = a.merge(b).to_row()
    for k in ("top1_mean", "median_mean", "ratio_top1_median"):
        for sfx in ("_se", "_lo", "_hi"):
            assert merged[k + sfx] == pytest.approx(row[k + sfx], rel=1e-12)


def test_massive_one_sequence_has_no_error_bar():
    from probes.massive import MassiveProbe

    p = MassiveProbe(3)
    p.update(torch.randn(1, 4, 3))
    row = p.to_row()
    assert math.isnan(row["top1_mean_se"]) and math.isnan(row["ratio_top1_median_lo"])


def _pass(ce, tok, zeros, entries):
    from probes.cliff import Pass

    ce, tok = np.asarray(ce, float), np.asarray(tok, float)
    z, e = np.asarray(zeros, float), np.asarray(entries, float)
    return Pass(float(ce.sum()), int(tok.sum()), list(z.sum(0)), list(e.sum(0)), removed_sum=[], layer_tokens=[],
                seconds=0.0, window_ce=ce, window_tokens=tok, window_zeros=z, window_entries=e)


def test_cliff_intervals_collapse_when_every_window_is_the_same():
    from probes.cliff import cliff_intervals, cliff_location

    m = 5
    dense = _pass([2.0] * m, [10] * m, [[5.0]] * m, [[10.0]] * m)
    pts = [dense] + [_pass([2.0 + d] * m, [10] * m, [[z]] * m, [[10.0]] * m)
                     for d, z in ((0.05, 6.0), (0.2, 7.0), (1.0, 8.0), (4.0, 9.0))]
    loc = cliff_location([(q.zeros[0] / q.entries[0], math.exp(q.ce - dense.ce)) for q in pts], 1.0)
    iv = cliff_intervals(dense, pts, p=1.0, seed=0, n_resamples=50)
    for c in ("sparsity_within_p", "sparsity_within_p_interp", "knee_sparsity"):
        assert iv[f"{c}_lo"] == pytest.approx(loc[c], abs=1e-12) and iv[f"{c}_hi"] == pytest.approx(loc[c], abs=1e-12)
    assert loc["sparsity_within_p"] == pytest.approx(0.6)  # 0.5 -> ratio 1, 0.6 -> exp(0.005) < 1.01


# ------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, word_lm):
    from probes.loading import load_checkpoint

    d = tmp_path_factory.mktemp("bars")
    word_lm.save_gpt2(d / "m", WORDS, max_len=16, n_layer=2, n_embd=16, n_inner=32)
    word_lm.corpus(d / "c.txt", WORDS, 700, seed=3)
    return load_checkpoint(str(d / "m")), str(d / "c.txt")


def test_massive_bars_match_an_independent_pass(tiny):
    from probes.massive import MassiveOptions, build_samples, massive, resolve_preset

    lm, corpus = tiny
    opts = MassiveOptions(data=corpus, max_tokens=320, top_k=3, seed=1)
    res = massive(lm, opts)
    samples, _ = build_samples(lm, opts, resolve_preset(opts.preset))
    blocks = lm.model.transformer.h
    per = {i: [] for i in range(len(blocks))}
    def grab(i):
        def f(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out  # [1, T, C]
            per[i].append(h[0].abs().reshape(-1))
        return f

    hooks = [blk.register_forward_hook(grab(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for smp in samples:  # one sequence at a time: no padding
                lm.model(input_ids=torch.tensor([smp.input_ids]))
    finally:
        for h in hooks:
            h.remove()
    assert len(samples) >= 10
    for i in range(len(blocks)):
        top1 = np.array([float(v.max()) for v in per[i]])
        med = np.array([float(v.sort().values[(v.numel() + 1) // 2 - 1]) for v in per[i]])
        row = next(r for r in res.layers if r["canonical_name"] == f"blocks.{i}.hook_resid_post")
        assert row["top1_mean"] == pytest.approx(top1.mean(), rel=1e-5)
        assert row["top1_mean_se"] == pytest.approx(top1.std(ddof=1) / math.sqrt(len(top1)), rel=1e-4)
        assert row["median_mean_se"] == pytest.approx(med.std(ddof=1) / math.sqrt(len(med)), rel=1e-4)
        assert row["ratio_top1_median_se"] == pytest.approx(_ratio_se_by_hand(top1, med), rel=1e-4)
        # the bootstrap: resample sequences in the run's order (sample id), ratio of resampled means
        order = np.argsort([s.sample_id for s in samples], kind="stable")
        c = _boot_counts(len(top1), 1000, 1)
        reps = (c @ top1[order]) / (c @ med[order])
        lo, hi = np.quantile(reps, [0.025, 0.975])
        assert row["ratio_top1_median_lo"] == pytest.approx(lo, rel=1e-4)
        assert row["ratio_top1_median_hi"] == pytest.approx(hi, rel=1e-4)
    assert "error_bars" in res.info


def _independent_windows(lm, batches, thresholds=None, col_norms=None, rule=None):
    """Per window (batch row): summed CE and counted tokens, and per layer zeros and entries of each MLP
    output projection's input, with our own pre-hooks (``rule(layer, x) -> drop mask`` zeroes entries)."""
    import torch.nn.functional as F

    projs = [blk.mlp.c_proj for blk in lm.model.transformer.h]
    state, ce, tok, zs, es = {}, [], [], [], []

    def pre(i):
        def f(mod, args):
            x = args[0]
            xs = x if rule is None else x.masked_fill(rule(i, x), 0.0)
            m = state["mask"]
            state["z"][:, i] = ((xs == 0) & m[..., None]).sum((1, 2)).double().numpy()
            state["e"][:, i] = (m.sum(1) * x.shape[-1]).double().numpy()
            return (xs,)
        return f

    hs = [p.register_forward_pre_hook(pre(i)) for i, p in enumerate(projs)]
    try:
        with torch.no_grad():
            for b in batches:
                B = b.input_ids.shape[0]
                state.update(mask=b.count_mask, z=np.zeros((B, len(projs))), e=np.zeros((B, len(projs))))
                logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                for r in range(B):
                    keep = b.labels[r] != -100
                    ce.append(float(F.cross_entropy(logits[r][keep].double(), b.labels[r][keep], reduction="sum")))
                    tok.append(float(keep.sum()))
                zs.append(state["z"])
                es.append(state["e"])
    finally:
        for h in hs:
            h.remove()
    return np.array(ce), np.array(tok), np.concatenate(zs), np.concatenate(es)


def test_pplp_bars_match_an_independent_pass(tiny):
    from probes import pplp as P
    from probes.cett import neuron_output_norms

    lm, corpus = tiny
    opts = P.PplpOptions(data=corpus, max_length=16, max_tokens=600, batch_size=4, p=(5.0,))
    s = P.PplpSession(lm, opts)
    s.calibrate(cett=True)
    ev = s.evaluate("cett", 0.2)
    widths = [l.site.width for l in s.layers]
    bars = P.target_bars(s.dense, ev, widths, seed=0)
    # the per-window values add up to the pass totals (and the totals did not move)
    assert s.dense.window_ce.sum() == pytest.approx(s.dense.ce_sum, rel=1e-12)
    assert list(ev.stats.window_zeros.sum(0)) == ev.stats.zeros
    ts = ev.thresholds
    norms = [l.col_norms for l in s.layers]
    d_ce, tok, _, _ = _independent_windows(lm, s.batches)
    s_ce, tok2, z, e = _independent_windows(lm, s.batches,
                                            rule=lambda i, x: neuron_output_norms(x, norms[i]) < ts[i])
    assert np.array_equal(tok, tok2) and len(tok) == bars["summary"]["n_windows"]
    np.testing.assert_allclose(s.dense.window_ce, d_ce, rtol=1e-5)
    np.testing.assert_allclose(ev.stats.window_zeros, z)
    y = s_ce - d_ce
    r = math.exp(y.sum() / tok.sum())
    assert ev.ratio == pytest.approx(r, rel=1e-5)
    summ = bars["summary"]
    assert summ["achieved_ratio_se"] == pytest.approx(r * _ratio_se_by_hand(y, tok), rel=1e-3)
    c = _boot_counts(len(tok), 1000, 0)
    lo, hi = np.quantile(np.exp((c @ y) / (c @ tok)), [0.025, 0.975])
    assert summ["achieved_ratio_lo"] == pytest.approx(lo, rel=1e-4)
    assert summ["achieved_ratio_hi"] == pytest.approx(hi, rel=1e-4)
    # the mean over layers: influence e_i = sum_l (z_il - R_l e_il) / E_l / L
    R = z.sum(0) / e.sum(0)
    infl = ((z - R * e) / e.sum(0)).mean(1)
    m = len(infl)
    assert summ["mean_sparsity_se"] == pytest.approx(math.sqrt(m / (m - 1) * (infl ** 2).sum()), rel=1e-9)
    for l in range(z.shape[1]):
        assert bars["layers"]["sparsity_se"][l] == pytest.approx(_ratio_se_by_hand(z[:, l], e[:, l]), rel=1e-9)


def test_pplp_result_tables_carry_the_columns(tiny):
    from probes import pplp as P

    lm, corpus = tiny
    res = P.pplp(lm, P.PplpOptions(data=corpus, max_length=16, max_tokens=600, batch_size=4, p=(0.1, 1e5)))
    summ = res.summary().set_index("p_pct")
    for c in P.SUMMARY_BAR_COLUMNS:
        assert c in summ.columns
    reached = summ.loc[0.1]  # the random tiny model reaches 0.1 % only
    assert reached.status == "reached"
    assert reached.achieved_ratio_lo <= reached.achieved_ratio <= reached.achieved_ratio_hi
    assert reached.mean_sparsity_se > 0 and reached.n_windows == res.info["n_windows"]
    assert math.isnan(summ.loc[1e5].achieved_ratio_se)  # unreachable: no numbers
    assert {"sparsity_se", "sparsity_lo", "sparsity_hi"} <= set(res.table().columns)


def test_cliff_intervals_match_an_independent_bootstrap(tiny):
    from probes.cliff import CliffOptions, calib_split, cliff, cliff_location, topk_token_mask
    from probes.data import token_windows

    lm, corpus = tiny
    opts = CliffOptions(data=corpus, max_length=16, max_tokens=640, batch_size=4, grid=(0.0, 0.5, 0.8, 0.9, 0.95),
                        families=("topk_token",), refine=0, seed=3)
    res = cliff(lm, opts)
    row = res.cliffs[0]
    td = token_windows(lm, opts, causal=True)
    _, held = calib_split(len(td.windows), opts.calib_share)
    batches = list(td.batches([td.windows[i] for i in held]))
    d_ce, tok, _, _ = _independent_windows(lm, batches)
    assert row["n_windows"] == len(tok)
    per = []
    for s in sorted(opts.grid):
        if s == 0:
            per.append((d_ce, *_independent_windows(lm, batches)[2:]))
            continue
        ce, _, z, e = _independent_windows(lm, batches, rule=lambda i, x, s=s: topk_token_mask(x, s))
        per.append((ce, z, e))
    c = _boot_counts(len(tok), 1000, 3)
    knees, within = [], []
    for w in c:
        pts = [(float(np.mean((w @ z) / (w @ e))), math.exp(float(w @ (ce - d_ce)) / float(w @ tok)))
               for ce, z, e in per]
        loc = cliff_location(pts, opts.p)
        knees.append(loc["knee_sparsity"])
        within.append(loc["sparsity_within_p"])
    for name, reps in (("knee_sparsity", knees), ("sparsity_within_p", within)):
        v = np.array(reps)
        v = v[np.isfinite(v)]
        lo, hi = np.quantile(v, [0.025, 0.975])
        assert row[f"{name}_lo"] == pytest.approx(lo, abs=1e-6)
        assert row[f"{name}_hi"] == pytest.approx(hi, abs=1e-6)
    pts = {p["target_sparsity"]: p for p in res.points}
    assert pts[0.0]["ppl_ratio_se"] == 0.0
    assert pts[0.95]["ppl_ratio_lo"] <= pts[0.95]["ppl_ratio"] <= pts[0.95]["ppl_ratio_hi"]


# ------------------------------------------------------------------------------------------ gradients
def test_gradient_probe_se_by_hand_and_merge():
    from probes.gradients import GradientSparsityProbe

    d = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # zeros 3, 1, 4
    eta = torch.tensor([[[0.0, 1.0], [2.0, 1e-9]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [5.0, 0.0]]])
    p = GradientSparsityProbe(2, taus=(1e-6,))
    p.update_forward(d)
    p.update_backward(eta)
    row = p.to_row()
    assert row["deriv_sparsity"] == pytest.approx(8 / 12)
    assert row["n_windows"] == 3
    assert row["deriv_sparsity_se"] == pytest.approx(_ratio_se_by_hand([3, 1, 4], [4, 4, 4]), rel=1e-12)
    assert row["eff_grad_sparsity@1e-06"] == pytest.approx(5 / 12)  # |eta| < 1e-6: 2, 0, 3
    assert row["eff_grad_sparsity_se@1e-06"] == pytest.approx(_ratio_se_by_hand([2, 0, 3], [4, 4, 4]), rel=1e-12)
    # a mask: window 0 counts one position only
    q = GradientSparsityProbe(2, taus=(1e-6,))
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    q.update_forward(d, mask)
    assert q.to_row()["deriv_sparsity_se"] == pytest.approx(_ratio_se_by_hand([1, 1, 4], [2, 4, 4]), rel=1e-12)
    # split over two probes and merged (windows by arrival): the same se; forward/backward halves stay paired
    a, b = GradientSparsityProbe(2, taus=(1e-6,)), GradientSparsityProbe(2, taus=(1e-6,))
    a.update_forward(d[:2])
    a.update_backward(eta[:2])
    b.update_forward(d[2:])
    b.update_backward(eta[2:])
    m = a.merge(b).to_row()
    for k in ("deriv_sparsity_se", "eff_grad_sparsity_se@1e-06", "n_windows"):
        assert m[k] == pytest.approx(row[k], rel=1e-12)


def test_gradient_deriv_se_matches_an_independent_pass(tiny):
    from probes.data import token_windows
    from probes.gradients import GradOptions, measure_gradients

    lm, corpus = tiny
    opts = GradOptions(data=corpus, max_length=16, max_tokens=400, batch_size=4, spikes=False)
    res = measure_gradients(lm, opts)
    td = token_windows(lm, opts, causal=True)
    fcs = [blk.mlp.c_fc for blk in lm.model.transformer.h]
    state, z, n = {}, [], []

    def grab(i):
        def f(mod, args, out):  # h = c_fc output: ReLU'(h) = 0 where h <= 0
            m = state["mask"]
            state["z"][:, i] = ((out <= 0) & m[..., None]).sum((1, 2)).double().numpy()
        return f

    hs = [fc.register_forward_hook(grab(i)) for i, fc in enumerate(fcs)]
    try:
        with torch.no_grad():
            for bt in td.batches():
                state.update(mask=bt.count_mask, z=np.zeros((bt.input_ids.shape[0], len(fcs))))
                lm.model(input_ids=bt.input_ids, attention_mask=bt.attention_mask)
                z.append(state["z"])
                n.append(bt.count_mask.sum(1).double().numpy())
    finally:
        for h in hs:
            h.remove()
    z, n = np.concatenate(z), np.concatenate(n)
    rows = {r["canonical_name"]: r for r in res.rows}
    for i, fc in enumerate(fcs):
        r = rows[f"blocks.{i}.mlp.hook_post"]
        ent = n * fc.nf
        assert r["deriv_sparsity"] == pytest.approx(z[:, i].sum() / ent.sum(), rel=1e-12)
        assert r["n_windows"] == len(n)
        assert r["deriv_sparsity_se"] == pytest.approx(_ratio_se_by_hand(z[:, i], ent), rel=1e-9)
        assert r["eff_grad_sparsity_se@1e-06"] > 0
    assert not any("_se" in m for m in res.summary().metric)
