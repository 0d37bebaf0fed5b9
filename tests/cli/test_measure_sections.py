"""`measure --grad --massive --pplp` writes every section into one bundle, on the embedded model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.embedded import DEFAULT_CHECKPOINT


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="embedded checkpoint absent")
def test_measure_with_every_section(tmp_path):
    out = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["measure", "--grad", "--massive", "--pplp", "5", "--max-tokens", "1024",
                                 "--batch-size", "4", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    for name in ("sparsity", "gradients", "spikes", "massive_layers", "massive_topk", "pplp"):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"measurement", "gradients", "massive", "pplp"} <= set(manifest)
    for f in manifest["files"]:
        assert (out / f).is_file(), f
    sp = pd.read_parquet(out / "sparsity.parquet")
    gr = pd.read_parquet(out / "gradients.parquet")
    # ReLU: act'(h) == 0 exactly where the activation is 0, on the same tokens.
    merged = sp.merge(gr, on="canonical_name", suffixes=("", "_g"))
    assert len(merged) == len(sp) == 4
    assert (merged.n_tokens == merged.n_tokens_g).all()
    assert merged.zero_frac.to_numpy() == pytest.approx(merged.deriv_sparsity.to_numpy(), abs=1e-12)
    # The short corpus is flagged, not hidden.
    assert any("4096" in w or "tokens" in w for w in manifest.get("warnings", []))


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="embedded checkpoint absent")
def test_summary_has_every_section_and_layers_agree(tmp_path, monkeypatch):
    """summary.md of `measure --grad --massive` holds all three sections, and the massive layer numbers
    in summary.md and in the figure are the tables' (0-based) layers."""
    import re

    import reports.massive_report as figures

    drawn = {}
    real_save = figures.save

    def keep(fig, folder, stem):
        drawn[stem] = [(ax.get_xlabel(), [list(line.get_xdata()) for line in ax.get_lines()]) for ax in fig.axes]
        return real_save(fig, folder, stem)

    monkeypatch.setattr(figures, "save", keep)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["measure", "--grad", "--massive", "--max-tokens", "512", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    md = (out / "summary.md").read_text()
    assert "## gradients" in md and "## massive" in md and "zero %" in md
    layers = pd.read_parquet(out / "massive_layers.parquet")
    shown = layers[layers.kind == "resid_post"]
    # the summary's massive table: one row per shown site, its layer column = the table's layer
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (blocks\.\d+\.hook_resid_post) \| (\d+) \|", md, re.M)}
    assert rows and {k: int(v) for k, v in rows.items()} == dict(zip(shown.canonical_name, shown.layer.astype(int)))
    xlabel, lines = drawn["massive_layers"][0]
    assert xlabel == "layer (0-based)"
    assert [int(x) for x in lines[0]] == sorted(shown.layer.astype(int))
