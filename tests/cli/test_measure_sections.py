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


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="embedded checkpoint absent")
def test_also_runs_registered_analyses_and_refuses_unknown_ones(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["measure", "--max-tokens", "256", "-q"]
    assert CliRunner().invoke(app, [*base, "--massive", "-o", str(a)]).exit_code == 0
    assert CliRunner().invoke(app, [*base, "--also", "massive", "-o", str(b)]).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(a / "massive_layers.parquet"),
                                  pd.read_parquet(b / "massive_layers.parquet"))
    r = CliRunner().invoke(app, [*base, "--also", "masive"])
    assert r.exit_code == 2 and "did you mean 'massive'" in r.stderr
    r = CliRunner().invoke(app, [*base, "--also", "drift"])
    assert r.exit_code == 2 and "actsparse drift" in r.stderr


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="embedded checkpoint absent")
def test_a_registered_analysis_reaches_measure_and_its_bundle(tmp_path, monkeypatch):
    """Registration alone: a new analysis and its section run under `measure --also` and land in the
    bundle's tables, manifest and summary.md, with the shared data options it declares."""
    import sys
    import types
    from dataclasses import dataclass

    from probes import analysis
    from reports import sections

    @dataclass
    class ToyOptions:
        max_tokens: int | None = None
        skip_first: int = 0
        scale: float = 1.0

    class ToyResult:
        def __init__(self, info):
            self.info = info

        def tables(self):
            return {"toy": pd.DataFrame({"layer": [0, 1], "value": [self.info["max_tokens"], 2.0]})}

    def run(loaded, options, progress=None):
        return ToyResult({"max_tokens": options.max_tokens, "family": loaded.family, "n_counted_tokens": 7})

    def write(folder, result, title):
        from reports.tables import write_table

        return [f for n, df in result.tables().items() for f in write_table(df, folder, n)]

    mod = types.ModuleType("toy_analysis")
    mod.ToyOptions, mod.run, mod.write = ToyOptions, run, write
    mod.manifest = lambda result: result.info
    mod.summary = lambda result, options: [f"toy value {result.info['max_tokens']}"]
    mod.SECTION = sections.ReportSection("toy", "toy", (("toy", "toy"),), {"toy": sections.TableSpec(("layer",))},
                                         summary="toy_analysis:summary", write="toy_analysis:write",
                                         manifest="toy_analysis:manifest")
    monkeypatch.setitem(sys.modules, "toy_analysis", mod)
    monkeypatch.setitem(sections.REGISTRY, "toy", "toy_analysis:SECTION")
    monkeypatch.setitem(analysis.ANALYSES, "toy", analysis.Analysis("toy", "toy", "toy_analysis:ToyOptions",
                                                                    "toy_analysis:run", "a toy"))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["measure", "--max-tokens", "300", "--also", "toy", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert pd.read_csv(out / "toy.csv").value.tolist() == [300.0, 2.0]
    man = json.loads((out / "manifest.json").read_text())
    assert man["toy"] == {"max_tokens": 300, "family": "gpt2", "n_counted_tokens": 7}
    assert "## toy" in (out / "summary.md").read_text() and "toy value 300" in (out / "summary.md").read_text()
