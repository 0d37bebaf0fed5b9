"""The analysis and report-section registries: every reference resolves, every analysis has its
section, and a section's tables, figures and prefixes feed the bundle, captions and compare."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from probes import analysis
from reports import sections


def test_every_section_and_reference_loads():
    for s in sections.sections():
        assert isinstance(s, sections.ReportSection)
        for f in s.figures:
            if f.draw:
                assert callable(sections.load(f.draw)), f.draw
        for ref in (s.summary, s.write, s.manifest, s.extra_manifest):
            if ref:
                assert callable(sections.load(ref)), ref


def test_every_analysis_resolves_and_has_a_section():
    for a in analysis.ANALYSES.values():
        assert a.section in sections.REGISTRY, a
        assert dataclasses.is_dataclass(a.options_class()), a.options
        assert callable(a.runner()), a.run
        if a.check:
            assert callable(analysis.load(a.check))
        if a.with_measure:  # measure writes it into its bundle through the section
            sec = sections.section(a.section)
            assert sec.write and sec.manifest and sec.summary and sec.manifest_key, a.name


def test_options_take_the_shared_data_fields_they_declare():
    a = analysis.get("massive")
    opts = a.make_options({"data": "c.txt", "max_tokens": 5, "stride": 3, "batch_size": 2}, preset="maxact2026")
    assert (opts.data, opts.max_tokens, opts.preset) == ("c.txt", 5, "maxact2026")
    assert not hasattr(opts, "stride")  # massive has no stride: not passed


def test_unknown_names_get_one_suggestion():
    with pytest.raises(Exception, match="did you mean 'massive'"):
        analysis.get("masive")
    with pytest.raises(Exception, match="did you mean 'gradients'"):
        sections.section("gradient")


def test_bundle_tables_come_from_the_registry():
    from reports import bundle_report, compare

    assert set(compare.SPECS) == set(sections.table_specs())
    assert bundle_report.TOKEN_SECTIONS == sections.token_sections()
    assert bundle_report.section_for("trend_sparsity", {}) == "track"  # longest prefix first
    assert bundle_report.section_for("trend_alpha", {}) is None
    assert bundle_report.section_for("gradients_summary", {}) == "gradients"
    assert [s for s in bundle_report._FIGURE_ORDER][:3] == ["sparsity_by_layer", "sparsity_vs_threshold",
                                                             "nonzero_per_token"]


def test_a_registered_section_reaches_the_bundle(tmp_path, monkeypatch):
    """Registration is all it takes: a new section's figure is drawn and captioned in a report."""
    import pandas as pd

    from reports.bundle_report import standard_figures
    from reports.sections import FigureSpec, ReportSection

    calls = []

    def draw(table, folder, title, manifest):
        calls.append(table("toy").shape)
        (folder / "toy_fig.png").write_bytes(b"png")
        return ["toy_fig.png"]

    monkeypatch.setitem(sys.modules, "toy_section", type(sys)("toy_section"))
    sys.modules["toy_section"].draw = draw
    sys.modules["toy_section"].SECTION = ReportSection(
        "toy", None, (("toy", None),), figures=(FigureSpec("toy_fig", lambda c: "A toy.", ("toy",),
                                                           "toy_section:draw"),))
    monkeypatch.setitem(sections.REGISTRY, "toy", "toy_section:SECTION")
    src = type("Src", (), {"manifest": {"command": "toy"}, "tables": ["toy"], "label": "t",
                           "table": lambda self, n: pd.DataFrame({"a": [1, 2]})})()
    warnings: list[str] = []
    assert standard_figures(src, tmp_path, set(), warnings) == ["toy_fig.png"] and warnings == []
    assert calls == [(2, 1)]


def test_listing_the_registries_imports_no_torch():
    code = ("import sys; from probes import analysis; from reports import sections; "
            "[a.section for a in analysis.ANALYSES.values()]; sections.table_specs(); "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_checkpoint_labels_of_several_checkpoints_have_no_stray_parenthesis():
    """The report's table of contents and figure titles of a drift over two checkpoints read
    '2 checkpoints (ckpt-50 ... tiny-relu-lm)', not 'tiny-relu-lm)' (issue 17)."""
    from reports.sources import checkpoint_label

    man = {"options": {"checkpoints": ["runs/a/ckpt-50", "runs/a/tiny-relu-lm"]}}
    assert checkpoint_label(man) == "2 checkpoints (ckpt-50 ... tiny-relu-lm)"
    assert checkpoint_label({"options": {"checkpoint": "x/y/model"}}) == "y/model"
    assert checkpoint_label({"options": {"checkpoints": ["x/only"]}}) == "only"
