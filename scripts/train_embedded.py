#!/usr/bin/env python
"""Train the embedded default checkpoint: a tiny GPT-2 with a ReLU MLP, on CPU, offline.

The project's first README command has to measure something real without a download, so
``probes/data/tiny-relu-lm`` is a model we train ourselves on ``probes/data/corpus_train.txt``
(built by ``scripts/build_corpus.py``). The ReLU activation is deliberate: it gives exact
zeros in the MLP, which is what activation-sparsity measurements are about. The model is
small enough (~1.1M parameters, ~4.4 MB in float32) to ship inside the ``probes`` package.

Steps:
  1. a byte-level BPE tokenizer (``tokenizers``), ``<|endoftext|>`` as bos/eos/pad/unk like
     GPT-2, saved as a ``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it offline;
  2. a ``GPT2LMHeadModel`` trained with AdamW, linear warmup then cosine decay, on 256-token
     windows of the concatenated documents (each followed by ``<|endoftext|>``);
  3. held-out loss/perplexity on ``probes/data/calibration.txt``, then ``save_pretrained``
     (safetensors, float32) and a ``TRAINING.md`` recording how it was made.

Everything is seeded; with the same CPU thread count and library versions the run is
reproducible. The default step count was chosen to take about 8-9 minutes on 2 CPU cores.

Usage: HF_HUB_OFFLINE=1 python scripts/train_embedded.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Never reach the network, whatever the caller's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "probes" / "data"
EOT = "<|endoftext|>"

SEED = 1234
VOCAB = 2048
CONTEXT = 256
BATCH = 32
PEAK_LR = 3e-3
MIN_LR_FRAC = 0.1  # cosine decays to 10% of peak rather than 0: the last steps still learn
WARMUP_FRAC = 0.05
WEIGHT_DECAY = 0.1
# The corpus is small (~0.3M tokens) and seen many times, so residual/embedding dropout limits
# overfitting. Attention dropout is off: it pushes SDPA off its fused CPU kernel and about
# doubles the step time, which costs more than it helps within a fixed time budget.
DROPOUT = 0.1
ATTN_DROPOUT = 0.0
DEFAULT_STEPS = 650
SNAPSHOT_STEPS = (50, 100, 200, 400)  # training-run checkpoints for the `actsparse track` demo


def read_documents(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    # GPT-2 style: bytes mapped to printable characters, so any input encodes without <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=CONTEXT,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one 1-D tensor, each document followed by <|endoftext|>."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def epoch_windows(stream: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Non-overlapping windows from a random phase, shuffled: every token once per epoch."""
    phase = int(torch.randint(0, CONTEXT, (1,), generator=gen))
    n = (len(stream) - phase) // CONTEXT
    windows = stream[phase: phase + n * CONTEXT].view(n, CONTEXT)
    return windows[torch.randperm(n, generator=gen)]


def batches(stream: torch.Tensor, gen: torch.Generator):
    while True:
        windows = epoch_windows(stream, gen)
        for i in range(0, len(windows) - BATCH + 1, BATCH):  # drop the ragged last batch
            yield windows[i: i + BATCH]


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, stream: torch.Tensor, max_tokens: int | None = None) -> float:
    """Token-weighted mean next-token loss over consecutive non-overlapping windows."""
    model.eval()
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // CONTEXT
    windows = stream[: n * CONTEXT].view(n, CONTEXT)
    total = 0.0
    for i in range(0, n, 64):
        chunk = windows[i: i + 64]
        # Every window has CONTEXT-1 targets, so a plain mean of window means is token-weighted.
        total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
    model.train()
    return total / n


