"""How a number is written for a person: terminal tables, ``summary.md``, compare's markdown, html.

One convention for every command and file (tables on disk keep full precision; this is only for
reading):

- missing (None, NaN, ``pd.NA``, ``NaT``) -> ``"-"`` (``na=`` changes it where a table needs another
  mark);
- infinities -> ``"inf"`` and ``"-inf"``, also in percentages and signed numbers;
- integers (Python or numpy) -> all their digits; booleans -> ``True``/``False``; text as it is;
- other numbers: ``fmt`` with ``digits`` significant digits (``g`` format: ``0.01235``, ``1.235e+06``,
  ``3`` for ``3.0``), ``fixed`` with a fixed number of decimals, ``pct`` a fraction as a percent.
"""

from __future__ import annotations

import math
import sys
from numbers import Integral, Real
from typing import Any

NA = "-"


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, Real):
        return not isinstance(v, Integral) and math.isnan(float(v))
    pd = sys.modules.get("pandas")  # pd.NA / pd.NaT can only exist once pandas is loaded
    return pd is not None and (v is pd.NA or v is pd.NaT)


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real number (not a bool, not text); None otherwise."""
    if isinstance(v, bool) or not isinstance(v, Real):
        return None
    return float(v)


def _special(f: float, na: str) -> str | None:
    if math.isnan(f):
        return na
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return None


def fmt(v: Any, digits: int = 4, na: str = NA) -> str:
    """``v`` with ``digits`` significant digits; integers whole; text and booleans as they are."""
    if _missing(v):
        return na
    if isinstance(v, Integral) and not isinstance(v, bool):
        return str(int(v))
    f = _number(v)
    if f is None:
        return str(v)
    return _special(f, na) or f"{f:.{digits}g}"


def fixed(v: Any, decimals: int, na: str = NA) -> str:
    """``v`` with ``decimals`` digits after the point (``fixed(1.00213, 4) == "1.0021"``)."""
    if _missing(v):
        return na
    f = _number(v)
    if f is None:
        return str(v)
    return _special(f, na) or f"{f:.{decimals}f}"


def pct(v: Any, decimals: int = 2, *, signed: bool = False, suffix: str = "", na: str = NA) -> str:
    """A fraction as a percent: ``pct(0.1234) == "12.34"``; ``signed`` adds ``+`` to positive values and
    ``suffix`` (e.g. ``" %"``) is written after finite values only (``pct(nan, suffix=" %") == "-"``)."""
    if _missing(v):
        return na
    f = _number(v)
    if f is None:
        return str(v)
    f *= 100
    special = _special(f, na)
    if special is not None:
        return special
    return f"{f:{'+' if signed else ''}.{decimals}f}{suffix}"


__all__ = ["NA", "fmt", "fixed", "pct"]
