"""Option values through the CLI (issue 12, items 4, 7 and 8, option side).

- Floats that must be finite, positive or in a range (``--eps``, ``--tau``, ``--eps-d``, ``--pplp``, ``--p``,
  ``--tol``, ``--clip-quantile``, ``curve --values``, ``compare --fail-on`` deltas) and every ``--seed`` are
  refused with exit 2 naming the option, before any model is loaded (``load_checkpoint`` is replaced by one
  that fails the test).
- Options that size a buffer are bounded: ``massive --top-k`` and ``--cett-grid`` above their maximum are
  usage errors, and below it the buffers follow the data (a top-K heap of min(K, entries seen), a CETT grid
  of at most one quantile per value); ``spectrum --workers`` is capped at the CPUs with a note.
- ``--stride`` above ``--max-length`` is clamped and the manifest records the value used, with a note and a
  warning line (none under ``-q``); ``track`` refuses checkpoints of different architectures; ``report``
  refuses an input folder with no tables; a CPU allocation failure is exit 6, not an internal error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Rich draws usage errors in a box: the text without the box and the wrapping."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").replace("─", " ").split())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), WORDS, n_inner=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", WORDS, 200)


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: these refusals must come before one."""
    import probes.loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the option was checked")

    monkeypatch.setattr(probes.loading, "load_checkpoint", boom)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])


