"""The loss reduction of gradient sparsity (issue 14, item 1).

cdgyp/sparsity's ``EffectiveGradientSparsity`` (codes/modules/hooks.py) takes g from the backward pass
of the training loss, a MEAN over the batch's targets (T5: ``CrossEntropyLoss(ignore_index=-100)``), and
counts |eta| < tau with absolute tau. Checked here, independently of ``probes.gradients``:
- the default reduction is ``mean`` (API and CLI);
- the cross-entropy's gradient by hand: (softmax - onehot) / n for the mean, without / n for the sum;
- on a tiny GPT-2: eta(mean) == eta(sum) / (loss targets of THAT batch), batch by batch (the batches
  have different numbers of targets), and eta(mean) equals plain autograd of a mean cross-entropy;
- eff_grad_sparsity@tau and the eta norms follow from the rescaled eta; the manifest records the
  reduction and the targets per batch.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from probes import corpus as corpus_mod
from probes.gradients import GradOptions, measure_gradients
from probes.loading import load_checkpoint
from probes.loss import DEFAULT_REDUCTION, cross_entropy

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients of relu nets".split()
MAX_LEN = 12
BATCH = 3


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, word_lm):
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm):
    # 100 words: 9 windows of 12 -> batches of 3, 3, 3 windows with different target counts (the first
    # window has no prefix token to predict its first word)
    return str(word_lm.corpus(tmp_path_factory.mktemp("corpus") / "c.txt", WORDS, 100, seed=3))


def _batches(lm, corpus_path):
    docs = corpus_mod.tokenize_documents(corpus_mod.read_documents(corpus_path), lm.tokenizer)
    wins = corpus_mod.build_windows(docs, lm.tokenizer, MAX_LEN, causal=True)
    return list(corpus_mod.batches(wins, BATCH, lm.tokenizer.pad_token_id))


def test_default_reduction_is_mean():
    assert DEFAULT_REDUCTION == "mean" and GradOptions().loss_reduction == "mean"


def test_cross_entropy_gradient_by_hand():
    # 2 targets of 3 classes plus one ignored position; logits 0 -> softmax 1/3 everywhere.
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    labels = torch.tensor([[2, -100, 0]])
    for red, n in (("sum", 1), ("mean", 2)):
        loss = cross_entropy(logits, labels, red)
        assert float(loss.detach()) == pytest.approx(2 * math.log(3) / n, rel=1e-6)
        (g,) = torch.autograd.grad(loss, logits)
        want = torch.tensor([[[1 / 3, 1 / 3, -2 / 3], [0.0, 0.0, 0.0], [-2 / 3, 1 / 3, 1 / 3]]]) / n
        torch.testing.assert_close(g, want)


def test_mean_eta_is_sum_eta_over_the_batch_targets(gpt2_dir, corpus, spy):
    lm = load_checkpoint(str(gpt2_dir), device="cpu")
    batches = _batches(lm, corpus)
    targets = [int((b.labels != -100).sum()) for b in batches]
    assert len(batches) == 3 and len(set(targets)) > 1  # the divisor really differs per batch

    res_sum = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=BATCH,
                                                loss_reduction="sum", spikes=False))
    res_mean = measure_gradients(lm, GradOptions(data=corpus, max_length=MAX_LEN, batch_size=BATCH, spikes=False))
    assert res_mean.info["loss_reduction"] == "mean" and res_sum.info["loss_reduction"] == "sum"
    for res in (res_sum, res_mean):
        assert res.info["loss_targets_per_batch"] == {"n_batches": 3, "min": min(targets),
                                                      "mean": sum(targets) / 3, "max": max(targets)}
        assert res.info["n_loss_targets"] == sum(targets)
        assert "depend on the reduction" in res.info["eta_scale"]
    # the mean loss per target is the same number either way
    assert res_mean.info["mean_loss_per_target"] == pytest.approx(res_sum.info["mean_loss_per_target"], rel=1e-6)

    # independent reference: plain autograd of torch's mean cross-entropy (ignore_index=-100), per batch
    ref_model = copy.deepcopy(lm.model)
    mods = dict(ref_model.named_modules())
    for layer in (0, 1):
        key = f"blocks.{layer}.mlp.hook_post#0"
        per_sum = spy[id(res_sum.probes[key])]
        per_mean = spy[id(res_mean.probes[key])]
        assert len(per_sum) == len(per_mean) == 3
        for k, (b, n) in enumerate(zip(batches, targets)):
            # float32 backward passes: equal up to rounding, relative to the batch's largest |eta|
            atol = 1e-6 * float(per_mean[k].abs().max())
            torch.testing.assert_close(per_mean[k], per_sum[k] / n, rtol=1e-5, atol=atol)
            store = {}
            h = mods[f"transformer.h.{layer}.mlp.c_fc"].register_forward_hook(
                lambda m, a, o: (o.retain_grad(), store.__setitem__("h", o))[0])
            logits = ref_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            loss = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits.reshape(-1, logits.shape[-1]),
                                                               b.labels.reshape(-1))
            loss.backward()
            h.remove()
            ref_model.zero_grad(set_to_none=True)
            want = store["h"].grad[b.count_mask]
            torch.testing.assert_close(per_mean[k], want, rtol=1e-5, atol=atol)

        # the columns follow from the rescaled eta (all batches pooled over counted positions)
        eta = torch.cat([e / n for e, n in zip(per_sum, targets)])
        row = res_mean.rows[layer]
        n_ent = eta.numel()
        for tau in (1e-9, 1e-6, 1e-3):
            want_frac = float((eta.abs() < tau).sum()) / n_ent
            assert row[f"eff_grad_sparsity@{tau:g}"] == pytest.approx(want_frac, abs=2 / n_ent)
        assert row["eta_l2sq_per_token"] == pytest.approx(float(eta.double().square().sum()) / eta.shape[0], rel=1e-4)
        # the act'(h) columns do not depend on the loss
        assert row["deriv_sparsity"] == res_sum.rows[layer]["deriv_sparsity"]
    # a mean over ~30 targets shrinks eta: more entries fall under the absolute thresholds
    for a, b in zip(res_mean.rows, res_sum.rows):
        assert a["eff_grad_sparsity@0.001"] >= b["eff_grad_sparsity@0.001"]
        assert a["eta_l1_per_token"] < b["eta_l1_per_token"]


def test_cli_default_is_mean_and_manifest_records_targets(gpt2_dir, corpus, tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    out = tmp_path / "g"
    r = CliRunner().invoke(app, ["grad", str(gpt2_dir), "--data", corpus, "--max-length", str(MAX_LEN),
                                 "--batch-size", str(BATCH), "--spikes", "none", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    g = json.loads((out / "manifest.json").read_text())["gradients"]
    assert g["loss_reduction"] == "mean" and g["options"]["loss_reduction"] == "mean"
    assert g["loss_targets_per_batch"]["n_batches"] == 3 and g["loss_targets_per_batch"]["max"] <= BATCH * MAX_LEN
    assert "per batch" in (out / "summary.md").read_text()
