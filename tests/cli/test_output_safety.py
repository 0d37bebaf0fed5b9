"""The output guard (reports/bundle.py) through the CLI: no input and no earlier result is ever
deleted or replaced unless the user asked for exactly that (issue 12, items 1, 2, 6 and the
compare --markdown and long-name cases of 7 and 8).

Every refusal: exit 5, one line ``actsparse: error: ... -- fix: ...``, every input file
byte-identical (sha256 before and after), nothing of ours left in the output's parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_OUTPUT, EXIT_TERMINATED
from reports import bundle

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
MAX_LEN = 16
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree_hash(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks followed), by path."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("m") / "model", WORDS, n_inner=64)


@pytest.fixture()
def work(tmp_path, model_dir) -> Path:
    """A private copy: the model in work/model, the corpus in work/data/corpus.txt."""
    import shutil

    w = tmp_path / "work"
    shutil.copytree(model_dir, w / "model")
    (w / "data").mkdir()
    (w / "data" / "corpus.txt").write_text(" ".join(WORDS * 20))
    return w


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    import reports.sections.drift
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])
    monkeypatch.setattr(reports.sections.drift, "drift_by_layer", lambda *a, **k: [])


def _args(cmd: str, w: Path, out: Path, ckpt: Path | None = None) -> list:
    ckpt = ckpt or w / "model"
    data = ["--data", w / "data" / "corpus.txt", "--max-length", MAX_LEN, "--max-tokens", 64]
    if cmd in ("spectrum", "drift"):
        return [cmd, ckpt, "-o", out, "-q"]
    if cmd == "massive":
        return [cmd, ckpt, *data, "-o", out, "-q"]
    if cmd in ("pplp", "curve"):
        return [cmd, ckpt, *data, "-o", out, "-q"] + (["--method", "topk"] if cmd == "curve" else [])
    return [cmd, ckpt, *data, "-o", out, "-q"]


def _refused(r, *words):
    assert r.exit_code == EXIT_OUTPUT, (r.exit_code, r.stderr, r.stdout)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: ") and " -- fix: " in lines[0], r.stderr
    for wd in words:
        assert wd in lines[0], (wd, lines[0])
    assert "Traceback" not in r.stderr + r.stdout


def _no_leftovers(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(".") and
            any(s in p.name for s in (".tmp-", ".old-", ".probe-", ".lock"))]
    assert left == [], left


# ------------------------------------------------------------------ item 1: -o over an input
WRITERS = ["measure", "grad", "massive", "pplp", "curve", "spectrum", "drift"]


@pytest.mark.parametrize("where", ["the-checkpoint", "its-parent", "inside-it", "corpus-folder"])
@pytest.mark.parametrize("cmd", WRITERS)
def test_output_over_an_input_is_refused_even_with_force(cmd, where, work):
    if where == "corpus-folder" and cmd in ("spectrum", "drift"):
        pytest.skip("reads no corpus")
    out = {"the-checkpoint": work / "model", "its-parent": work, "inside-it": work / "model" / "out",
           "corpus-folder": work / "data"}[where]
    before = tree_hash(work)
    r = invoke(*_args(cmd, work, out), "--force")
    _refused(r, "input")
    assert tree_hash(work) == before
    assert not (work / "model" / "out").exists()
    _no_leftovers(work)
    _no_leftovers(work.parent)


def test_output_through_a_symlink_to_an_input_is_refused(work):
    link = work.parent / "alias"
    link.symlink_to(work / "model", target_is_directory=True)
    before = tree_hash(work)
    _refused(invoke(*_args("spectrum", work, work.parent / "alias" / "x")), "inside the input")
    _refused(invoke(*_args("spectrum", work, work.parent, ckpt=link), "--force"), "input")
    assert tree_hash(work) == before


@pytest.mark.parametrize("opt", ["--config", "--tokenizer"])
def test_output_over_a_config_or_tokenizer_folder_is_refused(opt, work, tmp_path):
    import shutil

    side = tmp_path / "side"
    shutil.copytree(work / "model", side)
    before = tree_hash(side)
    r = invoke(*_args("measure", work, side), opt, side, "--force")
    _refused(r, "input")
    assert tree_hash(side) == before


def test_report_and_track_refuse_an_input(work, tmp_path):
    m = tmp_path / "m"
    assert invoke(*_args("spectrum", work, m)).exit_code == 0
    before = tree_hash(m)
    _refused(invoke("report", m, "-o", m, "--force", "-q"), "input")
    _refused(invoke("report", m, "-o", tmp_path, "--force", "-q"), "input")
    assert tree_hash(m) == before
    _refused(invoke("track", work / "model", "-o", work, "--force", "-q", "--analyses", "drift"), "input")


# ------------------------------------------------------------------ --force replaces only ours
def test_force_refuses_a_folder_actsparse_did_not_write(work, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    _refused(invoke(*_args("spectrum", work, out), "--force"), "actsparse did not write", "thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work"
    # ours, then a foreign file added later: refused too, naming it
    out2 = tmp_path / "ours"
    assert invoke(*_args("spectrum", work, out2)).exit_code == 0
    (out2 / "notes.md").write_text("mine")
    _refused(invoke(*_args("spectrum", work, out2), "--force"), "notes.md")
    (out2 / "notes.md").unlink()
    assert invoke(*_args("spectrum", work, out2), "--force").exit_code == 0
    _no_leftovers(tmp_path)


def test_an_empty_folder_is_used_without_force(work, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert invoke(*_args("spectrum", work, out)).exit_code == 0
    assert (out / "manifest.json").is_file()


def test_a_folder_from_an_older_actsparse_is_ours(work, tmp_path):
    """No marker (written before it existed): our manifest and only files of the kinds we write."""
    out = tmp_path / "old"
    assert invoke(*_args("spectrum", work, out)).exit_code == 0
    (out / bundle.MARKER).unlink()
    assert invoke(*_args("spectrum", work, out), "--force").exit_code == 0
    (out / bundle.MARKER).unlink()
    (out / "script.py").write_text("x")
    _refused(invoke(*_args("spectrum", work, out), "--force"), "script.py")


def test_a_long_output_name_is_an_output_error(work, tmp_path):
    _refused(invoke(*_args("spectrum", work, tmp_path / ("x" * 300))), "bytes long")
    out = tmp_path / ("y" * 250)  # fits, but our temporary siblings must too
    r = invoke(*_args("spectrum", work, out))
    assert r.exit_code == 0, r.stderr
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------ item 2: concurrent runs
def test_a_live_lock_refuses_a_second_run(work, tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = bundle._lock_path(out)
        lock.write_text(json.dumps({"pid": sleeper.pid, "start": bundle._start_time(sleeper.pid)}))
        _refused(invoke(*_args("spectrum", work, out)), "another actsparse run", str(sleeper.pid))
        assert lock.exists() and not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale, taken over, and removed at the end
    r = invoke(*_args("spectrum", work, out))
    assert r.exit_code == 0, r.stderr
    assert not lock.exists()


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_folder_that_appears_during_the_run_is_not_replaced(force, work, tmp_path, monkeypatch):
    """The final rename is no-replace: the loser exits 5 and keeps its results in a named folder."""
    out = tmp_path / "out"
    import probes.spectrum as sp

    real = sp.summarize

    def meanwhile(df):
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's")
        return real(df)

    monkeypatch.setattr(sp, "summarize", meanwhile)
    r = invoke(*_args("spectrum", work, out), *force)
    _refused(r, "did not write" if force else "was created by someone else", "results are in")
    assert (out / "theirs.txt").read_text() == "the other run's"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.") and p.is_dir()]
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file()
    assert str(kept[0]) in r.stderr
    _no_leftovers(tmp_path)


def test_rename_noreplace_never_replaces(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "x").write_text("b")
    with pytest.raises(FileExistsError):
        bundle.rename_noreplace(a, b)
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError):  # not even onto an empty folder (os.rename would)
        bundle.rename_noreplace(a, tmp_path / "e")
    bundle.rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not a.exists() and (b / "x").read_text() == "b"


def test_two_processes_into_one_folder(work, tmp_path):
    """Two real runs at once with the same -o, no --force: one writes, the other exits 5; nothing lost."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "actsparse_cli", "spectrum", str(work / "model"), "-o", str(out), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for _ in range(2)]
    res = [p.communicate(timeout=120) + (p.returncode,) for p in ps]
    codes = sorted(r[2] for r in res)
    assert codes == [0, EXIT_OUTPUT], res
    loser = [r for r in res if r[2] == EXIT_OUTPUT][0]
    assert loser[1].startswith("actsparse: error: ") and len(loser[1].strip().splitlines()) == 1, loser[1]
    assert json.loads((out / "manifest.json").read_text())["command"] == "spectrum"
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------ item 6: signals and stale folders
_DRIVER = """
import sys, time
import probes.spectrum as sp
real = sp.summarize
def slow(df):
    sys.stderr.write("WRITING\\n"); sys.stderr.flush()
    time.sleep(30)
    return real(df)
sp.summarize = slow
from actsparse_cli.main import app
app(prog_name="actsparse")
"""


