"""``actsparse grad`` and ``actsparse drift`` through typer's CliRunner, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_CHECKPOINT, EXIT_MODEL, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients".split()
MAX_LEN = 12
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "c.txt", WORDS, 120, seed=1)


def test_grad_writes_tables_figure_and_manifest(gpt2_dir, corpus, tmp_path):
    out = tmp_path / "g"
    r = invoke("grad", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "--batch-size", 4, "-o", out)
    assert r.exit_code == 0, r.output
    for f in ("gradients.parquet", "gradients.csv", "gradients_summary.csv", "spikes.parquet", "grad_by_layer.png",
              "grad_by_layer.svg", "summary.md", "manifest.json"):
        assert (out / f).is_file(), f
    df = pd.read_parquet(out / "gradients.parquet")
    assert list(df.canonical_name) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert {"deriv_sparsity", "deriv_sq_mean", "eff_grad_sparsity@1e-09", "eff_grad_sparsity@1e-06",
            "eff_grad_sparsity@0.001", "eta_l1_per_token", "eta_l2sq_per_token"} <= set(df.columns)
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "grad" and man["gradients"]["loss"] == "causal_lm"
    assert man["gradients"]["loss_reduction"] == "mean"  # the reference's (cdgyp) protocol by default
    assert man["gradients"]["loss_targets_per_batch"]["n_batches"] >= 1
    assert man["gradients"]["n_counted_tokens"] == int(df.n_tokens.iloc[0])
    assert "gradient sparsity:" in r.output and "spike_max" in r.output
    # the folder exists now: refused without --force, replaced with it
    r = invoke("grad", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "-o", out, "-q")
    assert r.exit_code == EXIT_OUTPUT and "--force" in r.output
    r = invoke("grad", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "-o", out, "-q", "--force",
               "--tau", 0.01, "--spikes", "none", "--loss-reduction", "mean")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "gradients.parquet")
    assert "eff_grad_sparsity@0.01" in df.columns and not (out / "spikes.parquet").exists()
    r = invoke("grad", gpt2_dir, "--data", corpus, "--max-length", MAX_LEN, "-o", out, "-q", "--force",
               "--spikes", "down")
    assert r.exit_code == 0, r.output
    sp = pd.read_parquet(out / "spikes.parquet")
    assert list(sp.module_path) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_grad_refuses_a_model_without_a_loss(tmp_path, corpus, word_lm):
    from transformers import BertConfig, BertModel

    tok, V = word_lm.tokenizer(WORDS, MAX_LEN)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=MAX_LEN)
    cfg.architectures = ["BertModel"]
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    r = invoke("grad", tmp_path / "enc", "--data", corpus, "-o", tmp_path / "never")
    assert r.exit_code == EXIT_MODEL
    assert "no loss on text" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "never").exists()


def test_grad_arch_needs_timm(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    (tmp_path / "w.safetensors").write_bytes(b"")
    r = invoke("grad", tmp_path / "w.safetensors", "--arch", "timm:resnet18", "--data", "random:3x8x8")
    assert r.exit_code == EXIT_MODEL and "needs the 'timm' package" in r.output


def test_drift_one_and_several_checkpoints(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"h.0.mlp.c_fc.weight": torch.randn(8, 32, generator=g),
            "h.0.mlp.c_proj.weight": torch.randn(32, 8, generator=g), "h.0.ln.weight": torch.ones(8)}
    paths = []
    for step in range(2):
        p = tmp_path / f"step{step}.safetensors"
        save_file({k: (v - 0.1 * step if v.dim() == 2 else v) for k, v in base.items()}, p)
        paths.append(p)
    out = tmp_path / "d"
    r = invoke("drift", paths[0], "-o", out)
    assert r.exit_code == 0, r.output
    for f in ("drift.parquet", "drift.csv", "drift_summary.csv", "drift_by_layer.png", "drift_by_layer.svg",
              "summary.md", "manifest.json"):
        assert (out / f).is_file(), f
    df = pd.read_parquet(out / "drift.parquet")
    assert list(df.name) == ["h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]
    assert "neg %" in r.output and "h.0.mlp.c_proj.weight" in r.output
    r = invoke("drift", *paths, "-o", tmp_path / "d2", "-q")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "d2" / "drift.parquet")
    assert list(df.checkpoint_index) == [0, 0, 1, 1]
    assert (df[df.checkpoint_index == 1]["mean"].to_numpy() < df[df.checkpoint_index == 0]["mean"].to_numpy()).all()
    man = json.loads((tmp_path / "d2" / "manifest.json").read_text())
    assert man["command"] == "drift" and man["drift"]["n_tensors_skipped"] == 2


def test_drift_bad_inputs(tmp_path):
    r = invoke("drift", tmp_path / "missing.safetensors")
    assert r.exit_code == EXIT_CHECKPOINT and "does not exist" in r.output
    (tmp_path / "notes.txt").write_text("hello")
    r = invoke("drift", tmp_path / "notes.txt")
    assert r.exit_code == EXIT_CHECKPOINT and "text file" in r.output
    r = invoke("drift", "--help")
    assert r.exit_code == 0 and "99.9th percentile" in r.output
