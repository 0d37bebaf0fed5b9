"""Results share one shape (``probes.analysis.Result``): ``tables()`` names each table as it is written.

For every result class: its ``tables()`` keys are the tables its command wrote in the golden run
(``tests/golden/expected/<case>/case.json``), and the writer in ``reports/`` writes exactly those
tables, no more (tables only: figures, summary.md and the manifest are left out). Results are built
from the golden tables, so no model runs; figures are built but not rendered.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.figure
import pandas as pd
import pytest

from probes.analysis import Result
from probes.drift import DriftResult
from probes.gradients import GradResult
from probes.massive import MassiveResult
from probes.measure import MeasureResult
from probes.pplp import CurveResult, PplpResult
from probes.track import CheckpointStep, TrackResult

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "expected"


@pytest.fixture(autouse=True)
def _no_rendering(monkeypatch):
    def placeholder(self, fname, *args, **kwargs):
        if isinstance(fname, (str, Path)):
            Path(fname).write_bytes(b"")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", placeholder)


def golden_tables(case: str) -> set[str]:
    """The tables (CSV stems) the command of ``case`` wrote in the golden run."""
    files = json.loads((GOLDEN / case / "case.json").read_text())["files"]
    return {f[:-len(".csv")] for f in files if f.endswith(".csv") and "/" not in f}


def golden(case: str, name: str) -> pd.DataFrame:
    p = GOLDEN / case / f"{name}.csv"
    return pd.read_csv(p if p.exists() else p.with_suffix(".csv.gz"))


def rows(case: str, name: str) -> list[dict]:
    return golden(case, name).to_dict("records")


def written(folder: Path) -> set[str]:
    return {p.name[:-len(".csv")] for p in folder.glob("*.csv")}


def fake_model():
    return SimpleNamespace(model=SimpleNamespace(parameters=lambda: iter(())), family="fake", dtype="float32",
                           device="cpu", is_causal_lm=True, source="fake", tokenizer=None)


MEASURE_INFO = {"n_counted_tokens": 1000, "corpus": "c.jsonl", "window_scheme": "w", "max_length": 256,
                "model_dtype": "float32", "device": "cpu"}


def measure_result() -> MeasureResult:
    return MeasureResult(rows("measure", "sparsity"), dict(MEASURE_INFO))


def grad_result(spikes: bool = True) -> GradResult:
    return GradResult(rows("grad", "gradients"), rows("grad", "spikes") if spikes else [], {"loss": "lm"})


def massive_result(int8: bool = False) -> MassiveResult:
    int8_rows = [{"canonical_name": "blocks.0.hook_resid_post", "policy": "per_tensor", "rel_err": 0.1}] if int8 else []
    return MassiveResult(rows("massive", "massive_layers"), rows("massive", "massive_topk"),
                         rows("massive", "massive_channels"), {}, int8_rows, {})


def test_every_result_has_the_shared_shape():
    for res in (measure_result(), grad_result(), massive_result(),
                PplpResult([], [], {}, rows("pplp", "cett_calibration"), {}, [], rows("pplp", "pplp_trace")),
                CurveResult(rows("curve", "curve"), rows("curve", "curve_layers"), {}, []),
                DriftResult(rows("drift", "drift"), {}),
                TrackResult([], {"trends": golden("track", "trends")}, {})):
        assert isinstance(res, Result), type(res).__name__
        assert all(isinstance(df, pd.DataFrame) for df in res.tables().values()), type(res).__name__


def test_measure_tables(tmp_path):
    res = measure_result()
    assert set(res.tables()) == golden_tables("measure") == {"sparsity", "summary"}
    from reports.measure_report import write_measure_outputs

    write_measure_outputs(tmp_path / "out", res, fake_model(), {"checkpoint": "fake"})
    assert written(tmp_path / "out") == set(res.tables())


@pytest.mark.parametrize("spikes", [True, False])
def test_grad_tables(tmp_path, spikes):
    res = grad_result(spikes)
    assert set(res.tables()) == ({"gradients", "gradients_summary", "spikes"} if spikes
                                 else {"gradients", "gradients_summary"})
    if spikes:
        assert set(res.tables()) == golden_tables("grad")
    from reports.grad_report import write_grad_files

    write_grad_files(tmp_path, res, "fake")
    assert written(tmp_path) == set(res.tables())


@pytest.mark.parametrize("int8", [False, True])
def test_massive_tables(tmp_path, int8):
    res = massive_result(int8)
    want = {"massive_layers", "massive_topk", "massive_channels"} | ({"massive_int8"} if int8 else set())
    assert set(res.tables()) == want
    if not int8:
        assert want == golden_tables("massive")
    from reports.massive_report import write_massive_files

    write_massive_files(tmp_path, res, "fake", plots=())
    assert written(tmp_path) == want


def test_measure_grad_massive_bundle_tables():
    """``measure --grad --massive`` writes the union of the three results' tables."""
    union = set(measure_result().tables()) | set(grad_result().tables()) | set(massive_result().tables())
    assert union == golden_tables("measure-grad-massive")


def test_pplp_tables(tmp_path):
    res = PplpResult([], [], {}, rows("pplp", "cett_calibration"), {}, [], rows("pplp", "pplp_trace"))
    assert set(res.tables()) == golden_tables("pplp") == {"pplp", "pplp_summary", "pplp_trace", "cett_calibration"}
    from reports.pplp_report import write_pplp_tables

    write_pplp_tables(tmp_path, res)
    assert written(tmp_path) == set(res.tables())


def test_curve_tables(tmp_path):
    res = CurveResult(rows("curve", "curve"), rows("curve", "curve_layers"), {}, [], rows("curve", "teal_projections"))
    assert set(res.tables()) == golden_tables("curve") == {"curve", "curve_layers", "teal_projections"}
    assert set(CurveResult(rows("curve", "curve"), rows("curve", "curve_layers"), {}, []).tables()) == {
        "curve", "curve_layers"}  # teal_projections only when a TEAL method ran
    from reports.pplp_report import write_curve_tables

    write_curve_tables(tmp_path, res)
    assert written(tmp_path) == set(res.tables())


def test_drift_tables(tmp_path):
    res = DriftResult(rows("drift", "drift"), {"n_tensors_measured": 1, "n_tensors_skipped": 0})
    assert set(res.tables()) == golden_tables("drift") == {"drift", "drift_summary"}
    from reports.sections.drift import write_drift_outputs

    write_drift_outputs(tmp_path / "out", res, {"checkpoints": ["fake"]})
    assert written(tmp_path / "out") == set(res.tables())


def test_track_tables(tmp_path):
    names = golden_tables("track")
    trends = golden("track", "trends")
    cks = [CheckpointStep(r.checkpoint, int(r.step), r.step_source) for r in trends.itertuples()]
    res = TrackResult(cks, {n: golden("track", n) for n in sorted(names)},
                      {"analyses": ["measure"], "n_checkpoints": len(cks), "steps": [c.step for c in cks]})
    assert set(res.tables()) == names
    assert res.tables["trends"] is res.tables()["trends"]  # the older spelling still reads them
    from reports.track import write_track_outputs

    write_track_outputs(tmp_path / "out", res, {})
    assert written(tmp_path / "out") == names
