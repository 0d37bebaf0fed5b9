#!/usr/bin/env python
"""How time and memory grow with tokens, layers and width (``measure``) and with matrix size and count (``spectrum``).

    HF_HUB_OFFLINE=1 python benchmarks/bench_scaling.py [--quick | --tiny] [--out FILE.md] [--json FILE]
        [--repeats N] [--threads N] [--workdir DIR] [--in-process]

Sweeps, each point one configuration:

(a) ``probes.measure.measure`` vs the number of counted tokens, (b) vs the number of layers, (c) vs
    the width (d_model, with d_mlp = 4 d_model), on GPT-2-style models with a ReLU MLP
    (``GPT2Config(activation_function="relu")``, random init, seed 0), saved as Hugging Face folders
    with the embedded model's tokenizer and loaded with ``probes.loading.load_checkpoint``. Corpus:
    the embedded calibration corpus (``probes.embedded.default_corpus()``), repeated and cut to a
    little more than the token count, so ``MeasureOptions(max_tokens=...)`` gets exactly that many.
    Beside each ``measure`` call, a plain forward pass over the same batches with no hooks
    (``probes.runner.forward_batch``, what ``measure``'s loop calls): the overhead is the time of
    ``measure``'s batch loop (``info["seconds"]``) over the forward-only time.
(d) ``probes.spectrum.analyze_checkpoint`` on safetensors files of random float32 matrices, vs
    the matrix size (square N x N, and one N x 4N) and vs the number of same-shape matrices; its
    baseline is a bare float64 ``numpy.linalg.svd(compute_uv=False)`` (LAPACK) of the same matrices
    read from the same file, so the overhead is what the whole table costs over plain singular values.

Every configuration runs in a fresh subprocess (``--in-process`` runs them in this one: for the
smoke test only, peak RSS is then not per configuration). Within a child, the peak of each phase
(forward-only, measure; plain SVD, analyze) is ``VmHWM`` after ``malloc_trim`` and a reset
through ``/proc/self/clear_refs``. That reset also lowers the child's ``ru_maxrss`` (the kernel
takes it from the same high-water mark at exit), so the child reads ``VmHWM`` before every reset
and reports the largest value; a configuration's peak RSS is the larger of that and ``ru_maxrss``
from ``os.wait4``. This driver imports neither torch nor transformers (unless ``--in-process``),
so the fork/exec inheritance of ``ru_maxrss`` cannot raise a child's figure. Nothing is
subtracted; a process that only imports torch and transformers gives the baseline RSS. Times are
the best (minimum) of ``--repeats`` runs of each variant, interleaved ABBA after a warm-up of
each on one batch (one pass for spectra). One thread by default (``--threads``): on a shared
machine, extra threads mostly measure the contention. The growth exponent is the least-squares
slope of log(time) against log(tokens | layers | width | N | matrices).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# base_*: the fixed point of the three measure sweeps (tokens, layers, width): each sweep varies one.
PRESETS: dict[str, dict] = {
    "tiny": dict(base_layers=1, base_width=32, base_tokens=256, tokens=(128, 256), layers=(1, 2), widths=(32, 64),
                 max_length=64, batch_size=2, spec_sizes=(32, 64), spec_tall=32, spec_count_n=32,
                 spec_counts=(1, 2), repeats=1),
    "quick": dict(base_layers=2, base_width=128, base_tokens=2048, tokens=(1024, 2048, 8192), layers=(1, 2, 4),
                  widths=(64, 128, 256), max_length=128, batch_size=8, spec_sizes=(128, 256, 512), spec_tall=256,
                  spec_count_n=256, spec_counts=(1, 4), repeats=1),
    "default": dict(base_layers=4, base_width=256, base_tokens=4096, tokens=(2048, 4096, 8192, 32768),
                    layers=(2, 4, 8, 16), widths=(128, 256, 512, 1024), max_length=256, batch_size=8,
                    spec_sizes=(256, 512, 1024, 2048), spec_tall=1024, spec_count_n=512, spec_counts=(1, 4, 16),
                    repeats=5),
}
CHARS_PER_TOKEN_GUESS = 3.0  # calibration corpus with the embedded tokenizer: ~3.3; corpus files are checked


# ------------------------------------------------------------------ memory of this process
def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_LIBC: list = []


def _trim() -> None:
    """Collect garbage and give free heap pages back to the OS (glibc), so a phase's peak starts from live memory."""
    import gc

    gc.collect()
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6"))
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        try:
            _LIBC[0].malloc_trim(0)
        except AttributeError:
            pass


