"""`actsparse track` with no checkpoints runs over the embedded training run (snapshots + final model)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.embedded import STEPS_DIR, default_track_checkpoints

pytestmark = pytest.mark.skipif(not STEPS_DIR.is_dir(), reason="embedded training snapshots absent")


def test_default_track_checkpoints_are_ordered_by_step():
    cks = default_track_checkpoints()
    assert len(cks) >= 5 and cks[-1].endswith("tiny-relu-lm")
    steps = [int(c.rsplit("ckpt-", 1)[1]) for c in cks[:-1]]
    assert steps == sorted(steps)


def test_track_embedded_run_shows_sparsity_emerging(tmp_path):
    out = tmp_path / "trends"
    r = CliRunner().invoke(app, ["track", "-o", str(out), "--analyses", "measure,drift", "--max-tokens", "512",
                                 "-q"])
    assert r.exit_code == 0, r.output
    trends = pd.read_parquet(out / "trends.parquet")
    assert trends.step.is_monotonic_increasing and trends.step.iloc[-1] == 650
    z = trends["zero_frac_mean_mlp_post"].to_numpy()
    # The trained model is far sparser than the early snapshot (real training dynamics, not a fixture).
    assert z[-1] > z[0] + 0.1
