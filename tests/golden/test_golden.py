"""Golden tests: every command on the bundled model gives the tables, manifest keys and texts pinned
under ``tests/golden/expected/`` (written by ``regen.py``; see README.md for when a golden may change).

The commands run in this process through typer's CliRunner (one shared import of torch), each
case once per session, dependencies first; regen.py runs the same argv as separate processes, so
a pass also shows that no command depends on what ran before it in the same process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden_common import (  # noqa: E402
    BY_NAME,
    CASES,
    EXPECTED,
    REPO,
    THREAD_ENV,
    XTOL,
    XTOL_SEARCH,
    Artefacts,
    argv_for,
    collect,
    compare_lines,
    compare_tables,
    compare_text,
    expected_files,
    golden_machine,
    ordered,
    read_csv_text,
    read_expected,
    same_machine,
    this_machine,
)

# End to end on the bundled checkpoint (~20-40 s in all): "slow" in this project's sense, still run in CI.
pytestmark = pytest.mark.slow

REGEN = "HF_HUB_OFFLINE=1 python tests/golden/regen.py"
# The goldens' machine and this one: strict comparison on the same, cross-machine tolerances elsewhere.
MADE_ON, HERE = golden_machine(), this_machine()
CROSS = not same_machine(MADE_ON, HERE)


def _xtol(case: str) -> float | None:
    return None if not CROSS else XTOL_SEARCH if BY_NAME[case].search else XTOL


def _placeholder_savefig(self, fname, *args, **kwargs):
    """Figures are not compared, only their file names: write an empty file instead of rendering
    (rendering ~36 PNG/SVG files is a quarter of this test's time). regen.py renders them for real."""
    if isinstance(fname, (str, Path)):
        Path(fname).write_bytes(b"")


class _Runs:
    """Runs cases on demand (each once), dependencies first, in one output root."""

    def __init__(self, out_root: Path):
        self.out_root = out_root
        self.done: dict[str, tuple[Artefacts | None, str]] = {}
        self.seconds: dict[str, float] = {}

    def get(self, name: str) -> Artefacts:
        import matplotlib.figure
        import torch
        from threadpoolctl import threadpool_limits
        from typer.testing import CliRunner

        from actsparse_cli.main import app

        for case in ordered([name]):
            if case.name in self.done:
                continue
            if case.mkdir:
                (self.out_root / case.name).mkdir(parents=True)
            argv = argv_for(case, self.out_root)
            t0 = time.perf_counter()
            threads = torch.get_num_threads()
            try:
                with pytest.MonkeyPatch.context() as mp, threadpool_limits(1):
                    mp.chdir(REPO)  # MODEL and the sites title are relative to the repository root
                    mp.delenv("FORCE_COLOR", raising=False)
                    mp.delenv("COLUMNS", raising=False)  # terminal tables follow COLUMNS; goldens are at the default
                    for k, v in THREAD_ENV.items():
                        mp.setenv(k, v)
                    mp.setattr(matplotlib.figure.Figure, "savefig", _placeholder_savefig)
                    torch.set_num_threads(1)  # as regen.py's OMP_NUM_THREADS=1
                    r = CliRunner().invoke(app, argv)
            finally:
                torch.set_num_threads(threads)
            self.seconds[case.name] = time.perf_counter() - t0
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                import traceback

                tb = "".join(traceback.format_exception(r.exception))
                self.done[case.name] = (None, f"raised {r.exception!r}\n{tb[-3000:]}")
                continue
            art = collect(case, self.out_root, r.exit_code, r.stdout, REPO)
            self.done[case.name] = (art, r.stderr[-3000:])
        art, err = self.done[name]
        if art is None:
            pytest.fail(f"golden case {name!r}: `actsparse {' '.join(BY_NAME[name].argv)}` {err}")
        return art


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    import probes

    here = Path(probes.__file__).resolve().parents[1]
    assert here == REPO, f"the golden test imports probes from {here}, not from this repository {REPO}"
    r = _Runs(tmp_path_factory.mktemp("golden"))
    yield r
    if r.seconds:
        print("\ngolden case times: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()))
    if CROSS:
        print(f"\ngoldens made on {MADE_ON}; this machine is {HERE}: numbers compared with cross-machine "
              f"tolerances (golden_common.py)")


def _fail(case: str, rel: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"golden mismatch: command {case!r} (`actsparse {' '.join(BY_NAME[case].argv)}`), "
                    f"file {rel!r}:\n  " + "\n  ".join(problems)
                    + f"\n(expected: tests/golden/expected/{case}/{rel}; if this change is intended, rerun "
                      f"`{REGEN} {case}` and say why in the commit)"
                    + (f"\n(goldens made on {MADE_ON}; this machine is {HERE})" if CROSS else ""), pytrace=False)


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_case(runs, case):
    """Exit code, the argv the golden was made with, and the names of every file written."""
    if not (EXPECTED / case / "case.json").is_file():
        pytest.fail(f"no golden for {case!r}: run `{REGEN} {case}`", pytrace=False)
    exp = json.loads(read_expected(case, "case.json"))
    art = runs.get(case)
    problems = []
    if exp["argv"] != art.meta["argv"]:
        problems.append(f"the case's argv changed since the golden was made (regenerate it):\n"
                        f"    golden {exp['argv']}\n    now    {art.meta['argv']}")
    if exp["exit_code"] != art.meta["exit_code"]:
        problems.append(f"exit code: expected {exp['exit_code']}, actual {art.meta['exit_code']}\n"
                        f"    stderr: {runs.done[case][1]}")
    problems += compare_lines(exp["files"], art.meta["files"], "output files")
    _fail(case, "case.json", problems)
    # every table/key list/text produced must have a golden (the per-file tests below check the reverse)
    produced = set(art.tables) | set(art.keys) | set(art.texts)
    unpinned = sorted(produced - set(expected_files(case)))
    _fail(case, "(outputs)", [f"produced but not pinned: {unpinned}"] if unpinned else [])


_FILES = [(c.name, rel) for c in CASES for rel in expected_files(c.name)]


@pytest.mark.parametrize("case,rel", _FILES, ids=[f"{c}:{rel}" for c, rel in _FILES])
def test_golden_file(runs, case, rel):
    art = runs.get(case)
    expected = read_expected(case, rel)
    if rel.endswith(".csv"):
        if rel not in art.tables:
            _fail(case, rel, ["the command no longer writes this table"])
        _fail(case, rel, compare_tables(read_csv_text(expected), art.tables[rel], xtol=_xtol(case)))
    elif rel.endswith(".keys.txt"):
        if rel not in art.keys:
            _fail(case, rel, ["the command no longer writes this manifest"])
        _fail(case, rel, compare_lines(expected.splitlines(), art.keys[rel], "manifest keys"))
    else:
        if rel not in art.texts:
            _fail(case, rel, ["the command no longer writes this text"])
        _fail(case, rel, compare_text(expected, art.texts[rel], rel))
