#!/usr/bin/env python
"""PPL-p% search cost: the safeguarded secant search vs plain bisection, to the same tolerance.

One process, one model, one corpus, one calibration (dense) pass shared by both methods; each
method then searches from nothing (no cached sparse passes) for every target p. Reported per
method and p: c*, the achieved PPL ratio, full passes (the calibration pass + the method's
sparse passes) and wall time (the calibration pass's time + the method's). Target (issue 6):
<= 8 full passes at tol 1e-3.

Model and corpus: the project's embedded checkpoint and calibration corpus
(``probes.embedded``), or ``--checkpoint`` / ``--data``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_pplp.py [--p 1 --p 5 --p 10] [--tol 1e-3]
        [--checkpoint PATH] [--data CORPUS] [--max-tokens N] [--batch-size 8] [--threads N]
        [--order bisection,secant] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from probes import pplp as P  # noqa: E402
from probes.loading import load_checkpoint  # noqa: E402

TARGET_PASSES = 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded checkpoint")
    ap.add_argument("--data", default=None, help="default: the embedded calibration corpus")
    ap.add_argument("--p", type=float, action="append", help="target PPL increase in percent (repeatable; default 1)")
    ap.add_argument("--tol", type=float, default=P.DEFAULT_TOL)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--order", default="bisection,secant", help="methods, in the order they run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ps = args.p or [1.0]
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.checkpoint
    if ckpt is None:
        from probes.embedded import default_checkpoint

        ckpt = default_checkpoint()
    lm = load_checkpoint(ckpt, device="cpu" if not torch.cuda.is_available() else "auto")
    opts = P.DataOptions(data=args.data, batch_size=args.batch_size, max_length=args.max_length,
                         max_tokens=args.max_tokens)
    session = P.PplpSession(lm, opts)
    t0 = time.perf_counter()
    session.calibrate(cett=True)
    calib_s = time.perf_counter() - t0
    print(f"model {ckpt} ({sum(p.numel() for p in lm.model.parameters()):,} params, {lm.dtype}, {lm.device}), "
          f"corpus {session.corpus}: {session.n_tokens} counted tokens in {len(session.batches)} batches; "
          f"torch threads {torch.get_num_threads()}")
    print(f"calibration (dense + CETT grid) pass: {calib_s:.2f}s, dense PPL {2.718281828459045 ** session.dense.ce:.4f}")
    for w in session.warnings:
        print("WARNING:", w)

    results: dict[str, list[dict]] = {}
    for method in [m.strip() for m in args.order.split(",") if m.strip()]:
        session.forget_evaluations()
        rows = []
        total_sparse, total_s = 0, 0.0
        for p in ps:
            before = session.passes
            t = time.perf_counter()
            tg = session.search(p, method, args.tol)
            dt = time.perf_counter() - t
            n = session.passes - before
            total_sparse += n
            total_s += dt
            ev = tg.evaluation
            rows.append({"p_pct": p, "status": tg.status, "c_star": tg.c_star, "ratio": ev.ratio if ev else None,
                         "mean_sparsity": ev.mean_sparsity if ev else None, "sparse_passes": n,
                         "full_passes_from_scratch": 1 + n if p == ps[0] else None,
                         "search_seconds": round(dt, 3), "trace": tg.trace})
        results[method] = rows
        results[method + "_total"] = [{"full_passes": 1 + total_sparse, "seconds": round(calib_s + total_s, 3)}]

    print(f"\n{'method':10s} {'p %':>5s} {'status':>12s} {'c*':>9s} {'PPL ratio':>10s} {'sparsity %':>10s} "
          f"{'sparse':>6s} {'seconds':>8s}")
    for method in [k for k in results if not k.endswith("_total")]:
        for r in results[method]:
            c = f"{r['c_star']:.5f}" if r["c_star"] is not None else "-"
            ratio = f"{r['ratio']:.5f}" if r["ratio"] is not None else "-"
            sp = f"{100 * r['mean_sparsity']:.2f}" if r["mean_sparsity"] is not None else "-"
            print(f"{method:10s} {r['p_pct']:5g} {r['status']:>12s} {c:>9s} {ratio:>10s} {sp:>10s} "
                  f"{r['sparse_passes']:6d} {r['search_seconds']:8.2f}")
    print()
    summary = {}
    for method in [k for k in results if not k.endswith("_total")]:
        tot = results[method + "_total"][0]
        first = results[method][0]["full_passes_from_scratch"]
        summary[method] = {"full_passes_all_p": tot["full_passes"], "seconds_all_p": tot["seconds"],
                           "full_passes_first_p": first}
        print(f"{method:10s}: p={ps[0]:g} from scratch {first} full passes; all targets {tot['full_passes']} full "
              f"passes, {tot['seconds']:.2f}s (calibration pass included)")
    if "secant" in summary and "bisection" in summary:
        s, b = summary["secant"], summary["bisection"]
        print(f"secant / bisection: passes {s['full_passes_all_p']}/{b['full_passes_all_p']} = "
              f"{s['full_passes_all_p'] / b['full_passes_all_p']:.2f}, wall time {s['seconds_all_p']:.2f}s/"
              f"{b['seconds_all_p']:.2f}s = {s['seconds_all_p'] / b['seconds_all_p']:.2f}")
        ok = s["full_passes_first_p"] <= TARGET_PASSES
        print(f"target <= {TARGET_PASSES} full passes for p={ps[0]:g} at tol {args.tol:g}: "
              f"{'met' if ok else 'MISSED'} ({s['full_passes_first_p']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(ckpt), "n_tokens": session.n_tokens, "tol": args.tol,
                                               "p": ps, "calibration_seconds": calib_s, "threads":
                                               torch.get_num_threads(), "platform": platform.platform(),
                                               "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
