"""Helpers shared by the database readers: sheet loading, column variants, clear errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


class DatabaseError(ValueError):
    """A problem with a database on disk: the message names the file/row and the fix."""


def read_sheet(path: Path, header_row: int | None = 0) -> pd.DataFrame:
    """Read an annotation sheet (.xlsx/.xls/.csv); DatabaseError if it is absent."""
    path = Path(path)
    if not path.exists():
        raise DatabaseError(f"annotation sheet not found: {path}. Point data.sheet at it.")
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, header=header_row)
    return pd.read_excel(path, header=header_row)


def find_column(df: pd.DataFrame, variants: list[str], sheet: Path, what: str) -> str:
    """The first column of ``df`` matching one of ``variants`` (case and space insensitive)."""
    norm = {str(c).lower().replace(" ", "").replace("_", ""): c for c in df.columns}
    for v in variants:
        key = v.lower().replace(" ", "").replace("_", "")
        if key in norm:
            return norm[key]
    raise DatabaseError(
        f"{sheet}: no {what} column (looked for {variants}; found {list(map(str, df.columns))}). "
        "Rename the column or fix the header row."
    )


def frame_number(value: object) -> int:
    """A frame cell as int, or -1 when missing or '/' (CASME II writes '/' for unknown apex)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return -1
    text = str(value).strip()
    if text in ("", "/", "-", "nan"):
        return -1
    return int(float(text))
