"""Sun et al. 2024's exp3 (intervention) and exp4 (attention sinks), and Max_act_llm's pooled |x| quantiles.

Each is checked against hand-computed values and against an independent implementation written from
the reference code (locuslab/massive-activations lib/hook.py ``Intervened_Layer.update``,
lib/eval_utils.py ``eval_ppl``, monkey_patch/modify_llama.py ``attn_probs`` / ``attn_logits``;
clx1415926/Max_act_llm analyze_model.py ``StatsAccumulator._update_sun`` / ``finalize``), on tiny
Llama and GPT-2 models built from configs.
"""

from __future__ import annotations

import bisect
import math

import pytest
import torch
import transformers as tf

from probes.attention_sinks import AttentionShares
from probes.loading import load_checkpoint
from probes.massive import MassiveOptions, MassiveProbe, massive, maxact_abs_quantile
from probes.massive_intervene import parse_modes
from probes.errors import DataError
from sun_reference import intervened_layer_update  # tests/sun_reference.py

WORDS = ("the cat sat on a mat dog ran in park sun is warm today we measure massive activations . "
         "winter cold summer").split()
MAX_LEN = 24


# ------------------------------------------------------------------------------------ Max_act_llm |x| quantiles
def test_maxact_quantile_hand_computed():
    # |x| = {0, 0, 1, 10, 100}: total 5, 2 zeros. q = 0.5: target 2.5 -> 0.5 into the bin of 1 (index 256,
    # one entry): 10 ** (-8 + 256 * 16/512 + 0.5 * 16/512) = 10 ** (1/64)
    hist = [0] * 512
    for v in (1.0, 10.0, 100.0):
        hist[math.floor((math.log10(v) + 8) / 16 * 512)] += 1
    assert maxact_abs_quantile(hist, 2, 5, 0.5) == pytest.approx(10 ** (1 / 64), rel=1e-12)
    assert maxact_abs_quantile(hist, 2, 5, 0.25) == 0.0  # target 1.25 <= 2 zeros
    # q = 0.999: target 4.995 -> t 2.995, third entry (bin of 100 = index 320), frac 0.995
    assert maxact_abs_quantile(hist, 2, 5, 0.999) == pytest.approx(10 ** (2 + 0.995 / 32), rel=1e-12)


def _their_quantiles(values: torch.Tensor) -> dict[str, float]:
    """Max_act_llm analyze_model.py, written from _update_sun (histogram) and finalize (quantile)."""
    n_bins, lo_, hi_ = 512, -8.0, 8.0
    flat = values.abs().float().reshape(-1)
    zero = flat <= 0.0
    nz = flat[~zero]
    idx = ((torch.log10(nz) - lo_) / (hi_ - lo_) * n_bins).floor().long().clamp(0, n_bins - 1)
    hist = torch.zeros(n_bins, dtype=torch.int64).scatter_add_(0, idx, torch.ones_like(idx))
    total, n_zero = flat.numel(), int(zero.sum())
    cum = torch.cumsum(hist, 0).tolist()
    span = hi_ - lo_

    def quantile(q):
        target = q * total
        if target <= n_zero:
            return 0.0
        t = target - n_zero
        i = bisect.bisect_left(cum, t)
        prev = cum[i - 1] if i > 0 else 0
        cnt = cum[i] - prev
        frac = ((t - prev) / cnt) if cnt > 0 else 0.5
        return float(10.0 ** (lo_ + i * span / n_bins + frac * span / n_bins))

    return {"abs_median": quantile(0.5), "abs_q25": quantile(0.25), "abs_q75": quantile(0.75),
            "abs_q90": quantile(0.9), "abs_q99": quantile(0.99), "abs_q999": quantile(0.999),
            "abs_hist_zero_frac": n_zero / total}


def test_maxact_quantiles_pooled_over_batches_match_reference():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 7, 16, generator=g) * torch.logspace(-3, 2, 16)
    x1[0, 0, :4] = 0.0  # some exact zeros
    x2 = torch.randn(3, 5, 16, generator=g) * 50
    mask2 = torch.ones(3, 5, dtype=torch.bool)
    mask2[2, 3:] = False  # padding never counts
    p = MassiveProbe(16)
    p.update(x1)
    q = MassiveProbe(16)
    q.update(x2, mask2)
    row = p.merge(q).to_row()
    pooled = torch.cat([x1.reshape(-1, 16), x2[mask2].reshape(-1, 16)])
    ref = _their_quantiles(pooled)
    for k, v in ref.items():
        assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert row["abs_hist_count"] == pooled.numel()


