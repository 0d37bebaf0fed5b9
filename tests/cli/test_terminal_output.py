"""Terminal output (issue 17): every command's table fits 80 columns with whole labels, ``--format json``
holds the numbers of the files, ``compare`` ends with a verdict line, ``-q`` without ``-o`` is refused.

Each command runs on the bundled model with a few hundred tokens, twice at most (a table at
``COLUMNS=80``, and ``-q -o DIR --format json``), once per module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "probes" / "data" / "tiny-relu-lm")
T = ("--max-tokens", "256", "--device", "cpu")
WIDTH = 80
ENV = {"COLUMNS": str(WIDTH), "FORCE_COLOR": None, "NO_COLOR": "1"}
runner = CliRunner(env=ENV)

# command -> (argv without -o/--format, labels its 80-column table must show whole; a tuple: any of them, as a
# table that fits shows full names and one that does not shows short labels)
COMMANDS = {
    "sites": (["sites", MODEL], ["L0 mlp_post", "L3 mlp_post", "transformer.h.0.mlp.c_proj"]),
    "measure": (["measure", *T], ["L0 mlp_post", "L3 mlp_post", "zero %", "nonzero/tok %"]),
    "grad": (["grad", *T], ["L0 mlp_post", "L3 mlp_post", "L0 mlp.c_proj"]),
    "drift": (["drift", MODEL], ["L0 attn.c_attn", "L3 mlp.c_proj", "transformer.wte"]),
    "massive": (["massive", *T, "--top-k", "5"], ["embed", "L0 resid_post", "L3 resid_post", "final_norm"]),
    "spectrum": (["spectrum", MODEL], ["L0 attn.c_attn", "L3 mlp.c_fc", "transformer.wpe"]),
    "pplp": (["pplp", "--p", "5", *T], [("L0 mlp_post", "blocks.0.mlp.hook_post"), "dense PPL"]),
    "curve": (["curve", "--method", "cett,topk", "--values", "cett=0.1,0.3", "--values", "topk=0.5,0.2",
               "--no-plot", *T], ["cett", "topk"]),
    "flatness": (["flatness", *T], ["L0 mlp_post", "L3 mlp_post", "kappa_2309"]),
    "cliff": (["cliff", "--max-tokens", "512", "--device", "cpu", "--grid", "0,0.9", "--refine", "0"],
              ["topk_sample", "sparling_posthoc", "PPL ratio"]),
    "track": (["track", "--analyses", "drift,spectrum", "--max-tokens", "64", "--device", "cpu"],
              ["alpha_mean", "neg_pct_linear", "step 50"]),
}
VERDICT = re.compile(r"^(PASS|FAIL): (\d+) values compared, (\d+) changed, (\d+) of (\d+) rules broken")


def invoke(*args, env=None):
    r = CliRunner(env={**ENV, **(env or {})}).invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per command: the 80-column table run, the JSON run (its result) and the JSON run's output folder."""
    root = tmp_path_factory.mktemp("terminal")
    out = {}
    for name, (argv, _) in COMMANDS.items():
        folder = root / name
        table_argv = [*argv, "-o", root / f"{name}-table"] if name == "track" else argv
        table = invoke(*table_argv)
        assert table.exit_code == 0, (name, table.stderr[-2000:])
        j = invoke(*argv, "--format", "json", *([] if name == "sites" else ["-q", "-o", folder]))
        assert j.exit_code == 0, (name, j.stderr[-2000:])
        out[name] = (table, j, folder)
    # a second measure that differs (one position fewer per window), for compare
    r = invoke("measure", *T, "--skip-first", "1", "-q", "-o", root / "measure-skip")
    assert r.exit_code == 0, r.stderr
    out["_root"] = root
    return out


# ------------------------------------------------------------------------------------------- 80 columns
def _check_80(name: str, stdout: str, labels) -> None:
    lines = stdout.splitlines()
    assert lines, f"{name}: nothing on stdout"
    long = [ln for ln in lines if len(ln) > WIDTH]
    assert not long, f"{name}: {len(long)} line(s) over {WIDTH} columns:\n" + "\n".join(long[:3])
    assert "…" not in stdout, f"{name}: a cell or header was cut:\n{stdout}"
    for lab in labels:
        alts = lab if isinstance(lab, tuple) else (lab,)
        assert any(a in ln for a in alts for ln in lines), f"{name}: {lab!r} is not on one line:\n{stdout}"
    # framed tables: the header is one line between its top edge and the rule under it
    for i, ln in enumerate(lines):
        if ln.startswith("┏"):
            assert lines[i + 2].startswith("┡"), f"{name}: a header spans lines:\n" + "\n".join(lines[i:i + 4])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_table_fits_80_columns_with_whole_labels(runs, name):
    table, _, _ = runs[name]
    _check_80(name, table.stdout, COMMANDS[name][1])
    assert "Traceback" not in table.stderr


