"""Gradient sparsity: hand-computed probe values, eta = dL/dh against autograd on tiny models
(incl. an in-place ReLU and a GLU), no parameter gradients kept, and refusal without a loss."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch

from probes import corpus as corpus_mod
from probes.errors import DataError, ModelError
from probes.gradients import (GradientSparsityProbe, GradOptions, GradSite, LinearInputProbe, find_grad_sites,
                              measure_gradients)
from probes.loading import load_checkpoint

# ----------------------------------------------------------------------------- probes by hand

# act'(h) of a ReLU on 2 sequences x 3 positions x 4 channels; position (1, 2) is padding.
D = torch.tensor([[[1., 0., 0., 1.], [0., 0., 0., 0.], [1., 1., 1., 1.]],
                  [[0., 1., 0., 0.], [1., 0., 0., 0.], [9., 9., 9., 9.]]])
# eta = dL/dh at the same entries (dyadic values: sums are exact).
ETA = torch.tensor([[[0.5, 0., 0., -2.0 ** -20], [0., 0., 0., 0.], [2.0 ** -31, -0.25, 2.0 ** -12, 1.0]],
                    [[0., -4.0, 0., 0.], [2.0 ** -8, 0., 0., 0.], [100., 100., 100., 100.]]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_gradient_probe_by_hand():
    p = GradientSparsityProbe(4, taus=(1e-9, 1e-6, 1e-3))
    p.update_forward(D, MASK)
    p.update_backward(ETA, MASK)
    r = p.to_row()
    assert r["n_tokens"] == 5 and r["n_grad_tokens"] == 5 and r["width"] == 4
    # 20 valid entries; act'(h) == 0 at 2 + 4 + 0 + 3 + 3 = 12 of them; sum of squares = 8.
    assert r["deriv_sparsity"] == 12 / 20 == r["deriv_zero_frac"]
    assert r["deriv_sparsity_rule"] == "act'(h)==0"
    assert r["deriv_sq_mean"] == 8 / 20
    # |eta| == 0 at 2 + 4 + 0 + 3 + 3 = 12; < 1e-9 adds 2^-31 -> 13; < 1e-6 adds 2^-20 -> 14;
    # < 1e-3 adds 2^-12 -> 15 (2^-8 ~ 3.9e-3 is not below 1e-3).
    assert r["eff_grad_zero_frac"] == 12 / 20
    assert r["eff_grad_sparsity@1e-09"] == 13 / 20
    assert r["eff_grad_sparsity@1e-06"] == 14 / 20
    assert r["eff_grad_sparsity@0.001"] == 15 / 20
    l1 = [0.5 + 2.0 ** -20, 0.0, 2.0 ** -31 + 0.25 + 2.0 ** -12 + 1.0, 4.0, 2.0 ** -8]
    l2 = [0.25 + 2.0 ** -40, 0.0, 2.0 ** -62 + 0.0625 + 2.0 ** -24 + 1.0, 16.0, 2.0 ** -16]
    # float32 within a token's row, float64 across tokens: 2^-31 + 1 rounds within the row
    assert r["eta_l1_per_token"] == pytest.approx(sum(l1) / 5, rel=1e-7)
    assert r["eta_l2sq_per_token"] == pytest.approx(sum(l2) / 5, rel=1e-7)
    assert r["eta_abs_max"] == 4.0 and r["nonfinite_grad"] == 0


def test_smooth_activation_counts_small_derivatives():
    d = torch.tensor([[[1e-7, -1e-7, 2e-6, 0.5]]])
    p = GradientSparsityProbe(4, eps_d=1e-6, exact_zero_region=False)
    p.update_forward(d)
    r = p.to_row()
    assert r["deriv_sparsity"] == 0.5 and r["deriv_zero_frac"] == 0.0
    assert r["deriv_sparsity_rule"] == "|act'(h)|<=1e-06"
    assert math.isnan(r["eff_grad_sparsity@0.001"])  # no backward seen: NaN, not 0


def test_gradient_probe_merge_equals_one_pass():
    one = GradientSparsityProbe(4)
    one.update_forward(D, MASK), one.update_backward(ETA, MASK)
    a, b = GradientSparsityProbe(4), GradientSparsityProbe(4)
    a.update_forward(D[:1], MASK[:1]), a.update_backward(ETA[:1], MASK[:1])
    b.update_forward(D[1:], MASK[1:]), b.update_backward(ETA[1:], MASK[1:])
    assert a.merge(b).to_row() == one.to_row()
    with pytest.raises(ValueError):
        GradientSparsityProbe(4).merge(GradientSparsityProbe(5))


def test_linear_input_probe_by_hand():
    x = torch.tensor([[[0., -3., 1., 2.], [0., 0., 0.5, 0.25]], [[-1., 0., 8., 0.], [7., 7., 7., 7.]]])
    m = torch.tensor([[True, True], [True, False]])
    p = LinearInputProbe(4)
    p.update(x, m)
    r = p.to_row()
    # |x| over the 12 valid entries: 0 0 0 0 0 0.25 0.5 1 1 2 3 8 -> lower median = 0.25 (the 6th).
    assert r["spike_max"] == 8.0 and r["median_abs_batchmean"] == 0.25
    assert r["spike_ratio_batchmedian"] == 32.0
    # non-zero |x|: 0.25 0.5 1 1 2 3 8 -> median 1
    assert r["median_abs_nonzero_batchmean"] == 1.0 and r["spike_ratio_nonzero_batchmedian"] == 8.0
    assert r["zero_frac"] == 5 / 12 and r["neg_frac"] == 2 / 12
    assert (r["max_input_value"], r["min_input_value"], r["n_tokens"]) == (8.0, -3.0, 3)
    p.update(torch.tensor([[[4., 4., 4., 4.]]]))  # second batch: median 4
    r = p.to_row()
    assert r["median_abs_batchmean"] == 2.125 and r["median_abs_nonzero_batchmean"] == 2.5
    q = LinearInputProbe(2)
    q.update(torch.tensor([[0., 0.], [0., 3.]]))  # [batch, channels]: median 0 -> ratio inf
    assert q.to_row()["spike_ratio_batchmedian"] == math.inf and q.to_row()["n_tokens"] == 2


# ----------------------------------------------------------------------------- tiny models

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients of relu nets".split()
MAX_LEN = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text(" ".join(rng.choice(WORDS) for _ in range(150)))
    return str(p)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, word_lm) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-relu-gpt2")
    tok, V = word_lm.tokenizer(WORDS, MAX_LEN)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=MAX_LEN, n_embd=16, n_layer=2, n_head=2, activation_function="relu",
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.architectures = ["GPT2LMHeadModel"]
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _batches(lm, corpus_path, batch_size):
    docs = corpus_mod.tokenize_documents(corpus_mod.read_documents(corpus_path), lm.tokenizer)
    wins = corpus_mod.build_windows(docs, lm.tokenizer, MAX_LEN, causal=True)
    return list(corpus_mod.batches(wins, batch_size, lm.tokenizer.pad_token_id))


def _reference_dl_dh(model, batches, pre_paths):
    """dL/dh at each pre-activation with plain autograd (retain_grad) on a copy with non-in-place acts."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    mods = dict(ref.named_modules())
    out = {p: [] for p in pre_paths}
    store = {}

    def keep(mod, args, o, _p):
        o.retain_grad()
        store[_p] = o  # returns None: the output is not replaced

    for b in batches:
        hs = [mods[p].register_forward_hook(lambda mod, a, o, _p=p: keep(mod, a, o, _p)) for p in pre_paths]
        logits = ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        loss.backward()
        for h in hs:
            h.remove()
        for p in pre_paths:
            out[p].append(store[p].grad[b.count_mask].detach().clone())
    return {p: torch.cat(v) for p, v in out.items()}