# ----------------------------------------------------------------------------------------------- models
def _tiny_llama(folder, word_lm, seed=0):
    tok, vocab = word_lm.tokenizer(WORDS, MAX_LEN)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.architectures = ["LlamaForCausalLM"]
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, word_lm):
    folder = _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), word_lm)
    corpus = word_lm.corpus(folder / "corpus.txt", WORDS, 400)
    return load_checkpoint(str(folder), device="cpu"), str(corpus)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, word_lm):
    folder = word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), WORDS, max_len=MAX_LEN, n_layer=2, n_embd=16)
    corpus = word_lm.corpus(folder / "corpus.txt", WORDS, 400, seed=1)
    return load_checkpoint(str(folder), device="cpu"), str(corpus)


def _opts(corpus, **kw):
    return MassiveOptions(data=corpus, n_samples=4, **kw)


# -------------------------------------------------------------------------------------- exp3: intervention
def _their_ppl(model, seqs, layer_module, channels, reset, consts, per_sequence=False):
    """lib/hook.py Intervened_Layer.update (the llama2_7b branch, with our channels and means) + eval_ppl
    (``per_sequence``: each sequence's mean next-token loss instead)."""
    h = layer_module.register_forward_hook(intervened_layer_update(channels, reset, consts))
    try:
        nlls = []
        with torch.no_grad():
            for s in seqs:
                lm_logits = model(s).logits
                loss = torch.nn.CrossEntropyLoss()(lm_logits[:, :-1, :].reshape(-1, lm_logits.shape[-1]),
                                                   s[:, 1:].reshape(-1))
                nlls.append(loss.double() if per_sequence else loss.float() * s.numel())
        if per_sequence:
            return torch.stack(nlls)
        seqlen = seqs[0].shape[1]
        return torch.exp(torch.stack(nlls).sum() / (len(seqs) * seqlen)).item()
    finally:
        h.remove()


def test_intervention_ppl_matches_reference_hook_on_llama(llama):
    lm, corpus = llama
    res = massive(lm, _opts(corpus, intervene=("zero", "mean")))
    iv = {r["mode"]: r for r in res.intervene}
    assert list(iv) == ["original", "zero", "mean"]
    layer, chans = iv["original"]["layer"], [int(c) for c in iv["original"]["channels"].split(",")]
    vals = res.table("intervene_values")
    consts = {cls: vals[vals.position_class == cls].sort_values("channel", key=lambda s: s.map(chans.index))
              ["mean_value"].tolist() for cls in ("first", "peak")}
    # the same sequences: sun2024 chunks of MAX_LEN tokens, batch size 1
    from probes.massive_presets import build_samples, resolve_preset

    samples, _ = build_samples(lm, _opts(corpus), resolve_preset("sun2024"))
    seqs = [torch.tensor([s.input_ids]) for s in samples]
    block = lm.model.model.layers[layer]
    assert iv["original"]["ppl"] == pytest.approx(_their_ppl(lm.model, seqs, block, chans, None, consts), rel=1e-5)
    assert iv["zero"]["ppl"] == pytest.approx(_their_ppl(lm.model, seqs, block, chans, "set_zero", consts), rel=1e-5)
    assert iv["mean"]["ppl"] == pytest.approx(_their_ppl(lm.model, seqs, block, chans, "set_mean", consts), rel=1e-5)
    assert iv["zero"]["ppl"] != iv["original"]["ppl"]
    assert iv["zero"]["ppl_ratio"] == pytest.approx(iv["zero"]["ppl"] / iv["original"]["ppl"])
    # error bars of the ratio: the paired per-sequence loss difference (equal-length sequences, so the ratio
    # estimator's se is the sample sd of the differences over sqrt(m)), delta method through exp
    base = _their_ppl(lm.model, seqs, block, chans, None, consts, per_sequence=True)
    diff = _their_ppl(lm.model, seqs, block, chans, "set_zero", consts, per_sequence=True) - base
    se_log = float(diff.std(unbiased=True)) / len(seqs) ** 0.5
    # (rel 2e-3: the differences are ~1e-3 of float32 losses, so float32 rounding is ~1e-4 of them)
    assert iv["zero"]["ppl_ratio_se"] == pytest.approx(iv["zero"]["ppl_ratio"] * se_log, rel=2e-3)
    assert iv["zero"]["ppl_ratio_lo"] <= iv["zero"]["ppl_ratio"] <= iv["zero"]["ppl_ratio_hi"]
    assert iv["original"]["ppl_ratio_se"] == 0 and iv["zero"]["ppl_se"] > iv["zero"]["ppl_ratio_se"] > 0
    # the means are the original forward's values at those entries, averaged over sequences
    hs = [lm.model(s, output_hidden_states=True).hidden_states[layer + 1][0].detach() for s in seqs]
    first = torch.stack([h[0, chans] for h in hs]).double().mean(0)
    assert consts["first"] == pytest.approx(first.tolist(), rel=1e-5, abs=1e-6)


