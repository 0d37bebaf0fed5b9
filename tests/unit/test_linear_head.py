"""Linear probing (probes/linear_head.py, reports/head_checkpoint.py, `actsparse fit-head`) on tiny models
built from configs: the saved classifier's logits are W x + b of its features, the fit is the optimum
of the stated objective, the encoder stays as it was, and bad input is refused writing nothing."""

from __future__ import annotations

import json
import random

import pytest

WORDS = {"alpha": ["file", "path", "folder", "disk", "copy", "mode"],
         "beta": ["thread", "lock", "queue", "task", "wait", "pool"],
         "gamma": ["sum", "mean", "root", "sine", "prime", "ratio"]}
SHARED = ["the", "a", "of", "to"]


def _bert_tokenizer(folder):
    """A WordPiece (BERT) tokenizer over the test words: [CLS] ... [SEP], [PAD] = 0."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SHARED, *(w for ws in WORDS.values() for w in ws)]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32)
    return tok, len(vocab)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random tiny BertModel (with pooler) saved as a folder, like all-MiniLM-L6-v2 (architectures BertModel)."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok, n = _bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, hidden_act="gelu")
    cfg.architectures = ["BertModel"]
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_corpus(path, n=90, seed=0, field="label"):
    rng = random.Random(seed)
    names = sorted(WORDS)
    with open(path, "w") as f:
        for i in range(n):
            lab = names[i % 3]
            words = [rng.choice(WORDS[lab]) for _ in range(5)] + [rng.choice(SHARED) for _ in range(2)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), field: lab}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "topics.jsonl")


@pytest.fixture(scope="module")
def fitted(tiny_bert, corpus, tmp_path_factory):
    from reports.head_checkpoint import fit_head_checkpoint

    out = tmp_path_factory.mktemp("fit") / "clf"
    fit = fit_head_checkpoint(str(tiny_bert), str(corpus), "label", out, l2=1e-3, max_length=16, batch_size=16,
                              device="cpu")
    return out, fit


# ---------------------------------------------------------------------------- pure functions
def test_heldout_mask_is_evenly_spaced():
    from probes.linear_head import heldout_mask

    assert heldout_mask(6, 0.5) == [False, True, False, True, False, True]
    assert [i for i, h in enumerate(heldout_mask(10, 0.8)) if h] == [4, 9]
    assert [i for i, h in enumerate(heldout_mask(9, 2 / 3)) if h] == [2, 5, 8]


def test_label_ids_sorted_by_name_and_integer_ids_kept():
    from probes.errors import DataError
    from probes.linear_head import label_ids

    assert label_ids(["b", "a", "c", "a"]) == (["a", "b", "c"], [1, 0, 2, 0])
    assert label_ids([1, 0, 2]) == (["0", "1", "2"], [1, 0, 2])
    with pytest.raises(DataError, match="0..K-1"):
        label_ids([0, 2])
    with pytest.raises(DataError, match="mix"):
        label_ids(["a", 1])


def test_logistic_fit_matches_hand_optimum():
    """Two separated points per class in 1-D: the fitted W, b make the gradient of the stated objective
    (computed here in numpy from the formula) vanish, and the fit is deterministic."""
    import numpy as np
    import torch

    from probes.linear_head import fit_logistic

    x = torch.tensor([[-2.0, 1.0], [-1.0, 0.5], [1.0, -0.5], [2.0, 0.0], [0.2, 2.0], [0.0, 3.0]], dtype=torch.float64)
    y = [0, 0, 1, 1, 2, 2]
    l2 = 0.1
    w, b, info = fit_logistic(x, y, 3, l2)
    assert info["converged"]
    X, W, B = x.numpy(), w.numpy(), b.numpy()
    z = X @ W.T + B
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    Y = np.eye(3)[y]
    gw = (p - Y).T @ X / len(y) + l2 * W
    gb = (p - Y).mean(0)
    assert np.abs(gw).max() < 1e-6 and np.abs(gb).max() < 1e-6
    w2, b2, _ = fit_logistic(x, y, 3, l2)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_multi_layer_heads_are_refused():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig, \
        RobertaForSequenceClassification

    from probes.errors import ModelError
    from probes.linear_head import find_head

    rob = RobertaForSequenceClassification(RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelError, match=r"more than one layer \(classifier.dense, classifier.out_proj\)"):
        find_head(rob)
    dist = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2,
                                                                hidden_dim=32))
    with pytest.raises(ModelError, match="classifier, pre_classifier"):
        find_head(dist)


# ---------------------------------------------------------------------------- the fitted checkpoint
def test_saved_classifier_logits_are_w_features_plus_b(fitted, tiny_bert, corpus):
    """Load the folder as every command does; its logits equal W x + b with W, b read from the weight
    file and x the pooled [CLS] features computed from the encoder alone (not through our hook)."""
    import torch
    from safetensors.torch import load_file

    from probes.linear_head import read_labeled
    from probes.loading import load_checkpoint

    out, fit = fitted
    lm = load_checkpoint(str(out), device="cpu")
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    assert lm.config.id2label == {0: "alpha", 1: "beta", 2: "gamma"}
    sd = load_file(str(out / "model.safetensors"))
    W, b = sd["classifier.weight"].double(), sd["classifier.bias"].double()
    texts, _ = read_labeled(str(corpus), "label")
    enc = lm.tokenizer(texts[:20], truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = lm.model.bert(**enc).pooler_output.double()  # BertForSequenceClassification: classifier(pooled)
        logits = lm.model(**enc).logits.double()
    assert torch.allclose(logits, pooled @ W.T + b, atol=1e-5)
    # the encoder is the pretrained one, unchanged
    enc_sd = load_file(str(tiny_bert / "model.safetensors"))
    for k, v in enc_sd.items():
        assert torch.equal(sd["bert." + k], v), k


def test_record_split_and_accuracy(fitted, corpus):
    out, fit = fitted
    rec = json.loads((out / "actsparse_head.json").read_text())
    assert rec == json.loads(json.dumps(fit.record))
    assert rec["split"]["heldout_indices"] == list(range(1, 90, 2))
    assert rec["split"]["n_fit"] == rec["split"]["n_heldout"] == 45
    assert rec["label_names"] == ["alpha", "beta", "gamma"] and rec["head_module"] == "classifier"
    assert rec["chance_accuracy"] == pytest.approx(1 / 3)
    assert rec["converged"] and rec["l2"] == 1e-3
    assert rec["heldout_accuracy"] >= 0.7  # separable words, random encoder: measured 1.0


def test_heldout_accuracy_recomputed_from_the_saved_model(fitted, corpus):
    import torch

    from probes.linear_head import label_ids, read_labeled
    from probes.loading import load_checkpoint

    out, fit = fitted
    lm = load_checkpoint(str(out), device="cpu")
    texts, raw = read_labeled(str(corpus), "label")
    _, ys = label_ids(raw)
    idx = fit.record["split"]["heldout_indices"]
    enc = lm.tokenizer([texts[i] for i in idx], truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**enc).logits
    acc = float((logits.argmax(-1) == torch.tensor([ys[i] for i in idx])).double().mean())
    loss = float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor([ys[i] for i in idx])))
    assert acc == pytest.approx(fit.record["heldout_accuracy"])
    assert loss == pytest.approx(fit.record["heldout_loss"], abs=1e-5)


def test_gpt2_score_head_without_bias(word_lm, tmp_path):
    """Decoder classifiers: `score` has no bias and pools the last non-pad token; the fit handles both."""
    import torch

    from probes.linear_head import fit_linear_head

    words = [w for ws in WORDS.values() for w in ws] + SHARED
    folder = word_lm.save_gpt2(tmp_path / "gpt2", words, n_embd=16, n_layer=1)
    data = _write_corpus(tmp_path / "c.jsonl", n=30)
    fit = fit_linear_head(str(folder), str(data), "label", max_length=16, batch_size=8, device="cpu")
    assert fit.head_module == "score" and fit.model.score.bias is None and fit.record["head_bias"] is False
    assert fit.record["converged"]
    enc = fit.tokenizer(["file path disk", "lock queue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = fit.model.transformer(**enc).last_hidden_state
        last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
        want = fit.model.score(h[torch.arange(2), last])
        assert torch.allclose(fit.model(**enc).logits, want, atol=1e-5)


# ---------------------------------------------------------------------------- the command and its refusals
def _cli(args):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    return CliRunner().invoke(app, ["fit-head", *args])


def test_cli_prints_accuracies_and_chance(tiny_bert, corpus, tmp_path):
    out = tmp_path / "clf"
    r = _cli([str(tiny_bert), "-o", str(out), "--data", str(corpus), "--labels", "label", "--max-length", "16",
              "--max-examples", "60", "--device", "cpu", "--format", "json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["info"]["chance_accuracy"] == pytest.approx(1 / 3)
    splits = [row["split"] for row in j["tables"]["fit_head"]]
    assert splits == ["fit", "held out", "chance (1/K)", "majority class"]
    assert json.loads((out / "actsparse_head.json").read_text())["n_examples"] == 60


@pytest.mark.parametrize("case", ["no_label_field", "empty", "one_label", "not_jsonl"])
def test_bad_data_is_refused_writing_nothing(case, tiny_bert, tmp_path):
    data = tmp_path / ("c.txt" if case == "not_jsonl" else "c.jsonl")
    if case == "no_label_field":
        _write_corpus(data, n=12, field="topic")
    elif case == "empty":
        data.write_text("\n\n")
    elif case == "one_label":
        data.write_text("".join(json.dumps({"text": "file path", "label": "alpha"}) + "\n" for _ in range(6)))
    else:
        data.write_text("file path\n")
    out = tmp_path / "clf"
    r = _cli([str(tiny_bert), "-o", str(out), "--data", str(data), "--labels", "label", "--device", "cpu"])
    assert r.exit_code == 4, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and " -- fix: " in err[0], r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".clf")]


def test_multi_layer_head_refused_by_the_command(tmp_path, corpus):
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    folder.mkdir()
    tok, n = _bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=n, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    cfg.architectures = ["DistilBertModel"]
    DistilBertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "clf"
    r = _cli([str(folder), "-o", str(out), "--data", str(corpus), "--labels", "label", "--device", "cpu"])
    assert r.exit_code == 3, r.output
    assert "more than one layer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_needs_force(tiny_bert, corpus, tmp_path):
    out = tmp_path / "clf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli([str(tiny_bert), "-o", str(out), "--data", str(corpus), "--labels", "label", "--device", "cpu"])
    assert r.exit_code == 5 and "--force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = _cli([str(tiny_bert), "-o", str(out), "--data", str(corpus), "--labels", "label", "--device", "cpu",
              "--force"])
    assert r.exit_code == 5 and "did not write" in r.stderr  # --force replaces only what actsparse wrote
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_a_classifier_folder_we_wrote(fitted, tiny_bert, corpus, tmp_path):
    import shutil

    out = tmp_path / "clf"
    shutil.copytree(fitted[0], out)
    r = _cli([str(tiny_bert), "-o", str(out), "--data", str(corpus), "--labels", "label", "--device", "cpu",
              "--max-examples", "30", "--max-length", "16", "-q", "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "actsparse_head.json").read_text())["n_examples"] == 30


def test_quality_analyses_leave_out_the_examples_the_head_was_fitted_on(fitted, corpus, tmp_path):
    """cliff --labels and massive --intervene measure quality: on the corpus the head was fitted on (same
    bytes, same fields, per actsparse_head.json's data_sha256) they keep only its held-out examples; on
    another file, or with other fields, they keep every example."""
    import shutil
    from types import SimpleNamespace

    from probes.loading import load_checkpoint
    from probes.loss import drop_head_fit_examples, file_sha256, labeled_examples

    folder = fitted[0] if isinstance(fitted, tuple) else fitted
    rec = json.loads((folder / "actsparse_head.json").read_text())
    assert rec["data_sha256"] == file_sha256(corpus)
    lm = load_checkpoint(str(folder), device="cpu")
    opts = SimpleNamespace(data=str(corpus), encoding="utf-8", text_field="text", labels="label")
    ex = labeled_examples(opts, lm)
    kept, note = drop_head_fit_examples(lm, opts, ex)
    held = rec["split"]["heldout_indices"]
    assert kept == [ex[i] for i in held] and len(kept) < len(ex)
    assert note and f"{len(ex) - len(held)} of {len(ex)}" in note
    # the same text in another file: still the same bytes, so the same rule
    copy = shutil.copy(corpus, tmp_path / "copy.jsonl")
    assert drop_head_fit_examples(lm, SimpleNamespace(**{**vars(opts), "data": str(copy)}), ex)[0] == kept
    # one more example appended: other bytes, nothing left out
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text() + json.dumps({"text": "file path", "label": "alpha"}) + "\n")
    opts2 = SimpleNamespace(**{**vars(opts), "data": str(other)})
    ex2 = labeled_examples(opts2, lm)
    assert drop_head_fit_examples(lm, opts2, ex2) == (ex2, None)
    # another label field: not the fitted task, nothing left out
    assert drop_head_fit_examples(lm, SimpleNamespace(**{**vars(opts), "labels": "topic"}), ex) == (ex, None)


def test_max_tokens_caps_labeled_examples_in_grad_flatness_and_cliff(fitted, corpus):
    """--max-tokens takes the first labeled examples whose real tokens fit (one shared rule, probes.loss):
    by hand on a whitespace tokenizer, and in grad's classification path (it used to read every example)."""
    from probes.gradients import GradOptions, measure_gradients
    from probes.loading import load_checkpoint
    from probes.loss import first_examples_within

    class Ws:
        def __call__(self, text, truncation=True, max_length=99):
            return {"input_ids": text.split()[:max_length]}

    ex = [("a b c", 0), ("d e", 1), ("f g h i", 2), ("j", 0)]
    assert first_examples_within(ex, Ws(), 8, None) == (ex, None)
    kept, note = first_examples_within(ex, Ws(), 8, 5)
    assert kept == ex[:2] and "first 2 of 4" in note
    assert first_examples_within(ex, Ws(), 2, 5)[0] == ex[:2]  # truncation counts: 2 + 2, then 2 more would be 6
    assert first_examples_within(ex, Ws(), 8, 1)[0] == ex[:1]  # at least one example
    folder = fitted[0]
    lm = load_checkpoint(str(folder), device="cpu")
    opts = GradOptions(data=str(corpus), labels="label", batch_size=8, max_length=16, max_tokens=60)
    res = measure_gradients(lm, opts)
    assert any("labeled examples" in n for n in res.info.get("notes", [])), res.info.get("notes")
    assert res.info["n_items"] < 90
