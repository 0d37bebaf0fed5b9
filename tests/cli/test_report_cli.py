"""``actsparse report``, ``compare`` and ``track`` end to end through typer's CliRunner, on a tiny ReLU
GPT-2 and a word-level tokenizer built offline (no download)."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_CHECKPOINT, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
MAX_LEN = 16
HOSTILE = "<script>alert(1)</script>"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]", model_max_length=MAX_LEN), len(vocab)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, V = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=MAX_LEN, n_embd=16, n_layer=2, n_head=2, activation_function="relu",
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.architectures = ["GPT2LMHeadModel"]
    return GPT2LMHeadModel(cfg), tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(1)
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    return p


@pytest.fixture(scope="module")
def hostile_ckpt(tmp_path_factory) -> Path:
    """A tiny model saved under a path whose name is an HTML injection attempt."""
    d = tmp_path_factory.mktemp("models") / HOSTILE  # "/" in the name makes it two folders; the path holds it all
    model, tok = _tiny_gpt2()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    assert HOSTILE in str(d)
    return d


@pytest.fixture(scope="module")
def measured(hostile_ckpt, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "m"
    r = invoke("measure", hostile_ckpt, "--data", corpus, "--max-length", MAX_LEN, "--max-tokens", 96, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """ckpt-100/200/300: one tiny ReLU GPT-2 nudged a little further at each 'step' (negative weight drift)."""
    root = tmp_path_factory.mktemp("runs")
    model, tok = _tiny_gpt2()
    for step in (100, 200, 300):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.add_(-0.003 + 0.01 * torch.randn_like(p))
                if "c_fc.bias" in name:
                    p.sub_(0.05)  # fewer units above zero: sparsity grows with the step
        model.save_pretrained(root / f"ckpt-{step}")
        tok.save_pretrained(root / f"ckpt-{step}")
    return root


# ----------------------------------------------------------------------------------------------- report
def test_report_bundle_embeds_every_figure_and_escapes_names(measured, tmp_path):
    out = tmp_path / "report"
    r = invoke("report", measured, "-o", out)
    assert r.exit_code == 0, r.output
    for f in ("manifest.json", "index.html", "summary.md", "tables/m/sparsity.parquet", "tables/m/sparsity.csv",
              "tables/m/summary.csv", "figures/m/sparsity_by_layer.png", "figures/m/sparsity_by_layer.svg",
              "figures/m/sparsity_vs_threshold.png", "figures/m/sparsity_vs_threshold.svg",
              "figures/m/nonzero_per_token.png", "inputs/m/manifest.json", "inputs/m/summary.md"):
        assert (out / f).is_file(), f
    page = (out / "index.html").read_text()
    pngs = sorted((out / "figures").rglob("*.png"))
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs) >= 3
    assert {base64.b64decode(e) for e in embedded} == {p.read_bytes() for p in pngs}
    # no network asset, no script: the checkpoint's name arrives escaped, everywhere
    assert "<script" not in page and HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "Content-Security-Policy" in page
    md = (out / "summary.md").read_text()
    assert HOSTILE not in md and "&lt;script&gt;" in md
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "report" and man["inputs"][0]["command"] == "measure"
    assert man["inputs"][0]["manifest"]["command"] == "measure"
    caps = {f["stem"]: f["caption"] for f in man["figures"]}
    n_tok = man["inputs"][0]["token_counts"]["measurement"]
    assert f"On {n_tok} counted tokens from `c.txt`" in caps["sparsity_vs_threshold"]
    assert "|a| <= eps" in caps["sparsity_vs_threshold"]
    # an existing bundle is not overwritten without --force; with it, it is replaced
    r = invoke("report", measured, "-o", out)
    assert r.exit_code == EXIT_OUTPUT and "--force" in r.output
    assert invoke("report", measured, "-o", out, "--force", "-q").exit_code == 0


def test_report_refuses_a_folder_that_is_not_an_actsparse_output(tmp_path, measured):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "r"
    r = invoke("report", plain, "-o", out)
    assert r.exit_code == EXIT_CHECKPOINT
    assert "not an actsparse output folder (it has no manifest.json)" in r.output
    assert "Traceback" not in r.output and not out.exists()
    assert not list(tmp_path.glob(".r.tmp-*"))  # nothing half written
    r = invoke("report", measured, tmp_path / "missing", "-o", out)
    assert r.exit_code == EXIT_CHECKPOINT and "does not exist" in r.output and not out.exists()
    r = invoke("report", measured, "-o", measured, "--force")
    assert r.exit_code == EXIT_OUTPUT and "also an input" in r.output
    assert (measured / "manifest.json").is_file()  # the input survived


# ----------------------------------------------------------------------------------------------- compare
def _shift_zero_frac(src: Path, dst: Path, layer: int, delta: float) -> None:
    shutil.copytree(src, dst)
    df = pd.read_parquet(dst / "sparsity.parquet")
    df.loc[df.layer == layer, "zero_frac"] += delta
    df.to_parquet(dst / "sparsity.parquet", index=False)
    df.to_csv(dst / "sparsity.csv", index=False)


def test_compare_exit_codes_and_markdown(measured, tmp_path):
    r = invoke("compare", measured, measured, "--fail-on", "zero_frac:-0.02", "--fail-on", "near_zero_frac@*:+5%")
    assert r.exit_code == 0, r.output
    assert "rule zero_frac:-0.02: ok" in r.output
    worse = tmp_path / "worse"
    _shift_zero_frac(measured, worse, layer=1, delta=-0.05)
    md = tmp_path / "pr" / "compare.md"
    r = invoke("compare", measured, worse, "--fail-on", "zero_frac:-0.02", "--markdown", md)
    assert r.exit_code == 7, r.output
    assert "rule zero_frac:-0.02 BROKEN by 1 of" in r.output
    text = md.read_text()
    assert text.startswith("## actsparse compare: FAIL: 1 of 1 rule(s) broken")
    assert "| table | site | layer | kind | metric | baseline | candidate | delta | delta % |" in text
    assert HOSTILE not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the checkpoint path, escaped
    # the opposite direction holds, a relative bound too
    assert invoke("compare", measured, worse, "--fail-on", "zero_frac:+0.02", "-q").exit_code == 0
    assert invoke("compare", measured, worse, "--fail-on", "zero_frac:+1%", "-q").exit_code == 0
    assert invoke("compare", measured, worse, "--fail-on", "sparsity/zero_frac:-1%", "-q").exit_code == 7
    # a rule that cannot be read, or names no metric: exit 2 with the reason
    r = invoke("compare", measured, worse, "--fail-on", "zero_frac=-0.02")
    assert r.exit_code == 2 and "METRIC:DELTA" in r.output
    r = invoke("compare", measured, worse, "--fail-on", "zero_fraction:-0.02")
    assert r.exit_code == 2 and "did you mean 'zero_frac'" in r.output
    r = invoke("compare", measured, tmp_path, "--fail-on", "zero_frac:-0.02")
    assert r.exit_code == EXIT_CHECKPOINT and "not an actsparse output folder" in r.output


def test_compare_reports_token_mismatch_and_strict_fails(measured, hostile_ckpt, corpus, tmp_path):
    fewer = tmp_path / "fewer"
    r = invoke("measure", hostile_ckpt, "--data", corpus, "--max-length", MAX_LEN, "--max-tokens", 48, "-o", fewer,
               "-q")
    assert r.exit_code == 0, r.output
    r = invoke("compare", measured, fewer, "--fail-on", "zero_frac:1")
    assert r.exit_code == 0, r.output
    assert "tokens: measure: counted tokens differ in measurement" in r.output
    r = invoke("compare", measured, fewer, "--fail-on", "zero_frac:1", "--strict", "-q")
    assert r.exit_code == 7 and "--strict" in r.output


# ------------------------------------------------------------------------------------------------- track
def test_track_three_checkpoints(run_dir, corpus, tmp_path):
    out = tmp_path / "trends"
    r = invoke("track", str(run_dir / "ckpt-*") + "/", "-o", out, "--data", corpus, "--max-tokens", 64,
               "--max-length", MAX_LEN)
    assert r.exit_code == 0, r.output
    trends = pd.read_parquet(out / "trends.parquet")
    assert list(trends.step) == [100, 200, 300] and list(trends.step_source) == ["name"] * 3
    assert (trends.n_counted_tokens == trends.n_counted_tokens.iloc[0]).all()
    z = trends["zero_frac_mean_mlp_post"].to_numpy()
    assert z[0] < z[1] < z[2]  # the biases were pushed down step by step
    assert trends.neg_pct_linear.is_monotonic_increasing and trends.weight_mean_linear.is_monotonic_decreasing
    assert np.isfinite(trends.top1_median_ratio_max).all() and np.isfinite(trends.alpha_mean).all()
    for name in ("trend_sparsity", "trend_drift", "trend_massive", "trend_spectrum", "emergence_fit"):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file(), name
    for fig in ("trend_sparsity", "trend_drift", "trend_massive", "trend_alpha"):
        assert (out / f"{fig}.png").is_file() and (out / f"{fig}.svg").is_file(), fig
    fits = pd.read_parquet(out / "emergence_fit.parquet")
    assert not fits.converged.any() and fits.A.isna().all()  # 3 points for 5 parameters: NaN, with a warning
    assert "warning: emergence fit: needs at least 7 distinct steps" in r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "track" and man["track"]["steps"] == [100, 200, 300]
    # the trends folder is an actsparse output like any other: it bundles and compares
    rep = tmp_path / "rep"
    assert invoke("report", out, "-o", rep, "-q").exit_code == 0
    page = (rep / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    assert invoke("compare", out, out, "--fail-on", "trends/neg_pct_linear:+1", "-q").exit_code == 0


def test_track_bad_input(tmp_path):
    r = invoke("track", str(tmp_path / "nothing-*"), "-o", tmp_path / "t")
    assert r.exit_code == EXIT_CHECKPOINT and "no checkpoint matches" in r.output
    r = invoke("track", str(tmp_path), "-o", tmp_path / "t", "--analyses", "meassure")
    assert r.exit_code != 0 and "did you mean 'measure'" in r.output