def test_intervention_modes_and_layer_errors(llama):
    assert parse_modes("zero,mean") == ("zero", "mean")
    assert parse_modes(["mean", "zero,mean"]) == ("mean", "zero")
    with pytest.raises(DataError, match="unknown intervention 'half'"):
        parse_modes("zero,half")
    lm, corpus = llama
    with pytest.raises(DataError, match="--intervene-layer 7 is not a layer"):
        massive(lm, _opts(corpus, intervene=("zero",), intervene_layer=7))
    res = massive(lm, _opts(corpus, intervene=("zero",), intervene_layer=2))
    assert {r["layer"] for r in res.intervene} == {2} and res.info["intervene"]["layer_rule"].startswith("given")


# ----------------------------------------------------------------------------------- exp4: attention shares
def test_attention_shares_hand_computed():
    probs = torch.tensor([[[[1.0, 0, 0], [0.6, 0.4, 0], [0.5, 0.2, 0.3]]]])  # [B=1, H=1, T=3, T=3]
    q = torch.zeros(1, 1, 3, 2)
    a = AttentionShares()
    a.begin(torch.ones(1, 3, dtype=torch.bool))
    a.on_attention(None, q, q, None, 1.0, probs)
    a.end(torch.tensor([[True, False, True]]), torch.tensor([[False, True, False]]))
    (r,) = a.rows()
    assert r["n_queries"] == 2  # query 0 sees only itself and is not counted
    assert r["attn_share_first"] == pytest.approx((0.6 + 0.5) / 2)
    assert r["attn_share_peak"] == pytest.approx((0.6 + 0.5 + 0.3) / 2)
    assert r["attn_share_massive"] == pytest.approx((0.4 + 0.2) / 2)
    assert r["uniform_share_first"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert r["uniform_share_peak"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert math.isnan(r["logit_first_mean"])  # no additive mask given: logits not checked, not reported


def _their_probs(folder):
    """attn_probs as the reference reads them: the model loaded with eager attention, output_attentions."""
    return tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_attention_shares_match_eager_probabilities(which, llama, gpt2):
    lm, corpus = llama if which == "llama" else gpt2
    res = massive(lm, _opts(corpus, attention=True))
    ref_layer = res.info["attention"]["reference_layer"]
    from probes.massive_presets import build_samples, resolve_preset

    samples, _ = build_samples(lm, _opts(corpus), resolve_preset("sun2024"))
    model = _their_probs(lm.source.get("path") or lm.model.name_or_path)
    n_layers = len(res.table("attention").layer.unique())
    H = int(res.table("attention")["head"].max()) + 1
    first = torch.zeros(n_layers, H, dtype=torch.float64)
    peak = torch.zeros(n_layers, H, dtype=torch.float64)
    logit_first = torch.zeros(n_layers, H, dtype=torch.float64)
    nq = 0
    for s in samples:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            out = model(ids, output_attentions=True, output_hidden_states=True)
        h = out.hidden_states[ref_layer + 1][0]
        pk = int(h.abs().flatten().argmax()) // h.shape[1]  # their token_dim
        for li, p in enumerate(out.attentions):  # [1, H, T, T]
            p = p[0, :, 1:, :].double()  # queries >= 1
            first[li] += p[:, :, 0].sum(1)
            keys = sorted({0, pk})
            peak[li] += p[:, :, keys].sum((1, 2))
        nq += ids.shape[1] - 1
    got = res.table("attention")
    for r in got.itertuples():
        assert r.attn_share_first == pytest.approx(float(first[r.layer, r.head]) / nq, rel=1e-5)
        assert r.attn_share_peak == pytest.approx(float(peak[r.layer, r.head]) / nq, rel=1e-5)
    assert res.info["attention"]["logits"].startswith("q k^T")
    assert set(got.attention_kind) == {"causal"} and res.info["attention"]["attention_kind"] == "causal"
    if which == "gpt2":  # logits from q and k read off c_attn (no rotary embedding): their attn_logits
        for li, blk in enumerate(model.transformer.h):
            qs = []
            hook = blk.attn.c_attn.register_forward_hook(lambda m, i, o: qs.append(o))
            tot, n = torch.zeros(H, dtype=torch.float64), 0
            for s in samples:
                qs.clear()
                with torch.no_grad():
                    model(torch.tensor([s.input_ids]))
                qq, kk, _ = qs[0][0].split(model.config.n_embd, dim=-1)
                T, d = qq.shape[0], model.config.n_embd // H
                qh, kh = qq.view(T, H, d).transpose(0, 1), kk.view(T, H, d).transpose(0, 1)
                lg = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # [H, T, T]
                tot += lg[:, 1:, 0].double().sum(1)
                n += T - 1
            hook.remove()
            rows = got[got.layer == li].sort_values("head")
            assert rows.logit_first_mean.tolist() == pytest.approx((tot / n).tolist(), rel=1e-4, abs=1e-6)
    # the prompt table: head-mean logits of the lower triangle, one block per layer
    pt = res.table("attention_prompt")
    assert set(pt.layer) == set(range(n_layers)) and (pt.key <= pt["query"]).all()


def test_attention_restores_the_attention_implementation(gpt2):
    lm, corpus = gpt2
    before = lm.model.config._attn_implementation
    massive(lm, _opts(corpus, attention=True))
    assert lm.model.config._attn_implementation == before


def test_attention_refuses_a_model_without_the_interface(gpt2):
    from probes.attention_sinks import eager_capture
    from probes.errors import ModelError

    with pytest.raises(ModelError, match="switched to eager"):
        with eager_capture(torch.nn.Linear(2, 2), lambda *a: None):
            pass


def test_maxact_preset_length_defaults_to_their_32768(word_lm):
    import types

    from probes.massive_presets import MAXACT_MAX_SEQ_LEN, build_samples, resolve_preset

    tok, _ = word_lm.tokenizer(WORDS, 10 ** 6)
    loaded = types.SimpleNamespace(tokenizer=tok, max_length=None, family=None)
    opts = MassiveOptions(prompt=None, data=None, preset="maxact2026")
    _, info = build_samples(loaded, opts, resolve_preset("maxact2026"))
    assert MAXACT_MAX_SEQ_LEN == 32768 and info["max_length"] == 32768
    loaded.max_length = 64  # capped at the model's position limit
    assert build_samples(loaded, opts, resolve_preset("maxact2026"))[1]["max_length"] == 64
    assert resolve_preset("sun2024").reference_dtype == "float16"
    assert resolve_preset("maxact2026").reference_dtype == "bfloat16"


def test_padded_batches_give_the_per_sequence_results(llama, tmp_path):
    """maxact2026: documents of different lengths, right-padded in batches: the same PPL and shares as one by one."""
    import random

    lm, _ = llama
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (5, 17, 9, 23, 12, 3)]
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(docs))
    runs = [massive(lm, MassiveOptions(data=str(corpus), preset="maxact2026", batch_size=b, intervene=("zero", "mean"),
                                       attention=True, intervene_layer=1)) for b in (1, 4)]
    one, four = (r.table("intervene") for r in runs)
    assert one.ppl.tolist() == pytest.approx(four.ppl.tolist(), rel=1e-6)
    assert one.n_targets.tolist() == four.n_targets.tolist() == [sum(len(d.split()) - 1 for d in docs)] * 3
    a, b = (r.table("attention") for r in runs)
    for c in ("attn_share_first", "attn_share_peak", "uniform_share_first", "logit_first_mean", "logit_other_mean"):
        assert a[c].tolist() == pytest.approx(b[c].tolist(), rel=1e-5, abs=1e-7), c


