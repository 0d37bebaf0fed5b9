"""``curve --method sparling_posthoc`` (SPARLING's per-channel thresholds, post hoc) against an independent
computation: per-channel k-th values of act(gate) over the calibration windows' real positions
(kavigupta/sparling ``EnforceSparsityPerChannel``: a channel keeps values above its threshold), applied by
a plain forward hook; the PPL ratio on the evaluation windows must be the one ``curve`` reports."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import transformers as tf
from probes import pplp as P
from probes.loading import LoadedModel

V = 40
OPTS = dict(max_length=32, batch_size=4)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return LoadedModel(model=tf.LlamaForCausalLM(cfg).eval(), tokenizer=None, config=cfg, family="llama",
                       device=torch.device("cpu"), dtype=torch.float32, is_causal_lm=True, is_encoder_decoder=False)


def test_sparling_posthoc_curve_matches_independent_thresholds_and_ppl(llama):
    docs = [torch.randint(1, V, (700,), generator=torch.Generator().manual_seed(5)).tolist()]
    s = 0.8
    res = P.curve(llama, P.CurveOptions(**OPTS, methods=("sparling_posthoc",), values={"sparling_posthoc": (s,)}),
                  docs_tokens=docs)
    sess = P.PplpSession(llama, P.CurveOptions(**OPTS), docs_tokens=docs, calib_fraction=0.25)
    # independent thresholds: every real position of the calibration windows, per channel the k-th value
    acts, cur, hs = {}, {}, []
    for i, layer in enumerate(llama.model.model.layers):
        hs.append(layer.mlp.act_fn.register_forward_hook(lambda m, a, out, i=i: acts.setdefault(i, []).extend(
            out[b][cur["am"][b].bool()].detach() for b in range(out.shape[0]))))
    with torch.no_grad():
        for b in sess.calib_batches:
            cur["am"] = b.attention_mask
            llama.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in hs:
        h.remove()
    thr = {}
    for i, rows in acts.items():
        a = torch.cat(rows).float()
        k = int(a.shape[0] * s)
        thr[i] = torch.kthvalue(a, k, dim=0).values

    def ce(sparse):
        hooks = []
        if sparse:
            for i, layer in enumerate(llama.model.model.layers):
                hooks.append(layer.mlp.act_fn.register_forward_hook(
                    lambda m, a, out, i=i: torch.where(out <= thr[i], torch.zeros_like(out), out)))
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in sess.batches:
                lg = llama.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                keep = b.labels != -100
                tot += float(F.cross_entropy(lg[keep].double(), b.labels[keep], reduction="sum"))
                n += int(keep.sum())
        for h in hooks:
            h.remove()
        return tot / n

    row = res.table().set_index("method").loc["sparling_posthoc"]
    assert row.ppl_ratio == pytest.approx(math.exp(ce(True) - ce(False)), rel=1e-6)
    assert 0.7 < row.mean_sparsity < 0.9  # about s of act(gate) dropped on the held-out windows
    assert row.threshold_scope == "per channel"
