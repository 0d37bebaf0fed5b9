"""``actsparse massive --intervene zero,mean --attention`` through typer's CliRunner (Sun et al. 2024 exp3/exp4).

The model is a tiny GPT-2 whose position embedding writes +500 into channel 3 of the first position, so
every block's output carries a massive activation at (position 0, channel 3): the intervention must find
layer 0 and channel 3, and zeroing that entry must change the perplexity.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure massive activations".split()
MAX_LEN = 16
SPIKE_CHANNEL, SPIKE = 3, 500.0

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    def spike(model):
        model.transformer.wte.weight[:, SPIKE_CHANNEL] = 0.0
        model.transformer.wpe.weight[0, SPIKE_CHANNEL] = SPIKE

    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-spiky-gpt2-sun"), WORDS, max_len=MAX_LEN, n_layer=2,
                             activation="gelu_new", edit=spike)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("c") / "c.txt", WORDS, 200)


def test_intervene_and_attention_write_tables_figures_and_summary(model_dir, corpus, tmp_path):
    out = tmp_path / "o"
    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 3, "--intervene", "zero,mean", "--attention",
               "--attention-prompt", "the cat sat on a mat .", "-o", out)
    assert r.exit_code == 0, r.output
    iv = pd.read_csv(out / "massive_intervene.csv")
    assert iv["mode"].tolist() == ["original", "zero", "mean"]
    assert set(iv.layer) == {0} and set(iv.channels.astype(str)) == {str(SPIKE_CHANNEL)}
    assert iv.set_index("mode").ppl["zero"] != iv.set_index("mode").ppl["original"]
    vals = pd.read_csv(out / "massive_intervene_values.csv")
    first = vals[(vals.position_class == "first") & (vals.channel == SPIKE_CHANNEL)].mean_value.item()
    assert first > 100  # the planted +500 after the first block
    at = pd.read_csv(out / "massive_attention.csv")
    assert len(at) == 2 * 2 and at.n_seq_with_massive.eq(3).all()  # 2 layers x 2 heads; every sequence has it
    assert at.attn_share_massive.notna().all()
    pt = pd.read_csv(out / "massive_attention_prompt.csv")
    assert pt["query"].max() == 6  # 7 prompt tokens
    for stem in ("massive_intervene", "massive_attention", "massive_attention_prompt"):
        assert (out / f"{stem}.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "Intervention (Sun et al. 2024 exp3) at layer 0" in summary
    assert "Attention (Sun et al. 2024 exp4)" in summary
    assert "x original" in r.output


@pytest.mark.parametrize("args, msg", [
    (("--intervene", "half"), "unknown intervention 'half'"),
    (("--intervene-layer", "1"), "--intervene-layer picks the layer"),
    (("--attention-prompt", "x"), "--attention-prompt is the text"),
    (("--attention", "--prompt", "the cat"), "not one --prompt"),
])
def test_bad_combinations(model_dir, corpus, args, msg):
    r = invoke("massive", model_dir, "--data", corpus, *args)
    assert r.exit_code != 0 and msg in r.output, r.output


def test_preset_dtype_on_cuda_only(monkeypatch):
    import torch

    from actsparse_cli import massive_cmd
    from probes import loading

    assert massive_cmd.preset_dtype("sun2024", "auto", "cpu") == "auto"
    assert massive_cmd.preset_dtype("sun2024", "float32", "cpu") == "float32"
    monkeypatch.setattr(loading, "resolve_device", lambda d: torch.device("cuda", 0))
    assert massive_cmd.preset_dtype("sun2024", "auto", "auto") == "float16"
    assert massive_cmd.preset_dtype("maxact2026", "auto", "auto") == "bfloat16"
    assert massive_cmd.preset_dtype("sun2024", "bfloat16", "auto") == "bfloat16"


# ------------------------------------------------------------------------------------------ encoders (BERT)
def _tiny_bert(folder, classifier: bool):
    """A 2-layer BERT (seeded) with a word tokenizer that writes [CLS] ... [SEP]; the first block's output LayerNorm
    scales channel 3 by 2000 (Sun-massive entries there)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LEN)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_LEN, pad_token_id=0,
                        **({"num_labels": 2} if classifier else {}))
    cls = tf.BertForSequenceClassification if classifier else tf.BertModel
    cfg.architectures = [cls.__name__]
    model = cls(cfg).eval()
    base = model.bert if classifier else model
    with torch.no_grad():
        base.encoder.layer[0].output.LayerNorm.weight[SPIKE_CHANNEL] = 2000.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return _tiny_bert(root / "enc", False), _tiny_bert(root / "clf", True)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("l") / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))),
                                        "topic": ["a", "b"][i % 2] if i % 3 else i % 2}) + "\n" for i in range(12)))
    return path


