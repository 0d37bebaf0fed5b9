#!/usr/bin/env python
"""Peak memory and time of ``actsparse measure`` against the corpus size, with ``--max-tokens``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_corpus.py [--big-mb 50] [--small-mb 1] [--max-tokens 2000]
        [--repeats 1] [--baseline-mb N] [--workdir DIR] [--json FILE]

Issue 12's target: ``--data`` of 50 MB on one line with ``--max-tokens 2000`` peaks at most 1.2x the
RSS of the same run on a 1 MB corpus (the reader streams and stops once the windows are filled).

Corpora, written into a temporary folder from the bundled calibration text
(``probes/data/calibration.txt``): SMALL is that text repeated to ``--small-mb`` MB, lines as they
are; BIG is the text with its newlines turned into spaces, repeated to ``--big-mb`` MB as one line
(the worst case for a reader that splits on lines). Each run is ``python -m actsparse_cli measure
--data CORPUS --max-tokens N -q`` on the bundled model (CPU, its defaults otherwise), in a fresh
process; its peak RSS is ``ru_maxrss`` from ``os.wait4`` on that child alone (the whole process:
interpreter, torch, model, corpus, windows). This driver imports neither torch nor transformers,
so nothing it holds is inherited into a child's figure. ``--repeats`` runs of each, interleaved;
the largest peak and the shortest wall time are reported.

``--baseline-mb N`` also runs the whole-file reader this replaced (read all bytes, decode, tokenize
the whole text, then cut the windows: ``probes.corpus.corpus_windows`` swapped for that in the
child) on an N MB one-line corpus, to show what the bound saves. It is slow and large (about 2 s
and 150 MB per MB of text); leave it off for the target check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "probes" / "data" / "calibration.txt"
TARGET_RATIO = 1.2

# The child for --baseline-mb: measure with the pre-streaming reader (whole file, whole tokenization).
_WHOLE_FILE_CHILD = r"""
import sys
from probes import corpus as c

def whole_file(spec, tokenizer, max_length, stride=None, causal=True, max_tokens=None, skip_first=0,
               text_field="text", encoding=None):
    raw = open(spec, "rb").read()
    text = raw.decode("utf-8", errors="replace")
    docs = c.tokenize_documents([text], tokenizer)
    wins = c.build_windows(docs, tokenizer, max_length, stride, causal, max_tokens, skip_first)
    return c.CorpusWindows(spec, wins, 1, len(docs[0]), True, len(raw))

c.corpus_windows = whole_file
from actsparse_cli.main import app
sys.argv = ["actsparse", *sys.argv[1:]]
app(prog_name="actsparse")
"""


def write_corpora(folder: Path, small_mb: float, big_mb: float, baseline_mb: float | None) -> dict[str, Path]:
    text = CALIBRATION.read_text(encoding="utf-8")
    one_line = " ".join(text.split("\n")) + " "

    def fill(path: Path, unit: str, mb: float) -> Path:
        target = int(mb * 1_000_000)
        data = unit.encode("utf-8")
        with path.open("wb") as f:
            n = 0
            while n < target:
                chunk = data[: target - n]
                f.write(chunk)
                n += len(chunk)
        return path

    out = {"small": fill(folder / "small.txt", text, small_mb),
           "big": fill(folder / "big_one_line.txt", one_line, big_mb)}
    if baseline_mb:
        out["baseline"] = fill(folder / "baseline_one_line.txt", one_line, baseline_mb)
    return out


def run_child(args: list[str], whole_file: bool = False) -> dict:
    """One ``actsparse measure`` in a fresh process: exit code, wall seconds, peak RSS (bytes)."""
    cmd = [sys.executable, "-c", _WHOLE_FILE_CHILD, *args] if whole_file else [sys.executable, "-m", "actsparse_cli",
                                                                             *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on it
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    kib = usage.ru_maxrss  # Linux: KiB
    return {"rc": rc, "seconds": round(wall, 2), "peak_rss_bytes": kib * 1024,
            "stderr": stderr.strip().splitlines()[-1:] if rc else []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mb", type=float, default=50.0)
    ap.add_argument("--small-mb", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline-mb", type=float, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if sys.platform != "linux":
        print("needs Linux (ru_maxrss in KiB from os.wait4)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-corpus-", dir=a.workdir) as tmp:
        corpora = write_corpora(Path(tmp), a.small_mb, a.big_mb, a.baseline_mb)
        common = ["measure", "--max-tokens", str(a.max_tokens), "--device", "cpu", "-q"]
        runs: dict[str, list[dict]] = {"small": [], "big": []}
        # each run writes its tables (as a user's run does; -q alone would compute and write nothing)
        for i in range(max(1, a.repeats)):
            for name in ("small", "big"):
                out = ["-o", str(Path(tmp) / f"out-{name}-{i}")]
                runs[name].append(run_child([*common, *out, "--data", str(corpora[name])]))
        if a.baseline_mb:
            out = ["-o", str(Path(tmp) / "out-baseline")]
            runs["baseline (whole-file reader)"] = [run_child([*common, *out, "--data", str(corpora["baseline"])],
                                                              whole_file=True)]
        sizes = {k: corpora[k].stat().st_size for k in corpora}
    failed = {k: r for k, rs in runs.items() for r in rs if r["rc"] != 0}
    if failed:
        print(f"a run failed: {failed}", file=sys.stderr)
        return 1
    peak = {k: max(r["peak_rss_bytes"] for r in rs) for k, rs in runs.items()}
    best = {k: min(r["seconds"] for r in rs) for k, rs in runs.items()}
    ratio = peak["big"] / peak["small"]
    size_of = {"small": sizes["small"], "big": sizes["big"], "baseline (whole-file reader)": sizes.get("baseline")}
    print(f"actsparse measure --max-tokens {a.max_tokens}, bundled model, CPU "
          f"({platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs)")
    print(f"{'corpus':<32} {'bytes':>12} {'peak RSS MiB':>13} {'seconds':>8}")
    for k in runs:
        print(f"{k:<32} {size_of[k]:>12,} {peak[k] / 2**20:>13.1f} {best[k]:>8.2f}")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"peak RSS ratio big/small = {ratio:.3f} ({verdict} the target <= {TARGET_RATIO})")
    if a.json:
        a.json.write_text(json.dumps({"max_tokens": a.max_tokens, "bytes": size_of, "peak_rss_bytes": peak,
                                      "seconds": best, "ratio": ratio, "target": TARGET_RATIO, "runs": runs},
                                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