def _after_imports(t0: float, spec: dict) -> tuple[float, float]:
    """A child's set-up once its imports are done: their time since ``t0``, the collector settled,
    the thread count applied, and the RSS at that point."""
    import torch

    import_s = time.perf_counter() - t0
    _settle()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return import_s, _status_mb("VmRSS")


def _settle() -> None:
    """After the imports: move every object alive now out of the collector's reach (``gc.freeze``), so the
    ``gc.collect`` before each phase takes milliseconds instead of ~0.2 s with transformers imported."""
    import gc

    gc.collect()
    gc.freeze()


_PEAK_MB = [0.0]  # this process's peak RSS: VmHWM read before every reset, and at the end (process_peak_mb)


def process_peak_mb() -> float | None:
    """The process's whole-life peak RSS. Resetting VmHWM (clear_refs) also lowers what the kernel reports as
    ``ru_maxrss`` at exit (the same high-water mark), so every value is read before it is reset."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        _PEAK_MB[0] = max(_PEAK_MB[0], hwm)
    return _PEAK_MB[0] or None


class Phase:
    """Peak RSS over every run of one phase: VmHWM, reset (clear_refs 5) to the current RSS before each run."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self.ok = True

    def run(self, fn):
        _trim()
        process_peak_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.ok = False
        out = fn()
        hwm = _status_mb("VmHWM")
        if self.ok and hwm is not None:
            self.peak_mb = max(self.peak_mb or 0.0, hwm)
        return out

    def value(self) -> float | None:
        return self.peak_mb if self.ok else None


def _interleaved(repeats: int, a, b) -> tuple[list, list]:
    """``repeats`` runs of each in ABBA order (the caller warms up)."""
    ra, rb = [], []
    for r in range(repeats):
        for which in ("ab" if r % 2 == 0 else "ba"):
            (ra if which == "a" else rb).append(a() if which == "a" else b())
    return ra, rb


