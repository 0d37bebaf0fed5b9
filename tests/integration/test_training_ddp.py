"""The training callback under DDP (torchrun, 2 CPU ranks, gloo): rank 0 alone writes, probe states
are merged over the ranks, and the merged numbers equal the single-process ones.

One torchrun start (two torch + transformers imports: the slow part on a small machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

WORDS = [f"w{i}" for i in range(40)]
MAXLEN = 16
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--monitor-interval", "0.1"]

SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer, TrainingArguments
    from probes.training import ActsparseCallback
    init, corpus, out, run = sys.argv[1:5]
    tok = AutoTokenizer.from_pretrained(init)
    model = GPT2LMHeadModel.from_pretrained(init).train()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(2, 40, (16,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(output_dir=run, max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
                             save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    cb = ActsparseCallback(output_dir=out, every_n_steps=1, data=corpus, max_tokens=192, max_length=16,
                           batch_size=4)
    Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb]).train()
    # a clean exit: without it gloo's threads can outlive the interpreter and abort a rank at exit
    # (SIGABRT "terminate called without an active exception"; pytorch/pytorch#179291), seen on a loaded machine
    torch.distributed.destroy_process_group()
""")


def test_ddp_rank0_writes_merged_probe_states(tmp_path, word_lm):
    from probes.loading import load_checkpoint
    from probes.measure import MeasureOptions, measure

    init = word_lm.save_gpt2(tmp_path / "init", WORDS, max_len=MAXLEN, n_layer=2, n_embd=16, n_inner=64, seed=3)
    corpus = word_lm.corpus(tmp_path / "cal.txt", WORDS, 400, seed=5)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "acts"
    r = subprocess.run([*TORCHRUN, str(script), str(init), str(corpus), str(out), str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "actsparse:" not in r.stderr  # no analysis failed on any rank
    man = json.loads((out / "trends" / "manifest.json").read_text())["track"]
    assert man["world_size"] == 2 and man["steps"] == [0, 1, 2] and not man["disabled"]
    # the training micro-batches of both ranks (4 sequences each) are in the merged gradient probes
    assert man["gradients"]["grad_batches"]["1"]["n_sequences"] == 8
    gr = pd.read_parquet(out / "trends" / "trend_gradients.parquet")
    assert (gr["n_grad_tokens"] == 8 * MAXLEN).all()
    # rank 0 alone wrote: one TensorBoard event file, nothing else beside trends/ and tensorboard/
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert {p.name for p in out.iterdir()} == {"trends", "tensorboard"}
    # step 0 (before any update): the calibration batches were split over the ranks and merged, and
    # equal one process measuring all of them on the same model
    live = pd.read_parquet(out / "trends" / "trend_sparsity.parquet")
    ref = measure(load_checkpoint(str(init), device="cpu"),
                  MeasureOptions(data=str(corpus), max_tokens=192, max_length=MAXLEN, batch_size=4)).table()
    got = live[live["step"] == 0].set_index("canonical_name")
    ref = ref.set_index("canonical_name")
    for col in ("n_tokens", "zero_frac", "dead_frac", "nonzero_pct_per_token"):
        np.testing.assert_allclose(got[col].astype(float), ref.loc[got.index, col].astype(float), rtol=1e-9,
                                   err_msg=col)
