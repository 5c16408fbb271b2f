"""CASME II reader.

Layout: ``<root>/CASME2_RAW_selected/sub01/EP02_01f/img46.jpg`` (or the cropped release,
``<root>/Cropped/sub01/EP19_06f/reg_img36.jpg``); sheet ``CASME2-coding-*.xlsx`` in ``<root>``.

Quirks written down here:
- ``Subject`` is an integer; folders are ``sub%02d``.
- Header variants: ``OnsetFrame`` / ``Onset Frame``, ``ApexFrame`` / ``Apex Frame``,
  ``Estimated Emotion`` / ``emotion``.
- Some apex cells are missing or ``/``: apex = -1 (the apex is estimated downstream).
- 200 fps.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mer.data.aus import parse_au_string
from mer.data.databases.common import DatabaseError, find_column, frame_number, read_sheet
from mer.data.samples import SAMPLE_COLUMNS

FPS = 200.0
_FRAME_TREES = (("CASME2_RAW_selected", "img{}.jpg"), ("Cropped", "reg_img{}.jpg"))


def find_sheet(root: Path) -> Path:
    """The coding sheet in ``root`` (``CASME2-coding*.xlsx``)."""
    found = sorted(Path(root).glob("CASME2-coding*.xls*")) + sorted(Path(root).glob("*.xlsx"))
    if not found:
        raise DatabaseError(f"no CASME2-coding*.xlsx in {root}; set data.sheet to its path")
    return found[0]


def read_casme2(
    root: str | Path, sheet: str | Path | None = None, database: str = "casme2",
    on_error: str = "raise",
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a CASME II tree into a sample table (``mer.data.samples``).

    Returns the table and the samples skipped (``on_error="skip"``) with their reasons.
    """
    root = Path(root)
    sheet = Path(sheet) if sheet else find_sheet(root)
    df = read_sheet(sheet)
    col = {
        "subject": find_column(df, ["Subject"], sheet, "subject"),
        "clip": find_column(df, ["Filename"], sheet, "filename"),
        "onset": find_column(df, ["OnsetFrame", "Onset Frame", "Onset"], sheet, "onset"),
        "apex": find_column(df, ["ApexFrame", "Apex Frame", "Apex"], sheet, "apex"),
        "offset": find_column(df, ["OffsetFrame", "Offset Frame", "Offset"], sheet, "offset"),
        "aus": find_column(df, ["Action Units", "AU"], sheet, "action units"),
        "emotion": find_column(df, ["Estimated Emotion", "emotion"], sheet, "emotion"),
    }
    tree, pattern = next(
        ((t, p) for t, p in _FRAME_TREES if (root / t).is_dir()), _FRAME_TREES[0]
    )
    if not (root / tree).is_dir():
        raise DatabaseError(
            f"{root}: no CASME2_RAW_selected/ or Cropped/ folder; point data.root at the folder "
            "that holds them"
        )
    records, skipped = [], []
    for i, r in enumerate(df.to_dict("records")):
        row = i + 2  # 1-based, header on row 1
        subject_cell = r[col["subject"]]
        if pd.isna(subject_cell):
            continue  # blank trailing rows of the spreadsheet
        subject = f"sub{int(subject_cell):02d}" if str(subject_cell).strip().isdigit() or \
            isinstance(subject_cell, (int, float)) else str(subject_cell).strip()
        clip = str(r[col["clip"]]).strip()
        onset, apex, offset = (frame_number(r[col[k]]) for k in ("onset", "apex", "offset"))
        frame_dir = root / tree / subject / clip
        onset_path = frame_dir / pattern.format(onset)
        apex_path = frame_dir / pattern.format(apex) if apex >= 0 else None
        problem = ""
        if onset < 0:
            problem = "no onset frame in the sheet"
        elif not frame_dir.is_dir():
            problem = f"frame folder missing: {frame_dir}"
        elif not onset_path.exists():
            problem = f"onset frame missing: {onset_path}"
        elif apex_path is not None and not apex_path.exists():
            problem = f"apex frame missing: {apex_path}"
        elif apex >= 0 and apex < onset:
            problem = f"apex {apex} before onset {onset}"
        if problem:
            if on_error == "skip":
                skipped.append({"database": database, "subject": subject, "clip": clip,
                                "reason": f"{sheet.name} row {row}: {problem}"})
                continue
            raise DatabaseError(
                f"{sheet} row {row} ({subject} {clip}): {problem}. Fix the sheet or the frames, "
                "or set data.on_error=skip to leave the sample out (it is then listed in the "
                "report)."
            )
        parsed = parse_au_string(r[col["aus"]])
        records.append({
            "database": database, "subject": subject, "clip": clip, "onset": onset,
            "apex": apex, "offset": offset, "frame_dir": str(frame_dir),
            "onset_path": str(onset_path), "apex_path": str(apex_path) if apex_path else "",
            "au_raw": parsed.raw, "aus": parsed.aus, "emotion": str(r[col["emotion"]]).strip()
            .lower(), "fps": FPS, "row": row,
        })
    return pd.DataFrame(records, columns=SAMPLE_COLUMNS), skipped
