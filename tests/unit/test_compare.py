"""``reports.compare``: rules (absolute / relative, signs), the tidy long form, and mismatches that are
reported rather than joined (missing metrics and rows, schemas, token counts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.bundle_report import NotAnOutputError
from reports.compare import RuleError, compare, long_form, parse_rule
from reports.manifest import build_manifest, write_manifest
from reports.tables import write_table


def sparsity_table(zero=(0.60, 0.80, 0.90), n_tokens=1000, name_prefix="blocks") -> pd.DataFrame:
    rows = []
    for i, z in enumerate(zero):
        rows.append({"canonical_name": f"{name_prefix}.{i}.mlp.hook_post", "module_path": f"h.{i}.mlp.c_proj",
                     "kind": "mlp_post", "layer": i, "width": 64, "dtype": "float32", "n_tokens": n_tokens,
                     "zero_frac": z, "near_zero_frac@0.01": min(1.0, z + 0.01), "dead_neurons": i})
    return pd.DataFrame(rows)


def make_output(folder: Path, command: str = "measure", tables: dict | None = None, n_tokens: int = 1000,
                checkpoint: str = "ckpt") -> Path:
    folder.mkdir(parents=True)
    tables = tables if tables is not None else {"sparsity": sparsity_table(n_tokens=n_tokens)}
    for name, df in tables.items():
        write_table(df, folder, name)
    sections = {}
    if command == "measure":
        sections["measurement"] = {"corpus": "/x/corpus.txt", "n_counted_tokens": n_tokens, "max_length": 128,
                                   "options": {"eps_grid": [0.01]}}
    write_manifest(folder, build_manifest(command, {"checkpoint": checkpoint}, **sections))
    return folder


# ------------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("text, metric, table, delta, direction, relative", [
    ("zero_frac:-0.02", "zero_frac", None, 0.02, -1, False),
    ("alpha:+0.5", "alpha", None, 0.5, 1, False),
    ("alpha:+10%", "alpha", None, 0.10, 1, True),
    ("zero_frac:-5%", "zero_frac", None, 0.05, -1, True),
    ("zero_frac:0.01", "zero_frac", None, 0.01, 0, False),
    ("near_zero_frac@0.01:-0.02", "near_zero_frac@0.01", None, 0.02, -1, False),
    ("sparsity/zero_frac:-1e-3", "zero_frac", "sparsity", 0.001, -1, False),
    ("near_zero_frac@*: +.5", "near_zero_frac@*", None, 0.5, 1, False),
])
def test_parse_rule(text, metric, table, delta, direction, relative):
    r = parse_rule(text)
    assert (r.metric, r.table, r.direction, r.relative) == (metric, table, direction, relative)
    assert r.delta == pytest.approx(delta)


@pytest.mark.parametrize("bad", ["zero_frac", "zero_frac:", ":0.1", "zero_frac:abc", "zero_frac:--0.1", "a:1%%"])
def test_parse_rule_rejects(bad):
    with pytest.raises(RuleError) as e:
        parse_rule(bad)
    assert e.value.exit_code == 2 and "METRIC:DELTA" in (e.value.fix or "")


def test_absolute_rules_and_signs():
    drop = parse_rule("zero_frac:-0.02")
    assert drop.broken_by(0.80, 0.77)  # -0.03 < -0.02
    assert not drop.broken_by(0.80, 0.79)
    assert not drop.broken_by(0.80, 0.99)  # a rise never breaks a drop rule
    assert not drop.broken_by(0.80, 0.78)  # exactly -0.02 is allowed (the rule is "< -0.02")
    rise = parse_rule("alpha:+0.5")
    assert rise.broken_by(2.0, 2.6) and not rise.broken_by(2.0, 2.4) and not rise.broken_by(2.0, 0.1)
    either = parse_rule("zero_frac:0.01")
    assert either.broken_by(0.5, 0.52) and either.broken_by(0.5, 0.48) and not either.broken_by(0.5, 0.505)


def test_relative_rules():
    r = parse_rule("alpha:+10%")
    assert r.change(2.0, 2.3) == pytest.approx(0.15)
    assert r.broken_by(2.0, 2.3) and not r.broken_by(2.0, 2.1)
    assert not r.broken_by(2.0, 1.0)
    assert r.change(-2.0, -1.0) == pytest.approx(0.5)  # relative to |baseline|: -2 -> -1 is a rise
    assert r.broken_by(0.0, 0.1) and r.change(0.0, 0.1) == math.inf  # from zero: infinitely relative
    assert not r.broken_by(0.0, 0.0)
    d = parse_rule("zero_frac:-5%")
    assert d.broken_by(0.8, 0.75) and not d.broken_by(0.8, 0.77)


# ------------------------------------------------------------------------------------------- long form
def test_long_form_keys_and_values():
    df = sparsity_table()
    long, text, issues = long_form(df, "sparsity")
    assert list(long.columns) == ["table", "name", "layer", "kind", "metric", "value"]
    assert set(long.metric) == {"zero_frac", "near_zero_frac@0.01", "dead_neurons"}  # width, n_tokens are not metrics
    row = long[(long.name == "blocks.1.mlp.hook_post") & (long.metric == "zero_frac")].iloc[0]
    assert row.layer == 1 and row.kind == "mlp_post" and row.value == pytest.approx(0.8)
    assert set(text.column) == {"module_path", "dtype"} and not issues


def test_long_form_summary_and_extra_keys():
    summ = pd.DataFrame({"kind": ["mlp_post"] * 2, "metric": ["zero_frac", "dead_frac"], "n_layers": [3, 3],
                         "mean_over_layers": [0.7, 0.1], "width_weighted_mean": [0.72, 0.11]})
    long, _, _ = long_form(summ, "summary")
    assert set(long.name) == {"mean_over_layers", "width_weighted_mean"}
    assert set(long.metric) == {"zero_frac", "dead_frac"}
    pplp = pd.DataFrame({"p_pct": [1.0, 5.0], "canonical_name": ["blocks.0.mlp.hook_post"] * 2, "layer": [0, 0],
                         "sparsity": [0.8, 0.9], "n_tokens": [100, 100]})
    long, _, _ = long_form(pplp, "pplp")
    assert sorted(long.name) == ["p_pct=1 blocks.0.mlp.hook_post", "p_pct=5 blocks.0.mlp.hook_post"]


def test_long_form_duplicate_keys_are_reported():
    df = pd.concat([sparsity_table(), sparsity_table().head(1)], ignore_index=True)
    long, _, issues = long_form(df, "sparsity")
    assert any(i.kind == "keys" for i in issues)
    assert long.groupby(["name", "metric"]).size().max() == 1  # disambiguated, never silently merged


# -------------------------------------------------------------------------------------------- compare
def test_identical_outputs_pass(tmp_path):
    a = make_output(tmp_path / "a")
    b = make_output(tmp_path / "b")
    res = compare(a, b, ["zero_frac:-0.02", "dead_neurons:0"])
    assert res.passed and not res.mismatched and res.changed().empty
    assert [r.n_checked for r in res.rules] == [3, 3]
    assert "PASS" in res.to_markdown()


def test_drop_breaks_rule_and_markdown_lists_it(tmp_path):
    a = make_output(tmp_path / "a")
    b = make_output(tmp_path / "b", tables={"sparsity": sparsity_table(zero=(0.60, 0.75, 0.905))})
    res = compare(a, b, ["zero_frac:-0.02", "zero_frac:+0.01", "near_zero_frac@*:-1%"])
    drop, rise, rel = res.rules
    assert not drop.passed and list(drop.broken.name) == ["blocks.1.mlp.hook_post"]
    assert drop.broken.iloc[0].delta == pytest.approx(-0.05)
    assert rise.passed  # +0.005 on layer 2 stays under +0.01
    assert not rel.passed and rel.broken.iloc[0].metric == "near_zero_frac@0.01"
    md = res.to_markdown()
    assert "FAIL: 2 of 3 rule(s) broken" in md and "blocks.1.mlp.hook_post" in md and "**broken**" in md
    ch = res.changed()
    assert ch.iloc[0].metric in ("zero_frac", "near_zero_frac@0.01") and len(ch) == 4


def test_missing_metric_and_rows_are_reported_and_break_rules(tmp_path):
    a = make_output(tmp_path / "a")
    cand = sparsity_table(zero=(0.6, 0.8)).drop(columns=["dead_neurons"])  # one layer and one column fewer
    b = make_output(tmp_path / "b", tables={"sparsity": cand})
    res = compare(a, b, ["zero_frac:-0.02", "dead_neurons:+1"])
    kinds = {(i.kind, i.message.split(":")[0]) for i in res.issues}
    assert ("schema", "sparsity") in kinds  # column dead_neurons only in the baseline
    msgs = " ".join(i.message for i in res.issues)
    assert "columns only in the baseline: dead_neurons" in msgs
    assert "row(s) only in the baseline: blocks.2.mlp.hook_post (layer 2)" in msgs
    zero, dead = res.rules
    assert not zero.passed and set(zero.broken.why) == {"missing in the candidate"}
    assert not dead.passed and len(dead.broken) == 3  # every baseline value of a vanished metric
    assert res.mismatched


def test_nan_in_candidate_breaks_rule_nan_in_baseline_is_skipped(tmp_path):
    base = sparsity_table()
    base.loc[0, "zero_frac"] = np.nan
    cand = sparsity_table()
    cand.loc[2, "zero_frac"] = np.nan
    res = compare(make_output(tmp_path / "a", tables={"sparsity": base}),
                  make_output(tmp_path / "b", tables={"sparsity": cand}), ["zero_frac:-0.5"])
    (r,) = res.rules
    assert r.n_skipped == 1 and r.n_checked == 2
    assert list(r.broken.why) == ["NaN in the candidate"]
    msgs = " ".join(i.message for i in res.issues)
    assert "NaN in the candidate" in msgs and "NaN in the baseline" in msgs


def test_token_count_mismatch_is_reported_not_joined_silently(tmp_path):
    a = make_output(tmp_path / "a", n_tokens=1000)
    b = make_output(tmp_path / "b", n_tokens=500)
    res = compare(a, b, ["zero_frac:-0.02"])
    tok = [i.message for i in res.issues if i.kind == "tokens"]
    assert any("measurement: baseline 1000, candidate 500" in m for m in tok)
    assert any("sparsity: n_tokens differ: baseline 1000, candidate 500" in m for m in tok)
    assert res.passed and res.mismatched  # the rule holds; --strict would fail on the mismatch
    assert "tokens" in res.to_markdown()


def test_schema_mismatch_types_tables_and_commands(tmp_path):
    cand = sparsity_table()
    cand["dead_neurons"] = ["none", "one", "two"]  # numeric in the baseline, text here
    a = make_output(tmp_path / "a", tables={"sparsity": sparsity_table(), "summary": pd.DataFrame(
        {"kind": ["mlp_post"], "metric": ["zero_frac"], "n_layers": [3], "mean_over_layers": [0.7],
         "width_weighted_mean": [0.7]})})
    b = make_output(tmp_path / "b", command="spectrum", tables={"sparsity": cand})
    res = compare(a, b)
    msgs = [i.message for i in res.issues]
    assert any("different kinds of output: baseline measure; candidate spectrum" in m for m in msgs)
    assert any("table summary only in the baseline" in m for m in msgs)
    assert any("column dead_neurons is numeric in the baseline but text in the candidate" in m for m in msgs)


def test_method_option_differences_are_reported(tmp_path):
    a = make_output(tmp_path / "a")
    b = make_output(tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    man["measurement"]["max_length"] = 64
    (b / "manifest.json").write_text(json.dumps(man))
    res = compare(a, b)
    assert any(i.kind == "method" and "max_length" in i.message for i in res.issues)


def test_rule_matching_nothing_is_an_error_with_a_suggestion(tmp_path):
    a, b = make_output(tmp_path / "a"), make_output(tmp_path / "b")
    with pytest.raises(RuleError) as e:
        compare(a, b, ["zero_fraction:-0.02"])
    assert "did you mean 'zero_frac'" in e.value.one_line()
    with pytest.raises(RuleError):
        compare(a, b, ["spectrum/zero_frac:-0.02"])  # the metric exists, but not in that table


def test_text_changes_and_hostile_names_are_escaped_in_markdown(tmp_path):
    evil = "<script>alert(1)</script>|x"
    a = make_output(tmp_path / "a", tables={"sparsity": sparsity_table(name_prefix=evil)})
    cand = sparsity_table(zero=(0.5, 0.8, 0.9), name_prefix=evil)
    cand["dtype"] = "bfloat16"
    b = make_output(tmp_path / "b", tables={"sparsity": cand}, checkpoint=evil)
    res = compare(a, b, ["zero_frac:-0.02"])
    assert any(i.kind == "text" and "dtype changed in 3 row(s)" in i.message for i in res.issues)
    md = res.to_markdown()
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;\\|x" in md


def test_not_an_output_folder(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.csv").write_text("a\n1\n")
    with pytest.raises(NotAnOutputError, match="not an actsparse output folder"):
        compare(tmp_path / "plain", tmp_path / "plain")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"tool": "other"}')
    with pytest.raises(NotAnOutputError, match="not written by actsparse"):
        compare(tmp_path / "foreign", tmp_path / "foreign")
    with pytest.raises(NotAnOutputError, match="does not exist"):
        compare(tmp_path / "nope", tmp_path / "nope")


def test_report_bundle_compares_like_its_inputs(tmp_path):
    from reports.bundle_report import build_report

    a = make_output(tmp_path / "a")
    b = make_output(tmp_path / "b", tables={"sparsity": sparsity_table(zero=(0.6, 0.7, 0.9))})
    bundle = build_report([a], tmp_path / "bundle")
    res = compare(bundle, b, ["zero_frac:-0.02"])
    assert not res.passed and list(res.rules[0].broken.layer) == [1]
    assert res.compared_tables == ["sparsity"]