def test_eta_equals_autograd_dl_dh_with_inplace_relu(gpt2_dir, corpus, spy):
    lm = load_checkpoint(str(gpt2_dir), device="cpu")
    lm.model.transformer.h[1].mlp.act = torch.nn.ReLU(inplace=True)  # full backward hooks would break here
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    # loss_reduction="sum": the reference below sums the loss (the default, mean, is in test_gradients_reduction.py)
    res = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=3, loss_reduction="sum"))
    ref = _reference_dl_dh(lm.model, _batches(lm, corpus, 3), ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"])
    df = res.table()
    assert list(df.canonical_name) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert list(df.module_path) == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert set(df.eta_method) == {"g*act'(h)"} and set(df.act) == {"relu"}
    for layer in (0, 1):
        probe = res.probes[f"blocks.{layer}.mlp.hook_post#0"]
        eta = torch.cat(spy[id(probe)])
        want = ref[f"transformer.h.{layer}.mlp.c_fc"]
        assert eta.shape == want.shape
        assert torch.allclose(eta, want, rtol=1e-5, atol=1e-7), (layer, (eta - want).abs().max())
        row = df.iloc[layer]
        n = want.numel()
        assert row.n_tokens == row.n_grad_tokens == res.info["n_counted_tokens"] == want.shape[0]
        assert row["eff_grad_sparsity@1e-06"] == pytest.approx(float((want.abs() < 1e-6).sum()) / n, abs=2 / n)
        assert row.eta_l2sq_per_token == pytest.approx(float(want.double().square().sum()) / want.shape[0], rel=1e-4)
        # ReLU: act'(h) = 0 exactly where h <= 0, and eta is 0 there too.
        assert row.deriv_sparsity <= row.eff_grad_zero_frac + 1e-12
    # Parameters: untouched, no .grad kept, requires_grad restored.
    assert all(p.grad is None for p in lm.model.parameters())
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    # Spikes: every linear input; the down projections' inputs are post-ReLU (zero_frac = deriv_sparsity).
    sp = res.spikes_table()
    down = sp[sp.is_down_proj].sort_values("layer")
    assert list(down.module_path) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert down.zero_frac.to_numpy() == pytest.approx(df.deriv_sparsity.to_numpy(), abs=1e-9)
    assert (down.min_input_value >= 0).all() and (sp.spike_max > 0).all()
    assert "lm_head" in set(sp.module_path)
    assert res.info["loss"] == "causal_lm" and res.info["loss_reduction"] == "sum"


def test_dl_dh_fallback_site_and_mean_reduction(gpt2_dir, corpus, spy):
    lm = load_checkpoint(str(gpt2_dir), device="cpu")
    from probes.activations import RELU

    mods = dict(lm.model.named_modules())
    site = GradSite("blocks.0.mlp.hook_post", "transformer.h.0.mlp.c_fc", "mlp_post", 0, "gpt2", RELU, "dL/dh",
                    mods["transformer.h.0.mlp.c_fc"])
    res = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=4, loss_reduction="mean",
                                            spikes=False), site_list=[site])
    batches = _batches(lm, corpus, 4)
    ref = _reference_dl_dh(lm.model, batches, ["transformer.h.0.mlp.c_fc"])["transformer.h.0.mlp.c_fc"]
    eta = torch.cat(spy[id(res.probes["blocks.0.mlp.hook_post#0"])])
    # mean reduction divides each batch's eta by that batch's number of targets
    scale = torch.cat([torch.full((int(b.count_mask.sum()),), 1.0 / int((b.labels != -100).sum())) for b in batches])
    assert torch.allclose(eta, ref * scale[:, None], rtol=1e-5, atol=1e-9)
    assert res.spike_rows == [] and res.rows[0]["eta_method"] == "dL/dh"


