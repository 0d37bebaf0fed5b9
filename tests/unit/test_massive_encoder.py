"""Sun et al. 2024's exp4 (attention) and exp3 (intervention) on encoders: bidirectional attention and
sequence classifiers.

Each number is checked against an independent implementation written here from the reference code
(locuslab/massive-activations: monkey_patch/modify_vit.py ``vit_custom_attention_forward`` -- unmasked
``attn_probs`` = softmax(q kᵀ x scale) -- and lib/hook.py ``Intervened_Layer.update`` for the entries;
lib/eval_utils.py ``test_imagenet`` for top-1 accuracy), with its own hooks, on tiny BERT models built
from configs (2 layers, seeded), with right padding in the batches under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from probes.attention_sinks import AttentionShares
from probes.errors import DataError, ModelError
from probes.loading import load_checkpoint
from probes.massive import MassiveOptions, massive
from sun_reference import intervened_layer_update  # tests/sun_reference.py

WORDS = ("the cat sat on a mat dog ran in park sun is warm today we measure massive activations . "
         "winter cold summer").split()
MAX_LEN = 32
MASSIVE_CHANNEL = 3


def bert_tokenizer(words, max_len: int = MAX_LEN):
    """A word-level tokenizer with BERT's special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; every
    encoded text becomes [CLS] ... [SEP], as BERT's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_len)
    return tok, len(vocab)


def save_tiny_bert(folder, cls=tf.BertModel, num_labels: int | None = None, seed: int = 0, massive: bool = True):
    """A 2-layer BERT (hidden 32, 4 heads) with a word tokenizer; ``massive``: the first block's output LayerNorm
    scales channel 3 by 2000, so that channel holds Sun-massive entries (|a| > 100, >= 1000 x the median)."""
    tok, vocab = bert_tokenizer(WORDS)
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_LEN, pad_token_id=0,
                        **({"num_labels": num_labels} if num_labels else {}))
    cfg.architectures = [cls.__name__]
    model = cls(cfg).eval()
    if massive:
        base = model.bert if hasattr(model, "bert") else model
        with torch.no_grad():
            base.encoder.layer[0].output.LayerNorm.weight[MASSIVE_CHANNEL] = 2000.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def docs_corpus(path, lengths=(5, 17, 9, 23, 12, 3, 14), seed=3):
    import random

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
    path.write_text("\n\n".join(docs))
    return path, docs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one torch thread is faster than several fighting over a loaded machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    return load_checkpoint(str(folder), device="cpu"), folder


# ------------------------------------------------------------------------------------------- hand-computed
def test_bidirectional_shares_hand_computed_with_padding():
    """One sequence of 3 real tokens and 1 pad; bidirectional: every real query counts, key 3 is padding."""

    class Module:
        is_causal = False

    probs = torch.tensor([[[[0.5, 0.25, 0.25, 0.0],
                            [0.2, 0.6, 0.2, 0.0],
                            [0.1, 0.3, 0.6, 0.0],
                            [0.25, 0.25, 0.25, 0.25]]]])  # [B=1, H=1, T=4, T=4]; query 3 is padding
    q = torch.zeros(1, 1, 4, 2)
    a = AttentionShares()
    a.begin(torch.tensor([[True, True, True, False]]))
    a.on_attention(Module(), q, q, None, 1.0, probs)
    a.end(torch.tensor([[True, False, True, False]]), torch.tensor([[False, True, False, False]]))
    (r,) = a.rows()
    assert r["attention_kind"] == "bidirectional" and r["n_queries"] == 3  # query 0 counts; the pad does not
    assert r["attn_share_first"] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert r["attn_share_peak"] == pytest.approx((0.5 + 0.25 + 0.2 + 0.2 + 0.1 + 0.6) / 3)
    assert r["attn_share_massive"] == pytest.approx((0.25 + 0.6 + 0.3) / 3)
    assert r["uniform_share_first"] == pytest.approx(1 / 3)  # 1 / (3 real keys), not 1/4 and not 1/(q+1)
    assert r["uniform_share_peak"] == pytest.approx(2 / 3)
    # logits: no mask and bidirectional -> checked against softmax(q k^T) = uniform over all 4 keys: differs
    assert math.isnan(r["logit_first_mean"])