# ------------------------------------------------------------------ refused before loading (exit 2)
REFUSED = [
    # (argv, option named in the message)
    (["measure", "--eps", "nan"], "--eps"),
    (["measure", "--eps", "-1"], "--eps"),
    (["measure", "--eps", "1e-3", "--eps", "inf"], "--eps"),
    (["measure", "--pplp", "nan"], "--pplp"),
    (["measure", "--pplp", "0"], "--pplp"),
    (["grad", "--tau", "nan"], "--tau"),
    (["grad", "--tau", "0"], "--tau"),
    (["grad", "--tau", "-1e-3"], "--tau"),
    (["grad", "--eps-d", "nan"], "--eps-d"),
    (["grad", "--eps-d", "-1"], "--eps-d"),
    (["massive", "--clip-quantile", "nan"], "--clip-quantile"),
    (["massive", "--clip-quantile", "1"], "--clip-quantile"),
    (["massive", "--clip-quantile", "0.2"], "--clip-quantile"),
    (["pplp", "--tol", "nan"], "--tol"),
    (["pplp", "--tol", "0"], "--tol"),
    (["pplp", "--tol", "5"], "--tol"),
    (["pplp", "--p", "nan"], "--p"),
    (["pplp", "--p", "-1"], "--p"),
    (["curve", "--values", "teal=1.5"], "--values"),
    (["curve", "--values", "cett=0.1,nan"], "--values"),
    # sizes of buffers: above the maximum is a usage error
    (["massive", "--top-k", str(10**9)], "--top-k"),
    (["massive", "--top-k", "10001"], "--top-k"),
    (["pplp", "--cett-grid", str(10**9)], "--cett-grid"),
    (["curve", "--cett-grid", "4097"], "--cett-grid"),
    # seeds: numpy's RandomState range, in every command that takes one
    *[([cmd, "--seed", seed], "--seed") for cmd in ("measure", "grad", "massive", "pplp", "curve")
      for seed in (str(2**70), "-1", str(2**32))],
    (["spectrum", "CKPT", "--seed", str(2**70)], "--seed"),
    (["spectrum", "CKPT", "--seed", str(2**32 - 1)], "--seed"),  # it also seeds seed + 1
    (["spectrum", "CKPT", "--seed", "-1"], "--seed"),
    (["track", "-o", "OUT", "--seed", str(2**70)], "--seed"),
    (["track", "-o", "OUT", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("argv, option", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_option_value_is_a_usage_error_before_loading(argv, option, model_dir, corpus, tmp_path, no_loading):
    out = tmp_path / "out"
    argv = [str(model_dir) if a == "CKPT" else str(out) if a == "OUT" else a for a in argv]
    extra = [] if argv[0] in ("spectrum", "track") else [str(model_dir), "--data", str(corpus), "-o", str(out)]
    if argv[0] == "spectrum":
        extra = ["-o", str(out)]
    r = invoke(*argv, *extra)
    assert r.exit_code == 2, (r.exit_code, r.output)
    text = flat(r.output)
    assert option in text and "Invalid value" in text, r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_refusals_name_the_allowed_range():
    r = invoke("measure", "--eps", "nan")
    assert r.exit_code == 2 and "give a number >= 0" in flat(r.output), r.output
    r = invoke("grad", "--tau", "-1")
    assert r.exit_code == 2 and "give a number > 0" in flat(r.output), r.output
    r = invoke("massive", "--clip-quantile", "nan")
    assert r.exit_code == 2 and "[0.5, 0.999999]" in flat(r.output), r.output
    r = invoke("measure", "--seed", str(2**70))
    assert r.exit_code == 2 and "4294967295" in flat(r.output), r.output


@pytest.mark.parametrize("rule", ["zero_frac:1e999", "alpha:+1e400%"])
def test_compare_refuses_an_infinite_delta(rule, tmp_path):
    r = invoke("compare", tmp_path / "a", tmp_path / "b", "--fail-on", rule)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: ") and "-- fix:" in lines[0], r.stderr
    assert "not a finite number" in lines[0]


def test_good_boundary_values_are_accepted(model_dir, corpus, tmp_path):
    """The largest seed, eps 0 and duplicate --eps values run (duplicates measured once)."""
    out = tmp_path / "m"
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", 16, "--max-tokens", 64, "--seed", 2**32 - 1,
               "--eps", 0, "--eps", 0.01, "--eps", 0.01, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["measurement"]["options"]["eps_grid"] == [0.0, 0.01]
    assert man["measurement"]["options"]["seed"] == 2**32 - 1


# ------------------------------------------------------------------ buffers follow the data
def test_massive_top_k_holds_what_the_data_fills(model_dir, corpus, tmp_path):
    """--top-k 10000 on 2 x 8 tokens of width 16: each site keeps every counted entry, no more."""
    import pandas as pd

    out = tmp_path / "mass"
    r = invoke("massive", model_dir, "--data", corpus, "--max-length", 8, "--n-samples", 2, "--top-k", 10_000,
               "--kind", "resid_post", "--plot", "layers", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    top = pd.read_parquet(out / "massive_topk.parquet")
    per_site = top.groupby("canonical_name").size()
    assert len(per_site) and (per_site == 2 * 8 * 16).all(), per_site
    assert json.loads((out / "manifest.json").read_text())["massive"]["top_k"] == 10_000


def test_massive_probe_allocates_by_entries_seen_not_by_top_k():
    import torch

    from probes.massive import MassiveProbe

    p = MassiveProbe(8, top_k=10**9)
    assert p.state["topk_abs"].numel() == 0  # nothing reserved up front
    p.update(torch.randn(2, 3, 8))
    assert p.state["topk_abs"].numel() == 2 * 3 * 8
    assert len(p.topk()) == 48
    q = MassiveProbe(8, top_k=5)
    q.update(torch.randn(2, 3, 8))
    q.update(torch.randn(1, 3, 8))
    assert q.state["topk_abs"].numel() == 5


def test_cett_grid_has_at_most_one_quantile_per_value():
    import torch

    from probes.pplp import CettGrid

    g = CettGrid(4096)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.5]])  # 4 positive neuron outputs
    g.update(x, torch.eye(3), torch.ones(3))
    assert len(g.grid) <= 1 + 8 + 4 + 6  # 0, 8 below, the 4 quantiles, 6 above


def test_spectrum_workers_are_capped_at_the_cpus_with_a_note(model_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    out = tmp_path / "spec"
    r = invoke("spectrum", model_dir / "model.safetensors", "--workers", 10**6, "-o", out)
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["options"]["workers"] == 1
    assert any("--workers 1000000 capped at 1" in n for n in man["notes"]), man["notes"]
    assert "--workers 1000000 capped at 1" in r.stderr


def test_cpu_allocation_failure_is_a_device_error(monkeypatch, model_dir, corpus):
    import probes.loading

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 6021120000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(probes.loading, "load_checkpoint", no_memory)
    import torch  # noqa: F401  (the OOM check looks torch up in sys.modules)

    r = invoke("measure", model_dir, "--data", corpus, "--batch-size", 8)
    assert r.exit_code == 6, r.output
    assert "--batch-size 4" in r.stderr and "internal error" not in r.stderr


# ------------------------------------------------------------------ clamped with a note
def test_stride_above_max_length_is_recorded_as_used(model_dir, corpus, tmp_path):
    out = tmp_path / "m"
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", 16, "--stride", 100, "--chunk-k", 64,
               "--max-tokens", 64, "-o", out)
    assert r.exit_code == 0, r.output
    meas = json.loads((out / "manifest.json").read_text())["measurement"]
    assert meas["stride"] == 16 and meas["options"]["stride"] == 16
    assert any("--stride 100" in n and "clamped to 16" in n for n in meas["notes"]), meas
    assert any("--chunk-k 64" in n for n in meas["notes"]), meas
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert any("clamped to 16" in ln for ln in warn) and any("--chunk-k 64" in ln for ln in warn), r.stderr

    q = invoke("measure", model_dir, "--data", corpus, "--max-length", 16, "--stride", 100, "--max-tokens", 64, "-q",
               "-o", tmp_path / "q")  # -q without -o is refused (issue 17)
    assert q.exit_code == 0 and "warning" not in q.stderr, q.stderr


# ------------------------------------------------------------------ track and report inputs
def test_track_refuses_checkpoints_of_different_architectures(word_lm, tmp_path, no_loading):
    runs = tmp_path / "runs"
    word_lm.save_gpt2(runs / "ckpt-100", WORDS, n_layer=2)
    word_lm.save_gpt2(runs / "ckpt-200", WORDS, n_layer=3)
    out = tmp_path / "trends"
    r = invoke("track", "-o", out, f"{runs}/ckpt-*")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: checkpoints of different architectures")
    assert "ckpt-200" in lines[0] and "layers 2 vs" in lines[0] and "-- fix:" in lines[0]
    assert not out.exists()


def test_track_compares_bare_weight_files_by_tensor_shapes(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "step-1.safetensors"))
    save_file({"w": torch.zeros(4, 8)}, str(tmp_path / "step-2.safetensors"))
    out = tmp_path / "trends"
    r = invoke("track", "-o", out, "--analyses", "drift", tmp_path / "step-1.safetensors",
               tmp_path / "step-2.safetensors")
    assert r.exit_code == 2, r.output
    assert "tensor w has shape [4, 4] vs [4, 8]" in r.stderr and not out.exists()


def test_report_refuses_an_input_without_tables(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"tool": "actsparse", "command": "measure", "files": []}))
    out = tmp_path / "report"
    r = invoke("report", empty, "-o", out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{empty} has no tables" in lines[0] and "-- fix:" in lines[0], r.stderr
    assert not out.exists()


def test_massive_layer_out_of_range_is_refused(model_dir, tmp_path):
    out = tmp_path / "mass"
    r = invoke("massive", model_dir, "--prompt", "the cat sat on a mat", "--layer", 99, "-o", out)
    assert r.exit_code == 2, r.output
    assert "--layer 99 is not a layer of this model" in r.stderr and "0 to 1" in r.stderr
    assert not out.exists()
