#!/usr/bin/env python
"""Demo: train the bundled ReLU model from scratch with ActsparseCallback and watch it happen.

The bundled ``tiny-relu-lm`` configuration (GPT-2, 4 layers, d_model 128, ReLU MLP of 512, its BPE
tokenizer) is re-initialised and trained with ``transformers.Trainer`` on the bundled training text
for a short run on CPU, with the callback measuring activation sparsity, linear-input spikes,
weight drift and gradient sparsity densely early (steps 1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 40) and
every ``--every`` steps after. Calibration: the bundled held-out text (``calibration.txt``), the same
batches at every step. Then it draws the two figures of the README's "Training callbacks" section
(``docs/figures/training_sparsity.png``, ``docs/figures/training_drift.png``) from the callback's own
long tables: activation sparsity per layer jumping early and where it settles, and the mean weight /
% negative weights of the linear layers drifting (Bug-or-Feature^2).

The README's figures come from the defaults (160 steps of 8 x 128 tokens, logs at 18 steps, 2048
calibration tokens): about 5-6 minutes on 2 idle CPU cores (1.5 s a step, about 5 s a log); 20
minutes on the shared 2-core machine they were made on (load average about 10).

    HF_HUB_OFFLINE=1 python examples/train_with_callback.py [--steps 160] [--every 20] [--out runs/demo]
        [--figures docs/figures] [--figures-only]

Outputs: ``OUT/actsparse/trends/`` (a ``track``-shaped folder: ``actsparse report OUT/actsparse/trends
-o report/``), ``OUT/actsparse/tensorboard/`` (``tensorboard --logdir OUT/actsparse/tensorboard``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

EARLY = (1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 40)


def train_windows(tok, length: int, n: int, seed: int):
    """``n`` random windows of ``length`` tokens from the bundled training text."""
    from probes.embedded import TRAIN_CORPUS

    ids = torch.tensor(tok(TRAIN_CORPUS.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length - 1, (n,), generator=g)
    return [{"input_ids": ids[s: s + length], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": ids[s: s + length]} for s in starts.tolist()]


def figures(trends: Path, out: Path) -> list[str]:
    from reports.figures import panel_size, pyplot, save_into

    sp = pd.read_parquet(trends / "trend_sparsity.parquet")
    dr = pd.read_parquet(trends / "trend_drift.parquet")
    plt = pyplot()
    files = []
    # 1. activation sparsity per layer
    fig, ax = plt.subplots(1, 1, figsize=panel_size(1, extra_width=0.8))
    cmap = plt.get_cmap("viridis")
    layers = sorted(sp["layer"].unique())
    for j, layer in enumerate(layers):
        h = sp[sp["layer"] == layer].sort_values("step")
        ax.plot(h["step"], 100 * h["zero_frac"], "o-", ms=3, color=cmap(j / max(1, len(layers) - 1)),
                label=f"layer {int(layer)}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, sp["step"].max() * 1.15)
    ax.set_xlabel("training step (symlog)")
    ax.set_ylabel("% of MLP activations exactly 0 (mlp_post)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title("tiny-relu-lm from scratch: activation sparsity per layer")
    fig.tight_layout()
    files += save_into(fig, out, "training_sparsity")
    # 2. weight drift of the linear layers
    fig, axes = plt.subplots(1, 2, figsize=panel_size(2, extra_width=1.0))
    roles = ["all_linear"] + sorted(r for r in dr["role"].unique() if r != "all_linear")
    for j, role in enumerate(roles):
        h = dr[dr["role"] == role].sort_values("step")
        style = dict(color="k", lw=2.0) if role == "all_linear" else dict(color=f"C{j - 1}", lw=1.2)
        axes[0].plot(h["step"], h["mean_weighted"], "o-", ms=3, label=role, **style)
        axes[1].plot(h["step"], h["neg_pct_weighted"], "o-", ms=3, label=role, **style)
    axes[0].axhline(0, color="0.5", lw=0.8)
    axes[0].set_ylabel("mean weight (element-weighted)")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[1].axhline(50, color="0.5", lw=0.8, ls=":")
    axes[1].set_ylabel("% negative weights")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, dr["step"].max() * 1.15)
        ax.set_xlabel("training step (symlog)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("tiny-relu-lm from scratch: weight drift of the linear layers")
    fig.tight_layout()
    files += save_into(fig, out, "training_drift")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/train-with-callback"))
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    ap.add_argument("--figures-only", action="store_true", help="redraw the figures from OUT without training")
    a = ap.parse_args()
    if a.figures_only:
        print("wrote", ", ".join(str(a.figures / f) for f in figures(a.out / "actsparse" / "trends", a.figures)))
        return 0
    import transformers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from probes.embedded import DEFAULT_CHECKPOINT
    from probes.training import ActsparseCallback

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(DEFAULT_CHECKPOINT))  # fresh init, the bundled shape
    args = TrainingArguments(output_dir=str(a.out / "trainer"), max_steps=a.steps,
                             per_device_train_batch_size=a.batch_size, learning_rate=3e-3, warmup_steps=10,
                             lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
                             save_strategy="no", logging_steps=50, report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=1234, disable_tqdm=True)
    cb = ActsparseCallback(output_dir=str(a.out / "actsparse"), every_n_steps=a.every,
                           also_at_steps=[s for s in EARLY if s < a.steps], max_tokens=2048, max_length=a.max_length)
    Trainer(model=model, args=args, train_dataset=train_windows(tok, a.max_length, a.steps * a.batch_size, 1234),
            processing_class=tok, callbacks=[cb]).train()
    m = cb.monitor
    print(f"trained {a.steps} steps in {time.time() - t0:.0f}s; callback seconds {m.timing}; disabled {m.disabled}")
    files = figures(a.out / "actsparse" / "trends", a.figures)
    tr = pd.read_parquet(a.out / "actsparse" / "trends" / "trends.parquet")
    cols = [c for c in ("step", "zero_frac_mean_mlp_post", "weight_mean_linear", "neg_pct_linear",
                        "deriv_sparsity_mean_mlp_post") if c in tr]
    print(tr[cols].to_string(index=False))
    print("wrote", ", ".join(str(a.figures / f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