# ------------------------------------------------------------------- a real encoder: MiniLM with a linear probe
def _minilm_classifier(request):
    """(classifier folder, topics corpus) from the ``minilm_classifier`` session fixture (tests/conftest.py: the
    all-MiniLM-L6-v2 encoder with a linear-probe head from ``actsparse fit-head``); skipped where it is missing."""
    try:
        v = request.getfixturevalue("minilm_classifier")
    except pytest.FixtureLookupError:
        pytest.skip("no minilm_classifier fixture in tests/conftest.py")
    if isinstance(v, (tuple, list)):
        return str(v[0]), str(v[1])
    return str(getattr(v, "folder", None) or getattr(v, "path")), str(getattr(v, "corpus", "probes/data/topics.jsonl"))


def check_minilm_classifier(folder: str, corpus: str, tmp_path) -> dict:
    """On the first 40 topics examples (32 tokens): the [CLS] attention share against output_attentions, the sink,
    and the intervention's quality columns. Returns the numbers (the README quotes a full run's)."""
    import json

    lines = [ln for ln in open(corpus, encoding="utf-8").read().splitlines() if ln.strip()][:40]
    data = tmp_path / "topics40.jsonl"
    data.write_text("\n".join(lines) + "\n")
    lm = load_checkpoint(folder, device="cpu")
    res = massive(lm, MassiveOptions(data=str(data), labels="label", intervene=("zero", "mean"), attention=True,
                                     bos=True, max_length=32, n_samples=2))
    at = res.table("attention")
    assert set(at.attention_kind) == {"bidirectional"}
    assert res.info["attention"]["first_position"] == "the prefix token [CLS] (--bos)"
    # independent: output_attentions of the same model on the same sequences (sun2024: batch size 1, no padding)
    from probes.massive_presets import build_samples, resolve_preset

    samples, _ = build_samples(lm, MassiveOptions(data=str(data), bos=True, max_length=32, n_samples=2),
                               resolve_preset("sun2024"))
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    first = None
    for s in samples:
        with torch.no_grad():
            att = model(torch.tensor([s.input_ids]), output_attentions=True).attentions
        got = torch.stack([p[0, :, :, 0].double().sum(-1) for p in att])  # [L, H]: every query's mass on key 0
        first = got if first is None else first + got
    nq = sum(len(s.input_ids) for s in samples)
    for r in at.itertuples():
        assert r.attn_share_first == pytest.approx(float(first[r.layer, r.head]) / nq, rel=1e-5)
    per_layer = at.groupby("layer").attn_share_first.mean()
    assert (per_layer.loc[1:4] > 10 * at.uniform_share_first.iloc[0]).all()  # [CLS] is a sink in the middle layers
    iv = res.table("intervene").set_index("mode")
    assert iv.loc["original", "n_sequences"] == len(lines) and iv.loc["original", "accuracy"] > 0.5
    assert iv.loc["original", "loss_ratio"] == 1.0
    assert iv.loc["zero", "ce_mean"] != iv.loc["original", "ce_mean"]
    return {"attn_share_first": per_layer.round(4).tolist(), "intervene": json.loads(iv.to_json())}


