"""The golden comparison (``tests/golden/golden_common.py``): strict on the machine the goldens were made on,
cross-machine tolerances elsewhere, and those tolerances still catch a real change."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
from golden_common import XTOL, XTOL_SEARCH, compare_tables, same_machine, this_machine  # noqa: E402

sys.path.pop(0)


def table(**cols) -> pd.DataFrame:
    return pd.DataFrame({k: [str(v) for v in vals] for k, vals in cols.items()})


EXP = table(canonical_name=["a", "b", "c"], zero_frac=[0.5, 0.25, 0.125], count=[1, 40, 1000])


def moved(col: str, i: int, by) -> pd.DataFrame:
    t = EXP.copy()
    t.loc[i, col] = str(by(float(t.loc[i, col])) if col != "count" else int(by(int(t.loc[i, col]))))
    return t


def test_the_same_machine_compares_strictly():
    assert compare_tables(EXP, EXP) == []
    assert compare_tables(EXP, moved("zero_frac", 1, lambda v: v * (1 + 1e-7))) == []
    assert compare_tables(EXP, moved("zero_frac", 1, lambda v: v * (1 + 1e-5)))
    assert compare_tables(EXP, moved("count", 1, lambda v: v + 1))


def test_another_machine_allows_float_noise_and_still_catches_a_change():
    # the allowance: XTOL of the value plus XTOL of the column's largest |value| (0.5 here)
    assert compare_tables(EXP, moved("zero_frac", 2, lambda v: v + 0.9 * XTOL * (v + 0.5)), xtol=XTOL) == []
    problems = compare_tables(EXP, moved("zero_frac", 2, lambda v: v + 1.1 * XTOL * (v + 0.5)), xtol=XTOL)
    assert problems and "another machine" in problems[0]
    assert compare_tables(EXP, moved("zero_frac", 0, lambda v: v * 1.01), xtol=XTOL)  # 1 %: a change
    assert compare_tables(EXP, moved("zero_frac", 0, lambda v: v * 1.005), xtol=XTOL_SEARCH) == []
    assert compare_tables(EXP, moved("zero_frac", 0, lambda v: v * 1.05), xtol=XTOL_SEARCH)


def test_another_machine_allows_a_count_to_move_by_two_and_a_thousandth():
    assert compare_tables(EXP, moved("count", 0, lambda v: v + 2), xtol=XTOL) == []
    assert compare_tables(EXP, moved("count", 0, lambda v: v + 3), xtol=XTOL)
    assert compare_tables(EXP, moved("count", 2, lambda v: v - 3), xtol=XTOL) == []  # 2 + 1e-3 x 1000
    assert compare_tables(EXP, moved("count", 2, lambda v: v - 4), xtol=XTOL)
    text = EXP.copy()
    text.loc[0, "canonical_name"] = "z"
    assert compare_tables(EXP, text, xtol=XTOL_SEARCH)  # text stays exact


def test_which_machine_is_the_same():
    here = this_machine()
    assert here["torch"] and here["arch"]
    assert same_machine(None, here) and same_machine(dict(here), here)
    assert same_machine({k: v for k, v in here.items() if k in ("arch", "torch")}, here)  # a shorter record
    assert not same_machine({**here, "vendor_id": "SomeOtherVendor"}, here)
    assert not same_machine({**here, "torch": "0.0.1"}, here)
    assert same_machine({**here, "note": "ignored"}, here)
