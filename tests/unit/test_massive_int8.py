"""INT8 sanity check with held-out calibration (issue 14, item 5).

Max_act_llm quant_sanity_check.py ``run_model`` takes the scales (max |x| of ``MaxCollector``, the
``--clip_quantile`` of ``HistCollector``) from the first ``--calibration_samples`` samples of its data
file and scores ``ErrorCollector`` (clamp to [-T, T], round(x / (T / 127)), back; rel_rmse, SQNR,
clip_rate = |x| > T) on the next ``--eval_samples``. Checked here against values computed by hand or
independently of ``probes.massive``: the scale, rel_rmse, SQNR and clip rate on small tensors, the
split, and the whole check on a tiny model (site tensors captured with a plain hook, one sequence at a time).
"""

from __future__ import annotations

import math

import pytest
import torch

from probes.errors import DataError
from probes.massive import (AbsLogHistogram, Int8ErrorProbe, MassiveOptions, build_samples, int8_split, massive,
                            resolve_preset)

WORDS = "the cat sat on a mat . dog ran in park , sun is warm today we measure massive values of nets".split()
MAX_LEN = 16


def _by_hand(cal: list[float], ev: list[float]) -> dict:
    """Everything in float64, straight from the reference's formulas."""
    t = max(abs(v) for v in cal)
    s = t / 127
    deq = [max(-127, min(127, round(max(-t, min(t, v)) / s))) * s for v in ev]  # round half to even, as torch
    err = [d - v for d, v in zip(deq, ev)]
    n = len(ev)
    sum_sq, err_sq = sum(v * v for v in ev), sum(e * e for e in err)
    return {"threshold": t, "scale": s, "rel_rmse": math.sqrt(err_sq / n) / math.sqrt(sum_sq / n),
            "sqnr_db": 10 * math.log10(sum_sq / err_sq), "clip_rate": sum(abs(v) > t for v in ev) / n,
            "deq": deq}


def test_held_out_scale_errors_and_clip_rate_by_hand():
    # dyadic values (exact in float32). Calibration max |x| = 127 / 64 -> scale 1/64; the evaluation
    # holds 3 and -4 beyond it (clipped to +-127/64), and three values on half steps (round half to even).
    u = 1 / 64
    cal = torch.tensor([[[0.5, -127 * u], [1.0, 0.25]]])
    ev = torch.tensor([[[3.0, 0.5 * u], [-4.0, 1.0]], [[1.5 * u, 0.5], [-16.5 * u, 1.5]]])
    h = AbsLogHistogram(2, upper=4.0)  # the run's max bounds the histogram; the calibration max is tracked
    h.update(cal)
    assert h.max_abs == 127 * u and int(h.state["count"]) == 4
    p = Int8ErrorProbe(2, {"max_abs": h.max_abs})
    p.update(ev)
    (row,) = p.rows()
    # by hand: 3 -> 127u, 0.5u -> 0 (half to even), -4 -> -127u, 1 -> 1, 1.5u -> 2u, 0.5 -> 0.5,
    # -16.5u -> -16u, 1.5 -> 1.5
    want = _by_hand(cal.reshape(-1).tolist(), ev.reshape(-1).tolist())
    assert want["deq"] == [127 * u, 0.0, -127 * u, 1.0, 2 * u, 0.5, -16 * u, 1.5]
    sum_sq = 9 + (0.5 * u) ** 2 + 16 + 1 + (1.5 * u) ** 2 + 0.25 + (16.5 * u) ** 2 + 2.25
    err_sq = (3 - 127 * u) ** 2 + (0.5 * u) ** 2 + (4 - 127 * u) ** 2 + (0.5 * u) ** 2 + (0.5 * u) ** 2
    assert row["threshold"] == 127 * u and row["scale"] == u
    assert row["count"] == 8 and row["clip_rate"] == 2 / 8 == want["clip_rate"]  # the max scale clips here
    assert row["sqnr_db"] == pytest.approx(10 * math.log10(sum_sq / err_sq), rel=1e-12) == want["sqnr_db"]
    assert row["rel_rmse"] == pytest.approx(math.sqrt(err_sq / sum_sq), rel=1e-12) == want["rel_rmse"]


def test_histogram_max_merges_as_a_max():
    a, b = AbsLogHistogram(1, 10.0), AbsLogHistogram(1, 10.0)
    a.update(torch.tensor([[[1.0], [-3.0]]]))
    b.update(torch.tensor([[[2.0]]]))
    assert a.merge(b).max_abs == 3.0 and int(a.state["count"]) == 3


