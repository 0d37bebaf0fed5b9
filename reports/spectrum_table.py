"""The spectrum table's files without pandas: ``spectrum.csv`` and ``spectrum.parquet`` from a
``probes.spectrum.SpectrumTable``, byte for byte what ``reports.tables.write_table`` writes for its
``to_pandas()`` DataFrame.

Why: ``actsparse spectrum`` is a 1-2 s command and importing pandas costs 0.25-0.45 s of it (issue 16,
goal 1). The table has four kinds of columns, and each is written the way pandas writes it:

- text (pandas' ``str`` columns): the values as they are; Arrow ``large_string``;
- ``Int64`` (``probes.spectrum.INT_COLUMNS``): ``str(int)``, missing as empty; Arrow ``int64`` with nulls;
- ``float64``: numpy's ``astype(str)`` (what pandas' CSV writer calls: the shortest repr), NaN as empty;
- ``bool``: ``True``/``False``.

CSV rows go through the ``csv`` module with pandas' dialect (``,``, ``"``, minimal quoting, ``\\n``). The
Parquet file is written by ``pyarrow.parquet.write_table`` (snappy, pandas' default) with the schema and the
``pandas`` / ``PANDAS_ATTRS`` metadata that pandas' ``to_parquet`` stores, so ``pd.read_parquet`` gives back
the same DataFrame (``Int64`` columns and ``attrs`` included). A table with a column of another kind (it
cannot come out of ``probes.spectrum``, but a caller may build one) is written through pandas.
``tests/unit/test_spectrum_fast.py`` compares both files with pandas' bytes.
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


def _arrow_array(kind: str, values: list[Any]):
    """The column as an Arrow array built from its buffers: ``pa.array`` would import pandas (pyarrow
    checks every input for pandas types), which is what this module avoids. Missing values are nulls, as
    in pandas' ``to_parquet``."""
    import pyarrow as pa

    n = len(values)
    if kind == "float64":
        data = np.asarray(values, dtype=np.float64)
        valid = ~np.isnan(data)
        typ, buffers = pa.float64(), [pa.py_buffer(np.ascontiguousarray(data))]
    elif kind == "Int64":
        valid = np.array([not isinstance(v, float) for v in values], dtype=bool)
        data = np.array([0 if isinstance(v, float) else int(v) for v in values], dtype=np.int64)
        typ, buffers = pa.int64(), [pa.py_buffer(data)]
    elif kind == "bool":
        valid = np.ones(n, dtype=bool)
        typ, buffers = pa.bool_(), [pa.py_buffer(np.packbits(np.array(values, dtype=bool), bitorder="little"))]
    else:
        valid = np.array([isinstance(v, str) for v in values], dtype=bool)
        encoded = [v.encode("utf-8") if isinstance(v, str) else b"" for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        typ, buffers = pa.large_string(), [pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    nulls = int(n - np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(typ, n, [bitmap, *buffers], null_count=nulls)


_ARROW_TYPES = {"float64": "float64", "Int64": "int64", "bool": "bool_", "str": "large_string"}


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

    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": [], "column_indexes": [],
        "columns": [{"name": c, "field_name": c, "pandas_type": _PANDAS_TYPES[kinds[c]][0],
                     "numpy_type": _PANDAS_TYPES[kinds[c]][1], "metadata": None} for c in columns],
        "attributes": table.attrs,
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": _pandas_version(),
    }
    metadata = {b"pandas": json.dumps(pandas_meta).encode()}
    if table.attrs:  # pandas stores its attrs a second time, when there are any
        metadata[b"PANDAS_ATTRS"] = json.dumps(table.attrs).encode()
    schema = pa.schema([pa.field(c, getattr(pa, _ARROW_TYPES[kinds[c]])()) for c in columns], metadata=metadata)
    arrow = pa.Table.from_arrays([_arrow_array(kinds[c], values[c]) for c in columns], schema=schema)
    pq.write_table(arrow, folder / f"{name}.parquet", compression="snappy")

    cells = [_csv_cells(kinds[c], values[c]) for c in columns]
    with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n", delimiter=",", quotechar='"', quoting=csv.QUOTE_MINIMAL,
                            doublequote=True)
        writer.writerow(columns)
        writer.writerows(zip(*cells))
    return [f"{name}.parquet", f"{name}.csv"]