# ------------------------------------------------------------------ children
def child_baseline(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {"import_s": time.perf_counter() - t0, "rss_mb": _status_mb("VmRSS"), "peak_mb": process_peak_mb()}


def _gpt2_config(layers: int, width: int, vocab: int, max_length: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=max_length, n_embd=width, n_layer=layers,
                      n_head=max(1, width // 64), n_inner=4 * width, activation_function="relu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def child_prepare(spec: dict) -> dict:
    """Write the models (HF folders), the corpus files and the weight files the sweeps need."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from probes.embedded import DEFAULT_CHECKPOINT, default_corpus

    work = Path(spec["workdir"])
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    out: dict = {"models": {}, "corpora": {}, "weights": {}}
    for layers, width in spec["models"]:
        folder = work / f"gpt2-relu-L{layers}-d{width}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(0)
            model = GPT2LMHeadModel(_gpt2_config(layers, width, len(tok), spec["max_length"])).eval()
            model.save_pretrained(str(folder))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(DEFAULT_CHECKPOINT / name, folder / name)
            del model
        out["models"][f"{layers}x{width}"] = str(folder)
    text = Path(default_corpus()).read_text(encoding="utf-8")
    for tokens in spec["tokens"]:
        path = work / f"corpus-{tokens}.txt"
        need = tokens + tokens // 50 + 64  # margin: the first token of the text is context, never counted
        chars = int(need * CHARS_PER_TOKEN_GUESS)
        while True:
            body = (text * (chars // len(text) + 1))[:chars]
            n = len(tok(body, add_special_tokens=False, verbose=False)["input_ids"])
            if n >= need:
                break
            chars = int(chars * 1.25) + 1
        path.write_text(body, encoding="utf-8")
        out["corpora"][str(tokens)] = {"path": str(path), "corpus_tokens": n}
    g = torch.Generator().manual_seed(0)
    for key, (rows, cols, count) in spec["weights"].items():
        path = work / f"weights-{key}.safetensors"
        if not path.is_file():
            save_file({f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=g) * 0.02 for i in range(count)},
                      str(path))
        out["weights"][key] = str(path)
    return out


def child_measure(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    from probes import corpus as corpus_mod
    from probes.loading import load_checkpoint
    from probes.measure import MeasureOptions, measure
    from probes.runner import forward_batch

    import_s, rss_imports = _after_imports(t0, spec)
    t0 = time.perf_counter()
    lm = load_checkpoint(spec["model"], device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mb("VmRSS")
    n_params = sum(p.numel() for p in lm.model.parameters())
    ml, bs = spec["max_length"], spec["batch_size"]
    opts = MeasureOptions(data=spec["corpus"], max_tokens=spec["tokens"], batch_size=bs, max_length=ml)

    # The forward-only baseline: the same windows and batches as measure builds (same corpus functions).
    tok = lm.tokenizer
    windows = corpus_mod.corpus_windows(spec["corpus"], tok, ml, None, causal=lm.is_causal_lm,
                                        max_tokens=spec["tokens"]).windows
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = list(corpus_mod.batches(windows, bs, pad, lm.device))
    counted = corpus_mod.n_counted(windows)

    def forward_only():
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                forward_batch(lm.model, b, is_encoder_decoder=lm.is_encoder_decoder)
        return time.perf_counter() - t

    last: dict = {}

    def run_measure():
        t = time.perf_counter()
        res = measure(lm, opts)
        wall = time.perf_counter() - t
        last["info"], last["rows"] = res.info, len(res.rows)
        return wall, res.info["seconds"] or wall  # info["seconds"] is rounded to ms: never divide by 0

    # Warm-up (allocator, kernels, lazy imports) on one batch of each variant.
    with torch.inference_mode():
        forward_batch(lm.model, batches[0], is_encoder_decoder=lm.is_encoder_decoder)
    measure(lm, MeasureOptions(data=spec["corpus"], max_tokens=min(spec["tokens"], bs * ml // 2), batch_size=bs,
                               max_length=ml))
    fwd_phase, meas_phase = Phase(), Phase()
    fwd, meas = _interleaved(spec["repeats"], lambda: fwd_phase.run(forward_only), lambda: meas_phase.run(run_measure))
    info = last["info"]
    if info["n_counted_tokens"] != counted:
        raise RuntimeError(f"measure counted {info['n_counted_tokens']} tokens, the forward-only pass {counted}")
    return {"tokens": counted, "tokens_requested": spec["tokens"], "layers": spec["layers"], "width": spec["width"],
            "d_mlp": 4 * spec["width"], "n_params": n_params, "n_sites": last["rows"], "n_windows": info["n_windows"],
            "n_batches": len(batches), "max_length": ml, "batch_size": bs, "threads": torch.get_num_threads(),
            "import_s": import_s, "load_s": load_s, "forward_s": fwd, "measure_loop_s": [m[1] for m in meas],
            "measure_wall_s": [m[0] for m in meas], "rss_after_imports_mb": rss_imports,
            "rss_after_load_mb": rss_loaded, "peak_forward_phase_mb": fwd_phase.value(),
            "peak_measure_phase_mb": meas_phase.value(), "peak_mb": process_peak_mb()}


def child_spectrum(spec: dict) -> dict:
    t0 = time.perf_counter()
    import pandas  # noqa: F401  (imported lazily by the library: a fixed cost, kept out of the timings)
    import numpy as np
    import scipy.optimize  # noqa: F401
    import torch
    from safetensors import safe_open

    from probes.spectrum import analyze_checkpoint

    import_s, rss_imports = _after_imports(t0, spec)
    path = spec["path"]

    def svd_only():
        t = time.perf_counter()
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                np.linalg.svd(f.get_tensor(k).astype(np.float64), compute_uv=False)
        return time.perf_counter() - t

    last: dict = {}

    def analyze():
        t = time.perf_counter()
        df = analyze_checkpoint(path)
        dt = time.perf_counter() - t
        last["rows"], last["alpha_finite"] = len(df), int(df["alpha"].astype(float).notna().sum())
        return dt

    svd_only()  # warm-up: LAPACK, page cache, lazy imports
    analyze()
    svd_phase, an_phase = Phase(), Phase()
    svd, an = _interleaved(spec["repeats"], lambda: svd_phase.run(svd_only), lambda: an_phase.run(analyze))
    return {"rows": spec["rows"], "cols": spec["cols"], "count": spec["count"], "n_matrices": last["rows"],
            "alpha_finite": last["alpha_finite"], "threads": torch.get_num_threads(), "import_s": import_s,
            "svd_s": svd, "analyze_s": an, "rss_after_imports_mb": rss_imports, "peak_svd_phase_mb": svd_phase.value(),
            "peak_analyze_phase_mb": an_phase.value(), "peak_mb": process_peak_mb(),
            "file_mb": os.path.getsize(path) / 2 ** 20}


CHILDREN = {"baseline": child_baseline, "prepare": child_prepare, "measure": child_measure, "spectrum": child_spectrum}


# ------------------------------------------------------------------ driver
def run_config(kind: str, spec: dict, in_process: bool, log) -> dict:
    """One configuration in a fresh subprocess (peak RSS of that child alone) or in this process."""
    if in_process:
        import gc

        import torch

        threads = torch.get_num_threads()
        try:
            res = CHILDREN[kind](spec)
        finally:
            gc.unfreeze()  # undo _settle's freeze in a process that goes on (a test run)
            torch.set_num_threads(threads)
        res["maxrss_mb"] = None  # no child: peak_mb is this process's, not per configuration
        return res
    return finish_child(start_child(kind, spec), log)


def start_child(kind: str, spec: dict) -> dict:
    env = dict(os.environ)
    if spec.get("threads"):
        env.update({k: str(spec["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(spec)],
                         stdout=out, stderr=err, cwd=ROOT, env=env, text=True)
    return {"kind": kind, "spec": spec, "popen": p, "out": out, "err": err, "t0": t0}


def finish_child(c: dict, log) -> dict:
    """Wait for a child; ``ru_maxrss`` from ``os.wait4`` is this child's alone."""
    p = c["popen"]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - c["t0"]
    with c["out"] as out, c["err"] as err:
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    kind, spec = c["kind"], c["spec"]
    if p.returncode != 0:
        raise SystemExit(f"bench_scaling: {kind} child failed (exit {p.returncode}) for {spec}:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    res["process_wall_s"] = wall
    log(f"  {kind} {_label(kind, spec)}: {wall:.1f} s, peak RSS {peak_rss(res):.0f} MiB")
    return res


def peak_rss(r: dict) -> float | None:
    """A configuration's peak RSS: the larger of the child's ``ru_maxrss`` (``os.wait4``) and its own tracked peak
    (the phase resets lower ``ru_maxrss``; see ``process_peak_mb``)."""
    vals = [v for v in (r.get("maxrss_mb"), r.get("peak_mb")) if v is not None]
    return max(vals) if vals else None


def _label(kind: str, spec: dict) -> str:
    if kind == "measure":
        return f"L={spec['layers']} d={spec['width']} tokens={spec['tokens']}"
    if kind == "spectrum":
        return f"{spec['count']} x {spec['rows']}x{spec['cols']}"
    return ""


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(args) -> dict:
    p = dict(PRESETS[args.preset])
    if args.repeats:
        p["repeats"] = args.repeats
    log = (lambda *a: None) if args.silent else (lambda msg: print(msg, file=sys.stderr, flush=True))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scaling."))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {"preset": args.preset, "params": p, "command": _command(args), "python": platform.python_version(),
                 "platform": platform.platform(), "cpus": os.cpu_count(), "load_average_start": _load_average(),
                 "in_process": args.in_process, "threads_requested": args.threads}
    log(f"bench_scaling: preset {args.preset}, workdir {workdir}")
    # The baseline is always a subprocess, started before this process imports torch (--in-process does
    # later): a child's ru_maxrss includes the parent's peak RSS at the time of the fork/exec. With
    # --in-process (a smoke test) it runs alongside the configurations, otherwise on its own.
    baseline = start_child("baseline", {})
    res["driver_rss_mb"] = _status_mb("VmHWM")
    if not args.in_process:
        res["baseline"] = finish_child(baseline, log)

    bl, bw, bt = p["base_layers"], p["base_width"], p["base_tokens"]
    points = {"tokens": [(bl, bw, t) for t in p["tokens"]], "layers": [(n, bw, bt) for n in p["layers"]],
              "width": [(bl, w, bt) for w in p["widths"]]}
    models = sorted({(n, w) for pts in points.values() for n, w, _ in pts})
    token_counts = sorted({t for pts in points.values() for _, _, t in pts})
    n_sq, n_tall, n_cnt = p["spec_sizes"], p["spec_tall"], p["spec_count_n"]
    spec_points = {"size": [(n, n, 1) for n in n_sq] + [(n_tall, 4 * n_tall, 1)],
                   "count": [(n_cnt, n_cnt, k) for k in p["spec_counts"]]}
    weights = {f"{r}x{c}x{k}": (r, c, k) for pts in spec_points.values() for r, c, k in pts}
    prep = run_config("prepare", {"workdir": str(workdir), "models": models, "tokens": token_counts,
                                  "max_length": p["max_length"], "weights": weights}, args.in_process, log)

    done: dict = {}
    for sweep, pts in points.items():
        rows = []
        for n, w, t in pts:
            if (n, w, t) not in done:
                spec = {"model": prep["models"][f"{n}x{w}"], "corpus": prep["corpora"][str(t)]["path"], "tokens": t,
                        "layers": n, "width": w, "max_length": p["max_length"], "batch_size": p["batch_size"],
                        "repeats": p["repeats"], "threads": args.threads}
                done[(n, w, t)] = run_config("measure", spec, args.in_process, log)
            rows.append(done[(n, w, t)])
        res[f"measure_vs_{sweep}"] = rows
    for sweep, pts in spec_points.items():
        rows = []
        for r, c, k in pts:
            key = f"{r}x{c}x{k}"
            if key not in done:
                spec = {"path": prep["weights"][key], "rows": r, "cols": c, "count": k, "repeats": p["repeats"],
                        "threads": args.threads}
                done[key] = run_config("spectrum", spec, args.in_process, log)
            rows.append(done[key])
        res[f"spectrum_vs_{sweep}"] = rows
    if args.in_process:
        res["baseline"] = finish_child(baseline, log)
    res["exponents"] = exponents(res)
    res["load_average_end"] = _load_average()
    res["total_s"] = time.perf_counter() - t_start
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def _command(args) -> str:
    parts = ["python benchmarks/bench_scaling.py"]
    if args.preset != "default":
        parts.append(f"--{args.preset}")
    if args.repeats:
        parts.append(f"--repeats {args.repeats}")
    if args.threads != 1:
        parts.append(f"--threads {args.threads}")
    if args.in_process:
        parts.append("--in-process")
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


# ------------------------------------------------------------------ summaries and markdown
def _best(xs) -> float:
    return min(xs)


def _rise(r: dict, peak_key: str, base_key: str = "rss_after_imports_mb") -> float | None:
    peak, base = r.get(peak_key), r.get(base_key)
    return peak - base if peak is not None and base is not None else None


MEASURE_X = {"tokens": ("tokens", "counted tokens"), "layers": ("layers", "layers"), "width": ("width", "d_model")}
SPECTRUM_X = {"size": "N", "count": "matrices"}


def exponents(res: dict) -> list[dict]:
    out = []
    for sweep, (key, label) in MEASURE_X.items():
        rows = res[f"measure_vs_{sweep}"]
        xs = [r[key] for r in rows]
        out.append({"sweep": f"measure vs {label}", "x": xs,
                    "forward": loglog_slope(xs, [_best(r["forward_s"]) for r in rows]),
                    "probed": loglog_slope(xs, [_best(r["measure_loop_s"]) for r in rows]),
                    "total": loglog_slope(xs, [_best(r["measure_wall_s"]) for r in rows]),
                    "memory": loglog_slope(xs, [_rise(r, "peak_measure_phase_mb") for r in rows]),
                    "memory_run": loglog_slope(xs, [_rise(r, "peak_measure_phase_mb", "rss_after_load_mb")
                                                    for r in rows]),
                    "overheads": [_best(r["measure_loop_s"]) / _best(r["forward_s"]) for r in rows]})
    for sweep, label in SPECTRUM_X.items():
        rows = res[f"spectrum_vs_{sweep}"]
        if sweep == "size":
            rows = [r for r in rows if r["rows"] == r["cols"]]  # the square ones; the N x 4N row is shown apart
        xs = [r["rows"] if sweep == "size" else r["count"] for r in rows]
        out.append({"sweep": f"spectrum vs {label}" + (" (square)" if sweep == "size" else ""), "x": xs,
                    "forward": loglog_slope(xs, [_best(r["svd_s"]) for r in rows]),
                    "probed": loglog_slope(xs, [_best(r["analyze_s"]) for r in rows]), "total": None,
                    "memory": loglog_slope(xs, [_rise(r, "peak_analyze_phase_mb") for r in rows]),
                    "memory_run": None,
                    "overheads": [_best(r["analyze_s"]) / _best(r["svd_s"]) for r in rows]})
    return out


def _f(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def _g(v) -> str:
    """Three significant digits (small times and sizes stay non-zero)."""
    return "n/a" if v is None else f"{v:.3g}"


def _mib(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(res: dict) -> str:
    p, b = res["params"], res["baseline"]
    threads = {r["threads"] for k in res if k.startswith(("measure_vs", "spectrum_vs")) for r in res[k]}
    rss_note = ("peak RSS is this one process's (`--in-process`), not per configuration" if res["in_process"] else
                "each configuration ran in a fresh subprocess; **peak RSS** is that child's whole-life peak (its "
                "VmHWM read before each phase reset and at the end; `ru_maxrss` from `os.wait4`, lowered by those "
                "resets, is kept in the JSON)")
    L = [f"Command: `{res['command']}` (preset `{res['preset']}`, {res['total_s'] / 60:.1f} min). "
         f"Python {res['python']}, {res['platform']}, {res['cpus']} CPUs, torch threads {sorted(threads)}, "
         f"load average {res['load_average_start']} at the start, {res['load_average_end']} at the end.",
         "",
         f"Baseline: a process that only imports torch and transformers peaks at **{_mib(peak_rss(b))} MiB** RSS "
         f"(import {b['import_s']:.1f} s). Nothing is subtracted from the figures below; {rss_note}. "
         "\"after imports\" is the child's RSS once torch, transformers and `probes` are imported; the phase peaks "
         "are VmHWM reset before each run of that phase. Times: best of "
         f"{p['repeats']} interleaved runs after a warm-up.",
         ""]
    measure_header = ["tokens", "layers", "d_model", "d_mlp", "params (M)", "forward only (s)", "measure loop (s)",
                      "overhead (x)", "measure() total (s)", "tokens/s (measure)", "after imports (MiB)",
                      "after load (MiB)", "peak, forward (MiB)", "peak, measure (MiB)", "peak RSS (MiB)"]
    titles = {"tokens": f"## measure vs counted tokens ({p['base_layers']} layers, d_model {p['base_width']})",
              "layers": f"## measure vs layers (d_model {p['base_width']}, {p['base_tokens']} tokens)",
              "width": f"## measure vs width ({p['base_layers']} layers, {p['base_tokens']} tokens, d_mlp = 4 d_model)"}
    for sweep in MEASURE_X:
        rows = res[f"measure_vs_{sweep}"]
        L += [titles[sweep], ""]
        L += _table(measure_header, [[
            str(r["tokens"]), str(r["layers"]), str(r["width"]), str(r["d_mlp"]), _g(r["n_params"] / 1e6),
            _g(_best(r["forward_s"])), _g(_best(r["measure_loop_s"])),
            _f(_best(r["measure_loop_s"]) / _best(r["forward_s"])), _g(_best(r["measure_wall_s"])),
            f"{r['tokens'] / _best(r['measure_loop_s']):.0f}", _mib(r["rss_after_imports_mb"]),
            _mib(r["rss_after_load_mb"]),
            _mib(r["peak_forward_phase_mb"]), _mib(r["peak_measure_phase_mb"]), _mib(peak_rss(r))] for r in rows])
        r0, sites = rows[0], "-".join(map(str, sorted({r["n_sites"] for r in rows})))
        L += ["", f"GPT-2, ReLU MLP, random init; max_length {r0['max_length']}, batch {r0['batch_size']}, "
                  f"{sites} probed sites (`mlp_post`, one per layer). \"measure loop\" "
                  "is measure's batch loop with the probes attached (`info['seconds']`), \"measure() total\" the "
                  "whole call (reading and tokenizing the corpus, windows, loop, rows).", ""]
    spec_header = ["shape", "matrices", "file (MiB)", "plain SVD (s)", "analyze_checkpoint (s)", "overhead (x)",
                   "after imports (MiB)", "peak, plain SVD (MiB)", "peak, analyze (MiB)", "peak RSS (MiB)"]
    spec_titles = {"size": "## spectrum vs matrix size (one matrix per file)",
                   "count": f"## spectrum vs number of matrices ({p['spec_count_n']} x {p['spec_count_n']} each)"}
    for sweep in SPECTRUM_X:
        rows = res[f"spectrum_vs_{sweep}"]
        L += [spec_titles[sweep], ""]
        L += _table(spec_header, [[
            f"{r['rows']} x {r['cols']}", str(r["count"]), _g(r["file_mb"]), _g(_best(r["svd_s"])),
            _g(_best(r["analyze_s"])), _f(_best(r["analyze_s"]) / _best(r["svd_s"])),
            _mib(r["rss_after_imports_mb"]), _mib(r["peak_svd_phase_mb"]), _mib(r["peak_analyze_phase_mb"]),
            _mib(peak_rss(r))] for r in rows])
        L += ["", "Random float32 matrices (std 0.02) in one safetensors file; \"plain SVD\" reads each and takes "
                  "its singular values in float64 (`numpy.linalg.svd(compute_uv=False)`), \"analyze_checkpoint\" "
                  "is the whole spectrum table (reading, singular values, power-law and Marchenko-Pastur fits, "
                  "every column).", ""]
    L += ["## Growth exponents", "",
          "Least-squares slope of log(time) against log(x) over the points above (1 = linear, 2 = quadratic). "
          "Memory: slope of the measure-phase (analyze-phase) peak RSS above the after-imports RSS (model and run "
          "together), and of the measure-phase peak above the after-load RSS (what the run adds to the loaded "
          "model).", ""]
    L += _table(["sweep", "x", "baseline time (forward / plain SVD)", "probed time (measure loop / analyze)",
                 "measure() total", "peak RSS above imports", "peak RSS above the loaded model",
                 "overhead range (x)"],
                [[e["sweep"], ", ".join(map(str, e["x"])), _f(e["forward"]), _f(e["probed"]), _f(e["total"]),
                  _f(e["memory"]), _f(e["memory_run"]), f"{min(e['overheads']):.2f} - {max(e['overheads']):.2f}"]
                 for e in res["exponents"]])
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="small sizes, one repeat (a smoke run, under 2 minutes on 2 cores)")
    g.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                   help="the tiniest sizes, two points per sweep (the test suite's smoke test)")
    ap.set_defaults(preset="default")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each variant (default: preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads in every child (default 1: "
                    "on a shared machine extra threads measure contention, not work; 0 = the libraries' default)")
    ap.add_argument("--workdir", default=None, help="keep the generated models, corpora and weights here")
    ap.add_argument("--in-process", action="store_true", help="run the configurations in this process (smoke "
                    "tests: no per-configuration peak RSS)")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--json", dest="json_path", default=None, help="write every measurement as JSON here")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res = run(args)
    md = markdown(res)
    print(md)
    if args.out:
        Path(args.out).write_text(md, encoding="utf-8")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        raise SystemExit(main())
