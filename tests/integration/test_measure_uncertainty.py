"""measure's error bars on the bundled model (issue 15 part 5): the se columns against an independent
computation (one forward per window, zeros counted by a hook, the ratio estimator's variance written
with sample covariances), the bootstrap columns against the same resamples, and a simulated
two-rank run that gives the same error bars as one process."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from probes import uncertainty as unc
from probes.data import token_windows
from probes.distributed import DistContext
from probes.embedded import default_checkpoint
from probes.loading import load_checkpoint
from probes.measure import MeasureOptions, measure

OPTS = dict(max_tokens=800, batch_size=4, max_length=64, seed=0, n_resamples=300)


@pytest.fixture(scope="module")
def lm():
    return load_checkpoint(default_checkpoint(), device="cpu")


@pytest.fixture(scope="module")
def result(lm):
    return measure(lm, MeasureOptions(**OPTS))


def _per_window_zeros(lm, module_paths: list[str]):
    """Per site and window: (zeros, counted entries), one forward per window, each c_proj input read by a hook."""
    td = token_windows(lm, MeasureOptions(**OPTS), causal=True)
    mods = dict(lm.model.named_modules())
    seen: dict[str, Any] = {}
    hooks = [mods[p].register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, args[0].detach()))
             for p in module_paths]
    zeros = {p: [] for p in module_paths}
    ents = {p: [] for p in module_paths}
    try:
        with torch.no_grad():
            for w in td.windows:
                ids = torch.tensor([w.input_ids])
                lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
                for p in module_paths:
                    a = seen[p][0][torch.tensor(w.count)]  # [counted, channels]
                    zeros[p].append(float((a == 0).sum()))
                    ents[p].append(float(a.numel()))
    finally:
        for h in hooks:
            h.remove()
    return {p: (np.array(zeros[p]), np.array(ents[p])) for p in module_paths}


def _ratio_se_by_covariance(y, n):
    """The ratio estimator's standard error, written as Cochran does: (s_y^2 - 2 R s_yn + R^2 s_n^2) / (m nbar^2)."""
    m = len(y)
    r = y.sum() / n.sum()
    c = np.cov(np.vstack([y, n]), ddof=1)
    return math.sqrt((c[0, 0] - 2 * r * c[0, 1] + r * r * c[1, 1]) / (m * n.mean() ** 2))


def test_se_columns_match_an_independent_computation(lm, result):
    t = result.table()
    assert {"n_windows", "zero_frac_se", "zero_frac_lo", "zero_frac_hi", "near_zero_frac_se@0.01",
            "chunk_sparsity_se@8", "nonzero_pct_per_token_hi"} <= set(t.columns)
    ys, ns = [], []
    per_site = _per_window_zeros(lm, list(t["module_path"]))
    for _, row in t.iterrows():
        y, n = per_site[row["module_path"]]
        assert row["n_windows"] == len(y) > 10
        assert y.sum() / n.sum() == pytest.approx(row["zero_frac"], rel=1e-12)
        assert row["zero_frac_se"] == pytest.approx(_ratio_se_by_covariance(y, n), rel=1e-9)
        assert row["nonzero_pct_per_token_se"] == pytest.approx(100 * row["zero_frac_se"], rel=1e-9)
        assert row["zero_frac_lo"] < row["zero_frac"] < row["zero_frac_hi"]
        ys.append(y), ns.append(n)
    Y, N = np.stack(ys, axis=1), np.stack(ns, axis=1)
    # bootstrap columns: the same resamples (seed = --seed) of the same per-window arrays
    lo, hi, lo_w, hi_w = unc.bootstrap_ratios(Y, N, [[1 / Y.shape[1]] * Y.shape[1]], n_resamples=300, seed=0)
    assert np.allclose(t["zero_frac_lo"], lo, rtol=1e-12) and np.allclose(t["zero_frac_hi"], hi, rtol=1e-12)
    # summary: the mean over layers, linearised with the layers' correlation kept
    s = result.summary().set_index("metric")
    big_n = N.sum(0)
    e = ((Y - (Y.sum(0) / big_n) * N) / big_n).mean(1)
    m = len(e)
    assert s.loc["zero_frac", "mean_over_layers_se"] == pytest.approx(math.sqrt(m / (m - 1) * (e @ e)), rel=1e-9)
    assert s.loc["zero_frac", "mean_over_layers_lo"] == pytest.approx(lo_w[0], rel=1e-12)
    assert s.loc["zero_frac", "mean_over_layers_hi"] == pytest.approx(hi_w[0], rel=1e-12)
    assert math.isnan(s.loc["dead_frac", "mean_over_layers_se"])  # not a window mean: no error bar
    assert result.info["uncertainty"]["n_resamples"] == 300


@dataclass
class _TwoRanks(DistContext):
    """A data-parallel context for one rank of two, exchanging through a dict (no process group)."""

    store: dict = field(default_factory=dict)

    def exchange(self, payload: Any = None) -> list[Any]:
        self.store[self.rank] = payload
        return [self.store.get(r, payload) for r in range(self.world_size)]


def test_two_ranks_give_the_error_bars_of_one_process(lm, result):
    store: dict = {}
    measure(lm, MeasureOptions(**OPTS), dist=_TwoRanks(rank=1, world_size=2, _open=True, store=store))
    merged = measure(lm, MeasureOptions(**OPTS), dist=_TwoRanks(rank=0, world_size=2, _open=True, store=store))
    assert merged.info["world_size"] == 2
    one, two = result.table(), merged.table()
    bars = [c for c in one.columns if unc.is_uncertainty_column(c, one.columns)]
    assert len(bars) == 3 * 7
    for c in bars + ["zero_frac", "n_windows"]:
        assert np.allclose(one[c].to_numpy(float), two[c].to_numpy(float), rtol=1e-12, atol=0, equal_nan=True), c
    s1, s2 = result.summary(), merged.summary()
    for c in ("mean_over_layers_se", "mean_over_layers_lo", "width_weighted_mean_hi"):
        assert np.allclose(s1[c].to_numpy(float), s2[c].to_numpy(float), rtol=1e-12, equal_nan=True), c
