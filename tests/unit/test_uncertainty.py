"""Error bars (probes.uncertainty, issue 15 part 5): standard errors by hand on tiny tensors with known
per-window values, bootstrap coverage with a fixed seed, merge of probe states = one pass (also the
bootstrap), and compare's within-noise verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from probes import uncertainty as unc
from probes.sparsity import ActivationSparsityProbe


# ------------------------------------------------------------------------------------------ by hand
def test_ratio_se_by_hand_equal_windows():
    # three windows of 8 entries with 2, 4 and 6 zeros: fractions 1/4, 1/2, 3/4
    se = unc.ratio_se([2, 4, 6], [8, 8, 8])
    # equal windows: sd of the per-window fractions (0.25) over sqrt(3)
    assert se == pytest.approx(0.25 / math.sqrt(3), rel=1e-12)
    assert unc.mean_se([0.25, 0.5, 0.75]) == pytest.approx(se, rel=1e-12)


def test_ratio_se_by_hand_unequal_windows():
    y, n = np.array([1.0, 3.0, 0.0, 4.0]), np.array([4.0, 6.0, 2.0, 8.0])
    r = 8.0 / 20.0
    # written out: sum of squared residuals y - R n = (1-1.6)^2 + (3-2.4)^2 + (0-0.8)^2 + (4-3.2)^2 = 2.0
    assert ((y - r * n) ** 2).sum() == pytest.approx(2.0)
    want = math.sqrt(4 / 3 * 2.0) / 20.0
    assert unc.ratio_se(y, n) == pytest.approx(want, rel=1e-12)
    # a window with no denominator is left out (it carries no information), and < 2 windows give NaN
    assert unc.ratio_se([*y, 0.0], [*n, 0.0]) == pytest.approx(want, rel=1e-12)
    assert math.isnan(unc.ratio_se([1.0], [2.0])) and math.isnan(unc.mean_se([0.3]))


def test_weighted_ratios_se_reduces_to_ratio_se():
    y, n = np.array([[1.0], [3.0], [0.0], [4.0]]), np.array([[4.0], [6.0], [2.0], [8.0]])
    assert unc.weighted_ratios_se(y, n, [1.0]) == pytest.approx(unc.ratio_se(y[:, 0], n[:, 0]), rel=1e-12)
    # the mean of two identical layers has the se of one (perfectly correlated, not averaged away)
    y2, n2 = np.hstack([y, y]), np.hstack([n, n])
    assert unc.weighted_ratios_se(y2, n2, [0.5, 0.5]) == pytest.approx(unc.ratio_se(y[:, 0], n[:, 0]), rel=1e-12)
    # two layers with opposite residuals cancel in their mean
    y3 = np.hstack([y, n - y])
    assert unc.weighted_ratios_se(y3, n2, [0.5, 0.5]) == pytest.approx(0.0, abs=1e-15)


def _windows(zeros_per_window, tokens=2, width=4):
    """``[windows, tokens, width]`` with exactly ``zeros_per_window[i]`` zeros in window i (others 1.0)."""
    x = torch.ones(len(zeros_per_window), tokens, width)
    for i, z in enumerate(zeros_per_window):
        x[i].view(-1)[:z] = 0.0
    return x


def test_probe_se_by_hand():
    # windows of 2 tokens x 4 channels with 2, 4, 6 zeros: zero_frac 1/2, se 0.25 / sqrt(3)
    p = ActivationSparsityProbe(4, eps_grid=(0.5,), chunk_k=2)
    p.update(_windows([2, 4, 6]))
    row, se = p.to_row(), p.se_row()
    assert row["zero_frac"] == 0.5 and se["n_windows"] == 3
    assert se["zero_frac_se"] == pytest.approx(0.25 / math.sqrt(3), rel=1e-12)
    assert se["near_zero_frac_se@0.5"] == pytest.approx(0.25 / math.sqrt(3), rel=1e-12)
    assert se["nonzero_pct_per_token_se"] == pytest.approx(100 * 0.25 / math.sqrt(3), rel=1e-12)
    assert se["neg_frac_se"] == 0.0
    # one chunk of 2 tokens per window: the union of non-zero channels is 4, 4 and 2 channels of 4
    # (window 2: zeros fill token 0 and half of token 1), so chunk sparsity per window 0, 0, 1/2
    assert row["chunk_sparsity@2"] == pytest.approx(1 / 6)
    assert se["chunk_sparsity_se@2"] == pytest.approx(np.std([0, 0, 0.5], ddof=1) / math.sqrt(3), rel=1e-12)


def test_probe_se_with_padding_by_hand():
    # unequal windows through a mask: window 0 counts 3 tokens, window 1 one token, window 2 none
    x = torch.zeros(3, 3, 2)
    x[0, 0] = 1.0  # window 0: 2 non-zero of 6 entries -> 4 zeros
    x[1, 0, 0] = 1.0  # window 1: 1 non-zero of 2 -> 1 zero
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    p = ActivationSparsityProbe(2, chunk_k=1)
    p.update(x, mask)
    y, n = np.array([4.0, 1.0]), np.array([6.0, 2.0])
    r = y.sum() / n.sum()
    want = math.sqrt(2 * ((y - r * n) ** 2).sum()) / n.sum()
    se = p.se_row()
    assert se["n_windows"] == 2  # the window with no counted token is not a window of the data
    assert se["zero_frac_se"] == pytest.approx(want, rel=1e-12)
    assert p.to_row()["zero_frac"] == pytest.approx(r)


def test_probe_totals_unchanged_by_window_bookkeeping():
    # the totals come from the per-window sums now: exact integers, as before
    torch.manual_seed(0)
    x = torch.relu(torch.randn(5, 7, 9))
    mask = torch.rand(5, 7) > 0.3
    p = ActivationSparsityProbe(9, chunk_k=2)
    p.update(x, mask)
    valid = x[mask]
    assert int(p.state["zero"]) == int((valid == 0).sum())
    assert int(p.state["near_zero"][1]) == int((valid.abs() <= 1e-3).sum())
    ids, ratios = p.window_ratios()
    num, den = ratios["zero_frac"]
    assert num.sum() == int(p.state["zero"]) and den.sum() == int(mask.sum()) * 9


# ------------------------------------------------------------------------------------------ merge
def _tagged_pass(x, mask, batches, tags_ids):
    """One probe fed ``batches`` (lists of row indices of x) with their global ids through WindowTags."""
    tags = unc.WindowTags()
    p = ActivationSparsityProbe(x.shape[-1], chunk_k=2, tags=tags)
    for rows in tags.follow([r for r in batches], [tags_ids[i] for b in batches for i in b], len(batches[0])):
        p.update(x[rows], mask[rows])
    return p


def test_merge_of_shards_equals_one_pass_including_the_bootstrap():
    torch.manual_seed(1)
    x = torch.relu(torch.randn(12, 6, 8) - 0.3)
    mask = torch.ones(12, 6, dtype=torch.bool)
    mask[5, 3:] = False
    mask[11, :] = False
    ids = list(range(12))
    one = _tagged_pass(x, mask, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], ids)
    # round robin over 2 ranks by batch (probes.distributed.shard_windows), merged in both orders
    r0 = _tagged_pass(x, mask, [[0, 1, 2], [6, 7, 8]], ids)
    r1 = _tagged_pass(x, mask, [[3, 4, 5], [9, 10, 11]], ids)
    for a, b in ((r0, r1), (r1, r0)):
        import copy

        merged = copy.deepcopy(a).merge(copy.deepcopy(b))
        i1, w1 = one.window_ratios()
        i2, w2 = merged.window_ratios()
        assert np.array_equal(i1, i2) and list(i1) == [i for i in range(11)]  # window 11 counts nothing
        for col in w1:
            assert np.array_equal(w1[col][0], w2[col][0]) and np.array_equal(w1[col][1], w2[col][1]), col
        assert merged.se_row() == one.se_row()
        b1 = unc.bootstrap_ratios(*w1["zero_frac"], n_resamples=200, seed=3)
        b2 = unc.bootstrap_ratios(*w2["zero_frac"], n_resamples=200, seed=3)
        assert all(np.array_equal(u, v) for u, v in zip(b1, b2))


def test_arrival_order_merge_appends_windows():
    a, b = ActivationSparsityProbe(4, chunk_k=0), ActivationSparsityProbe(4, chunk_k=0)
    a.update(_windows([1, 2]))
    b.update(_windows([3]))
    a.merge(b)
    ids, r = a.window_ratios()
    assert list(ids) == [0, 1, 2] and list(r["zero_frac"][0]) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="global indices"):
        a.merge(ActivationSparsityProbe(4, chunk_k=0, tags=unc.WindowTags()))


def test_a_window_seen_twice_in_one_forward_adds_up():
    v = unc.WindowValues(("y", "n"))
    v.add([5, 2], np.array([[1.0, 2.0], [3.0, 4.0]]))
    v.add([5], np.array([[10.0, 20.0]]))
    ids, vals = v.arrays()
    assert list(ids) == [2, 5] and vals.tolist() == [[3.0, 4.0], [11.0, 22.0]]


@pytest.mark.parametrize("native", [True, False])
def test_window_state_moves_to_cpu_with_the_probe(native, monkeypatch):
    """The window rows are numpy arrays from the CPU kernel (``probes.fastcount``) and tensors of the probe's
    device from the torch path; after ``probe_to_cpu`` none is on another device."""
    from probes import distributed
    from probes import sparsity

    if not native:
        monkeypatch.setattr(sparsity, "_native_ok", lambda *a: False)
    p = ActivationSparsityProbe(4, tags=None)
    p.update(_windows([1, 2]))
    q = distributed.probe_to_cpu(p)
    assert q.windows["values"]
    assert all((t.device.type == "cpu") if torch.is_tensor(t) else isinstance(t, np.ndarray)
               for t in q.windows["values"])
    assert q.se_row() == p.se_row()


# -------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_centred():
    y = np.array([2.0, 4.0, 6.0, 3.0, 5.0, 1.0])
    n = np.full(6, 8.0)
    a = unc.bootstrap_ratios(y, n, n_resamples=500, seed=0)
    b = unc.bootstrap_ratios(y, n, n_resamples=500, seed=0)
    c = unc.bootstrap_ratios(y, n, n_resamples=500, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and not np.array_equal(a[0], c[0])
    lo, hi = a[0][0], a[1][0]
    assert lo < y.sum() / n.sum() < hi
    counts = next(unc.resample_counts(6, 50, seed=0))
    assert counts.shape == (50, 6) and np.all(counts.sum(1) == 6)


def test_bootstrap_and_se_coverage_with_a_fixed_seed():
    """Nominal 95 %: over 300 simulated data sets of 40 windows (binomial zero counts, known p), the
    percentile interval and R +- 1.96 se both cover p close to 95 % of the time."""
    rng = np.random.default_rng(12345)
    p_true, m, n_per = 0.3, 40, 50
    cover_boot = cover_se = 0
    trials = 300
    for t in range(trials):
        p_win = np.clip(rng.normal(p_true, 0.08, m), 0, 1)  # windows differ: overdispersed
        y = rng.binomial(n_per, p_win).astype(float)
        n = np.full(m, float(n_per))
        lo, hi, _, _ = unc.bootstrap_ratios(y, n, n_resamples=400, seed=t)
        cover_boot += lo[0] <= p_true <= hi[0]
        r, se = y.sum() / n.sum(), unc.ratio_se(y, n)
        cover_se += abs(r - p_true) <= 1.96 * se
    assert 0.89 <= cover_boot / trials <= 0.99, cover_boot / trials
    assert 0.90 <= cover_se / trials <= 0.99, cover_se / trials


def test_bootstrap_of_weighted_means_uses_the_same_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, (20, 3)).astype(float)
    n = np.full((20, 3), 10.0)
    w = [[1 / 3] * 3, [0.5, 0.25, 0.25]]
    lo, hi, lo_w, hi_w = unc.bootstrap_ratios(y, n, w, n_resamples=300, seed=4)
    # the same replicates by hand
    reps = unc.bootstrap(20, lambda c: (c @ y) / (c @ n), 300, 4)
    means = reps @ np.array(w).T
    want_lo, want_hi, _ = unc.percentile_interval(means)
    assert np.allclose(lo_w, want_lo) and np.allclose(hi_w, want_hi)
    assert np.allclose(lo, unc.percentile_interval(reps)[0])
    iv = unc.interval_of_mean([0.1, 0.4, 0.2, 0.3], n_resamples=300, seed=0)
    assert iv.se == pytest.approx(unc.mean_se([0.1, 0.4, 0.2, 0.3])) and iv.lo < 0.25 < iv.hi


def test_column_names_keep_the_parameter_last():
    assert unc.bar_column("zero_frac", "_se") == "zero_frac_se"
    assert unc.bar_column("near_zero_frac@0.01", "_lo") == "near_zero_frac_lo@0.01"
    assert unc.bar_base("chunk_sparsity_hi@8") == ("chunk_sparsity@8", "_hi")
    assert unc.bar_base("nonzero_pct_per_token_p05_hist") is None
    cols = ["zero_frac", "zero_frac_se", "near_zero_frac@0.01", "near_zero_frac_se@0.01", "alpha_se"]
    assert [c for c in cols if unc.is_uncertainty_column(c, cols)] == ["zero_frac_se", "near_zero_frac_se@0.01"]
    assert unc.within_noise(0.02, 0.01, 0.01) and not unc.within_noise(0.03, 0.01, 0.01)
    assert unc.within_noise(0.02, math.nan, 0.01) is None


# ---------------------------------------------------------------------------------------- compare
def _table(zero, se=None):
    rows = []
    for i, z in enumerate(zero):
        r = {"canonical_name": f"blocks.{i}.mlp.hook_post", "kind": "mlp_post", "layer": i, "width": 64,
             "n_tokens": 1000, "zero_frac": z, "dead_neurons": 1}
        if se is not None:
            r.update({"n_windows": 10, "zero_frac_se": se[i], "zero_frac_lo": z - 2 * se[i],
                      "zero_frac_hi": z + 2 * se[i]})
        rows.append(r)
    return pd.DataFrame(rows)


def _out(tmp_path, name, df):
    from reports.manifest import build_manifest, write_manifest
    from reports.tables import write_table

    folder = tmp_path / name
    folder.mkdir()
    write_table(df, folder, "sparsity")
    write_manifest(folder, build_manifest("measure", {"checkpoint": "c"}, measurement={
        "n_counted_tokens": 1000, "max_length": 64, "options": {"eps_grid": [0.01]}}))
    return folder


def test_compare_says_which_changes_are_within_noise(tmp_path):
    from reports.compare import compare

    a = _out(tmp_path, "a", _table([0.50, 0.60, 0.70], se=[0.01, 0.01, 0.01]))
    # layer 0: +0.01 (0.7 sigma: within); layer 1: +0.05 (3.5 sigma: beyond); layer 2 unchanged
    b = _out(tmp_path, "b", _table([0.51, 0.65, 0.70], se=[0.01, 0.01, 0.01]))
    res = compare(a, b, ["zero_frac:0.001"])
    d = res.diff.set_index(["name", "metric"])
    assert set(res.diff.metric) == {"zero_frac", "dead_neurons"}  # error bars are not metrics
    assert d.loc[("blocks.0.mlp.hook_post", "zero_frac"), "within_noise"] == True  # noqa: E712
    assert d.loc[("blocks.1.mlp.hook_post", "zero_frac"), "within_noise"] == False  # noqa: E712
    assert d.loc[("blocks.1.mlp.hook_post", "zero_frac"), "sigma"] == pytest.approx(math.sqrt(2) * 0.01)
    assert pd.isna(d.loc[("blocks.0.mlp.hook_post", "dead_neurons"), "within_noise"])  # no se: no verdict
    assert res.noise_counts() == {"changed_with_error_bars": 2, "beyond_noise": 1}
    assert res.noise_clause() == "1 of 2 changes with error bars beyond noise (|delta| > 1.96 sigma)"
    md = res.to_markdown()
    assert "1 of 2 changes with error bars beyond noise" in md.splitlines()[0]
    assert "beyond noise, 3.54 sigma" in md and "within noise, 0.707 sigma" in md
    why = sorted(res.rules[0].broken.why)
    assert why == ["+0.01 (within noise, 0.707 sigma)", "+0.05 (beyond noise, 3.54 sigma)"]
    # a wider z puts both within noise
    assert compare(a, b, z=4.0).noise_counts()["beyond_noise"] == 0


def test_compare_without_error_bars_is_as_before(tmp_path):
    from reports.compare import compare

    a = _out(tmp_path, "a", _table([0.50, 0.60]))
    b = _out(tmp_path, "b", _table([0.51, 0.65]))
    res = compare(a, b)
    assert "within_noise" not in res.diff.columns and "se_baseline" not in res.diff.columns
    assert not res.has_error_bars and res.noise_clause() == "" and "noise" not in res.to_markdown()
    # error bars on one side only: said, but not a difference in what was measured
    c = _out(tmp_path, "c", _table([0.51, 0.65], se=[0.01, 0.01]))
    res = compare(a, c)
    assert not res.mismatched and not res.has_error_bars
    assert [i.kind for i in res.issues] == ["noise"] and "only in the candidate" in res.issues[0].message


# ---------------------------------------------------------------------------------------- figure
def test_sparsity_by_layer_draws_the_intervals_as_error_bars(monkeypatch, tmp_path):
    from reports import figures

    figs = []
    monkeypatch.setattr(figures, "save", lambda fig, folder, stem: figs.append(fig) or [f"{stem}.png"])
    df = pd.DataFrame({"kind": "mlp_post", "layer": [0, 1], "canonical_name": ["a", "b"], "n_windows": [12, 12],
                       "zero_frac": [0.5, 0.8], "zero_frac_lo": [0.45, 0.78], "zero_frac_hi": [0.52, 0.85],
                       "near_zero_frac@0.01": [0.6, 0.9], "near_zero_frac_lo@0.01": [0.55, 0.88],
                       "near_zero_frac_hi@0.01": [0.61, 0.95]})
    figures.sparsity_by_layer(df, tmp_path, "t", 100)
    ax = figs[0].axes[0]
    bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    assert len(bars) == 2  # exact zeros and |a| <= 0.01, each with its interval
    segs = bars[0].errorbar.lines[2][0].get_segments()
    assert [tuple(np.round(s[:, 1], 6)) for s in segs] == [(45.0, 52.0), (78.0, 85.0)]  # in %, lo to hi
    assert "bootstrap interval over 12 windows" in figs[0]._suptitle.get_text()
    # an older table without interval columns: plain bars, no note
    figs.clear()
    figures.sparsity_by_layer(df[["kind", "layer", "canonical_name", "zero_frac", "near_zero_frac@0.01"]], tmp_path,
                              "t", 100)
    assert not any(getattr(c, "errorbar", None) is not None for c in figs[0].axes[0].containers)
    assert "bootstrap" not in figs[0]._suptitle.get_text()


def test_compare_command_marks_rows_and_counts_changes_beyond_noise(tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    a = _out(tmp_path, "a", _table([0.50, 0.60, 0.70], se=[0.01, 0.01, 0.01]))
    b = _out(tmp_path, "b", _table([0.51, 0.65, 0.70], se=[0.01, 0.01, 0.01]))
    r = CliRunner().invoke(app, ["compare", str(a), str(b), "--format", "csv"])
    assert r.exit_code == 0, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("PASS: ") and last.endswith(", 1 of 2 changes with error bars beyond noise "
                                                       "(|delta| > 1.96 sigma)")
    changes = pd.read_csv(__import__("io").StringIO(r.stdout))
    assert {"se_baseline", "se_candidate", "sigma", "within_noise"} <= set(changes.columns)
    assert sorted(changes.within_noise.dropna().tolist()) == [False, True]


def test_measure_refuses_a_bootstrap_it_cannot_make():
    from probes.errors import ActsparseError
    from probes.measure import MeasureOptions, measure

    for bad in (dict(ci_level=1.0), dict(ci_level=0.0), dict(n_resamples=-1)):
        with pytest.raises(ActsparseError, match="bootstrap interval") as e:
            measure(None, MeasureOptions(**bad))  # refused before the model is touched
        assert "0 < ci_level < 1" in e.value.fix
