"""Tidy tables: every table is written as Parquet and CSV side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_table(df: pd.DataFrame, folder: str | Path, name: str) -> list[str]:
    """Write ``name.parquet`` and ``name.csv`` in ``folder``; return the file names."""
    folder = Path(folder)
    df = df.reset_index(drop=True)
    df.to_parquet(folder / f"{name}.parquet", index=False)
    df.to_csv(folder / f"{name}.csv", index=False)
    return [f"{name}.parquet", f"{name}.csv"]


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> list[str]:
    """Write each of a result's ``tables()`` under its name, in order; return the file names."""
    return [f for name, df in tables.items() for f in write_table(df, folder, name)]


def read_table(folder: str | Path, name: str) -> pd.DataFrame:
    folder = Path(folder)
    pq = folder / f"{name}.parquet"
    return pd.read_parquet(pq) if pq.exists() else pd.read_csv(folder / f"{name}.csv")
