"""The training callbacks (probes.training): live numbers equal the after-the-fact commands.

A tiny GPT-2 trains a few steps with transformers.Trainer and ActsparseCallback on CPU; the
checkpoint saved at a logged step, measured by ``actsparse measure`` / ``actsparse drift`` on the same
calibration batches, gives the numbers the callback logged (float tolerance). TensorBoard event
files are read back with tensorboard.backend.event_processing. The gradient sparsity taken from a
training step's own backward equals ``probes.gradients.measure_gradients`` on the same batch (no
dropout, mean loss over the batch's targets: the reference protocol).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(40)]
MAXLEN = 16
CAL = dict(max_tokens=192, max_length=MAXLEN, batch_size=4)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _dataset(tok, n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (MAXLEN,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, word_lm):
    """4 Trainer steps of a tiny ReLU GPT-2 with the callback every 2 steps; checkpoints at steps 2 and 4."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer, TrainingArguments

    from probes.training import ActsparseCallback

    root = tmp_path_factory.mktemp("train")
    init = word_lm.save_gpt2(root / "init", WORDS, max_len=MAXLEN, n_layer=2, n_embd=16, n_inner=64, seed=3)
    corpus = word_lm.corpus(root / "cal.txt", WORDS, 400, seed=5)
    tok = AutoTokenizer.from_pretrained(init)
    model = GPT2LMHeadModel.from_pretrained(init)
    before = _files(root)
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-3, save_strategy="steps", save_steps=2, logging_steps=100,
                             report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    cb = ActsparseCallback(output_dir=str(root / "acts"), every_n_steps=2, data=str(corpus), **CAL)
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=_dataset(tok), processing_class=tok, callbacks=[cb]).train()
    new = _files(root) - before
    return {"root": root, "corpus": corpus, "cb": cb, "new": new,
            "warnings": [w for w in wlist if "actsparse" in str(w.message)]}


def _table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(folder / f"{name}.parquet")