def test_split_is_by_sample_id_and_deterministic():
    ids = [7, 2, 9, 0, 5, 1]  # the run's sequences in batching order (sorted by length, say)
    cal, ev = int8_split(ids, MassiveOptions(int8=True))
    # a third (2) of the sequences, lowest sample ids first: ids 0 and 1 sit at indices 3 and 5
    assert (cal, ev) == ([3, 5], [0, 1, 2, 4])
    assert int8_split(ids, MassiveOptions(int8=True, int8_calibration_samples=4)) == ([1, 3, 4, 5], [0, 2])
    both = list(range(6))
    assert int8_split(ids, MassiveOptions(int8=True, int8_calibration="in-sample")) == (both, both)
    with pytest.raises(DataError, match="at least 2 sequences"):
        int8_split([0], MassiveOptions(int8=True))
    with pytest.raises(DataError):
        int8_split(ids, MassiveOptions(int8=True, int8_calibration_samples=6))
    with pytest.raises(DataError, match="unknown INT8 calibration"):
        int8_split(ids, MassiveOptions(int8=True, int8_calibration="insample"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, word_lm):
    from probes.loading import load_checkpoint

    d = word_lm.save_gpt2(tmp_path_factory.mktemp("gpt2"), WORDS, max_len=MAX_LEN, n_layer=2, n_embd=16)
    corpus = word_lm.corpus(tmp_path_factory.mktemp("c") / "c.txt", WORDS, 12 * MAX_LEN, seed=5)
    return load_checkpoint(str(d), device="cpu"), str(corpus)


@pytest.mark.parametrize("mode", ["held-out", "in-sample"])
def test_int8_check_against_an_independent_computation(tiny, mode):
    lm, corpus = tiny
    opts = MassiveOptions(data=corpus, n_samples=9, int8=True, int8_calibration=mode, batch_size=4)
    res = massive(lm, opts)
    info = res.info["int8"]
    samples, _ = build_samples(lm, opts, resolve_preset(opts.preset))
    n = len(samples)
    assert n == 9
    # independently: the peak site's tensor for each sequence alone (no padding), with a plain forward hook
    mod = dict(lm.model.named_modules())[info["module_path"]]
    seen = {}
    hook = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple) else o)))
    per_sample = {}
    with torch.no_grad():
        for smp in samples:
            lm.model(input_ids=torch.tensor([smp.input_ids]))
            per_sample[smp.sample_id] = seen["x"][0].reshape(-1).double()
    hook.remove()
    ids = sorted(per_sample)
    cal_ids = ids[:n // 3] if mode == "held-out" else ids
    ev_ids = ids[n // 3:] if mode == "held-out" else ids
    assert (info["n_calibration_sequences"], info["n_evaluation_sequences"]) == (len(cal_ids), len(ev_ids))
    cal = torch.cat([per_sample[i] for i in cal_ids])
    ev = torch.cat([per_sample[i] for i in ev_ids])
    rows = {r["policy"]: r for r in res.int8}
    # max_abs policy: the scale from the calibration sequences only
    want = _by_hand(cal.tolist(), ev.tolist())
    r = rows["max_abs"]
    assert r["threshold"] == pytest.approx(want["threshold"], rel=1e-6)
    assert r["count"] == ev.numel() and r["calibration"] == mode
    assert r["clip_rate"] == pytest.approx(want["clip_rate"], abs=1e-12)
    assert r["rel_rmse"] == pytest.approx(want["rel_rmse"], rel=1e-4)
    assert r["sqnr_db"] == pytest.approx(want["sqnr_db"], rel=1e-4)
    if mode == "in-sample":
        assert r["clip_rate"] == 0.0
    # clip policy: the 99.9th percentile of the calibration |x| (rank ceil(q n)), within the histogram's 0.2 %
    c = rows["p99.9"]
    srt = cal.abs().sort().values
    exact = float(srt[math.ceil(0.999 * srt.numel()) - 1])
    assert c["threshold"] == pytest.approx(exact, rel=3e-3) and c["threshold"] <= want["threshold"]
    t = c["threshold"]
    assert c["clip_rate"] == pytest.approx(float((ev.abs() > t).double().mean()), abs=1e-12)
    s = t / 127
    err = (torch.round(ev.clamp(-t, t) / s).clamp(-127, 127) * s) - ev
    assert c["sqnr_db"] == pytest.approx(10 * math.log10(float((ev ** 2).sum() / (err ** 2).sum())), rel=1e-4)
