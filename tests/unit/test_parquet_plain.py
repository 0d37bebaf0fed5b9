"""``reports.parquet_plain``: Parquet files written without pyarrow, read back by pyarrow and pandas."""

import math
import struct

import pytest

from reports import parquet_plain as pp

pq = pytest.importorskip("pyarrow.parquet")


def _write(tmp_path, columns, meta=None):
    path = tmp_path / "t.parquet"
    path.write_bytes(pp.parquet_bytes(columns, meta))
    return path


def test_every_kind_with_nulls_reads_back(tmp_path):
    n = 1000  # multi-byte varints, several bytes of levels
    floats = [None if i % 7 == 0 else (math.nan if i == 5 else i / 3) for i in range(n)]
    ints = [None if i % 11 == 0 else (-1) ** i * i ** 3 for i in range(n)]
    bools = [i % 3 == 0 for i in range(n)]
    strs = [None if i % 13 == 0 else ("" if i % 17 == 0 else f"é{i}" * (i % 5)) for i in range(n)]
    path = _write(tmp_path, [("f", "float64", floats), ("i", "int64", ints), ("b", "bool", bools),
                             ("s", "str", strs)], {"pandas": "{}", "other": "x"})
    t = pq.read_table(path)
    assert [str(t.schema.field(c).type) for c in "fibs"] == ["double", "int64", "bool", "string"]
    got = t.to_pydict()
    assert got["i"] == ints and got["b"] == bools and got["s"] == strs
    assert [None if v is None else (math.isnan(v) and "nan") or v for v in got["f"]] == \
           [None if v is None else (math.isnan(v) and "nan") or v for v in floats]
    assert t.schema.metadata == {b"pandas": b"{}", b"other": b"x"}
    md = pq.read_metadata(path)
    assert (md.num_rows, md.num_columns, md.num_row_groups, md.created_by) == (n, 4, 1, "actsparse")
    assert md.row_group(0).column(3).statistics is None  # no statistics are claimed


def test_many_columns_and_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    cols = [(f"c{k}", "float64", [float(k), None, 2.5]) for k in range(20)]  # lists longer than 14: long headers
    df = pd.read_parquet(_write(tmp_path, cols))
    assert list(df.columns) == [f"c{k}" for k in range(20)]
    assert df["c19"].tolist()[0] == 19.0 and math.isnan(df["c19"].tolist()[1])


def test_one_row_and_no_rows(tmp_path):
    t = pq.read_table(_write(tmp_path, [("a", "str", ["only"]), ("b", "int64", [None])]))
    assert t.to_pydict() == {"a": ["only"], "b": [None]}
    t = pq.read_table(_write(tmp_path, [("a", "float64", []), ("b", "bool", [])]))
    assert t.num_rows == 0 and t.column_names == ["a", "b"]


def test_bad_columns_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        pp.parquet_bytes([("a", "int64", [1, 2]), ("b", "int64", [1])])
    with pytest.raises(ValueError, match="kind 'int32'"):
        pp.parquet_bytes([("a", "int32", [1])])


def test_compact_protocol_by_hand():
    # field 1 i32 = 3 (zigzag 6), field 20 (delta 19 > 15: type byte, then zigzag varint 40) i64 = -1 (zigzag 1)
    s = pp._Struct().i32(1, 3).i64(20, -1)
    assert s.end() == bytes([0x15, 0x06, 0x06, 0x28, 0x01, 0x00])
    assert pp._varint(300) == bytes([0xAC, 0x02])
    assert pp._levels([True, False, True]) == struct.pack("<I", 2) + bytes([0x03, 0b101])
    assert pp._bits([True] * 9) == bytes([0xFF, 0x01])