def test_full_names_when_they_fit(runs):
    """Wider than the table: the full site names, as before (the sites golden pins this for `sites`)."""
    r = invoke("sites", MODEL, env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "blocks.0.mlp.hook_post" in r.stdout and "L0 mlp_post" not in r.stdout
    measure_80 = runs["measure"][0].stdout
    assert "blocks.0.mlp.hook_post" not in measure_80 and "not shown at 80 columns" in measure_80


# ------------------------------------------------------------------------------------------------ JSON
def _same_numbers(name: str, table: str, csv: pd.DataFrame, rows: list[dict]) -> None:
    assert all(list(r) == list(csv.columns) for r in rows), (name, table, list(csv.columns))
    assert len(rows) == len(csv), (name, table, len(rows), len(csv))
    for c in csv.columns:
        for i, (a, b) in enumerate(zip(csv[c].tolist(), [r[c] for r in rows])):
            if isinstance(b, str) and b in ("inf", "-inf"):
                b = float(b)
            missing_a = a is None or (isinstance(a, float) and math.isnan(a))
            if missing_a or b is None:  # empty in the CSV (or text pandas reads as NaN, e.g. a token "NA")
                assert missing_a and (b is None or isinstance(b, str)), (name, table, c, i, a, b)
            elif isinstance(a, (int, float, np.number)) and not isinstance(a, bool) and isinstance(b, (int, float)):
                assert float(a) == float(b), (name, table, c, i, a, b)
            else:
                assert str(a) == str(b), (name, table, c, i, a, b)


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "sites"])
def test_json_holds_the_numbers_of_the_files(runs, name):
    _, j, folder = runs[name]
    assert "wrote" not in j.stderr and "Traceback" not in j.stderr, (name, j.stderr)  # -q: only warnings there
    doc = json.loads(j.stdout)
    assert set(doc) == {"info", "tables"} and doc["info"]["command"] == name
    csvs = {p.stem: p for p in folder.glob("*.csv")}
    assert csvs and set(csvs) == set(doc["tables"]), (name, sorted(csvs), sorted(doc["tables"]))
    for table, path in csvs.items():
        _same_numbers(name, table, pd.read_csv(path, keep_default_na=True), doc["tables"][table])


def test_sites_json_and_csv_agree(runs):
    _, j, _ = runs["sites"]
    rows = json.loads(j.stdout)["tables"]["sites"]
    csv = invoke("sites", MODEL, "--format", "csv")
    assert csv.exit_code == 0
    from io import StringIO

    _same_numbers("sites", "sites", pd.read_csv(StringIO(csv.stdout)), rows)


def test_csv_is_the_main_table_file_and_md_is_markdown(runs):
    folder = runs["drift"][2]
    r = invoke("drift", MODEL, "--format", "csv", "-q")
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout == (folder / "drift.csv").read_text()
    r = invoke("drift", MODEL, "--format", "md")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[0].startswith("**weight drift")
    assert lines[2].startswith("| weight |") and set(lines[3]) <= set("|-:")
    assert "| L0 attn.c_attn |" in r.stdout or "| transformer.h.0.attn.c_attn.weight |" in r.stdout


# --------------------------------------------------------------------------------------------- compare
def _verdict(r) -> re.Match:
    last = r.stderr.strip().splitlines()[-1]
    m = VERDICT.match(last)
    assert m, f"the last stderr line is not a verdict: {last!r}\n{r.stderr}"
    return m