def test_logged_sparsity_equals_actsparse_measure_on_the_checkpoint(trained, tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    assert not trained["warnings"], [str(w.message) for w in trained["warnings"]]
    live = _table(trained["root"] / "acts" / "trends", "trend_sparsity")
    assert sorted(live["step"].unique()) == [0, 2, 4]
    out = tmp_path / "m"
    r = CliRunner().invoke(app, ["measure", str(trained["root"] / "run" / "checkpoint-2"), "--data",
                                 str(trained["corpus"]), "--max-tokens", "192", "--max-length", str(MAXLEN),
                                 "--batch-size", "4", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    ref = _table(out, "sparsity").set_index("canonical_name")
    got = live[live["step"] == 2].set_index("canonical_name")
    assert list(got.index) == list(ref.index) and len(ref) == 2  # mlp_post of both layers
    for col in ("zero_frac", "near_zero_frac@0.001", "nonzero_pct_per_token", "dead_frac", "n_tokens"):
        np.testing.assert_allclose(got[col].astype(float), ref.loc[got.index, col].astype(float), rtol=1e-6,
                                   atol=1e-9, err_msg=col)
    # the numbers moved between steps: the comparison above is not of a constant
    s0 = live[live["step"] == 0].set_index("canonical_name")["zero_frac"]
    assert not np.allclose(s0.values, got["zero_frac"].values)


def test_logged_drift_equals_actsparse_drift_on_the_checkpoint(trained, tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    live = _table(trained["root"] / "acts" / "trends", "trend_weights")
    out = tmp_path / "d"
    r = CliRunner().invoke(app, ["drift", str(trained["root"] / "run" / "checkpoint-4"), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    ref = _table(out, "drift").set_index("name")
    got = live[live["step"] == 4].set_index("name")
    assert set(got.index) == set(ref.index) and len(got) >= 9
    for col in ("mean", "neg_pct", "std", "extreme_threshold", "extreme_count", "max_abs"):
        np.testing.assert_allclose(got[col].astype(float), ref.loc[got.index, col].astype(float), rtol=1e-6,
                                   err_msg=col)
    dr = _table(trained["root"] / "acts" / "trends", "trend_drift")
    assert set(dr["role"]) >= {"all_linear", "mlp_up", "mlp_down", "attn"}


def test_tensorboard_series_read_back(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained["root"] / "acts" / "tensorboard"), size_guidance={"scalars": 0,
                                                                                      "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    live = _table(trained["root"] / "acts" / "trends", "trend_sparsity")
    layer1 = "actsparse/sparsity/mlp_post/zero_frac/layer_01"
    assert layer1 in tags["scalars"] and "actsparse/sparsity/mlp_post/zero_frac/mean" in tags["scalars"]
    ev = ea.Scalars(layer1)
    assert [e.step for e in ev] == [0, 2, 4]
    want = live[live["layer"] == 1].sort_values("step")["zero_frac"].to_numpy(float)
    np.testing.assert_allclose([e.value for e in ev], want, rtol=1e-6)
    assert "actsparse/drift/all_linear/neg_pct_weighted" in tags["scalars"]
    assert [e.step for e in ea.Scalars("actsparse/grad/mlp_post/deriv_sparsity/mean")] == [2, 4]
    assert any(t.startswith("actsparse/firing_rate/") for t in tags["histograms"])


def test_outputs_stay_in_the_chosen_folder_and_report_reads_them(trained, tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    outside = {p for p in trained["new"] if not p.startswith(("acts", "run"))}
    assert not outside, outside
    trends = trained["root"] / "acts" / "trends"
    man = json.loads((trends / "manifest.json").read_text())
    assert man["command"] == "track" and man["track"]["steps"] == [0, 2, 4]
    gb = man["track"]["gradients"]["grad_batches"]
    assert set(gb) == {"2", "4"} and gb["2"]["n_sequences"] == 4 and "optimizer step 2" in gb["2"]["what"]
    assert (trends / "trend_sparsity.png").is_file() and (trends / "trend_gradients.png").is_file()
    tr = _table(trends, "trends")
    assert list(tr["step"]) == [0, 2, 4] and "deriv_sparsity_mean_mlp_post" in tr
    sk = _table(trends, "trend_spikes")  # default spikes="down": the inputs of the MLP down projections
    assert sk["is_down_proj"].all() and sorted(sk["module_path"].unique()) == ["transformer.h.0.mlp.c_proj",
                                                                               "transformer.h.1.mlp.c_proj"]
    assert (sk["spike_max"] > 0).all() and sorted(sk["step"].unique()) == [0, 2, 4]
    r = CliRunner().invoke(app, ["report", str(trends), "-o", str(tmp_path / "rep"), "-q"])
    assert r.exit_code == 0, r.output


def test_grad_sparsity_of_the_step_backward_equals_measure_gradients(tmp_path, word_lm):
    """Hooks on a hand-written training step (dropout 0, mean loss over the batch's targets) give the
    numbers of ``actsparse grad`` on the same batch; after the step no hook is left on the model."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from probes.data import DataOptions, token_windows
    from probes.gradients import GradOptions, measure_gradients
    from probes.loading import load_checkpoint
    from probes.loss import cross_entropy
    from probes.training import TrainingMonitor

    def no_dropout(m):
        m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0

    folder = word_lm.save_gpt2(tmp_path / "m", WORDS, max_len=MAXLEN, n_layer=2, n_embd=16, n_inner=64,
                               edit=no_dropout, seed=4)
    corpus = word_lm.corpus(tmp_path / "c.txt", WORDS, 200, seed=2)
    lm = load_checkpoint(str(folder), device="cpu")
    ref = measure_gradients(lm, GradOptions(data=str(corpus), max_tokens=64, max_length=MAXLEN, batch_size=4,
                                            spikes=False))
    tok = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder).train()
    batch = next(iter(token_windows(lm, DataOptions(data=str(corpus), max_tokens=64, max_length=MAXLEN,
                                                    batch_size=4), causal=True).batches()))
    assert bool(batch.count_mask.all())  # 4 whole windows: attention_mask (what a training step counts) = count_mask
    mon = TrainingMonitor(output_dir=str(tmp_path / "acts"), every_n_steps=1, analyses=("grad",),
                          tensorboard=False, log_at_start=False)
    mon.setup(model, tok)
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    mon.begin_step(model, 1)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    cross_entropy(out.logits, batch.labels, "mean").backward()
    mon.end_backward()
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == n_hooks
    mon.after_step(model, 1)
    mon.close()
    got = pd.DataFrame(mon.rows["grad"]).set_index("canonical_name")
    want = ref.table().set_index("canonical_name")
    assert len(got) == len(want) == 2
    for col in ("deriv_sparsity", "eff_grad_sparsity@1e-06", "eff_grad_sparsity@0.001", "eta_l1_per_token",
                "n_grad_tokens"):
        np.testing.assert_allclose(got[col].astype(float), want.loc[got.index, col].astype(float), rtol=1e-5,
                                   err_msg=col)


def test_a_failing_analysis_warns_once_and_training_goes_on(tmp_path, word_lm, monkeypatch):
    from transformers import GPT2LMHeadModel

    import probes.drift
    from probes.training import ActsparseTrainingWarning, TrainingMonitor

    folder = word_lm.save_gpt2(tmp_path / "m", WORDS, max_len=MAXLEN, n_layer=1, n_embd=16, seed=1)
    model = GPT2LMHeadModel.from_pretrained(folder)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(probes.drift, "weight_stats", boom)
    mon = TrainingMonitor(output_dir=str(tmp_path / "acts"), every_n_steps=1, analyses=("drift", "grad"),
                          tensorboard=False)
    mon.setup(model)
    ids = torch.randint(2, 40, (2, MAXLEN))
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        mon.after_step(model, 0)
        for step in (1, 2, 3):
            mon.begin_step(model, step)
            model(input_ids=ids, labels=ids).loss.backward()
            mon.end_backward()
            mon.after_step(model, step)
        mon.close()
    ours = [w for w in wl if issubclass(w.category, ActsparseTrainingWarning)]
    assert len(ours) == 1 and "drift" in str(ours[0].message) and "boom" in str(ours[0].message)
    assert len(calls) == 1  # disabled after the first failure
    man = json.loads((tmp_path / "acts" / "trends" / "manifest.json").read_text())
    assert "drift" in man["track"]["disabled"] and man["track"]["steps"] == [0, 1, 2, 3]
    assert sorted(pd.read_parquet(tmp_path / "acts" / "trends" / "trend_gradients.parquet")["step"].unique()) == [1, 2, 3]


def test_calibration_batches_given_as_dicts_equal_the_corpus_route(tmp_path, word_lm):
    """``calibration=<batches>`` (e.g. ``trainer.get_eval_dataloader()``): dicts with input_ids and
    attention_mask; padding never counts. The corpus windows given as such dicts give the corpus numbers."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from probes.data import DataOptions, token_windows
    from probes.loading import load_checkpoint
    from probes.training import TrainingMonitor

    folder = word_lm.save_gpt2(tmp_path / "m", WORDS, max_len=MAXLEN + 3, n_layer=2, n_embd=16, seed=6)
    corpus = word_lm.corpus(tmp_path / "c.txt", WORDS, 150, seed=7)
    tok = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder)
    # 96 tokens: 6 whole windows of 16, every token counted
    td = token_windows(load_checkpoint(str(folder), device="cpu"),
                       DataOptions(data=str(corpus), max_tokens=96, max_length=MAXLEN, batch_size=3), causal=True)
    dicts = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in td.batches()]
    # the same batches right-padded by 3 positions (attention_mask 0): padding must not count
    padded = [{"input_ids": torch.nn.functional.pad(d["input_ids"], (0, 3), value=0),
               "attention_mask": torch.nn.functional.pad(d["attention_mask"], (0, 3), value=0)} for d in dicts]
    rows = {}
    for name, cal in (("corpus", "corpus"), ("given", dicts), ("padded", padded)):
        mon = TrainingMonitor(output_dir=str(tmp_path / name), analyses=("sparsity",), calibration=cal,
                              data=str(corpus), max_tokens=96, max_length=MAXLEN, batch_size=3, tensorboard=False)
        mon.setup(model, tok)
        mon.after_step(model, 0)
        rows[name] = pd.DataFrame(mon.rows["sparsity"]).set_index("canonical_name")
    for name in ("given", "padded"):
        assert (rows[name]["n_tokens"] == td.n_counted).all() and td.n_counted == 96
        for col in ("zero_frac", "dead_frac", "nonzero_pct_per_token"):
            np.testing.assert_allclose(rows[name][col], rows["corpus"][col], rtol=1e-6, err_msg=(name, col))


def test_bad_options_are_one_line_errors():
    from probes.errors import ActsparseError
    from probes.training import TrainingMonitor

    with pytest.raises(ActsparseError, match="unknown analysis 'sparsty'.*sparsity"):
        TrainingMonitor(analyses=("sparsty",))
    with pytest.raises(ActsparseError, match="every_n_steps"):
        TrainingMonitor(every_n_steps=0)
    with pytest.raises(ActsparseError, match="calibration='corpus'"):
        TrainingMonitor(calibration="train")


def test_lightning_is_imported_only_for_its_callback(monkeypatch):
    import subprocess
    import sys

    code = "import sys, probes.training; print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.stdout.split() == ["False", "False"], r.stderr[-2000:]
    import probes.training as tr
    from probes.errors import ActsparseError

    monkeypatch.setattr(tr, "_LIGHTNING_CLASS", [])
    monkeypatch.setattr(tr, "_lightning_callback_base", lambda: None)
    with pytest.raises(ActsparseError, match=r"needs Lightning.*actsparse\[lightning\]"):
        tr.ActsparseLightningCallback  # noqa: B018