def lr_at(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


def sha256_short(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_snapshot(model, tokenizer, folder: Path) -> None:
    """A float16 copy of the weights mid-training (no RNG use, so the final model is unchanged)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != tied}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_step(folder, int(folder.name.split("-")[-1]))


def write_step(folder: Path, step: int) -> None:
    """``trainer_state.json`` with the step, as Hugging Face's Trainer writes it (read by ``actsparse track``)."""
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: only at the end)")
    ap.add_argument("--out", type=Path, default=DATA / "tiny-relu-lm")
    ap.add_argument("--snapshot-steps", type=int, nargs="*", default=list(SNAPSHOT_STEPS),
                    help="also save float16 snapshots ckpt-N at these steps (for `actsparse track`)")
    ap.add_argument("--snapshot-dir", type=Path, default=DATA / "tiny-relu-lm-steps")
    args = ap.parse_args()

    # Whole documents are tokenized before windowing and nothing is padded, so the length and
    # attention-mask warnings transformers would print do not apply here.
    transformers.logging.set_verbosity_error()
    t0 = time.time()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)

    train_path, cal_path = DATA / "corpus_train.txt", DATA / "calibration.txt"
    if not train_path.exists() or not cal_path.exists():
        sys.exit(f"{train_path} or {cal_path} is missing -- run: python scripts/build_corpus.py")
    train_docs, cal_docs = read_documents(train_path), read_documents(cal_path)

    tokenizer = train_tokenizer(train_docs)
    train_ids, cal_ids = token_stream(tokenizer, train_docs), token_stream(tokenizer, cal_docs)
    print(f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids):,} tokens, "
          f"calibration {len(cal_ids):,} tokens ({time.time() - t0:.1f}s)", flush=True)

    eot = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=128, n_layer=4, n_head=4, n_inner=512,
        activation_function="relu", tie_word_embeddings=True,
        resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=ATTN_DROPOUT,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once

    # Decay matrices only; biases, LayerNorm gains and position embeddings are left alone.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95),
    )

    model.train()
    recent: list[float] = []
    t_train = time.time()
    data = batches(train_ids, gen)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if step + 1 in args.snapshot_steps:
            save_snapshot(model, tokenizer, args.snapshot_dir / f"ckpt-{step + 1}")
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            msg = f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.3f} " \
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t_train:.0f}s"
            if args.eval_every and (step + 1) % args.eval_every == 0:
                msg += f" | held-out {mean_loss(model, cal_ids):.3f}"
            print(msg, flush=True)
    train_seconds = time.time() - t_train

    # Same number of tokens from each corpus, dropout off: a like-for-like generalisation gap.
    train_loss = mean_loss(model, train_ids, max_tokens=len(cal_ids))
    cal_loss = mean_loss(model, cal_ids)
    print(f"final: train loss {train_loss:.3f} (ppl {math.exp(train_loss):.1f}), "
          f"calibration loss {cal_loss:.3f} (ppl {math.exp(cal_loss):.1f}), uniform ppl {len(tokenizer)}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    # transformers 5 always writes safetensors; weights are float32 as trained.
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    write_step(args.out, args.steps)
    total_seconds = time.time() - t0
    write_training_md(args.out, dict(
        steps=args.steps, threads=args.threads, n_params=n_params, vocab=len(tokenizer),
        train_tokens=len(train_ids), cal_tokens=len(cal_ids),
        train_loss=train_loss, cal_loss=cal_loss, last_batch_loss=sum(recent) / len(recent),
        train_seconds=train_seconds, total_seconds=total_seconds,
        train_sha=sha256_short(train_path), cal_sha=sha256_short(cal_path),
    ))
    print(f"saved {args.out} ({total_seconds:.0f}s total)")


def write_training_md(out: Path, r: dict) -> None:
    text = f"""# tiny-relu-lm

A tiny GPT-2 (`GPT2LMHeadModel`, ReLU MLP) trained from scratch by this project as the
default checkpoint for `actsparse`. It is meant to exhibit real, exact-zero MLP activation
sparsity on a model that has actually learned something, not to be a useful language model.

## How it was made

```
python scripts/build_corpus.py
HF_HUB_OFFLINE=1 python scripts/train_embedded.py --steps {r['steps']}
```

- Machine: {platform.machine()} CPU, {r['threads']} torch threads, no GPU
- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}
- Seed: {SEED} (`torch.manual_seed`, a seeded `torch.Generator` for data order), deterministic algorithms on
- Tokenizer: byte-level BPE, vocab {r['vocab']}, `<|endoftext|>` (id 0) as bos/eos/pad/unk
- Model: n_layer 4, n_head 4, n_embd 128, n_inner 512, n_positions {CONTEXT}, activation relu,
  tied input/output embeddings, residual/embedding dropout {DROPOUT}, attention dropout {ATTN_DROPOUT}; {r['n_params']:,} parameters, saved in float32
- Training: {r['steps']} steps of {BATCH} x {CONTEXT}-token windows ({r['steps'] * BATCH * CONTEXT:,} tokens,
  {r['steps'] * BATCH * CONTEXT / r['train_tokens']:.1f} passes over {r['train_tokens']:,} training tokens);
  AdamW (betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices), peak lr {PEAK_LR}, {WARMUP_FRAC:.0%} linear warmup,
  cosine decay to {MIN_LR_FRAC:.0%} of peak, gradient clipping 1.0
- Wall time: {r['train_seconds']:.0f} s training, {r['total_seconds']:.0f} s in all (tokenizer, evaluation, saving)

## Results

Losses are mean next-token cross-entropy (nats) over non-overlapping {CONTEXT}-token windows,
dropout off.

| data | tokens | loss | perplexity |
|---|---|---|---|
| corpus_train.txt (first {r['cal_tokens']:,} tokens) | {r['cal_tokens']:,} | {r['train_loss']:.3f} | {math.exp(r['train_loss']):.1f} |
| calibration.txt (held out) | {r['cal_tokens']:,} | {r['cal_loss']:.3f} | {math.exp(r['cal_loss']):.1f} |

Uniform-guess perplexity would be {r['vocab']}. Mean training-batch loss over the last 50 steps
(dropout on): {r['last_batch_loss']:.3f}.

## Data and license

`corpus_train.txt` (sha256 {r['train_sha']}...) and `calibration.txt` (sha256 {r['cal_sha']}...)
are docstrings of the CPython {platform.python_version()} standard library, held out by top-level package; see
`scripts/build_corpus.py`. That text is Copyright (c) 2001-present Python Software Foundation,
All Rights Reserved, and is used and redistributed under the PSF License Agreement
(https://docs.python.org/3/license.html). The model weights are derived from it.
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
