"""reports.numbers: the one way numbers are written for people (terminal, summary.md, compare, html)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.numbers import NA, fixed, fmt, pct

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("v, digits, expected", [
    (None, 4, "-"),
    (float("nan"), 4, "-"),
    (np.float32("nan"), 4, "-"),
    (pd.NA, 4, "-"),
    (pd.NaT, 4, "-"),
    (math.inf, 4, "inf"),
    (-math.inf, 4, "-inf"),
    (np.float16("-inf"), 4, "-inf"),
    (0.012345678, 4, "0.01235"),
    (3.0, 4, "3"),
    (-0.5, 4, "-0.5"),
    (123456.7, 4, "1.235e+05"),
    (1.2345e-05, 4, "1.234e-05"),
    (2.5e-7, 6, "2.5e-07"),
    (0.00390625, 6, "0.00390625"),
    (0.005859375, 6, "0.00585938"),
    (np.float32(1.5), 4, "1.5"),
    (np.float64(11.22343), 6, "11.2234"),
    (12345678, 4, "12345678"),          # integers keep every digit
    (np.int64(-42), 4, "-42"),
    (True, 4, "True"),
    ("mlp_post", 4, "mlp_post"),
])
def test_fmt(v, digits, expected):
    assert fmt(v, digits) == expected


def test_fmt_default_is_four_significant_digits_and_na_can_be_changed():
    assert fmt(2 / 3) == "0.6667"
    assert fmt(None, na="") == "" and fmt(math.nan, na="n/a") == "n/a"
    assert fmt(math.inf, na="") == "inf"  # na is only for missing values
    assert NA == "-"


@pytest.mark.parametrize("v, decimals, expected", [
    (1.0021349, 4, "1.0021"),
    (1.000005, 5, "1.00001"),
    (3, 2, "3.00"),
    (None, 2, "-"),
    (math.nan, 2, "-"),
    (math.inf, 2, "inf"),
    (-math.inf, 3, "-inf"),
    ("unreachable", 2, "unreachable"),
])
def test_fixed(v, decimals, expected):
    assert fixed(v, decimals) == expected


@pytest.mark.parametrize("v, kwargs, expected", [
    (0.1234, {}, "12.34"),
    (1, {}, "100.00"),
    (0.00001, {}, "0.00"),
    (0.5, {"decimals": 1}, "50.0"),
    (None, {}, "-"),
    (math.nan, {}, "-"),
    (math.inf, {}, "inf"),
    (-math.inf, {}, "-inf"),
    (0.5, {"signed": True, "suffix": " %"}, "+50.00 %"),
    (-0.0065, {"signed": True, "suffix": " %"}, "-0.65 %"),
    (0.0, {"signed": True, "suffix": " %"}, "+0.00 %"),
    (math.nan, {"signed": True, "suffix": " %"}, "-"),      # no "- %"
    (math.inf, {"signed": True, "suffix": " %"}, "inf"),    # the same inf everywhere
    (-math.inf, {"signed": True, "suffix": " %"}, "-inf"),
])
def test_pct(v, kwargs, expected):
    assert pct(v, **kwargs) == expected


def test_no_other_number_formatter_is_defined():
    """One formatter: no module of the presentation or CLI layers defines its own _fmt / _num / _pct / fmt."""
    names = {"fmt", "_fmt", "_num", "_pct", "pct", "fmt_rel", "_fmt_num"}
    found = []
    for pkg in ("reports", "actsparse_cli", "probes"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "reports" / "numbers.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, "number formatters outside reports/numbers.py: " + ", ".join(found)
