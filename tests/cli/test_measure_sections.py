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
