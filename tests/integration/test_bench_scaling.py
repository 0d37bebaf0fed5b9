"""Smoke test of benchmarks/bench_scaling.py: its tiniest sizes, in-process, give complete tables.

No timing is asserted: only that every sweep has its rows and every figure is a finite positive number.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sections(md: str) -> dict[str, list[list[str]]]:
    """Data rows of the table under each '## ' heading (heading text up to ' (' as the key)."""
    out: dict[str, list[list[str]]] = {}
    key = None
    for line in md.splitlines():
        if line.startswith("## "):
            key = line[3:].split(" (")[0]
            out[key] = []
        elif key and line.startswith("| ") and not line.startswith("|---"):
            out[key].append([c.strip() for c in line.strip("|").split("|")])
    return {k: rows[1:] for k, rows in out.items()}  # drop each header row


def _positive(cell: str) -> bool:
    try:
        v = float(cell)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def test_tiny_run_gives_every_table(tmp_path, capsys):
    bench = _load_script()
    out, js = tmp_path / "scaling.md", tmp_path / "scaling.json"
    rc = bench.main(["--tiny", "--in-process", "--silent", "--out", str(out), "--json", str(js),
                     "--workdir", str(tmp_path / "work")])
    assert rc == 0
    md = out.read_text()
    assert md in capsys.readouterr().out  # also printed
    p = bench.PRESETS["tiny"]
    sec = _sections(md)
    assert set(sec) == {"measure vs counted tokens", "measure vs layers", "measure vs width",
                        "spectrum vs matrix size", "spectrum vs number of matrices", "Growth exponents"}

    # x columns: tokens, layers, d_model; the other two held at the base point
    expect = {"measure vs counted tokens": [(t, p["base_layers"], p["base_width"]) for t in p["tokens"]],
              "measure vs layers": [(p["base_tokens"], n, p["base_width"]) for n in p["layers"]],
              "measure vs width": [(p["base_tokens"], p["base_layers"], w) for w in p["widths"]]}
    for name, points in expect.items():
        rows = sec[name]
        assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == points, name
        for r in rows:
            assert int(r[3]) == 4 * int(r[2])  # d_mlp
            # phase peaks (columns 12-13) need /proc/self/clear_refs; everything else is always a number
            assert all(_positive(c) for i, c in enumerate(r) if i not in (12, 13)), r
            assert all(_positive(c) or c == "n/a" for c in r[12:14]), r

    sizes = sec["spectrum vs matrix size"]
    assert [r[0] for r in sizes] == [f"{n} x {n}" for n in p["spec_sizes"]] + \
        [f"{p['spec_tall']} x {4 * p['spec_tall']}"]
    counts = sec["spectrum vs number of matrices"]
    assert [int(r[1]) for r in counts] == list(p["spec_counts"])
    for r in sizes + counts:
        assert all(_positive(c) for i, c in enumerate(r[1:], start=1) if i not in (7, 8)), r
        assert all(_positive(c) or c == "n/a" for c in r[7:9]), r

    exps = sec["Growth exponents"]
    assert len(exps) == 5
    for r in exps:
        float(r[2]), float(r[3])  # fitted exponents: finite numbers, any sign (tiny sizes are all noise)
        lo, hi = (float(x) for x in r[7].split(" - "))
        assert 0 < lo <= hi and math.isfinite(hi)

    base = md.split("peaks at **", 1)[1].split(" MiB", 1)[0]
    assert _positive(base)  # the import-only baseline, always a subprocess
    res = json.loads(js.read_text())
    assert res["preset"] == "tiny" and res["in_process"] is True
    assert all(r["n_sites"] == r["layers"] for r in res["measure_vs_layers"])  # one mlp_post site per layer
    assert all(r["alpha_finite"] >= 0 and r["n_matrices"] == r["count"] for r in res["spectrum_vs_count"])
