"""Regenerate the golden outputs under ``tests/golden/expected/`` (on purpose only: see README.md).

    HF_HUB_OFFLINE=1 python tests/golden/regen.py            # every case
    HF_HUB_OFFLINE=1 python tests/golden/regen.py pplp curve  # only these cases (and nothing else changes)

Each command runs as its own process (``python -m actsparse_cli ...``, what a user runs) in the
root of the repository this file belongs to, with that repository first on PYTHONPATH, on CPU
with the seeds and token limits of ``golden_common.CASES``. To pin the committed code while the
working tree has other changes, regenerate from a worktree of HEAD:

    git worktree add /tmp/golden-base HEAD && cp -r tests/golden /tmp/golden-base/tests/
    (cd /tmp/golden-base && HF_HUB_OFFLINE=1 python tests/golden/regen.py)
    rm -rf tests/golden/expected && cp -r /tmp/golden-base/tests/golden/expected tests/golden/
    git worktree remove --force /tmp/golden-base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden_common import (BY_NAME, EXPECTED, MACHINE_FILE, REPO, THREAD_ENV, argv_for, collect,  # noqa: E402
                           golden_machine, ordered, same_machine, this_machine, write_expected)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["MPLBACKEND"] = "Agg"
    env.update(THREAD_ENV)
    env.pop("FORCE_COLOR", None)
    env.pop("COLUMNS", None)  # terminal tables follow COLUMNS; goldens are at the default width
    return env


def check_code_location(env: dict[str, str]) -> None:
    """The commands must import this repository's packages, not another checkout's."""
    out = subprocess.run([sys.executable, "-c", "import probes, reports, actsparse_cli as a; "
                          "print(probes.__file__); print(reports.__file__); print(a.__file__)"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()
    wrong = [p for p in out if not Path(p).resolve().is_relative_to(REPO)]
    if wrong:
        sys.exit(f"regen: the commands would import {wrong}, not the code in {REPO}; fix PYTHONPATH")
    print(f"regen: code from {REPO}")


def warn_if_dirty() -> None:
    try:
        st = subprocess.run(["git", "status", "--porcelain", "--", "probes", "reports", "actsparse_cli"],
                            cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if st:
        print("regen: WARNING: the library has uncommitted changes; the goldens will pin them:\n" + st)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"cases to regenerate (default all): {', '.join(BY_NAME)}")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in BY_NAME]
    if unknown:
        sys.exit(f"regen: unknown case(s) {unknown}; known: {list(BY_NAME)}")
    wanted = set(args.cases or BY_NAME)

    env = _env()
    check_code_location(env)
    warn_if_dirty()
    here, recorded = this_machine(), golden_machine()
    if wanted != set(BY_NAME) and not same_machine(recorded, here):
        print(f"regen: WARNING: the other goldens were made on {recorded}, this machine is {here}: regenerate "
              "every case, or the record (expected/MACHINE.json) will name a machine that made only some of them")
    with tempfile.TemporaryDirectory(prefix="actsparse-golden-") as tmp:
        out_root = Path(tmp)
        for case in ordered(wanted):
            if case.mkdir:
                (out_root / case.name).mkdir(parents=True)
            argv = argv_for(case, out_root)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "actsparse_cli", *argv], cwd=REPO, env=env,
                               capture_output=True, text=True)
            print(f"regen: {case.name:22s} exit {r.returncode}  {time.perf_counter() - t0:5.1f} s")
            if r.returncode not in (0, 7):  # 7: compare's broken --fail-on rule, pinned on purpose
                sys.exit(f"regen: {case.name} failed ({r.returncode}):\n{r.stderr[-4000:]}")
            if case.name not in wanted:
                continue
            art = collect(case, out_root, r.returncode, r.stdout, REPO)
            dest = EXPECTED / case.name
            if dest.exists():
                shutil.rmtree(dest)
            files = write_expected(art, dest)
            size = sum(p.stat().st_size for p in files)
            print(f"regen:   -> {dest.relative_to(REPO)}/ ({len(files)} files, {size / 1024:.0f} KiB)")
    (EXPECTED / MACHINE_FILE).write_text(json.dumps(
        {"machine": here, "note": "the machine regen.py last ran on; test_golden.py compares strictly on it and "
                                  "with cross-machine tolerances elsewhere (golden_common.py)"}, indent=1) + "\n")
    stale = [p.name for p in EXPECTED.iterdir() if p.is_dir() and p.name not in BY_NAME] if EXPECTED.is_dir() else []
    if stale:
        print(f"regen: WARNING: expected/ holds folders of no case (remove them): {stale}")


if __name__ == "__main__":
    main()