def test_compare_ends_with_a_verdict_in_every_mode(runs, tmp_path):
    root = runs["_root"]
    a, b = root / "measure", root / "measure-skip"
    same = invoke("compare", a, a, "--fail-on", "zero_frac:-0.02", "--fail-on", "dead_frac:+10%",
                  "--markdown", tmp_path / "same.md")
    assert same.exit_code == 0, same.stderr
    m = _verdict(same)
    n = int(m.group(2))
    assert m.groups() == ("PASS", str(n), "0", "0", "2") and n > 0
    assert f"no value changed ({n} values compared)" in same.stdout  # not an empty table
    assert f"{n} values on both sides" in (tmp_path / "same.md").read_text()  # the numbers agree
    _check_80("compare", same.stdout, [])

    quiet = invoke("compare", a, a, "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr.strip().splitlines() == [
        f"PASS: {n} values compared, 0 changed, 0 of 0 rules broken"]

    broken = invoke("compare", a, b, "--fail-on", "sparsity/zero_frac:-0.02", "--fail-on", "dead_frac:+10%")
    assert broken.exit_code == 7
    m = _verdict(broken)
    assert m.group(1) == "FAIL" and int(m.group(3)) > 0 and m.group(4, 5) == ("1", "2")
    _check_80("compare", broken.stdout, ["L2 mlp_post"])

    strict = invoke("compare", a, b, "-q", "--strict")
    assert strict.exit_code == 7 and strict.stdout == ""
    err = strict.stderr.strip().splitlines()
    assert VERDICT.match(err[-1]).group(1) == "FAIL" and "(--strict)" in err[-1]
    assert "listed above" in err[-2] and err[0].startswith("method: ")  # what differs is listed, also under -q

    js = invoke("compare", a, b, "--format", "json", "-q")
    doc = json.loads(js.stdout)
    m = _verdict(js)
    info = doc["info"]
    assert (info["verdict"], info["values_compared"], info["changed"]) == ("PASS", int(m.group(2)), int(m.group(3)))
    assert len(doc["tables"]["changes"]) == info["changed"]

    md = invoke("compare", a, b, "--format", "md")
    assert md.stdout.startswith("## actsparse compare:") and _verdict(md).group(1) == "PASS"


# ------------------------------------------------------------------------------------------ -q, usage
@pytest.mark.parametrize("argv", [["measure"], ["grad"], ["massive"], ["pplp"], ["curve"], ["drift", MODEL],
                                  ["spectrum", MODEL]], ids=lambda a: a[0])
def test_quiet_without_output_is_refused(argv):
    r = invoke(*argv, "-q")
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: -q without -o"), r.stderr
    assert "-- fix: give -o" in lines[0] and "drop -q" in lines[0]


@pytest.mark.parametrize("command", ["sites", "spectrum", "drift"])
def test_missing_argument_is_one_line(command):
    r = invoke(command)
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"actsparse: error: {command}: missing ") and " -- fix: " in lines[0]


def test_flags_show_no_value_placeholder():
    r = invoke("measure", "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--grad" in r.stdout and "--format" in r.stdout
    assert "<bool>" not in r.stdout
    assert "<bool>" not in invoke("--help", env={"COLUMNS": "200"}).stdout


# ---------------------------------------------------------------------------------------------- labels
def test_short_labels_stay_unique():
    from actsparse_cli.display import site_label, unique_labels, weight_label

    assert site_label({"canonical_name": "blocks.3.mlp.hook_post", "kind": "mlp_post", "layer": 3}) == "L3 mlp_post"
    assert site_label({"canonical_name": "blocks.0.mlp.hook_pre"}) == "L0 mlp_pre"  # kind read from the name
    assert site_label({"canonical_name": "blocks.0.hook_resid_pre", "kind": "embed", "layer": None}) == "embed"
    t5 = [{"canonical_name": f"{s}.blocks.0.mlp.hook_post", "kind": "mlp_post", "layer": 0}
          for s in ("encoder", "decoder")]
    assert unique_labels(t5) == ["encoder L0 mlp_post", "decoder L0 mlp_post"]
    custom = [{"canonical_name": f"custom.m.{i}.fc.hook_in", "module_path": f"m.{i}.fc", "kind": "custom",
               "layer": i} for i in range(2)]
    assert unique_labels(custom) == ["L0 fc", "L1 fc"]
    same = [{"canonical_name": n, "kind": "final_norm", "layer": None} for n in ("a.ln_final", "b.ln_final")]
    assert unique_labels(same) == ["a.ln_final", "b.ln_final"]  # a clash falls back to the full names
    assert weight_label("model.layers.12.self_attn.q_proj.weight") == "L12 self_attn.q_proj"
    assert weight_label("transformer.wte.weight") == "transformer.wte"
