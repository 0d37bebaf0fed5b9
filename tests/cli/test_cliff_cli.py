"""``actsparse cliff`` through typer's CliRunner, end to end on the bundled model (small settings)."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from actsparse_cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cliff_writes_tables_figures_and_manifest(tmp_path):
    out = tmp_path / "c"
    r = invoke("cliff", "--max-tokens", 1024, "--grid", "0,0.9", "--refine", 0, "--family",
               "topk_sample,sparling_posthoc", "-o", out, "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["info"]["command"] == "cliff" and doc["info"]["n_counted_tokens"] > 0
    for f in ("cliff.csv", "cliff_points.parquet", "cliff_layers.csv", "cliff_sparling.csv",
              "cliff_sparling_channels.csv", "cliff.png", "cliff.svg", "cliff_sparling.png", "summary.md",
              "manifest.json"):
        assert (out / f).is_file(), f
    cl = pd.read_csv(out / "cliff.csv")
    assert list(cl.family) == ["topk_sample", "sparling_posthoc"] and list(cl.post_hoc) == [False, True]
    pts = pd.read_csv(out / "cliff_points.csv")
    assert sorted(pts.target_sparsity.unique()) == [0.0, 0.9]
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "cliff" and man["cliff"]["families"] == ["topk_sample", "sparling_posthoc"]
    assert "sparling_posthoc" in (out / "summary.md").read_text()


def test_cliff_bad_options():
    r = invoke("cliff", "--family", "sparling")
    assert r.exit_code == 2 and "sparling_posthoc" in r.output
    r = invoke("cliff", "--grid", "0.5,1.2")
    assert r.exit_code == 2 and "[0, 1)" in r.output
    r = invoke("cliff", "--calib-share", "1")
    assert r.exit_code == 2