def test_glu_gate_eta_equals_autograd(tmp_path, corpus, spy, word_lm):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, V = word_lm.tokenizer(WORDS, MAX_LEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=MAX_LEN, hidden_act="silu", bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_checkpoint(str(tmp_path), device="cpu")
    sites = find_grad_sites(lm.model, lm.family, lm.config)
    assert [s.kind for s in sites] == ["mlp_gate_act", "mlp_gate_act"]
    assert [s.module_path for s in sites] == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    assert sites[0].act.name == "silu" and sites[0].pre_module_path == "model.layers.0.mlp.gate_proj"
    res = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=4, loss_reduction="sum",
                                            spikes=False))
    gates = ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    ref = _reference_dl_dh(lm.model, _batches(lm, corpus, 4), gates)
    for i, g in enumerate(gates):
        # eta = dL/d act(gate) * silu'(gate) = dL/dgate: the GLU's up branch is inside g
        eta = torch.cat(spy[id(res.probes[f"blocks.{i}.mlp.hook_gate_act#0"])])
        assert torch.allclose(eta, ref[g], rtol=1e-5, atol=1e-7), (i, (eta - ref[g]).abs().max())
    row = res.rows[0]
    assert row["deriv_sparsity_rule"] == "|act'(h)|<=1e-06" and row["act"] == "silu"
    assert row["deriv_zero_frac"] == 0.0


