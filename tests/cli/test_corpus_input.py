"""Corpus input through the CLI (issue 12): strict decoding with the byte offset, --encoding, a BOM
dropped, jsonl texts that are not strings, FIFOs and devices refused at once (exit 2), a capped run
on a long one-line corpus reading only what it measures, and inputs left byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA

WORDS = "the cat sat on a mat dog ran in park café crème naïve façade is warm today".split()
MAX_LEN = 16
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _text(n_words: int = 400, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _digest(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("actsparse: error: ") and " -- fix: " in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, n_inner=64)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Matplotlib costs ~2 s a run; nothing here is about figures."""
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])


def _measure(model_dir, data, out, *extra):
    return invoke("measure", model_dir, "--data", data, "--max-length", MAX_LEN, "--batch-size", 8, "-o", out,
                  "-q", *extra)


def test_invalid_utf8_names_the_byte_offset_and_the_fix(model_dir, tmp_path):
    p = tmp_path / "latin1.txt"
    text = _text()
    p.write_bytes(text.encode("latin-1"))
    offset = next(i for i, ch in enumerate(text) if ord(ch) > 127)  # latin-1: one byte per character
    before = _digest(p, model_dir)
    r = _measure(model_dir, p, tmp_path / "out")
    assert r.exit_code == EXIT_DATA, r.output
    line = _error_line(r)
    assert f"byte offset {offset} " in line and "--encoding latin-1" in line and "UTF-8" in line
    assert not (tmp_path / "out").exists() and _digest(p, model_dir) == before


def test_latin1_with_encoding_gives_the_utf8_numbers(model_dir, tmp_path):
    text = _text()
    lat, utf = tmp_path / "latin1.txt", tmp_path / "utf8.txt"
    lat.write_bytes(text.encode("latin-1"))
    utf.write_text(text, encoding="utf-8")
    before = _digest(lat, utf, model_dir)
    r1 = _measure(model_dir, lat, tmp_path / "a", "--encoding", "latin-1")
    r2 = _measure(model_dir, utf, tmp_path / "b")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    a, b = (pd.read_csv(tmp_path / d / "sparsity.csv") for d in "ab")
    pd.testing.assert_frame_equal(a, b)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["measurement"]["options"]["encoding"] == "latin-1"
    assert _digest(lat, utf, model_dir) == before


def test_bom_is_dropped(model_dir, tmp_path):
    text = _text()
    bom, plain = tmp_path / "bom.txt", tmp_path / "plain.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    plain.write_text(text, encoding="utf-8")
    r1, r2 = _measure(model_dir, bom, tmp_path / "a"), _measure(model_dir, plain, tmp_path / "b")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "sparsity.csv"),
                                  pd.read_csv(tmp_path / "b" / "sparsity.csv"))


def test_unknown_encoding_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    import probes.loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(probes.loading, "load_checkpoint", boom)
    r = _measure(model_dir, tmp_path / "x.txt", tmp_path / "out", "--encoding", "klingon")
    assert r.exit_code == EXIT_DATA and "unknown --encoding 'klingon'" in _error_line(r)


@pytest.mark.parametrize("value, kind", [("12", "number"), ('{"a": 1}', "object"), ("[1]", "array"),
                                         ("true", "boolean")])
def test_jsonl_text_that_is_not_a_string(model_dir, tmp_path, value, kind):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": _text()}) + "\n" + '{"text": ' + value + "}\n")
    r = _measure(model_dir, p, tmp_path / "out")
    assert r.exit_code == EXIT_DATA, r.output
    line = _error_line(r)
    assert "line 2" in line and f"is a {kind}, not a string" in line and "--text-field" in line


def test_a_capped_run_on_a_long_one_line_corpus_reads_a_prefix(model_dir, tmp_path):
    """6 MB on one line with --max-tokens 200: the manifest says how little was read."""
    p = tmp_path / "long.txt"
    p.write_text(_text(1_000_000), encoding="utf-8")
    r = _measure(model_dir, p, tmp_path / "out", "--max-tokens", 200)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["measurement"]
    assert m["n_counted_tokens"] == 200
    n_bytes = int(m["corpus_read"].split()[1])
    assert n_bytes <= 1 << 16 < p.stat().st_size


# ------------------------------------------------------------------ non-regular files, in a subprocess
def _run(args, timeout=90):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "actsparse_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # a regression that blocks fails on the timeout, not hangs


@pytest.fixture(scope="module")
def fifo(tmp_path_factory) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    p = tmp_path_factory.mktemp("pipe") / "corpus.txt"
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("cmd", ["measure", "grad", "massive", "pplp", "curve", "track"])
@pytest.mark.parametrize("what", ["fifo", "/dev/zero"])
def test_fifo_and_dev_zero_fail_at_once(cmd, what, fifo, model_dir, tmp_path):
    if what != "fifo" and not Path(what).exists():
        pytest.skip(f"no {what}")
    data = fifo if what == "fifo" else what
    ck = [] if cmd == "track" else [model_dir]
    r = _run([cmd, *ck, "--data", data, "-o", tmp_path / "out", "-q"])
    assert r.returncode == EXIT_CHECKPOINT, r.stdout + r.stderr
    line = _error_line(r)
    assert ("FIFO" if what == "fifo" else "character device") in line and "regular" in line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