def test_kind_read_off_the_probabilities_without_a_flag():
    from probes.attention_sinks import attention_kind

    valid = torch.tensor([[True, True, False]])
    lower = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.3, 0.3, 0.4]]]])
    assert attention_kind(None, lower, valid) == "causal"
    full = torch.tensor([[[[0.9, 0.1, 0], [0.5, 0.5, 0], [0.3, 0.3, 0.4]]]])
    assert attention_kind(None, full, valid) == "bidirectional"
    # mass on a padding key above the diagonal does not make it bidirectional
    pad = torch.tensor([[[[1.0, 0, 0], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]]])
    assert attention_kind(None, pad, valid) == "causal"


# -------------------------------------------------------------------------------------- exp4 on an encoder
def _their_attention(folder, seqs, ref_layer, batch_size):
    """Per (layer, head): attention mass on key 0 / on {0, peak} / on the massive positions, summed over every real
    query (the batches right-padded here, the padding excluded here), the uniform baselines (1 / real keys), the
    logits on key 0 and on the other real keys from q and k read off the query/key Linears (modify_vit.py: attn =
    q k^T x scale, softmax, no causal mask)."""
    model = tf.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    d = model.config.hidden_size // H
    z = lambda: torch.zeros(L, H, dtype=torch.float64)  # noqa: E731
    acc = {k: z() for k in ("first", "peak", "massive", "lg_first", "lg_other")}
    n_q = n_other = 0
    u_first = u_peak = 0.0
    qk: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [getattr(blk.attention.self, w).register_forward_hook(
        lambda m, i, o, li=li, w=w: qk.__setitem__((li, w), o.detach()))
        for li, blk in enumerate(model.encoder.layer) for w in ("query", "key")]
    seqs = sorted(seqs, key=len)  # as the run batches them (maxact2026: by length)
    try:
        for i in range(0, len(seqs), batch_size):
            group = seqs[i:i + batch_size]
            T = max(len(s) for s in group)
            ids = torch.tensor([s + [0] * (T - len(s)) for s in group])
            att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in group])
            with torch.no_grad():
                out = model(ids, attention_mask=att, output_attentions=True, output_hidden_states=True)
            for b, s in enumerate(group):
                n = len(s)  # real tokens: queries and keys 0..n-1
                h = out.hidden_states[ref_layer + 1][b, :n].abs()  # [n, C]
                token_dim = int(torch.sort(h.flatten(), descending=True).indices[0]) // h.shape[1]
                peak = sorted({0, token_dim})
                med = h.flatten().kthvalue((h.numel() + 1) // 2).values  # torch.median's lower median
                mass = [p for p in range(n) if bool(((h[p] > 100) & (h[p] >= 1000 * med)).any())]
                other = [k for k in range(n) if k not in peak]
                for li, p in enumerate(out.attentions):  # [B, H, T, T]
                    p = p[b, :, :n, :].double()  # every real query counts (bidirectional)
                    acc["first"][li] += p[:, :, 0].sum(1)
                    acc["peak"][li] += p[:, :, peak].sum((1, 2))
                    acc["massive"][li] += p[:, :, mass].sum((1, 2))
                    qh = qk[(li, "query")][b, :n].view(n, H, d).transpose(0, 1)
                    kh = qk[(li, "key")][b, :n].view(n, H, d).transpose(0, 1)
                    lg = (qh @ kh.transpose(-1, -2)).double() / math.sqrt(d)  # [H, n, n]
                    acc["lg_first"][li] += lg[:, :, 0].sum(1)
                    acc["lg_other"][li] += lg[:, :, other].sum((1, 2))
                n_q += n
                n_other += n * len(other)
                u_first += n * (1 / n)
                u_peak += n * (len(peak) / n)
    finally:
        for hk in hooks:
            hk.remove()
    return {"attn_share_first": acc["first"] / n_q, "attn_share_peak": acc["peak"] / n_q,
            "attn_share_massive": acc["massive"] / n_q, "logit_first_mean": acc["lg_first"] / n_q,
            "logit_other_mean": acc["lg_other"] / n_other, "uniform_share_first": u_first / n_q,
            "uniform_share_peak": u_peak / n_q, "n_queries": n_q}


def test_encoder_attention_matches_independent_hooks_with_padding(bert, tmp_path):
    lm, folder = bert
    corpus, docs = docs_corpus(tmp_path / "docs.txt")
    # maxact2026: one document per sequence, batched 4 at a time by length: right padding in every batch
    opts = MassiveOptions(data=str(corpus), preset="maxact2026", batch_size=4, attention=True,
                          attention_prompt="the cat sat on a mat .")
    res = massive(lm, opts)
    at = res.table("attention")
    assert set(at.attention_kind) == {"bidirectional"} and res.info["attention"]["attention_kind"] == "bidirectional"
    assert res.info["attention"]["n_seq_with_massive"] > 0  # the planted channel
    from probes.massive_presets import build_samples, resolve_preset

    samples, _ = build_samples(lm, MassiveOptions(data=str(corpus), preset="maxact2026"),
                               resolve_preset("maxact2026"))
    assert len({len(s.input_ids) for s in samples}) > 1  # different lengths: the batches are padded
    ref = _their_attention(folder, [s.input_ids for s in samples], res.info["attention"]["reference_layer"], 4)
    assert set(at.n_queries) == {ref["n_queries"]} == {sum(len(d.split()) for d in docs)}
    for r in at.itertuples():
        for c in ("attn_share_first", "attn_share_peak", "attn_share_massive", "logit_first_mean",
                  "logit_other_mean"):
            assert getattr(r, c) == pytest.approx(float(ref[c][r.layer, r.head]), rel=1e-6, abs=1e-9), (c, r.layer)
        assert r.uniform_share_first == pytest.approx(ref["uniform_share_first"], rel=1e-12)
        assert r.uniform_share_peak == pytest.approx(ref["uniform_share_peak"], rel=1e-12)
    assert at.attn_share_first.max() > 0  # not trivially zero
    # the prompt map is the full square, and its probabilities are the heads' mean of output_attentions
    pt = res.table("attention_prompt")
    T = int(pt["query"].max()) + 1
    assert T == 7 and len(pt) == 2 * T * T and (pt.key > pt["query"]).any()
    model = tf.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids = lm.tokenizer("the cat sat on a mat .", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    for li, p in enumerate(att):
        g = pt[pt.layer == li].sort_values(["query", "key"])
        want = p[0].mean(0).reshape(-1).tolist()
        assert g.prob_mean.tolist() == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert lm.model.config._attn_implementation != "actsparse_capture"  # restored


def test_bos_puts_cls_at_position_0(bert, tmp_path):
    lm, _ = bert
    corpus, _ = docs_corpus(tmp_path / "docs.txt")
    res = massive(lm, MassiveOptions(data=str(corpus), preset="maxact2026", batch_size=4, attention=True, bos=True))
    assert res.info["attention"]["first_position"] == "the prefix token [CLS] (--bos)"
    res2 = massive(lm, MassiveOptions(data=str(corpus), preset="maxact2026", batch_size=4, attention=True))
    assert "no special tokens" in res2.info["attention"]["first_position"]


# --------------------------------------------------------------------------------- exp3 on a classifier
def _labelled(path, n=14, seed=5):
    import random

    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), "label": i % 3}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-clf"), tf.BertForSequenceClassification,
                            num_labels=3, seed=1)
    return load_checkpoint(str(folder), device="cpu"), folder


