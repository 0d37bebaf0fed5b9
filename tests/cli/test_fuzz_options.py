"""Property test over every command's options (issue 12): hostile option values never crash.

Hypothesis picks a command and up to three of its options (read from the Typer app itself, so a
new option is fuzzed without editing this file) and gives each a value from a pool of hostile
ones (negative, zero, huge, NaN, infinities, empty, text). Every run, whatever it does, must:
exit with a documented code (never 1, the internal-error code), print no traceback, print one
``actsparse: error: ... -- fix: ...`` line when it fails for a reason of ours, leave the inputs'
bytes unchanged and nothing of ours (temporary folders, locks) next to the output, and keep the
process's memory bounded (an option value must not size a buffer).
"""

from __future__ import annotations

import hashlib
import resource
import shutil
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from actsparse_cli.main import app
from hint_check import assert_hints_name_real_options

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
COMMANDS = ("measure", "grad", "massive", "pplp", "curve", "spectrum", "drift", "sites")
# Options that name inputs, outputs or devices, or switch on code execution: covered by their own tests.
NOT_FUZZED = {"-o", "--force", "-q", "--debug", "--data", "--config", "--tokenizer", "--arch", "--device",
              "--device-map", "--trust-remote-code", "--unsafe-pickle", "--site", "--labels", "--prompt",
              "--help", "--plot", "--format"}
HOSTILE = ["-1", "0", "1", "2", "3", "nan", "inf", "-inf", "1e308", "-1e308", "1e-300", "0.5", "100",
           "99999999999999999999", "2147483648", "4294967296", "", "x", "auto", "1,2", "mlp_post"]
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7}
RSS_GROWTH_LIMIT_MB = 1500

runner = CliRunner()


def _options() -> dict[str, list[tuple[str, bool]]]:
    """Each command's fuzzable options: (flag, takes no value)."""
    group = typer.main.get_command(app)
    out = {}
    for name in COMMANDS:
        cmd = group.commands[name]
        out[name] = sorted((p.opts[0], bool(p.is_flag)) for p in cmd.params
                           if p.param_type_name == "option" and p.opts[0] not in NOT_FUZZED)
    return out


OPTIONS = _options()


def _hash(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, word_lm) -> Path:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    word_lm.save_gpt2(root / "model", WORDS, n_inner=64)
    word_lm.corpus(root / "corpus.txt", WORDS, 400)
    return root


@st.composite
def invocations(draw):
    cmd = draw(st.sampled_from(COMMANDS))
    opts = OPTIONS[cmd]
    chosen = draw(st.lists(st.sampled_from(opts), min_size=1, max_size=3, unique=True)) if opts else []
    args = []
    for flag, is_flag in chosen:
        args += [flag] if is_flag else [flag, draw(st.sampled_from(HOSTILE))]
    return cmd, args


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(inv=invocations())
def test_hostile_option_values(inv, inputs, tmp_path_factory, monkeypatch):
    import reports.sections.drift
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])
    monkeypatch.setattr(reports.sections.drift, "drift_by_layer", lambda *a, **k: [])
    cmd, extra = inv
    before = _hash(inputs)
    parent = tmp_path_factory.mktemp("fuzz-out")
    out = parent / "out"
    argv = [cmd, str(inputs / "model")]
    if cmd in ("measure", "grad", "massive", "pplp", "curve"):
        argv += ["--data", str(inputs / "corpus.txt"), "--max-length", "16"] if "--max-length" not in extra \
            else ["--data", str(inputs / "corpus.txt")]
    if cmd != "sites":
        argv += ["-o", str(out)]
    rss0 = _rss_mb()
    r = runner.invoke(app, argv + extra + ["-q"])
    text = r.stdout + r.stderr
    assert r.exit_code in DOCUMENTED, (argv + extra, r.exit_code, text[-2000:])
    assert "Traceback" not in text and "internal error" not in text, (argv + extra, text[-2000:])
    if r.exit_code not in (0, 2, 7) or "actsparse: error:" in r.stderr:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("actsparse: error: ") and " -- fix: " in lines[0], \
            (argv + extra, r.stderr)
    assert_hints_name_real_options(cmd, r.stderr)
    assert _hash(inputs) == before, argv + extra
    left = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert left == [], (argv + extra, left)
    if r.exit_code != 0:
        assert not out.exists(), argv + extra
    assert _rss_mb() - rss0 < RSS_GROWTH_LIMIT_MB, (argv + extra, _rss_mb() - rss0)
    shutil.rmtree(parent, ignore_errors=True)
