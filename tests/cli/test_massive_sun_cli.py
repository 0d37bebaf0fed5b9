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
