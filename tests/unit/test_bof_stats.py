"""Bug or Feature^2's per-linear statistics beside spikes and drift: input/output sign fractions and
bias means (On-Point-RND/BugOrFeature custom_layers/custom_linear.py ``compute_statistics``).

By hand on tiny tensors, and on a tiny GPT-2 against the reference's formulas applied to tensors
captured with plain PyTorch hooks.
"""

from __future__ import annotations

import math

import pytest
import torch

from probes.spikes import LinearInputProbe


def bof_compute_statistics(inp, out, bias):
    """The reference's sign and bias statistics (``compute_statistics``, eval mode)."""
    n_in, n_out = inp.numel(), out.numel()
    return {"input_negative_percentage": (inp < 0).sum().item() / n_in,
            "input_positive_percentage": (inp > 0).sum().item() / n_in,
            "output_negative_percentage": (out < 0).sum().item() / n_out,
            "output_positive_percentage": (out > 0).sum().item() / n_out,
            "bias_mean": bias.mean().item() if bias is not None else None}


def test_sign_fractions_by_hand():
    p = LinearInputProbe(3, bias_mean=0.25)
    x = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]], [[-1.0, -1.0, 2.0], [5.0, 5.0, 5.0]]])
    m = torch.tensor([[True, True], [True, False]])  # 3 counted positions
    y = torch.tensor([[[0.5, -0.5]], [[-1.0, 0.0]]]).expand(2, 2, 2).clone()
    p.update(x, m)
    p.update_output(y, m)
    r = p.to_row()
    # counted inputs: 1 -2 0 | 3 0 0 | -1 -1 2 -> positive 3/9, negative 3/9, zero 3/9
    assert r["pos_frac"] == 3 / 9 and r["neg_frac"] == 3 / 9 and r["zero_frac"] == 3 / 9
    # counted outputs: (0.5, -0.5) twice, (-1, 0) once -> 6 entries: 2 > 0, 3 < 0
    assert r["out_pos_frac"] == 2 / 6 and r["out_neg_frac"] == 3 / 6
    assert r["bias_mean"] == 0.25
    q = LinearInputProbe(3)
    q.update(torch.ones(1, 1, 3))
    assert math.isnan(q.to_row()["out_pos_frac"]) and math.isnan(q.to_row()["bias_mean"])
    # merging sums the sign counts exactly
    a, b = LinearInputProbe(3), LinearInputProbe(3)
    a.update(x[:1], m[:1]); a.update_output(y[:1], m[:1])
    b.update(x[1:], m[1:]); b.update_output(y[1:], m[1:])
    mr = a.merge(b).to_row()
    assert (mr["pos_frac"], mr["out_pos_frac"], mr["out_neg_frac"]) == (r["pos_frac"], r["out_pos_frac"],
                                                                         r["out_neg_frac"])


WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse gradients of relu nets".split()


def test_spikes_signs_and_bias_against_reference(tmp_path, word_lm):
    from probes.gradients import GradOptions, measure_gradients
    from probes.loading import load_checkpoint

    def edit(model):  # a non-zero bias on the first MLP input layer
        model.transformer.h[0].mlp.c_fc.bias.copy_(torch.linspace(-1, 0.5, model.transformer.h[0].mlp.c_fc.nf))

    word_lm.save_gpt2(tmp_path / "m", WORDS, max_len=12, n_layer=1, n_embd=8, n_inner=16, edit=edit)
    corpus = word_lm.corpus(tmp_path / "c.txt", WORDS, 60, seed=1)
    lm = load_checkpoint(str(tmp_path / "m"))
    # every window fills max_length and counts every position but the first -> compare on counted rows
    res = measure_gradients(lm, GradOptions(data=str(corpus), max_length=12, batch_size=64, loss_reduction="sum"))
    rows = {r["module_path"]: r for r in res.spike_rows}
    fc = lm.model.transformer.h[0].mlp.c_fc
    got = {}
    h = fc.register_forward_hook(lambda mod, args, out: got.update(x=args[0], y=out))
    from probes.data import DataOptions, token_windows
    from probes.runner import forward_batch

    td = token_windows(lm, DataOptions(data=str(corpus), max_length=12, batch_size=64), causal=True)
    batch = next(iter(td.batches()))
    with torch.no_grad():
        forward_batch(lm.model, batch)
    h.remove()
    m = batch.count_mask
    ref = bof_compute_statistics(got["x"][m], got["y"][m], fc.bias)
    r = rows["transformer.h.0.mlp.c_fc"]
    assert r["neg_frac"] == pytest.approx(ref["input_negative_percentage"])
    assert r["pos_frac"] == pytest.approx(ref["input_positive_percentage"])
    assert r["out_neg_frac"] == pytest.approx(ref["output_negative_percentage"])
    assert r["out_pos_frac"] == pytest.approx(ref["output_positive_percentage"])
    assert r["bias_mean"] == pytest.approx(ref["bias_mean"], rel=1e-6) and r["bias_mean"] == pytest.approx(-0.25)


def test_drift_bias_mean(tmp_path):
    from safetensors.torch import save_file

    from probes.drift import bias_name, weight_drift

    assert bias_name("a.b.weight") == "a.b.bias" and bias_name("x") == "x.bias"
    t = {"h.0.fc.bias": torch.tensor([1.0, 2.0, 6.0]), "h.0.fc.weight": torch.ones(3, 2),
         "h.0.proj.weight": torch.ones(2, 3), "ln.bias": torch.tensor([5.0])}
    save_file(t, str(tmp_path / "w.safetensors"))
    res = weight_drift(str(tmp_path / "w.safetensors"))
    by = {r["name"]: r for r in res.rows}
    assert by["h.0.fc.weight"]["bias_mean"] == 3.0  # the bias came before its weight in the file
    assert math.isnan(by["h.0.proj.weight"]["bias_mean"])
    assert res.summary()["bias_mean_of_means"].iloc[0] == 3.0
