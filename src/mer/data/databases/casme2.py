"""CASME II reader.

Layout: ``<root>/CASME2_RAW_selected/sub01/EP02_01f/img46.jpg`` (or the cropped release,
``<root>/Cropped/sub01/EP19_06f/reg_img36.jpg``); sheet ``CASME2-coding-*.xlsx`` in ``<root>``.

Quirks written down here:
- ``Subject`` is an integer; folders are ``sub%02d``.
- Header variants: ``OnsetFrame`` / ``Onset Frame``, ``ApexFrame`` / ``Apex Frame``,
  ``Estimated Emotion`` / ``emotion``; two unnamed empty columns.
- Some apex cells are missing or ``/``: apex = -1 (the apex is estimated downstream).
- 200 fps.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    DatabaseError,
    Problems,
    collect_samples,
    find_columns,
    read_table,
    subject_id,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS = 200.0
EMOTIONS = ("happiness", "disgust", "surprise", "repression", "others", "fear", "sadness")
_FRAME_TREES = (("CASME2_RAW_selected", "img{}.jpg"), ("Cropped", "reg_img{}.jpg"))


def find_sheet(root: Path) -> Path:
    """The coding sheet in ``root`` (``CASME2-coding*.xlsx``)."""
    found = sorted(Path(root).glob("CASME2-coding*.xls*")) + sorted(Path(root).glob("*.xlsx"))
    if not found:
        raise DatabaseError(f"no CASME2-coding*.xlsx in {root}; set data.sheet to its path")
    return found[0]


def read_casme2(
    root: str | Path, sheet: str | Path | None = None, database: str = "casme2",
    on_error: str = "raise", emotions: Iterable[str] | None = None, check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a CASME II tree into a sample table (``mer.data.samples``).

    ``emotions``: the emotion words accepted (None: any; SynME writes other databases'
    emotions in this layout). Returns the table and the samples skipped (``on_error="skip"``)
    with their reasons.
    """
    root = Path(root)
    sheet = Path(sheet) if sheet else find_sheet(root)
    df = read_table(sheet, keys=("Subject", "Filename"))
    col = find_columns(df, sheet)
    tree, pattern = next(((t, p) for t, p in _FRAME_TREES if (root / t).is_dir()), (None, None))
    if tree is None:
        raise DatabaseError(
            f"{root}: no CASME2_RAW_selected/ or Cropped/ folder; point data.root at the folder "
            "that holds them"
        )
    specs = []
    for r in df.to_dict("records"):
        subject = subject_id(r[col["subject"]], "sub{:02d}")  # 1 -> sub01
        clip = text_cell(r[col["clip"]])
        specs.append({
            "row": r["_row"], "subject": subject, "clip": clip,
            **{k: r[col[k]] for k in ("onset", "apex", "offset")},
            "frame_dir": root / tree / subject / clip, "frame_name": pattern,
            "au": r[col["aus"]], "emotion": r[col["emotion"]],
        })
    problems = Problems(sheet, database, on_error)
    table = collect_samples(specs, problems, FPS, emotions, check_images)
    return table, problems.skipped


@DATABASES.register("casme2")
def read_casme2_release(
    root: str | Path, sheet: str | Path | None = None, **options,
) -> tuple[pd.DataFrame, list[dict]]:
    """The real CASME II: :func:`read_casme2` accepting its own emotion words only (SynME,
    which writes other databases' words in this layout, calls :func:`read_casme2`)."""
    options.setdefault("emotions", EMOTIONS)
    return read_casme2(root, sheet, **options)
