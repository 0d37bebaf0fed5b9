"""The Lightning callback (probes.training.ActsparseLightningCallback): same options, same outputs.

Skipped when Lightning is not installed (it is the optional extra ``actsparse[lightning]``).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

WORDS = [f"w{i}" for i in range(40)]
MAXLEN = 16


def lit_lm(L, model):
    """A LightningModule around ``model``. Lightning is imported by the test, not at module level: importing it
    takes ~1 s, which every xdist worker would pay while collecting, also the one that does not run this file."""

    class LitLM(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=5e-3)

    return LitLM(model)


# lightning's own pytree helper against newer torch (lightning/pytorch/utilities/_pytree.py), not ours
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_lightning_callback_logs_the_engine_numbers(tmp_path, word_lm):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from probes.loading import load_checkpoint
    from probes.measure import MeasureOptions, measure
    from probes.training import ActsparseLightningCallback

    folder = word_lm.save_gpt2(tmp_path / "m", WORDS, max_len=MAXLEN, n_layer=2, n_embd=16, n_inner=64, seed=2)
    corpus = word_lm.corpus(tmp_path / "c.txt", WORDS, 300, seed=3)
    tok = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 40, (MAXLEN,), generator=g), "attention_mask": torch.ones(MAXLEN,
                                                                                                     dtype=torch.long)}
            for _ in range(16)]
    cb = ActsparseLightningCallback(output_dir=str(tmp_path / "acts"), every_n_steps=2, tokenizer=tok,
                                    data=str(corpus), max_tokens=128, max_length=MAXLEN, batch_size=4)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "pl"))
    trainer.fit(lit_lm(L, model), DataLoader(data, batch_size=4))
    trends = tmp_path / "acts" / "trends"
    man = json.loads((trends / "manifest.json").read_text())
    assert man["track"]["steps"] == [0, 2, 4] and not man["track"]["disabled"]
    assert set(man["track"]["gradients"]["grad_batches"]) == {"2", "4"}
    live = pd.read_parquet(trends / "trend_sparsity.parquet")
    # the last logged step is the final model: the engine's measure on it gives the same rows
    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    ref = measure(load_checkpoint(str(tmp_path / "final"), device="cpu"),
                  MeasureOptions(data=str(corpus), max_tokens=128, max_length=MAXLEN, batch_size=4)).table()
    got = live[live["step"] == 4].set_index("canonical_name")
    ref = ref.set_index("canonical_name")
    np.testing.assert_allclose(got["zero_frac"], ref.loc[got.index, "zero_frac"], rtol=1e-6)
    gr = pd.read_parquet(trends / "trend_gradients.parquet")
    assert sorted(gr["step"].unique()) == [2, 4] and gr["deriv_sparsity"].between(0, 1).all()
    assert (gr["n_grad_tokens"] == 4 * MAXLEN).all()  # one micro-batch of 4 sequences per logged step
