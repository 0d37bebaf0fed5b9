"""The bad-input matrix of issue 8, through the CLI, for every command that loads a checkpoint.

One row per kind of bad input (``ROWS``), each run against the commands it applies to. Every
failing run must: exit with the documented code (README, "Errors and exit codes"), print exactly
one line on stderr (``actsparse: error: PROBLEM -- fix: FIX``) naming the problem, show no
traceback (and one with ``--debug``), leave no output folder and no temporary folder next to it,
and overwrite nothing. Rows that exist elsewhere only for ``measure`` (tests/cli/test_cli.py:
truncated bare files, bad jsonl, unknown --kind, ...) are not repeated here.

The model is a tiny randomly initialised ReLU GPT-2 with a word-level tokenizer, built offline.
Ctrl-C runs ``actsparse measure`` in a subprocess and interrupts it inside the batch loop.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from actsparse_cli.main import app
from hint_check import assert_hints_name_real_options
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_DEVICE, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
MAX_LEN = 16
EOT = "<|endoftext|>"

CORPUS_CMDS = ("measure", "grad", "massive", "pplp")  # load a model and run it over a corpus
LOADERS = CORPUS_CMDS + ("sites",)  # load a model
WEIGHT_CMDS = ("spectrum", "drift")  # read the weights only
ALL = LOADERS + WEIGHT_CMDS
WRITERS = CORPUS_CMDS + WEIGHT_CMDS  # take -o
ON_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, n_inner=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", WORDS, 320)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Matplotlib costs ~2 s a run; no row here is about figures."""
    import reports.sections.drift
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])
    monkeypatch.setattr(reports.sections.drift, "drift_by_layer", lambda *a, **k: [])


# ------------------------------------------------------------------ building bad inputs
@dataclass
class Case:
    checkpoint: Path | str
    data: Path | None = None  # None: the good corpus
    extra: tuple = ()
    config: Path | None = None  # --config, for the commands that build a model
    out: Path | None = None  # None: a fresh path that must not appear
    never: Path | None = None  # a file a pickle payload would create


@dataclass
class Row:
    cmds: tuple[str, ...]
    code: int
    words: tuple[str, ...]  # each must appear in the message (case-insensitive)
    make: Callable[[Path, Path], Case]  # (work dir, good model folder) -> the bad input
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    marks: tuple = field(default_factory=tuple)


def _copy_model(m: Path, dst: Path, weights: bytes | None = None, config: dict | None = None) -> Path:
    dst.mkdir()
    for f in m.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    (dst / "config.json").write_text(json.dumps(config) if config else (m / "config.json").read_text())
    (dst / "model.safetensors").write_bytes(weights if weights is not None else (m / "model.safetensors").read_bytes())
    return dst


