"""Weight drift: statistics by hand, the exact 99.9th percentile against torch.quantile, and streaming
from files (safetensors, torch .bin) equal to the in-memory computation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from probes.drift import extreme_threshold, layer_of, tensor_kind, weight_drift, weight_stats
from probes.errors import CheckpointError


def test_weight_stats_by_hand():
    w = torch.tensor([[-2.0, -1.0, 0.0, 1.0], [2.0, 3.0, 4.0, 1.0]])
    s = weight_stats(w)
    assert s["n"] == 8
    assert s["mean"] == 1.0  # (-2 -1 0 1 2 3 4 1) / 8
    assert s["neg_pct"] == 25.0
    # squared deviations: 9 4 1 0 1 4 9 0 = 28; Bessel: 28 / 7 = 4
    assert s["std"] == 2.0 == pytest.approx(float(w.std()))
    # |w| sorted: 0 1 1 1 2 2 3 4; q = 0.999: pos = 6.993 -> 3 + 0.993 * (4 - 3)
    assert s["extreme_threshold"] == pytest.approx(3.993, abs=1e-12)
    assert s["extreme_count"] == 1 and s["extreme_frac"] == 1 / 8
    assert (s["max_abs"], s["min"], s["max"], s["zero_frac"], s["nonfinite"]) == (4.0, -2.0, 4.0, 1 / 8, 0)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_threshold_matches_torch_quantile(n):
    a = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    assert extreme_threshold(a) == pytest.approx(float(torch.quantile(a.double(), 0.999)), rel=1e-12, abs=0)
    assert extreme_threshold(a, 0.5) == pytest.approx(float(torch.quantile(a.double(), 0.5)), rel=1e-12)


def test_ties_at_the_threshold_all_count():
    w = torch.ones(10, 100)  # every |w| equals the percentile
    s = weight_stats(w)
    assert s["extreme_threshold"] == 1.0 and s["extreme_frac"] == 1.0 and s["std"] == 0.0


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "transformer.wte.weight": torch.randn(50, 16, generator=g),
        "transformer.h.0.mlp.c_fc.weight": torch.randn(16, 64, generator=g) - 0.01,
        "transformer.h.0.mlp.c_fc.bias": torch.randn(64, generator=g),
        "transformer.h.0.ln_1.weight": torch.ones(16),
        "transformer.h.1.mlp.c_proj.weight": (torch.randn(64, 16, generator=g) * 0.02).to(torch.bfloat16),
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "step": torch.tensor([3, 4]),
    }


def test_streaming_from_files_equals_in_memory(tmp_path):
    sd = _weights()
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    bn = tmp_path / "ckpt.bin"
    torch.save({"state_dict": sd, "epoch": 3}, bn)
    for path in (st, bn):
        res = weight_drift(str(path))
        df = res.table().set_index("name")
        assert set(df.index) == {"transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight",
                                 "transformer.h.1.mlp.c_proj.weight", "conv.weight"}
        for name, row in df.iterrows():
            want = weight_stats(sd[name])
            for k, v in want.items():
                assert row[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (path.suffix, name, k)
        assert df.loc["transformer.wte.weight", "kind"] == "embedding"
        assert df.loc["transformer.h.0.mlp.c_fc.weight", "role"] == "mlp_up"
        assert df.loc["transformer.h.1.mlp.c_proj.weight", "role"] == "mlp_down"
        assert df.loc["transformer.h.1.mlp.c_proj.weight", "dtype"] == "bfloat16"
        assert df.loc["conv.weight", "kind"] == "conv" and df.loc["conv.weight", "shape"] == "8x3x3x3"
        assert res.info["n_tensors_skipped"] == 3  # bias, norm, integer buffer
        assert res.info["quantile"] == 0.999


def test_several_checkpoints_show_drift(tmp_path):
    paths = []
    base = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    for step, shift in enumerate((0.0, -0.005, -0.01)):
        p = tmp_path / f"step{step}.safetensors"
        save_file({"layers.0.mlp.down_proj.weight": base + shift}, p)
        paths.append(str(p))
    res = weight_drift(paths)
    df = res.table()
    assert list(df.checkpoint_index) == [0, 1, 2]
    assert df["mean"].is_monotonic_decreasing and df["neg_pct"].is_monotonic_increasing
    summ = res.summary()
    assert list(summ.checkpoint_index) == [0, 1, 2] and set(summ.kind) == {"linear"}
    assert summ.mean_weighted.to_numpy() == pytest.approx(df["mean"].to_numpy())


def test_names_and_errors(tmp_path):
    assert layer_of("model.layers.12.mlp.down_proj.weight") == 12 and layer_of("lm_head.weight") is None
    assert tensor_kind("lm_head.weight", 2) == "lm_head" and tensor_kind("blk.3.ffn_down.weight", 2) == "linear"
    assert tensor_kind("token_embd.weight", 2) == "embedding"
    with pytest.raises(CheckpointError):
        weight_drift(str(tmp_path / "missing.safetensors"))
    assert math.isnan(extreme_threshold(torch.tensor([])))


@pytest.mark.parametrize("n,dtype,seed", [(1, "float32", 0), (2, "float32", 1), (1000, "float32", 2),
                                          (4097, "float16", 3), (3001, "bfloat16", 4), (500, "float64", 5)])
def test_numpy_stats_equal_the_torch_stats(n, dtype, seed):
    """Safetensors checkpoints are reduced with numpy (no torch import): every statistic equals the torch
    path's (counts and order statistics exactly, sums to float64 summation order)."""
    import numpy as np
    import torch

    from probes.drift import weight_stats_np

    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * 0.05).to(getattr(torch, dtype))
    if n > 10:
        t[:5] = 0  # exact zeros, and ties in |w|
        t[5:8] = t[8]
    a = t.float().numpy() if dtype == "bfloat16" else t.numpy()  # safetensors' bf16 is read widened to float32
    ref, got = weight_stats(t.reshape(-1, 1) if n > 1 else t), weight_stats_np(a.reshape(-1, 1) if n > 1 else a)
    assert set(ref) == set(got)
    for k in ("n", "extreme_count", "nonfinite"):
        assert got[k] == ref[k], k
    for k in ("neg_pct", "zero_frac", "extreme_threshold", "max_abs", "min", "max", "extreme_frac"):
        assert got[k] == ref[k] or (np.isnan(got[k]) and np.isnan(ref[k])), k
    for k in ("mean", "std"):
        assert got[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-18, nan_ok=True), k


def test_drift_of_safetensors_does_not_import_torch(tmp_path):
    """`actsparse drift` on safetensors checkpoints reads and reduces them with numpy: torch is never imported
    (a second or more of start-up), and the table equals the torch path's on the same file."""
    import json
    import subprocess
    import sys

    from probes.embedded import default_checkpoint

    ck = str(default_checkpoint())
    code = ("import sys, json; from probes.drift import weight_drift; r = weight_drift([%r]); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'rows': r.rows}))" % ck)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert res["torch"] is False
    import probes.drift as d

    from probes.formats import sniff

    ref = d._weight_drift([ck], [sniff(ck)], False, None, d.QUANTILE, None, numpy_path=False).rows
    assert [r["name"] for r in res["rows"]] == [r["name"] for r in ref]
    for a, b in zip(res["rows"], ref):
        assert a["dtype"] == b["dtype"] and a["extreme_count"] == b["extreme_count"] and a["shape"] == b["shape"]
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12, abs=1e-18)
        assert a["extreme_threshold"] == b["extreme_threshold"]
        assert a["bias_mean"] == pytest.approx(b["bias_mean"], rel=1e-12, abs=1e-18, nan_ok=True)
