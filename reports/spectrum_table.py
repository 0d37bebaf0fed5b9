"""The spectrum table's files without pandas or pyarrow: ``spectrum.csv`` and ``spectrum.parquet`` from a
``probes.spectrum.SpectrumTable``. The CSV file is byte for byte what ``reports.tables.write_table`` writes for
its ``to_pandas()`` DataFrame; the Parquet file reads back (``pd.read_parquet``) as that same DataFrame.

Why: ``actsparse spectrum`` is a 1-2 s command; importing pandas costs 0.25-0.45 s of it and pyarrow ~35 ms
(issue 16, goal 1). The table has four kinds of columns, and each is written the way pandas writes it:

- text (pandas' ``str`` columns): the values as they are;
- ``Int64`` (``probes.spectrum.INT_COLUMNS``): ``str(int)``, missing as empty; Parquet INT64 with nulls;
- ``float64``: numpy's ``astype(str)`` (what pandas' CSV writer calls: the shortest repr), NaN as empty
  (a null in Parquet, as pandas stores it);
- ``bool``: ``True``/``False``.

CSV rows go through the ``csv`` module with pandas' dialect (``,``, ``"``, minimal quoting, ``\\n``). The
Parquet file is written by ``reports.parquet_plain`` (uncompressed PLAIN pages, one row group) with the
``pandas`` / ``PANDAS_ATTRS`` metadata that pandas' ``to_parquet`` stores, so ``pd.read_parquet`` gives back
the same DataFrame (``Int64`` columns and ``attrs`` included). A table with a column of another kind (it
cannot come out of ``probes.spectrum``, but a caller may build one) is written through pandas.
``tests/unit/test_spectrum_fast.py`` compares the CSV with pandas' bytes and the Parquet file's contents with
pandas' file.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


_FLOATS = (float, np.float64, np.float32)
_INTS = (int, np.int64, np.int32)
_BOOLS = (bool, np.bool_)


def _kind(name: str, values: list[Any], int_columns) -> str | None:
    """``str``, ``Int64``, ``float64`` or ``bool``: the dtype pandas gives the column; None for anything else
    (the types are tested exactly: the abstract ``numbers`` checks cost 15 ms a table)."""
    types = {type(v) for v in values}
    if name in int_columns:
        ok = types <= {*_INTS, float} and all(type(v) is not float or math.isnan(v) for v in values)
        return "Int64" if ok else None
    if values and types <= set(_BOOLS):
        return "bool"
    if str in types and types <= {str, float} and all(type(v) is str or math.isnan(v) for v in values):
        return "str"
    if types and types <= {*_FLOATS, *_INTS} and types & set(_FLOATS):  # whole numbers only: pandas makes int64
        return "float64"
    return None


# pandas' metadata entry of each kind: (pandas_type, numpy_type)
_PANDAS_TYPES = {"str": ("object", "str"), "Int64": ("int64", "Int64"), "float64": ("float64", "float64"),
                 "bool": ("bool", "bool")}


def _csv_cells(kind: str, values: list[Any]) -> list[str]:
    if kind == "float64":
        arr = np.asarray(values, dtype=np.float64)
        cells = arr.astype(str).tolist()
        return ["" if m else c for c, m in zip(cells, np.isnan(arr).tolist())]
    if kind == "Int64":
        return ["" if isinstance(v, float) else str(int(v)) for v in values]
    if kind == "bool":
        return ["True" if v else "False" for v in values]
    return [v if isinstance(v, str) else "" for v in values]


def _parquet_values(kind: str, values: list[Any]) -> tuple[str, list[Any]]:
    """The column for ``reports.parquet_plain``: its Parquet kind and values, missing ones as None (nulls, as
    pandas' ``to_parquet`` stores NaN and ``<NA>``)."""
    if kind == "float64":
        return "float64", [None if math.isnan(v) else float(v) for v in values]
    if kind == "Int64":
        return "int64", [None if isinstance(v, float) else int(v) for v in values]
    if kind == "bool":
        return "bool", [bool(v) for v in values]
    return "str", [v if isinstance(v, str) else None for v in values]


def _pandas_version() -> str:
    """pandas' version (stored in the Parquet metadata) without importing pandas, from the name of its
    ``pandas-<version>.dist-info`` folder next to the package (one directory listing, where
    ``importlib.metadata`` parses the METADATA file: 15 ms); else ``importlib.metadata``."""
    import importlib.util

    spec = importlib.util.find_spec("pandas")
    if spec is not None and spec.origin:
        site = Path(spec.origin).parent.parent
        found = [d.name[len("pandas-"):-len(".dist-info")] for d in site.glob("pandas-*.dist-info")]
        if len(found) == 1:
            return found[0]
    from importlib import metadata

    return metadata.version("pandas")


def _own_version() -> str:
    from reports.manifest import package_versions

    return package_versions(("actsparse",)).get("actsparse") or "unknown"


def write_spectrum_table(table, folder: str | Path, name: str = "spectrum") -> list[str]:
    """Write ``name.parquet`` and ``name.csv`` of a ``SpectrumTable`` into ``folder``; return the file names
    (as ``reports.tables.write_table``, whose bytes these are)."""
    from probes.spectrum import INT_COLUMNS

    folder = Path(folder)
    columns = list(table.columns)
    values = {c: table.column(c) for c in columns}
    kinds = {c: _kind(c, values[c], INT_COLUMNS) for c in columns}
    if any(k is None for k in kinds.values()):
        from reports.tables import write_table

        return write_table(table.to_pandas(), folder, name)

    from reports.parquet_plain import parquet_bytes

    pandas_meta = {
        "index_columns": [], "column_indexes": [],
        "columns": [{"name": c, "field_name": c, "pandas_type": _PANDAS_TYPES[kinds[c]][0],
                     "numpy_type": _PANDAS_TYPES[kinds[c]][1], "metadata": None} for c in columns],
        "attributes": table.attrs,
        "creator": {"library": "actsparse", "version": _own_version()},
        "pandas_version": _pandas_version(),
    }
    metadata = {"pandas": json.dumps(pandas_meta)}
    if table.attrs:  # pandas stores its attrs a second time, when there are any
        metadata["PANDAS_ATTRS"] = json.dumps(table.attrs)
    data = parquet_bytes([(c, *_parquet_values(kinds[c], values[c])) for c in columns], metadata)
    (folder / f"{name}.parquet").write_bytes(data)

    cells = [_csv_cells(kinds[c], values[c]) for c in columns]
    with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n", delimiter=",", quotechar='"', quoting=csv.QUOTE_MINIMAL,
                            doublequote=True)
        writer.writerow(columns)
        writer.writerows(zip(*cells))
    return [f"{name}.parquet", f"{name}.csv"]