def test_minilm_classifier_attention_and_intervention(request, tmp_path):
    folder, corpus = _minilm_classifier(request)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared machine: one thread is the fast one
    try:
        check_minilm_classifier(folder, corpus, tmp_path)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_shares_are_the_same_a_head_at_a_time(monkeypatch, causal):
    """on_attention works on groups of heads (``HEAD_GROUP_BYTES``) so that its [B, heads, T, T] temporaries are
    one group's: one head per group and all heads in one give the same sums and the same logit check, with
    grouped keys (8 query heads, 2 key heads), a per-head floating mask and padding."""
    import probes.attention_sinks as sinks

    class Module:
        is_causal = causal

    g = torch.Generator().manual_seed(0)
    B, H, Hk, T, d = 2, 8, 2, 12, 4
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hk, T, d, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, -3:] = False
    allowed = valid[:, None, None, :] & (torch.ones(T, T, dtype=torch.bool).tril() if causal else True)
    mask = torch.zeros(B, H, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = torch.matmul(q, k.repeat_interleave(H // Hk, 1).transpose(-1, -2)) * 0.5 + mask
    probs = torch.softmax(logits, -1)
    rows = {}
    for group_bytes in (1, 1 << 30):
        monkeypatch.setattr(sinks, "HEAD_GROUP_BYTES", group_bytes)
        a = AttentionShares()
        a.begin(valid)
        a.on_attention(Module(), q, k, mask, 0.5, probs)
        layer = a.layers[0]
        rows[group_bytes] = (layer.p_col, layer.l_col, layer.logits_ok, a.max_logit_gap)
    one, all_heads = rows[1], rows[1 << 30]
    assert torch.equal(one[0], all_heads[0]) and torch.equal(one[1], all_heads[1])
    assert one[2] == all_heads[2] is True and one[3] == all_heads[3]
