"""Start-up of the commands, whole processes, against `python -c "import torch"` (issue 16, goal 2).

Each command runs as a user runs it: a fresh process of the installed ``actsparse`` entry point, on
the bundled model and the bundled training checkpoints, timed from ``exec`` to exit. The baseline
is a fresh ``python -c "import torch"`` with the same interpreter. Rounds are interleaved (every
command once per round, in a rotated order), so load drift hits all of them alike; each command's
median over the rounds is divided by the baseline's median.

Targets (issue 16): commands that need no forward pass (``--help``, ``drift``, ``spectrum``,
``report``, ``compare``) within 2x of the baseline; ``sites`` on the bundled model under 2x too (timed
three ways: cold, ``--no-cache``, which reads the sites from the files (``probes/quick_sites.py``); cold
with ``--load-model``, which builds the model with transformers as every ``sites`` did before; and
``--load-model`` as a hit of the listing cache, the repeated call on a model the files do not vouch for;
the cache lives in the benchmark's temporary folder, ``ACTSPARSE_CACHE_DIR``); and
every command that loads a model shows a status line on the terminal within 1 s of its start. The
last is measured in a pseudo-terminal (the status line is drawn only on a terminal): the time from
start to the first byte the command writes there, for ``measure`` and ``grad``.

A second reference row, ``import torch, transformers.models.gpt2.modeling_gpt2``, is the import floor of
``sites --load-model`` on the bundled (GPT-2) model: the modules it cannot load the model without. That
row is also shown against the floor.

    python benchmarks/bench_startup.py                 # 5 rounds
    python benchmarks/bench_startup.py --rounds 9 --load --json startup.json

``--load`` runs a competing CPU-bound process (a Python busy loop) through all the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "probes" / "data" / "tiny-relu-lm"
STEPS = ROOT / "probes" / "data" / "tiny-relu-lm-steps"
BIN = Path(sys.executable).parent / "actsparse"
NO_FORWARD_TARGET = 2.0
FLOOR = "import floor of loading gpt2"  # torch + transformers' GPT-2 modeling: what loading the model imports
SITES_COLD = "sites, cold (--no-cache)"
SITES_LOAD = "sites --load-model --no-cache"
STATUS_TARGET_S = 1.0


CACHE: dict[str, str] = {}  # ACTSPARSE_CACHE_DIR of the run: its temporary folder, never the user's cache


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: compiled modules cached, not compiled each time
    env.setdefault("COLUMNS", "80")
    env.update(CACHE)
    return env


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-400:]}")
    return dt


def first_output_on_a_terminal(cmd: list[str], timeout: float = 120.0) -> tuple[float, float, str]:
    """(seconds to the first byte written to the terminal, seconds to exit, that first text)."""
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout and stderr are the terminal
        os.chdir(ROOT)
        os.execvpe(cmd[0], cmd, _env())
    t0 = time.perf_counter()
    first, text = None, b""
    try:
        while True:
            r, _, _ = select.select([fd], [], [], timeout)
            if not r:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            if first is None:
                first = time.perf_counter() - t0
            if len(text) < 200:
                text += chunk
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    total = time.perf_counter() - t0
    shown = " ".join(text.decode("utf-8", "replace").split())[:60]
    return (first if first is not None else float("nan")), total, shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load", action="store_true", help="a competing CPU-bound process runs throughout")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} not found: install the package (pip install -e .) in this interpreter's venv")
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    CACHE["ACTSPARSE_CACHE_DIR"] = str(tmp / "cache")
    try:
        a1, a2, sp = tmp / "m1", tmp / "m2", tmp / "sp"
        common = ["--max-tokens", "1000", "-q"]
        for cmd in ([str(BIN), "measure", *common, "-o", str(a1)],
                    [str(BIN), "measure", *common, "--skip-first", "1", "-o", str(a2)],
                    [str(BIN), "spectrum", str(MODEL), "-q", "-o", str(sp)],
                    [str(BIN), "sites", str(MODEL), "--load-model"]):  # stores the listing the cached case reads
            timed(cmd)
        if not any((tmp / "cache" / "sites").glob("*.json")):
            raise SystemExit("sites stored no cache entry (an input changed in the last seconds?); rerun")
        out = tmp / "out"
        steps = sorted(str(p) for p in STEPS.iterdir())
        cases = {
            "import torch (baseline)": [sys.executable, "-c", "import torch"],
            FLOOR: [sys.executable, "-c", "import torch, transformers.models.gpt2.modeling_gpt2"],
            "actsparse --help": [str(BIN), "--help"],
            "drift (4 training checkpoints)": [str(BIN), "drift", *steps, "-q", "-o", str(out), "--force"],
            "spectrum (bundled model)": [str(BIN), "spectrum", str(MODEL), "-q", "-o", str(out), "--force"],
            "report (measure + spectrum)": [str(BIN), "report", str(a1), str(sp), "-q", "-o", str(out), "--force"],
            "compare (two measure outputs)": [str(BIN), "compare", str(a1), str(a2), "-q"],
            SITES_COLD: [str(BIN), "sites", str(MODEL), "--no-cache"],
            SITES_LOAD: [str(BIN), "sites", str(MODEL), "--load-model", "--no-cache"],
            "sites --load-model, cached (a hit)": [str(BIN), "sites", str(MODEL), "--load-model"],
        }
        from bench_spectrum_load import Load, _Quiet  # the spectrum benchmark's busy loop and its no-op

        ctx = Load() if a.load else _Quiet()
        times: dict[str, list[float]] = {k: [] for k in cases}
        status: dict[str, list[tuple[float, float, str]]] = {"measure": [], "grad": []}
        loads = [os.getloadavg()[0]]
        with ctx:
            names = list(cases)
            for r in range(a.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for k in order:
                    times[k].append(timed(cases[k]))
                for k in status:
                    status[k].append(first_output_on_a_terminal(
                        [str(BIN), k, "--max-tokens", "1000", "-o", str(tmp / f"st-{k}"), "--force"]))
                loads.append(os.getloadavg()[0])
        base = statistics.median(times["import torch (baseline)"])
        print(f"load average (1 min) over the run: {min(loads):.1f}-{max(loads):.1f}"
              f"{'  (+ a competing busy loop)' if a.load else ''}; {a.rounds} interleaved rounds")
        print(f"{'command':<34} {'median s':>9} {'min s':>7} {'x torch':>8}  target")
        rows = []
        for k, v in times.items():
            med = statistics.median(v)
            ratio = med / base
            target = "" if k.startswith("import") else (
                f"<= {NO_FORWARD_TARGET:.0f}x {'met' if ratio <= NO_FORWARD_TARGET else 'MISSED'}")
            if k == SITES_LOAD:
                target += f"; {med / statistics.median(times[FLOOR]):.2f}x the import floor"
            print(f"{k:<34} {med:9.2f} {min(v):7.2f} {ratio:8.2f}  {target}")
            rows.append({"command": k, "median_s": med, "min_s": min(v), "ratio_to_import_torch": ratio,
                         "all_s": v, **({"ratio_to_import_floor": med / statistics.median(times[FLOOR])}
                                        if k == SITES_LOAD else {})})
        print(f"\n{'first terminal output (pty)':<34} {'median s':>9} {'max s':>7} {'exit s':>8}  target / first text")
        for k, v in status.items():
            firsts = [f for f, _, _ in v]
            med, worst = statistics.median(firsts), max(firsts)
            ok = "met" if worst <= STATUS_TARGET_S else "MISSED"
            print(f"{k + ' (loads the model)':<34} {med:9.2f} {worst:7.2f} {statistics.median(t for _, t, _ in v):8.2f}"
                  f"  <= {STATUS_TARGET_S:.0f} s {ok} / {v[0][2]!r}")
            rows.append({"command": f"{k} first output", "median_s": med, "max_s": worst,
                         "first_text": v[0][2], "all_s": firsts})
        if a.json:
            a.json.write_text(json.dumps({"load": a.load, "loadavg": loads, "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
