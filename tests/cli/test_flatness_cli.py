"""``actsparse flatness`` and ``measure --also flatness`` through typer's CliRunner, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_MODEL, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure flat sparse gradients".split()
MAX_LEN = 12
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, max_len=MAX_LEN, n_inner=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "c.txt", WORDS, 120, seed=1)


def test_flatness_writes_tables_figure_and_manifest(gpt2_dir, corpus, tmp_path):
    out = tmp_path / "f"
    r = invoke("flatness", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "--batch-size", 4, "-o", out)
    assert r.exit_code == 0, r.output
    for f in ("flatness.parquet", "flatness.csv", "flatness_hist.parquet", "flatness_by_layer.png",
              "flatness_by_layer.svg", "summary.md", "manifest.json"):
        assert (out / f).is_file(), f
    df = pd.read_parquet(out / "flatness.parquet")
    assert list(df.canonical_name) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert list(df.key_module) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert {"grad_density_g2", "aug_flatness_share", "gg_diag_share_p1", "kkT_diag_share_p1", "beneficial_frac",
            "detrimental_frac", "kappa_2309", "eff_grad_sparsity@1e-06", "act_zero_frac"} <= set(df.columns)
    assert df.aug_flatness_share.sum() == pytest.approx(1.0)
    hist = pd.read_parquet(out / "flatness_hist.parquet")
    assert len(hist) == 2 * 150 and (hist.groupby("canonical_name").g_count.sum() > 0).all()
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "flatness" and man["flatness"]["loss"] == "causal_lm"
    assert man["flatness"]["loss_reduction"] == "mean"
    assert "flatness (arXiv 2309.03004)" in r.output and "kappa_2309" in r.output
    assert "| layer | key |" in (out / "summary.md").read_text()
    r = invoke("flatness", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "-o", out, "-q")
    assert r.exit_code == EXIT_OUTPUT and "--force" in r.output


def test_measure_also_flatness(gpt2_dir, corpus):
    r = invoke("measure", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "--also", "flatness",
               "--format", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "flatness" in json.dumps(out)


def test_flatness_refuses_no_loss(gpt2_dir, corpus):
    r = invoke("flatness", gpt2_dir, "--data", "random:3x8x8")  # image inputs: not a corpus, refused before loading
    assert r.exit_code == 4 and "does not exist" in r.output
    r = invoke("flatness", gpt2_dir, "--data", corpus, "--loss", "mlm", "--max-length", MAX_LEN)
    assert r.exit_code == EXIT_MODEL and "masked-LM head" in r.output
