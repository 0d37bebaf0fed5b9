"""``actsparse cliff`` through typer's CliRunner, end to end on the bundled model (small settings)."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from actsparse_cli.main import app

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_cliff_writes_tables_figures_and_manifest(tmp_path):
    out = tmp_path / "c"
    r = invoke("cliff", "--max-tokens", 1024, "--grid", "0,0.9", "--refine", 0, "--family",
               "topk_sample,sparling_posthoc", "-o", out, "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["info"]["command"] == "cliff" and doc["info"]["n_counted_tokens"] > 0
    for f in ("cliff.csv", "cliff_points.parquet", "cliff_layers.csv", "cliff_sparling.csv",
              "cliff_sparling_channels.csv", "cliff.png", "cliff.svg", "cliff_sparling.png", "summary.md",
              "manifest.json"):
        assert (out / f).is_file(), f
    cl = pd.read_csv(out / "cliff.csv")
    assert list(cl.family) == ["topk_sample", "sparling_posthoc"] and list(cl.post_hoc) == [False, True]
    pts = pd.read_csv(out / "cliff_points.csv")
    assert sorted(pts.target_sparsity.unique()) == [0.0, 0.9]
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "cliff" and man["cliff"]["families"] == ["topk_sample", "sparling_posthoc"]
    assert "sparling_posthoc" in (out / "summary.md").read_text()


def test_cliff_bad_options():
    r = invoke("cliff", "--family", "sparling")
    assert r.exit_code == 2 and "sparling_posthoc" in r.output
    r = invoke("cliff", "--grid", "0.5,1.2")
    assert r.exit_code == 2 and "[0, 1)" in r.output
    r = invoke("cliff", "--calib-share", "1")
    assert r.exit_code == 2


# ------------------------------------------------------------------------------- cliff --labels
CLF_WORDS = "alpha beta gamma delta file path disk read socket port host number sum log text word".split()


def _tiny_classifier(folder):
    """A 2-layer ReLU BertForSequenceClassification (seeded) with a word-level tokenizer, and a labeled .jsonl."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(CLF_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", model_max_length=32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_act="relu", num_labels=2,
                     initializer_range=0.5)
    cfg.architectures = ["BertForSequenceClassification"]
    BertForSequenceClassification(cfg).save_pretrained(folder / "clf")
    tok.save_pretrained(folder / "clf")
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(CLF_WORDS) for _ in range(rng.randint(2, 10))), "label": i % 2})
             for i in range(24)]
    (folder / "ex.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "clf", folder / "ex.jsonl"


def test_cliff_labels_bundle_and_table(tmp_path):
    clf, data = _tiny_classifier(tmp_path)
    out = tmp_path / "c"
    r = invoke("cliff", clf, "--data", data, "--labels", "label", "--grid", "0,0.5,0.9", "--refine", 0,
               "--family", "topk_sample,magnitude_layer", "--batch-size", 4, "-o", out,
               env={"COLUMNS": "80", "NO_COLOR": "1", "FORCE_COLOR": None})
    assert r.exit_code == 0, r.output
    assert "loss ratio" in r.stdout and "acc %" in r.stdout and "PPL ratio" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for f in ("cliff.csv", "cliff_points.csv", "cliff_layers.csv", "cliff.png", "summary.md", "manifest.json"):
        assert (out / f).is_file(), f
    pts = pd.read_csv(out / "cliff_points.csv")
    assert {"loss_ratio", "accuracy", "accuracy_dense", "accuracy_drop", "accuracy_lo", "loss_ratio_hi"} <= set(pts)
    assert "ppl_ratio" not in pts and (pts.n_examples == 18).all()  # 24 examples, 6 calibrate
    assert (pts[pts.target_sparsity == 0].loss_ratio == 1.0).all()
    summary = (out / "summary.md").read_text()
    assert "loss ratio" in summary and "accuracy" in summary and "Trainer.validate" in summary
    man = json.loads((out / "manifest.json").read_text())
    assert man["cliff"]["labels_field"] == "label" and man["cliff"]["heldout_examples"] == 18
    assert man["cliff"]["options"]["labels"] == "label"


def test_cliff_labels_refused_without_a_classification_head(tmp_path):
    _, data = _tiny_classifier(tmp_path)
    r = invoke("cliff", "--data", data, "--labels", "label", "-o", tmp_path / "out")  # the bundled causal LM
    assert r.exit_code == 3, r.output
    assert "no classification head" in r.stderr and "actsparse fit-head" in r.stderr
    assert not (tmp_path / "out").exists()