def _st_parts(m: Path) -> tuple[dict, bytes]:
    raw = (m / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_bytes(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def _truncated(t: Path, m: Path) -> Case:
    raw = (m / "model.safetensors").read_bytes()
    return Case(_copy_model(m, t / "truncated", weights=raw[:len(raw) // 2]))


def _no_weights(t: Path, m: Path) -> Case:
    d = _copy_model(m, t / "no-weights")  # config and tokenizer, no weight file
    (d / "model.safetensors").unlink()
    return Case(d)


def _header_bytes_flipped(t: Path, m: Path) -> Case:
    raw = bytearray((m / "model.safetensors").read_bytes())
    raw[12:24] = b"\xff" * 12  # inside the JSON header
    return Case(_copy_model(m, t / "corrupt", weights=bytes(raw)))


def _shape_does_not_fit_bytes(t: Path, m: Path) -> Case:
    header, data = _st_parts(m)
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = [2 * s for s in header[name]["shape"]]  # twice the values its bytes hold
    return Case(_copy_model(m, t / "corrupt", weights=_st_bytes(header, data)))


def _png(t: Path, m: Path) -> Case:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    p = t / "model.png"  # a real 1x1 PNG
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))
    return Case(p)


class _Touch:
    """Unpickling this creates ``marker``: the code a weights_only load must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_state_dict(m: Path, marker: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(m / "model.safetensors"), "payload": _Touch(marker)}


def _pickle_file(t: Path, m: Path) -> Case:
    f = t / "evil.pt"
    torch.save(_evil_state_dict(m, t / "PWNED"), f)
    return Case(f, config=m, never=t / "PWNED")


def _pickle_in_model_folder(t: Path, m: Path) -> Case:
    d = _copy_model(m, t / "evil")
    torch.save(_evil_state_dict(m, t / "PWNED"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return Case(d, never=t / "PWNED")


def _config_of_another_width(t: Path, m: Path) -> Case:
    cfg = json.loads((m / "config.json").read_text())
    cfg["n_embd"] = 32
    return Case(_copy_model(m, t / "wide", config=cfg))


def _config_with_more_layers(t: Path, m: Path) -> Case:
    cfg = json.loads((m / "config.json").read_text())
    cfg["n_layer"] = 4
    return Case(_copy_model(m, t / "deep", config=cfg))


def _unknown_model_type(t: Path, m: Path) -> Case:
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    return Case(_copy_model(m, t / "frob", config=cfg))


def _module_without_sites(t: Path, m: Path) -> Case:
    f = t / "net.pt"
    torch.save(torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8)), f)
    return Case(f, extra=("--unsafe-pickle",))


def _nan_weights(t: Path, m: Path) -> Case:
    from safetensors.torch import load_file

    sd = load_file(m / "model.safetensors")
    sd["transformer.h.1.mlp.c_fc.weight"][2, 3] = float("nan")
    d = _copy_model(m, t / "nan")
    save_file(sd, d / "model.safetensors")
    return Case(d)


def _corpus(name: str, text: str) -> Callable[[Path, Path], Case]:
    def make(t: Path, m: Path) -> Case:
        (t / name).write_text(text)
        return Case(m, data=t / name)
    return make


def _existing_output(t: Path, m: Path) -> Case:
    out = t / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return Case(m, out=out)


def _output_under_a_file(t: Path, m: Path) -> Case:
    (t / "a-file").write_text("x")
    return Case(m, out=t / "a-file" / "out")


def _output_in_proc(t: Path, m: Path) -> Case:
    return Case(m, out=Path("/proc/actsparse-bad-input/out"))  # root may write anywhere, but not there


def _oom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every forward, and the weight-only commands' main call, runs out of memory (as torch says it)."""
    import transformers

    import probes.drift
    import probes.spectrum

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5

    def boom(*a, **k):
        raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", boom)
    monkeypatch.setattr(probes.spectrum, "analyze_checkpoint", boom)
    monkeypatch.setattr(probes.drift, "weight_drift", boom)


ROWS: dict[str, Row] = {
    "missing-path": Row(ALL, EXIT_CHECKPOINT, ("does not exist", "check the path"),
                        lambda t, m: Case(t / "no-such-model")),
    "folder-without-weights": Row(ALL, EXIT_CHECKPOINT, ("no weights", "found config.json"), _no_weights),
    "truncated-safetensors": Row(ALL, EXIT_CHECKPOINT, ("truncated", "re-download"), _truncated),
    "corrupt-safetensors-header": Row(ALL, EXIT_CHECKPOINT, ("corrupt", "safetensors"), _header_bytes_flipped),
    "corrupt-safetensors-shape": Row(ALL, EXIT_CHECKPOINT, ("corrupt",), _shape_does_not_fit_bytes),
    "text-file-as-checkpoint": Row(ALL, EXIT_CHECKPOINT, ("text file", "not a checkpoint"),
                                   lambda t, m: Case(_write(t / "notes.txt", "hello world\n"))),
    "png-image-as-checkpoint": Row(ALL, EXIT_CHECKPOINT, ("not a checkpoint", "safetensors"), _png),
    "pickle-that-runs-code": Row(ALL, EXIT_CHECKPOINT, ("pickled objects", "--unsafe-pickle"), _pickle_file),
    "pickle-that-runs-code-in-model-folder": Row(ALL, EXIT_CHECKPOINT, ("pickled objects", "re-save"),
                                                 _pickle_in_model_folder),
    "config-weights-shape-mismatch": Row(LOADERS, EXIT_CHECKPOINT, ("do not match", "in the weights but",
                                                                    "config.json belongs"),
                                         _config_of_another_width),
    "config-weights-missing-layers": Row(("measure",), EXIT_CHECKPOINT, ("do not match", "parameters missing",
                                                                         "transformer.h.2"),
                                         _config_with_more_layers),
    "unknown-architecture": Row(LOADERS, EXIT_MODEL, ("unknown architecture", "frobnicator", "--config"),
                                _unknown_model_type),
    "no-site-found": Row(("measure", "sites"), EXIT_MODEL, ("no activation sites found", "candidate modules: 1",
                                                            '--site "1:input"'), _module_without_sites),
    "nan-weights": Row(LOADERS, EXIT_MODEL, ("transformer.h.1.mlp.c_fc.weight", "nan or inf", "earlier checkpoint"),
                       _nan_weights),
    "empty-corpus": Row(CORPUS_CMDS, EXIT_DATA, ("empty", "some text"), _corpus("empty.txt", "")),
    "whitespace-corpus": Row(CORPUS_CMDS, EXIT_DATA, ("empty",), _corpus("blank.txt", "  \n\t\n \n")),
    "special-tokens-corpus": Row(CORPUS_CMDS, EXIT_DATA, ("only special tokens", "real text"),
                                 _corpus("eot.txt", EOT * 64)),
    "special-tokens-jsonl": Row(CORPUS_CMDS, EXIT_DATA, ("only special tokens",),
                                _corpus("eot.jsonl", f'{{"text": "{EOT}{EOT}"}}\n{{"text": "  "}}\n')),
    "output-exists": Row(WRITERS, EXIT_OUTPUT, ("already exists", "--force"), _existing_output),
    "output-under-a-file": Row(WRITERS, EXIT_OUTPUT, ("cannot write", "is a file", "-o folder"),
                               _output_under_a_file),
    "output-unwritable": Row(WRITERS, EXIT_OUTPUT, ("cannot write to /proc", "writable -o folder"), _output_in_proc,
                             marks=(pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc"),)),
    "cuda-without-gpu": Row(LOADERS + ("spectrum",), EXIT_DEVICE, ("cuda", "--device cpu"),
                            lambda t, m: Case(m, extra=("--device", "cuda")), marks=(ON_CPU_ONLY,)),
    "out-of-memory": Row(CORPUS_CMDS + ("curve",), EXIT_DEVICE, ("out of memory", "--batch-size 2"),
                         lambda t, m: Case(m, extra=("--batch-size", 4)), patch=_oom),
    "out-of-memory-weights": Row(WEIGHT_CMDS, EXIT_DEVICE, ("out of memory",),
                                 lambda t, m: Case(m), patch=_oom),
}


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _argv(cmd: str, case: Case, corpus: Path, out: Path) -> list:
    args = [cmd, case.checkpoint, *case.extra]
    if case.config is not None and cmd in LOADERS + ("curve",):
        args += ["--config", case.config]
    if cmd in CORPUS_CMDS + ("curve",):
        args += ["--data", case.data or corpus, "--max-length", MAX_LEN, "--max-tokens", 64]
    if cmd != "sites":
        args += ["-o", out, "-q"]
    return args


PARAMS = [pytest.param(row, cmd, id=f"{row}-{cmd}", marks=ROWS[row].marks) for row in ROWS for cmd in ROWS[row].cmds]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("row, cmd", PARAMS)
def test_bad_input_fails_cleanly(row, cmd, model_dir, corpus, tmp_path, monkeypatch, capfd):
    spec = ROWS[row]
    work = tmp_path / "work"
    work.mkdir()
    case = spec.make(work, model_dir)
    out = case.out or tmp_path / "out"
    before = _listing(out)
    if spec.patch:
        spec.patch(monkeypatch)
    args = _argv(cmd, case, corpus, out)

    r = invoke(*args)
    assert r.exit_code == spec.code, (r.exit_code, r.stderr, r.stdout)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("actsparse: error: ") and " -- fix: " in lines[0], lines[0]
    for w in spec.words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    assert_hints_name_real_options(cmd, r.stderr)
    # Nothing reached the real stderr behind CliRunner's back (transformers logs there: its LOAD REPORT).
    leaked = capfd.readouterr().err
    assert "LOAD REPORT" not in leaked and "Traceback" not in leaked, leaked
    # No partial output, nothing overwritten, no temporary folder left next to the output.
    assert _listing(out) == before
    if not before:
        assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if case.never is not None:
        assert not case.never.exists(), "the pickle's payload ran"

    if cmd == spec.cmds[0]:  # --debug shows the traceback, with the same exit code
        d = invoke(*args, "--debug")
        assert d.exit_code == spec.code, d.stderr
        assert "Traceback" in d.stderr and d.stderr.rstrip().splitlines()[-1] == lines[0]
        assert _listing(out) == before


# ------------------------------------------------------------------ rows with more to check
def test_the_pickle_payload_runs_only_with_unsafe_pickle(model_dir, tmp_path):
    """The marker of the pickle rows is real: --unsafe-pickle (and only it) runs the payload."""
    case = _pickle_file(tmp_path, model_dir)
    r = invoke("sites", case.checkpoint, "--config", case.config)
    assert r.exit_code == EXIT_CHECKPOINT and not case.never.exists()
    r = invoke("sites", case.checkpoint, "--config", case.config, "--unsafe-pickle")
    assert r.exit_code == 0, r.stderr
    assert case.never.exists()


@pytest.mark.parametrize("cmd", WEIGHT_CMDS)
def test_nan_weights_are_marked_by_the_weight_commands(cmd, model_dir, tmp_path):
    """spectrum and drift read weights only: a NaN marks its row, and the run goes on (exit 0)."""
    case = _nan_weights(tmp_path, model_dir)
    out = tmp_path / "out"
    r = invoke(cmd, case.checkpoint, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    table = pd.read_parquet(out / f"{cmd}.parquet").set_index("name")
    bad = "transformer.h.1.mlp.c_fc.weight"
    if cmd == "spectrum":
        assert table.loc[bad, "status"] == "non-finite" and "non-finite" in table.loc[bad, "warning"]
        assert (table.drop(index=bad)["status"] == "success").all()
    else:
        assert table.loc[bad, "nonfinite"] == 1 and pd.isna(table.loc[bad, "mean"])
        assert (table.drop(index=bad)["nonfinite"] == 0).all()


@pytest.mark.parametrize("cmd", ["measure", "spectrum"])
def test_force_replaces_an_existing_output(cmd, model_dir, corpus, tmp_path):
    """--force replaces a folder actsparse wrote, whole; a folder holding anything else stays untouched."""
    case = _existing_output(tmp_path, model_dir)
    r = invoke(*_argv(cmd, case, corpus, case.out), "--force")
    assert r.exit_code == EXIT_OUTPUT and "actsparse did not write" in r.stderr and "keep.txt" in r.stderr
    assert (case.out / "keep.txt").read_text() == "precious"
    (case.out / "keep.txt").unlink()
    case.out.rmdir()
    assert invoke(*_argv(cmd, case, corpus, case.out)).exit_code == 0
    (case.out / "manifest.json").write_text((case.out / "manifest.json").read_text().replace('"tool"', '"tool" ', 1))
    r = invoke(*_argv(cmd, case, corpus, case.out), "--force")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in case.out.iterdir()}
    assert "manifest.json" in names and '"tool" ' not in (case.out / "manifest.json").read_text()  # replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("exc, code, words", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED, ("interrupted", "no output was written")),
    (OSError(28, "No space left on device"), EXIT_OUTPUT, ("cannot write output folder", "no space left",
                                                           "free some disk space")),
], ids=["ctrl-c-while-writing", "disk-full-while-writing"])
def test_failure_while_writing_leaves_nothing(exc, code, words, model_dir, corpus, tmp_path, monkeypatch):
    import reports.measure_report

    def fail_midway(folder, *a, **k):
        assert any(Path(folder).iterdir())  # some files are written already
        raise exc

    monkeypatch.setattr(reports.measure_report, "write_summary_md", fail_midway)
    out = tmp_path / "out"
    r = invoke(*_argv("measure", Case(model_dir), corpus, out))
    assert r.exit_code == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0].lower(), lines[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


_DRIVER = """
import functools, signal, sys, time
import transformers

# as a terminal starts it: a run launched from a background job (`cmd &` in a script) inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

_forward = transformers.GPT2LMHeadModel.forward

@functools.wraps(_forward)
def slow(self, *a, **k):  # says when the batch loop has started, and leaves time to interrupt it
    sys.stderr.write("IN-BATCH-LOOP\\n")
    sys.stderr.flush()
    time.sleep(1.0)  # room for the test to send SIGINT before the run ends, even on a loaded machine
    return _forward(self, *a, **k)

transformers.GPT2LMHeadModel.forward = slow
from actsparse_cli.main import app
app(prog_name="actsparse")
"""


def test_ctrl_c_in_the_batch_loop(model_dir, corpus, tmp_path):
    """SIGINT during `actsparse measure ... -o out` (with its progress bar): exit 130, one error line, no out/."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "out"
    cmd = [sys.executable, str(driver), "measure", str(model_dir), "--data", str(corpus), "--max-length",
           str(MAX_LEN), "--batch-size", "1", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, p.kill)
    watchdog.start()
    try:
        seen = []
        while True:
            line = p.stderr.readline()
            seen.append(line)
            if not line or "IN-BATCH-LOOP" in line:
                break
        assert seen[-1].startswith("IN-BATCH-LOOP"), "".join(seen)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_INTERRUPTED, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "IN-BATCH-LOOP" not in ln]
    assert lines[-1] == "actsparse: error: interrupted; no output was written", stderr
    assert [ln for ln in lines if ln.startswith("actsparse")] == lines[-1:], stderr
    assert all(ln.startswith("measure") for ln in lines[:-1]), stderr  # only the progress bar besides
    assert "Traceback" not in stderr and stdout == ""
    assert list(runs.iterdir()) == [], "no output folder and no temporary folder"


def test_usage_errors_raised_inside_a_command_keep_clicks_exit_code():
    """typer.BadParameter raised inside a handle_errors-wrapped function stays a usage error (exit 2),
    not an internal error, whichever copy of click typer raises it from."""
    import typer
    from typer.testing import CliRunner

    from actsparse_cli.common import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def cmd(debug: bool = False) -> None:
        raise typer.BadParameter("bad value", param_hint="--thing")

    r = CliRunner().invoke(app, [])
    assert r.exit_code == 2 and "internal error" not in r.output and "bad value" in r.output
