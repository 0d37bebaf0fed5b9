#!/usr/bin/env python
"""Training-callback overhead: the same transformers.Trainer run with and without ActsparseCallback.

Target (issue 18): at the default logging interval (``every_n_steps`` 100, calibration 2048 counted
tokens of the bundled corpus, analyses sparsity + spikes + drift + grad) the callback adds at most
5 % to the training time. Each model trains ``--steps`` optimizer steps from the same seed twice in
one process, once bare and once with the callback (``--order`` decides which first; ``--repeats``
alternates), and the ratio of wall-clock times is reported, with the callback's own accounting of
where its time went (``seconds`` in its manifest).

Models (both trained from a fresh init, on windows of the bundled training text, the bundled BPE
tokenizer, vocabulary 2048):
- ``embedded``: the bundled ReLU model's configuration (4 layers, d_model 128, d_ff 512);
- ``gpt2-small-shape``: GPT-2-small's width (d_model 768, d_ff 3072, 12 heads, gelu_new) at a
  reduced depth (``--layers``, default 2) and context (``--max-length`` 128): a full 12-layer
  GPT-2-small for hundreds of steps does not fit the time of a 2-core CPU run. Say so when quoting it.

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py [--models embedded,gpt2-small-shape] [--steps 200]
        [--every 100] [--batch-size 8] [--max-length 128] [--layers 2] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGET = 1.05


def _data(tok, n_windows: int, length: int):
    from probes.embedded import TRAIN_CORPUS

    text = TRAIN_CORPUS.read_text(encoding="utf-8")[: 400 * length * 8]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n_windows):
        s = (i * length) % max(1, len(ids) - length)
        w = torch.tensor(ids[s: s + length])
        out.append({"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()})
    return out


def _config(name: str, layers: int, length: int):
    from transformers import GPT2Config

    from probes.embedded import DEFAULT_CHECKPOINT

    if name == "embedded":
        cfg = GPT2Config.from_pretrained(DEFAULT_CHECKPOINT)
        cfg.n_positions = max(cfg.n_positions, length)
        return cfg
    if name == "gpt2-small-shape":
        return GPT2Config(vocab_size=2048, n_positions=max(length, 128), n_embd=768, n_inner=3072, n_head=12,
                          n_layer=layers, activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
                          pad_token_id=0)
    raise SystemExit(f"unknown model {name!r}: use embedded or gpt2-small-shape")


def run_once(name: str, with_cb: bool, a, tok, data, work: Path) -> dict:
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from probes.training import ActsparseCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config(name, a.layers, a.max_length))
    args = TrainingArguments(output_dir=str(work / "run"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             learning_rate=1e-3, save_strategy="no", logging_steps=10 ** 9, report_to=[],
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    cbs = []
    if with_cb:
        out = work / f"acts-{name}-{time.time_ns()}"
        cbs = [ActsparseCallback(output_dir=str(out), every_n_steps=a.every)]
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=cbs)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"seconds": sec, "cpu_seconds": cpu, "n_params": sum(p.numel() for p in model.parameters())}
    if with_cb:
        m = cbs[0].monitor
        res["callback_seconds"] = {k: round(v, 3) for k, v in m.timing.items()}
        res["logged_steps"] = sorted(m.steps)
        res["disabled"] = m.disabled
        res["calibration_tokens"] = m.info.get("calibration", {}).get("n_counted_tokens")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,gpt2-small-shape")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2, help="depth of gpt2-small-shape")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--order", choices=("bare-first", "callback-first"), default="bare-first")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from probes.embedded import DEFAULT_CHECKPOINT

    tok = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    data = _data(tok, a.steps * a.batch_size, a.max_length)
    print(f"# training-callback overhead: {a.steps} steps, batch {a.batch_size} x {a.max_length} tokens, "
          f"callback every {a.every} steps (default analyses, 2048 calibration tokens); torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, {platform.processor() or platform.machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="actsparse-bench-training-") as tmp:
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            runs = {"bare": [], "callback": []}
            order = [False, True] if a.order == "bare-first" else [True, False]
            for r in range(a.repeats):
                for with_cb in (order if r % 2 == 0 else order[::-1]):
                    res = run_once(name, with_cb, a, tok, data, Path(tmp))
                    runs["callback" if with_cb else "bare"].append(res)
            bare = min(x["seconds"] for x in runs["bare"])
            cb = min(x["seconds"] for x in runs["callback"])
            ratio = cb / bare
            cpu_ratio = min(x["cpu_seconds"] for x in runs["callback"]) / min(x["cpu_seconds"] for x in runs["bare"])
            last = runs["callback"][-1]
            # steady state at the default interval: the callback's own seconds per logged step (the step-0 log and
            # the end-of-run figures are one-off) over 100 bare training steps
            per_log = sum(v for k, v in last["callback_seconds"].items()) / max(1, len(last["logged_steps"]))
            projected = 1 + per_log / (100 * bare / a.steps)
            results.append({"model": name, "n_params": runs["bare"][0]["n_params"], "bare_s": bare, "callback_s": cb,
                            "ratio": ratio, "cpu_ratio": cpu_ratio, "seconds_per_log": per_log,
                            "projected_ratio_every_100": projected,
                            "target": TARGET, "meets_target": ratio <= TARGET,
                            "callback_seconds": last["callback_seconds"], "logged_steps": last["logged_steps"],
                            "calibration_tokens": last["calibration_tokens"], "disabled": last["disabled"],
                            "runs": runs})
            print(f"{name:18s} params {runs['bare'][0]['n_params'] / 1e6:6.2f}M  bare {bare:7.1f}s  with callback "
                  f"{cb:7.1f}s  ratio {ratio:.3f} ({'meets' if ratio <= TARGET else 'MISSES'} <= {TARGET}), CPU-time ratio "
                  f"{cpu_ratio:.3f}; {per_log:.2f}s per logged step -> {projected:.3f} at every 100 steps (steady "
                  f"state); logged steps {last['logged_steps']}; callback time {last['callback_seconds']}")
    if a.json:
        text = json.dumps({"args": vars(a), "results": results}, indent=2)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