def test_encoder_attention_is_bidirectional(bert_dirs, corpus, tmp_path):
    enc, _ = bert_dirs
    out = tmp_path / "o"
    r = invoke("massive", enc, "--data", corpus, "--n-samples", 2, "--bos", "--attention", "--attention-prompt",
               "the cat sat", "-o", out)
    assert r.exit_code == 0, r.output
    at = pd.read_csv(out / "massive_attention.csv")
    assert set(at.attention_kind) == {"bidirectional"} and len(at) == 2 * 4
    assert at.uniform_share_first.eq(1 / MAX_LEN).all()  # every query: 1 / (16 real keys)
    pt = pd.read_csv(out / "massive_attention_prompt.csv")
    assert len(pt) == 2 * 4 * 4 and pt.query_token.iloc[0] == "[CLS]"  # full square: [CLS] + 3 tokens, 2 layers
    summary = (out / "summary.md").read_text()
    assert "bidirectional attention" in summary and "prefix token \\[CLS\\] (--bos)" in summary
    assert "bidirectional attention" in r.output
    for stem in ("massive_attention", "massive_attention_prompt"):
        assert (out / f"{stem}.png").is_file()


def test_classifier_intervention_cli(bert_dirs, labelled, tmp_path):
    _, clf = bert_dirs
    out = tmp_path / "o"
    # string labels are not in this classifier's label2id: the loader refuses them
    r = invoke("massive", clf, "--data", labelled, "--labels", "topic", "--intervene", "zero,mean", "-o", out)
    assert r.exit_code != 0 and "neither an id nor a name in label2id" in r.output, r.output
    lab = tmp_path / "ids.jsonl"
    lab.write_text("".join(line.replace('"a"', "0").replace('"b"', "1") + "\n"
                           for line in labelled.read_text().splitlines()))
    r = invoke("massive", clf, "--data", lab, "--labels", "topic", "--intervene", "zero,mean", "--max-length", 8,
               "-o", out)
    assert r.exit_code == 0, r.output
    iv = pd.read_csv(out / "massive_intervene.csv")
    assert iv["mode"].tolist() == ["original", "zero", "mean"] and set(iv.n_sequences) == {12}
    assert {"ce_mean", "loss_ratio", "accuracy", "accuracy_drop"} <= set(iv.columns) and "ppl" not in iv
    assert iv.loss_ratio.iloc[0] == 1.0 and iv.accuracy_drop.iloc[0] == 0.0
    assert (out / "massive_intervene.png").is_file()
    assert "loss ratio" in r.output and "accuracy" in r.output
    assert "on a sequence classifier" in (out / "summary.md").read_text()


@pytest.mark.parametrize("which, args, msg", [
    ("enc", ("--intervene", "zero"), "actsparse fit-head"),
    ("clf", ("--intervene", "zero"), "no --labels was given"),
    ("clf", ("--labels", "topic"), "--labels gives the labels of --intervene"),
])
def test_encoder_refusals(bert_dirs, labelled, which, args, msg):
    enc, clf = bert_dirs
    r = invoke("massive", enc if which == "enc" else clf, "--data", labelled, "--max-length", 8, *args)
    assert r.exit_code != 0 and msg in r.output, r.output