def _their_classifier_quality(model, tok, rows, layer, channels, reset, consts):
    """lib/hook.py Intervened_Layer.update (position 0 and the row's top-|h| position, the given channels) on one
    example at a time (no padding), then mean cross-entropy and top-1 (lib/eval_utils.py test_imagenet)."""
    ce, correct = _their_per_example(model, tok, rows, layer, channels, reset, consts)
    return sum(ce) / len(ce), sum(correct) / len(correct)


def _their_per_example(model, tok, rows, layer, channels, reset, consts):
    """Per example (one at a time, no padding), with the reference hook: (cross-entropy list, correct list)."""
    h = model.bert.encoder.layer[layer].register_forward_hook(intervened_layer_update(channels, reset, consts))
    ce, correct = [], []
    try:
        for r in rows:
            with torch.no_grad():
                logits = model(**tok(r["text"], return_tensors="pt")).logits
            ce.append(float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor([r["label"]]))))
            correct.append(int(logits.argmax(-1)) == r["label"])
    finally:
        h.remove()
    return ce, correct


def _their_means(model, tok, rows, layer, channels):
    """The set_mean constants: per (position class, channel) mean of h at that layer over the examples."""
    first, peak = [], []
    for r in rows:
        with torch.no_grad():
            hs = model(**tok(r["text"], return_tensors="pt"), output_hidden_states=True).hidden_states
        h = hs[layer + 1][0]
        first.append(h[0, channels].double())
        p = int(h.abs().flatten().argmax()) // h.shape[1]
        if p != 0:
            peak.append(h[p, channels].double())
    return {"first": torch.stack(first).mean(0).tolist(),
            "peak": torch.stack(peak).mean(0).tolist() if peak else None}