def test_sigterm_exits_143_and_leaves_nothing(work, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "out"
    p = subprocess.Popen([sys.executable, str(driver), "spectrum", str(work / "model"), "-o", str(out), "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    watchdog = threading.Timer(120, p.kill)
    watchdog.start()
    try:
        line = p.stderr.readline()
        assert line.startswith("WRITING"), line
        assert [q.name for q in runs.iterdir() if ".tmp-" in q.name], "the temporary folder exists mid-run"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_TERMINATED, stderr
    assert stderr.strip() == "actsparse: error: terminated (SIGTERM); no output was written", stderr
    assert list(runs.iterdir()) == [], "no output folder, no temporary folder, no lock"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_are_cleaned_by_the_next_run(work, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abcd"
    stale.mkdir()
    (stale / bundle.RUN_MARKER).write_text(json.dumps({"pid": dead, "start": None, "target": "out"}))
    (stale / "half.csv").write_text("a")
    live = tmp_path / f".other.tmp-{os.getpid()}-beef"  # a live process's: kept
    live.mkdir()
    (live / bundle.RUN_MARKER).write_text(json.dumps(bundle._me() | {"target": "other"}))
    users = tmp_path / ".mine.tmp-1-x"  # our naming, but no marker: not ours, kept
    users.mkdir()
    stale_lock = tmp_path / ".gone.lock"
    stale_lock.write_text(json.dumps({"pid": dead, "start": None}))
    # an interrupted --force replacement whose new folder never arrived comes back
    old = tmp_path / f".prev.old-{dead}-1234"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    (old / bundle.RUN_MARKER).write_text(json.dumps({"pid": dead, "start": None, "target": "prev"}))

    r = invoke(*_args("spectrum", work, tmp_path / "out2"))
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in names and stale_lock.name not in names and old.name not in names
    assert live.name in names and users.name in names
    assert (tmp_path / "prev" / "manifest.json").is_file() and not (tmp_path / "prev" / bundle.RUN_MARKER).exists()


def test_a_reused_pid_is_not_alive(tmp_path):
    assert bundle._alive(os.getpid(), bundle._start_time(os.getpid()))
    assert not bundle._alive(os.getpid(), "1")  # same PID, another start time: the old process is gone
    assert not bundle._alive(_dead_pid(), None)


# ------------------------------------------------------------------ compare --markdown
@pytest.fixture()
def two_results(work, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for o in (a, b):
        assert invoke(*_args("spectrum", work, o)).exit_code == 0
    return a, b


def test_compare_markdown_never_replaces_without_force(two_results, tmp_path):
    a, b = two_results
    md = tmp_path / "cmp.md"
    assert invoke("compare", a, b, "--markdown", md, "-q").exit_code == 0
    first = md.read_text()
    md.write_text("my edits")
    _refused(invoke("compare", a, b, "--markdown", md, "-q"), "already exists", "--force")
    assert md.read_text() == "my edits"
    assert invoke("compare", a, b, "--markdown", md, "-q", "--force").exit_code == 0
    assert md.read_text() == first
    empty = tmp_path / "step-summary.md"  # GitHub's $GITHUB_STEP_SUMMARY exists, empty
    empty.write_text("")
    assert invoke("compare", a, b, "--markdown", empty, "-q").exit_code == 0 and empty.read_text() == first
    _no_leftovers(tmp_path)


def test_compare_markdown_into_a_folder_or_an_input_is_refused(two_results, tmp_path):
    a, b = two_results
    before = tree_hash(a, b)
    _refused(invoke("compare", a, b, "--markdown", tmp_path, "-q"), "input")
    folder = tmp_path / "f"
    folder.mkdir()
    _refused(invoke("compare", a, b, "--markdown", folder, "-q"), "is a folder")
    _refused(invoke("compare", a, b, "--markdown", a / "summary.json", "-q", "--force"), "inside the input")
    assert tree_hash(a, b) == before


def test_compare_markdown_on_a_full_disk_leaves_nothing(two_results, tmp_path, monkeypatch):
    a, b = two_results
    md = tmp_path / "cmp.md"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    r = invoke("compare", a, b, "--markdown", md, "-q")
    monkeypatch.setattr(os, "fsync", real_fsync)
    _refused(r, "No space left", "free some disk space")
    assert not md.exists()
    _no_leftovers(tmp_path)
