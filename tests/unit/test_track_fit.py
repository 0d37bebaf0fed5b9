"""``probes.track``: training steps from names / trainer_state.json, and the emergence fit
f(t) = A exp(-lambda x) log x + K, x = gamma t + t0 (converging on clean data, NaN + warning otherwise)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from probes.errors import CheckpointError
from probes.track import EmergenceFitWarning, emergence_curve, expand_checkpoints, fit_emergence, parse_step


@pytest.mark.parametrize("name, step, source", [
    ("ckpt-1000", 1000, "name"), ("step_1000", 1000, "name"), ("checkpoint-1000", 1000, "name"),
    ("global_step1000", 1000, "name"), ("iter_250", 250, "name"), ("run-7", 7, "trailing number"),
])
def test_parse_step_from_folder_names(tmp_path, name, step, source):
    (tmp_path / name).mkdir()
    assert parse_step(tmp_path / name) == (step, source)


def test_parse_step_files_and_trainer_state(tmp_path):
    f = tmp_path / "model_step_300.safetensors"
    f.write_bytes(b"")
    assert parse_step(f) == (300, "name")
    d = tmp_path / "step_5"
    d.mkdir()
    g = d / "model.pt"
    g.write_bytes(b"")
    assert parse_step(g) == (5, "parent name")
    hf = tmp_path / "checkpoint-10"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    assert parse_step(hf) == (12, "trainer_state.json")  # the trainer's own count wins over the name
    assert parse_step(tmp_path / "final") == (None, None)


def test_expand_checkpoints_sorts_by_step_and_refuses_ambiguity(tmp_path):
    for s in (1000, 200, 30):
        (tmp_path / f"ckpt-{s}").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    cks = expand_checkpoints([str(tmp_path / "ckpt-*") + "/"])
    assert [c.step for c in cks] == [30, 200, 1000]
    with pytest.raises(CheckpointError, match="no checkpoint matches"):
        expand_checkpoints([str(tmp_path / "nothing-*")])
    (tmp_path / "final").mkdir()
    with pytest.raises(CheckpointError, match="no training step in the name"):
        expand_checkpoints([str(tmp_path / "ckpt-*"), str(tmp_path / "final")])
    (tmp_path / "step_200").mkdir()
    with pytest.raises(CheckpointError, match="both have step 200"):
        expand_checkpoints([str(tmp_path / "ckpt-200"), str(tmp_path / "step_200")])
    with pytest.raises(CheckpointError, match="does not exist"):
        expand_checkpoints([str(tmp_path / "gone")])


def test_emergence_fit_recovers_a_clean_curve():
    true = dict(A=40.0, lam=0.8, gamma=0.004, t0=1.2, K=5.0)
    t = np.linspace(0, 3000, 16)
    y = emergence_curve(t, true["A"], true["lam"], true["gamma"], true["t0"], true["K"])
    fit = fit_emergence(t, y)
    assert fit["converged"] and fit["r2"] > 0.9999 and fit["n_points"] == 16
    pred = emergence_curve(t, fit["A"], fit["lambda"], fit["gamma"], fit["t0"], fit["K"])
    np.testing.assert_allclose(pred, y, rtol=1e-3, atol=1e-3 * np.abs(y).max())


def test_emergence_fit_noisy_data_still_fits():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 10_000, 25)
    y = emergence_curve(t, 100.0, 1.5, 0.001, 1.05, 20.0) + rng.normal(0, 0.3, t.size)
    fit = fit_emergence(t, y)
    assert fit["converged"] and fit["r2"] > 0.95


def test_emergence_fit_fails_gracefully_with_a_warning():
    with pytest.warns(EmergenceFitWarning, match="at least 7 distinct steps"):
        fit = fit_emergence([100, 200, 300], [1.0, 2.0, 1.5])
    assert not fit["converged"] and all(math.isnan(fit[k]) for k in ("A", "lambda", "gamma", "t0", "K", "r2"))
    with pytest.warns(EmergenceFitWarning, match="did not converge"):
        fit = fit_emergence(np.arange(8) * 100.0, [3, 1, 4, 1, 5, 9, 2, 6], maxfev=1)
    assert not fit["converged"] and math.isnan(fit["A"])
    with pytest.warns(EmergenceFitWarning):
        fit = fit_emergence([1, 2, 3, 4, 5, 6], [np.nan] * 6)  # nothing finite to fit
    assert fit["n_points"] == 0


def test_five_points_for_five_parameters_are_not_fitted():
    """A 5-parameter curve through 5 points fits any data exactly and determines nothing: not run."""
    t = np.array([0.0, 100, 200, 400, 800])
    y = emergence_curve(t / 800, 2.0, 1.0, 5.0, 1.5, 0.3)
    with pytest.warns(EmergenceFitWarning, match="at least 7 distinct steps"):
        fit = fit_emergence(t, y)
    assert not fit["converged"] and math.isnan(fit["A"]) and fit["n_points"] == 5


def test_well_sampled_noiseless_curve_is_determined_and_recovered():
    t = np.linspace(0, 1000, 40)
    y = emergence_curve(t / 1000, 2.0, 1.0, 5.0, 1.5, 0.3)
    fit = fit_emergence(t, y)
    assert fit["converged"] and fit["determined"] and fit["max_rel_se"] < 0.5
    assert fit["A"] == pytest.approx(2.0, rel=1e-3) and fit["gamma"] * 1000 == pytest.approx(5.0, rel=1e-3)
