"""``cliff --labels``: the sparsity cliff of a sequence classifier (probes/cliff.py, classifier path).

A tiny BertForSequenceClassification (2 layers, ReLU MLPs, seeded random init) on a small synthetic
labeled .jsonl of sentences of different lengths (so batches are padded). The reference here is written
from the rules' definitions, not from our code: each held-out example is run ALONE (batch of one: no
padding exists), with plain forward pre-hooks on every MLP output projection that apply Bug or
Feature^2's per-sample rule (modifiers/decorators.py ``topk_sparse_module``: zero ``x < kthvalue(x, k)``
over the sample's flattened activations, at ``k = int(s n) + 1`` in our zeroed-fraction parameterisation)
or top-k |x| per token, and the loss ratio exp(mean CE_sparse - mean CE_dense) and accuracy computed in
float64 from the logits. Our run pads (batches of 4), so equality also shows that padded positions
never enter a k-th value or a count.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from probes.cliff import CliffOptions, DenseScan, calib_split, cliff, labeled_split, topk_sample_mask

WORDS = ("alpha beta gamma delta file path disk read write socket port host send number sum log root "
         "text word line string parse").split()
LABELS = ("files", "net", "math")
N_EX = 40


def _tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_len), len(vocab)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """(loaded classifier, data path, folder)."""
    import random

    from transformers import BertConfig, BertForSequenceClassification

    from probes.loading import load_checkpoint

    d = tmp_path_factory.mktemp("cliff_labels")
    tok, vocab = _tokenizer(32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_act="relu", num_labels=3,
                     initializer_range=0.5,  # logits that move with the input: ratios far from 1
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    cfg.architectures = ["BertForSequenceClassification"]
    BertForSequenceClassification(cfg).save_pretrained(d / "m")
    tok.save_pretrained(d / "m")
    rng = random.Random(1)
    with open(d / "ex.jsonl", "w") as f:
        for i in range(N_EX):
            n = rng.randint(2, 12)  # lengths differ: every batch of 4 is padded
            lab = i % 3
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n)),
                                "label": LABELS[lab] if i % 2 else lab}) + "\n")
    return load_checkpoint(str(d / "m")), str(d / "ex.jsonl"), d


def _opts(data, **kw):
    base = dict(data=data, labels="label", batch_size=4, max_length=32, grid=(0.0, 0.3, 0.6, 0.9), refine=0,
                families=("topk_sample", "topk_token"))
    base.update(kw)
    return CliffOptions(**base)


# ---------------------------------------------------------------- the reference, from the definitions
def _bof_sample_rule(x, s):
    """Bug or Feature^2's per-sample rule on one sample x [P, C] (all positions real): flatten, zero
    ``x < kthvalue(x, n_drop + 1)`` with ``n_drop = int(s n)``."""
    flat = x.reshape(-1)
    n_drop = int(s * flat.numel())
    if n_drop <= 0:
        return x
    kth = torch.kthvalue(flat, n_drop + 1).values
    return torch.where(x < kth, torch.zeros_like(x), x)


def _token_rule(x, s):
    """Top-k |x| per token: keep the C - int(s C) largest |x| of each position."""
    C = x.shape[-1]
    keep = C - int(s * C)
    order = x.abs().argsort(dim=-1, descending=True)
    m = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order[..., :keep], True)
    return torch.where(m, x, torch.zeros_like(x))


def _reference(lm, examples, rule, s):
    """(mean CE in float64, accuracy, zero fraction per layer) of ``examples`` run one at a time with ``rule``
    at ``s`` on the input of every ``bert.encoder.layer[i].output.dense``."""
    tok = lm.tokenizer
    projs = [layer.output.dense for layer in lm.model.bert.encoder.layer]
    zeros, entries = [0] * len(projs), [0] * len(projs)

    def pre(i):
        def f(mod, args):
            x = args[0]
            y = x if rule is None or s <= 0 else torch.stack([rule(x[b], s) for b in range(x.shape[0])])
            zeros[i] += int((y == 0).sum())
            entries[i] += y.numel()
            return (y,)
        return f

    hs = [p.register_forward_pre_hook(pre(i)) for i, p in enumerate(projs)]
    ce, ok = [], []
    try:
        with torch.no_grad():
            for text, lab in examples:
                enc = tok(text, truncation=True, max_length=32, return_tensors="pt")
                logits = lm.model(**enc).logits.double()[0]
                ce.append(float(-torch.log_softmax(logits, -1)[lab]))
                ok.append(int(logits.argmax()) == lab)
    finally:
        for h in hs:
            h.remove()
    return sum(ce) / len(ce), sum(ok) / len(ok), [z / e for z, e in zip(zeros, entries)]


def test_padding_never_enters_the_kth_value():
    # one sequence: two real positions, one padded position with large values. Counted: n = 4, s = 0.5 ->
    # n_drop = 2, k-th value = the 3rd smallest of {1, 2, 3, 4} = 3: zero 1 and 2. Had the padding counted,
    # n = 6, n_drop = 3, k-th = the 4th smallest of {1, 2, 3, 4, 100, 100} = 4: 3 would be zeroed too.
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[True, True, False]])
    assert topk_sample_mask(v, m, 0.5)[0].tolist() == [[True, True], [False, False], [False, False]]
    assert topk_sample_mask(v, None, 0.5)[0].tolist() == [[True, True], [True, False], [False, False]]


def test_classifier_cliff_equals_the_reference(clf):
    from probes.loss import labeled_examples

    lm, data, _ = clf
    opts = _opts(data)
    res = cliff(lm, opts)
    ex = labeled_examples(opts, lm)
    cal_i, held_i = calib_split(len(ex), opts.calib_share)
    held = [ex[i] for i in held_i]
    ce0, acc0, sp0 = _reference(lm, held, None, 0.0)
    pts = {(r["family"], r["target_sparsity"]): r for r in res.points}
    assert res.info["heldout_examples"] == len(held) and res.info["dense_accuracy"] == pytest.approx(acc0, abs=0)
    for fam, rule in (("topk_sample", _bof_sample_rule), ("topk_token", _token_rule)):
        for s in opts.grid:
            ce, acc, sp = _reference(lm, held, rule, s)
            p = pts[(fam, s)]
            assert p["loss_ratio"] == pytest.approx(math.exp(ce - ce0), rel=1e-6), (fam, s)
            assert p["accuracy"] == acc and p["accuracy_dense"] == acc0
            assert p["accuracy_drop"] == pytest.approx(100 * (acc0 - acc), abs=1e-9)
            # zeros counted on real positions only (the reference has no padding): the same fractions
            assert p["mean_sparsity"] == pytest.approx(sum(sp) / len(sp), rel=1e-12), (fam, s)
            assert "ppl_ratio" not in p and p["n_examples"] == len(held)
    # the cliff rules read the loss ratio
    assert {"sparsity_within_p", "knee_sparsity", "knee_accuracy", "accuracy_within_p"} <= set(res.cliffs[0])
    assert res.cliffs[0]["max_ratio"] == max(r["loss_ratio"] for r in res.points if r["family"] == "topk_sample")
    # error bars over held-out examples
    p9 = pts[("topk_sample", 0.9)]
    assert p9["accuracy_lo"] <= p9["accuracy"] <= p9["accuracy_hi"]
    assert p9["loss_ratio_lo"] <= p9["loss_ratio"] <= p9["loss_ratio_hi"]
    assert res.cliffs[0]["n_windows"] == len(held)


def test_calibration_and_heldout_examples_are_disjoint(clf):
    lm, data, _ = clf
    opts = _opts(data, families=("magnitude_layer",), grid=(0.0, 0.9))
    split = labeled_split(lm, opts)
    cal, held = set(split["cal_idx"]), set(split["held_idx"])
    assert not cal & held and cal | held == set(range(N_EX)) and len(cal) == round(0.25 * N_EX)
    res = cliff(lm, opts)
    # the calibration sample holds exactly the calibration examples' real tokens (no padded row)
    real = split["cal_tokens"]
    assert res.info["calibration_rows_per_layer"] == [real, real]
    assert real == sum(int(b.attention_mask.sum()) for b in split["cal_batches"])
    assert any(bool((b.attention_mask == 0).any()) for b in split["cal_batches"])  # padding was there
    assert res.info["calibration_examples"] + res.info["heldout_examples"] == N_EX


def test_reusing_the_dense_pass_changes_no_number(clf, monkeypatch):
    lm, data, _ = clf
    opts = _opts(data, families=("topk_sample", "topk_token", "magnitude_layer"), grid=(0.0, 0.1, 0.3, 0.9))
    res = cliff(lm, opts)
    assert any(r["pass"] == 0 and r["target_sparsity"] > 0 for r in res.points)  # some point was reused
    monkeypatch.setattr(DenseScan, "is_dense", lambda self, family, s, thresholds=(): s <= 0)
    full = cliff(lm, opts)
    assert full.info["full_passes"] > res.info["full_passes"]
    for a, b in zip(res.points, full.points):
        assert {k: v for k, v in a.items() if k != "pass"} == {k: v for k, v in b.items() if k != "pass"}


def test_dense_scan_by_hand():
    sc = DenseScan(1)
    # one sequence, 2 positions x 4 channels, 3 real entries are zero; smallest nonzero is 0.5
    v = torch.tensor([[[0.0, 0.5, 2.0, 0.0], [0.0, 1.0, 3.0, 4.0]]])
    sc.update(0, v, torch.tensor([[True, True]]))
    assert sc.max_nnz == [3] and sc.min_abs == [0.5]
    # n = 8: s = 0.3 drops int(2.4) = 2 < 3 zeros -> kth = 0 -> nothing dropped; s = 0.4 -> n_drop = 3, kth = 0.5
    # still drops only zeros; s = 0.5 -> n_drop = 4 -> kth = 1.0 drops 0.5
    assert sc.is_dense("topk_sample", 0.3) and sc.is_dense("topk_sample", 0.4)
    assert not sc.is_dense("topk_sample", 0.5)
    # per token C = 4, the densest token has 3 nonzeros: s = 0.25 keeps 3, s = 0.5 keeps 2
    assert sc.is_dense("topk_token", 0.25) and not sc.is_dense("topk_token", 0.5)
    assert sc.is_dense("magnitude_layer", 0.9, [0.0]) and not sc.is_dense("magnitude_layer", 0.9, [0.5])
    assert not sc.is_dense("sparling_posthoc", 0.1)


def test_labels_refusals(clf, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from probes.cliff import check_cliff
    from probes.errors import ModelError
    from probes.loading import load_checkpoint

    lm, data, _ = clf
    with pytest.raises(ModelError, match="--labels") as e:
        check_cliff(lm, CliffOptions(data=data))  # a classifier without --labels
    assert "--labels FIELD" in e.value.one_line()
    tok, vocab = _tokenizer(16)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    g = load_checkpoint(str(tmp_path / "g"))
    with pytest.raises(ModelError, match="no classification head") as e:
        check_cliff(g, CliffOptions(data=data, labels="label"))
    assert "actsparse fit-head" in e.value.one_line()


def test_minilm_classifier_cliff(minilm_classifier):
    """A real checkpoint: all-MiniLM-L6-v2 with a fitted linear probe (tests/conftest.py), a small grid."""
    from probes.loading import load_checkpoint

    lm = load_checkpoint(minilm_classifier.path)
    opts = CliffOptions(data=minilm_classifier.data, labels=minilm_classifier.labels, batch_size=16,
                        max_length=32, max_tokens=800, grid=(0.0, 0.9), refine=0,
                        families=("topk_sample", "magnitude_layer"))  # ~40 examples, 4 passes: a few seconds
    res = cliff(lm, opts)
    pts = {(r["family"], r["target_sparsity"]): r for r in res.points}
    assert res.info["dense_accuracy"] > 0.5  # the probe learned the topics (5 classes, chance 0.2)
    for fam in opts.families:
        assert pts[(fam, 0.9)]["loss_ratio"] > pts[(fam, 0.0)]["loss_ratio"] == 1.0
        assert pts[(fam, 0.9)]["mean_sparsity"] > 0.85
    assert len({r["layer"] for r in res.layer_rows}) == 6
    # the head was fitted on every second one of the first 200 examples: those are left out (actsparse_head.json)
    assert any("left out" in n and "actsparse_head.json" in n for n in res.info["notes"]), res.info["notes"]