def test_classifier_intervention_matches_independent_hook(classifier, tmp_path):
    lm, folder = classifier
    data, rows = _labelled(tmp_path / "labelled.jsonl")
    res = massive(lm, MassiveOptions(data=str(data), labels="label", intervene=("zero", "mean"), max_length=16,
                                     n_samples=4, batch_size=4))
    iv = {r["mode"]: r for r in res.intervene}
    assert list(iv) == ["original", "zero", "mean"]
    info = res.info["intervene"]
    assert info["quality"] == "classification" and info["examples"]["n_examples"] == len(rows)
    layer, chans = iv["original"]["layer"], [int(c) for c in iv["original"]["channels"].split(",")]
    assert layer == 0 and chans[0] == MASSIVE_CHANNEL  # the first layer with Sun-massive entries, its channel
    model = tf.BertForSequenceClassification.from_pretrained(folder).eval()  # the folder, loaded here
    tok = tf.AutoTokenizer.from_pretrained(folder)
    consts = _their_means(model, tok, rows, layer, chans)
    vals = res.table("intervene_values")
    got_first = vals[vals.position_class == "first"].set_index("channel").loc[chans, "mean_value"].tolist()
    assert got_first == pytest.approx(consts["first"], rel=1e-5, abs=1e-6)
    ce0, acc0 = _their_classifier_quality(model, tok, rows, layer, chans, None, consts)
    assert iv["original"]["ce_mean"] == pytest.approx(ce0, rel=1e-5)
    assert iv["original"]["accuracy"] == acc0 and iv["original"]["n_sequences"] == len(rows)
    for mode, reset in (("zero", "set_zero"), ("mean", "set_mean")):
        ce, acc = _their_classifier_quality(model, tok, rows, layer, chans, reset, consts)
        assert iv[mode]["ce_mean"] == pytest.approx(ce, rel=1e-5)
        assert iv[mode]["loss_ratio"] == pytest.approx(math.exp(ce - ce0), rel=1e-5)
        assert iv[mode]["accuracy"] == acc and iv[mode]["accuracy_drop"] == pytest.approx(acc0 - acc)
        for col in ("loss_ratio", "accuracy", "accuracy_drop"):
            assert iv[mode][f"{col}_lo"] <= iv[mode][col] <= iv[mode][f"{col}_hi"], (mode, col)
    # error bars, paired over examples: the sample sd of the per-example difference over sqrt(m)
    m = len(rows)
    ce_orig, ok_orig = _their_per_example(model, tok, rows, layer, chans, None, consts)
    ce_zero, ok_zero = _their_per_example(model, tok, rows, layer, chans, "set_zero", consts)
    d = torch.tensor(ce_zero) - torch.tensor(ce_orig)
    assert iv["zero"]["loss_ratio_se"] == pytest.approx(iv["zero"]["loss_ratio"] * float(d.std()) / m ** 0.5, rel=1e-4)
    drop = torch.tensor(ok_orig, dtype=torch.float64) - torch.tensor(ok_zero, dtype=torch.float64)
    assert iv["zero"]["accuracy_drop_se"] == pytest.approx(float(drop.std()) / m ** 0.5, abs=1e-12)
    acc = torch.tensor(ok_zero, dtype=torch.float64)
    assert iv["zero"]["accuracy_se"] == pytest.approx(float(acc.std()) / m ** 0.5, abs=1e-12)
    assert iv["zero"]["ce_mean"] != pytest.approx(iv["original"]["ce_mean"], rel=1e-3)  # the intervention bites