# ----------------------------------------------------------------------------- refusals

def test_refused_without_a_loss(tmp_path, corpus):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bare = load_checkpoint(BertModel(cfg), device="cpu")
    with pytest.raises(ModelError, match="no loss on text"):
        measure_gradients(bare, GradOptions(data=corpus))
    with pytest.raises(ModelError, match="no labels"):
        measure_gradients(bare, GradOptions(data="random:3x8x8"))
    with pytest.raises(ModelError, match="needs a causal-LM head"):
        measure_gradients(bare, GradOptions(data=corpus, loss="causal_lm"))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=30, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8))
    lm = load_checkpoint(t5, device="cpu")
    lm.is_encoder_decoder = True
    with pytest.raises(ModelError, match="encoder-decoder"):
        measure_gradients(lm, GradOptions(data=corpus))
    with pytest.raises(ModelError, match="unknown loss reduction"):
        measure_gradients(bare, GradOptions(data=corpus, loss_reduction="avg"))


def test_sequence_classifier_labels_from_jsonl(tmp_path, word_lm):
    import json

    from transformers import BertConfig, BertForSequenceClassification

    from probes.loading import LoadedModel

    tok, V = word_lm.tokenizer(WORDS, MAX_LEN)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     num_labels=3, max_position_embeddings=MAX_LEN, hidden_act="relu")
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    lm = LoadedModel(model, tok, cfg, "bert", torch.device("cpu"), torch.float32, False, False, {})
    p = tmp_path / "lab.jsonl"
    p.write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:i + 5]), "y": i % 3}) for i in range(7)))
    res = measure_gradients(lm, GradOptions(data=str(p), labels="y", batch_size=4))
    assert res.info["loss"] == "classification" and res.info["n_loss_targets"] == 7
    assert len(res.rows) == 2 and all(r["n_grad_tokens"] == r["n_tokens"] > 0 for r in res.rows)
    p.write_text(json.dumps({"text": "the cat", "y": 7}))
    with pytest.raises(DataError, match="out of range"):
        measure_gradients(lm, GradOptions(data=str(p), labels="y"))


def test_masked_lm_loss_masks_fifteen_percent(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LEN)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=MAX_LEN, hidden_act="relu")
    cfg.architectures = ["BertForMaskedLM"]
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_checkpoint(str(tmp_path), device="cpu")
    res = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=8, seed=3))
    info = res.info
    assert info["loss"] == "mlm" and "15%" in info["loss_definition"]
    n_body = info["n_counted_tokens"] - 2 * info["n_windows"]  # [CLS] and [SEP] are never targets
    assert 0.08 * n_body < info["n_loss_targets"] < 0.25 * n_body
    df = res.table()
    assert list(df.canonical_name) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert (df.n_grad_tokens == df.n_tokens).all() and (df.eta_l2sq_per_token > 0).all()
    again = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=8, seed=3, spikes=False))
    assert again.info["n_loss_targets"] == info["n_loss_targets"]  # seeded masking


def test_lower_medians_follow_torch_median_with_nan_and_inf():
    """``lower_medians`` claims torch.median's convention: a NaN anywhere gives NaN for both medians (numpy's
    selection would sort it last and return a number); +inf is an ordinary largest value."""
    import math

    import torch

    from probes.spikes import lower_medians

    a = torch.tensor([0.0, 1.0, 2.0, float("nan"), 3.0, 0.0])
    med, med_nz = lower_medians(a)
    assert math.isnan(med) and math.isnan(med_nz)
    assert math.isnan(float(torch.median(a))) and math.isnan(float(torch.median(a[a != 0])))
    b = torch.tensor([0.0, float("inf"), 1.0, 0.0, 5.0])
    assert lower_medians(b) == (float(torch.median(b)), float(torch.median(b[b != 0]))) == (1.0, 5.0)
    assert lower_medians(torch.zeros(4)) == (0.0, None)
