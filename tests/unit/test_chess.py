"""CHESS (probes.chess, ``curve --method chess``) against an independent re-implementation.

Written from junhuihe-hjh/CHESS ``CHESS/notebooks/thresholds.py`` (mean|up| per sample, then the
``torch.kthvalue`` k = int(N * q) quantile of |act(gate)| * mean|up| per sample, both averaged over
samples; channel threshold T / mean|up_i|) and ``CHESS/models/llama.py`` (act(gate) zeroed where
|act(gate)| < threshold), with plain torch hooks on a tiny Llama; a sample is one calibration window.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import transformers as tf
from probes import chess as C
from probes import pplp as P
from probes.loading import LoadedModel

V = 40
OPTS = dict(max_length=32, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    m = tf.LlamaForCausalLM(cfg).eval()
    return LoadedModel(model=m, tokenizer=None, config=cfg, family="llama", device=torch.device("cpu"),
                       dtype=torch.float32, is_causal_lm=True, is_encoder_decoder=False)


def tokens(n, seed):
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def captured(model, batches):
    """Per layer: the up projection outputs and act(gate) of every calibration window (real positions)."""
    ups, acts, handles, cur = {}, {}, [], {}
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.up_proj.register_forward_hook(
            lambda m, a, out, i=i: ups.setdefault(i, []).extend(
                out[b][cur["am"][b].bool()].detach() for b in range(out.shape[0]))))
        handles.append(layer.mlp.act_fn.register_forward_hook(
            lambda m, a, out, i=i: acts.setdefault(i, []).extend(
                out[b][cur["am"][b].bool()].detach() for b in range(out.shape[0]))))
    with torch.no_grad():
        for b in batches:
            cur["am"] = b.attention_mask
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in handles:
        h.remove()
    return ups, acts


def test_kth_values_by_hand():
    x = torch.tensor([[5.0, 1.0], [3.0, 2.0]])  # sorted: 1 2 3 5
    assert C.kth_values(x, [0.5, 0.75, 1.0, 0.1]) == [2.0, 3.0, 5.0, 0.0]  # k = 2, 3, 4, 0


def test_chess_thresholds_are_exact_quantiles(llama):
    docs = [tokens(700, 1)]
    sess = P.PplpSession(llama, P.CurveOptions(**OPTS), docs_tokens=docs, calib_fraction=0.25)
    sess.chess_calibrate([0.5, 0.7])
    ups, acts = captured(llama.model, sess.calib_batches)
    for i in range(2):
        up_mean = torch.stack([u.abs().double().mean(0) for u in ups[i]]).mean(0)
        assert torch.allclose(sess.chess_up_mean[i], up_mean, rtol=1e-12, atol=0)
        for s in (0.5, 0.7):
            per = []
            for a in acts[i]:
                imp = (a.abs() * up_mean.float()).flatten()
                k = int(imp.numel() * s)
                q = torch.quantile(imp, (k - 1) / (imp.numel() - 1), interpolation="lower")
                assert float(q) == float(torch.kthvalue(imp, k).values)
                per.append(float(q))
            assert sess.chess_thr[s][i] == pytest.approx(sum(per) / len(per), rel=1e-12)
    assert sess.chess_samples == len(sess.calib_windows)


def test_chess_ppl_ratio_matches_an_independent_mask(llama):
    docs = [tokens(700, 2)]
    res = P.curve(llama, P.CurveOptions(**OPTS, methods=("chess",), values={"chess": (0.5,)}), docs_tokens=docs)
    sess = P.PplpSession(llama, P.CurveOptions(**OPTS), docs_tokens=docs, calib_fraction=0.25)
    sess.chess_calibrate([0.5])
    thr = [sess.chess_thr[0.5][i] / sess.chess_up_mean[i].float() for i in range(2)]

    def ce(sparse):
        hs = []
        if sparse:
            for i, layer in enumerate(llama.model.model.layers):
                hs.append(layer.mlp.act_fn.register_forward_hook(
                    lambda m, a, out, i=i: torch.where(out.abs() < thr[i], torch.zeros_like(out), out)))
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in sess.batches:
                lg = llama.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                keep = b.labels != -100
                tot += float(F.cross_entropy(lg[keep].double(), b.labels[keep], reduction="sum"))
                n += int(keep.sum())
        for h in hs:
            h.remove()
        return tot / n

    ratio = math.exp(ce(True) - ce(False))
    row = res.table().set_index("method").loc["chess"]
    assert row.ppl_ratio == pytest.approx(ratio, rel=1e-6)
    assert 0.4 < row.mean_sparsity < 0.6  # about half of act(gate) zeroed (T is a per-window average)
    assert res.info["chess"]["chess_plus_attention"] == "chess_plus not run"


def test_chess_plus_attention_thresholds_and_ppl(llama):
    docs = [tokens(700, 3)]
    sess = P.PplpSession(llama, P.CurveOptions(**OPTS), docs_tokens=docs, calib_fraction=0.25)
    sess.chess_plus_calibrate([0.5])
    # independent: the exact k-th |x| of each calibration window's q_proj input and o_proj input, averaged
    got, handles, cur = {}, [], {}
    for i, layer in enumerate(llama.model.model.layers):
        for j, mod in enumerate((layer.self_attn.q_proj, layer.self_attn.o_proj)):
            def pre(m, args, key=(i, j)):
                x = args[0]
                for b in range(x.shape[0]):
                    v = x[b][cur["am"][b].bool()].abs().flatten()
                    got.setdefault(key, []).append(float(torch.kthvalue(v, int(v.numel() * 0.5)).values))
            handles.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        for b in sess.calib_batches:
            cur["am"] = b.attention_mask
            llama.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in handles:
        h.remove()
    for i in range(2):
        for j in range(2):
            ref = sum(got[(i, j)]) / len(got[(i, j)])
            assert sess.chess_attn_thr[0.5][i][j] == pytest.approx(ref, rel=1e-12)

    # the PPL ratio of the curve equals an independent mask: act(gate) (CHESS) + q / o inputs (CHESS+)
    res = P.curve(llama, P.CurveOptions(**OPTS, methods=("chess_plus",), values={"chess_plus": (0.5,)}),
                  docs_tokens=docs)
    thr = [sess.chess_thr[0.5][i] / sess.chess_up_mean[i].float() for i in range(2)]
    att = sess.chess_attn_thr[0.5]
    hs = []
    for i, layer in enumerate(llama.model.model.layers):
        hs.append(layer.mlp.act_fn.register_forward_hook(
            lambda m, a, out, i=i: torch.where(out.abs() < thr[i], torch.zeros_like(out), out)))
        for j, mod in enumerate((layer.self_attn.q_proj, layer.self_attn.o_proj)):
            hs.append(mod.register_forward_pre_hook(
                lambda m, a, t=att[i][j]: (torch.where(a[0].abs() < t, torch.zeros_like(a[0]), a[0]),)))

    def ce():
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in sess.batches:
                lg = llama.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                keep = b.labels != -100
                tot += float(F.cross_entropy(lg[keep].double(), b.labels[keep], reduction="sum"))
                n += int(keep.sum())
        return tot / n

    sparse = ce()
    for h in hs:
        h.remove()
    ratio = math.exp(sparse - ce())
    assert res.table().set_index("method").loc["chess_plus"].ppl_ratio == pytest.approx(ratio, rel=1e-6)


def test_chess_plus_refuses_a_fused_qkv():
    from probes.errors import ModelError

    cfg = tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    m = tf.GPT2LMHeadModel(cfg).eval()
    lm = LoadedModel(model=m, tokenizer=None, config=cfg, family="gpt2", device=torch.device("cpu"),
                     dtype=torch.float32, is_causal_lm=True, is_encoder_decoder=False)
    with pytest.raises(ModelError, match="fused q/k/v projection") as e:
        P.curve(lm, P.CurveOptions(**OPTS, methods=("chess_plus",), values={"chess_plus": (0.5,)}),
                docs_tokens=[tokens(400, 4)])
    assert "--method chess" in e.value.fix