def test_classifier_intervention_is_batch_size_independent(classifier, tmp_path):
    lm, _ = classifier
    data, _ = _labelled(tmp_path / "labelled.jsonl")
    runs = [massive(lm, MassiveOptions(data=str(data), labels="label", intervene=("zero", "mean"), max_length=16,
                                       n_samples=1, batch_size=b)).table("intervene") for b in (1, 5)]
    for c in ("ce_mean", "loss_ratio", "accuracy"):
        assert runs[0][c].tolist() == pytest.approx(runs[1][c].tolist(), rel=1e-5), c


def test_max_tokens_caps_the_labelled_examples(classifier, tmp_path):
    lm, _ = classifier
    data, rows = _labelled(tmp_path / "labelled.jsonl")
    sizes = [len(lm.tokenizer(r["text"], truncation=True, max_length=16)["input_ids"]) for r in rows]
    budget = sum(sizes[:5]) + sizes[5] - 1  # the sixth example does not fit
    res = massive(lm, MassiveOptions(data=str(data), labels="label", intervene=("zero",), max_length=16,
                                     n_samples=4, batch_size=4, max_tokens=budget))
    ex = res.info["intervene"]["examples"]
    assert ex["n_examples"] == 5 and f"the first 5 of {len(rows)} labeled examples" in ex["left_out"]
    assert {r["n_sequences"] for r in res.intervene} == {5}


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(bert, classifier, tmp_path, word_lm):
    enc, _ = bert
    clf, _ = classifier
    data, _ = _labelled(tmp_path / "labelled.jsonl")
    with pytest.raises(ModelError, match="no causal-LM head and no classification head") as e:
        massive(enc, MassiveOptions(data=str(data), intervene=("zero",), max_length=16))
    assert "actsparse fit-head" in e.value.fix
    with pytest.raises(DataError, match="BertModel is not a sequence classifier") as e:  # labels do not help it
        massive(enc, MassiveOptions(data=str(data), labels="label", intervene=("zero",), max_length=16))
    assert "actsparse fit-head" in e.value.fix
    with pytest.raises(DataError, match="no --labels was given"):
        massive(clf, MassiveOptions(data=str(data), intervene=("zero",), max_length=16))
    with pytest.raises(DataError, match="no --intervene was given"):
        massive(clf, MassiveOptions(data=str(data), labels="label", max_length=16))
    gpt2 = word_lm.save_gpt2(tmp_path / "g", WORDS, max_len=MAX_LEN)
    with pytest.raises(DataError, match="a causal language model, whose --intervene measures perplexity"):
        massive(load_checkpoint(str(gpt2), device="cpu"),
                MassiveOptions(data=str(data), labels="label", intervene=("zero",), max_length=16))
