"""MMEW reader (the micro-expression part).

Layout: ``<root>/Micro_Expression/<emotion>/<Filename>/<n>.jpg``; sheet ``MMEW_Micro_Exp.xlsx``
in ``<root>`` (``<root>`` may also be ``Micro_Expression/`` itself).

Quirks written down here:
- Frame folders are grouped by emotion, not by subject: the folder is
  ``<Estimated Emotion>/<Filename>`` (the emotion folder matched case-insensitively; a blank
  emotion or one that is no folder name is a row error).
- Header ``Subject, Filename, OnsetFrame, ApexFrame, OffsetFrame, Action Units,
  Estimated Emotion, remarks``; the subject id is kept as the sheet writes it.
- 90 fps. The macro-expression part (``Macro_Expression/``) is not read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    Problems,
    collect_samples,
    find_columns,
    find_sheet,
    find_tree,
    name_problem,
    read_table,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS = 90.0
EMOTIONS = ("anger", "disgust", "fear", "happiness", "others", "sadness", "surprise")


@DATABASES.register("mmew")
def read_mmew(
    root: str | Path, sheet: str | Path | None = None, database: str = "mmew",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read an MMEW tree into a sample table; also returns the skipped samples with reasons."""
    root = Path(root)
    tree = find_tree(root, ["Micro_Expression", "MMEW/Micro_Expression", "."], "*/*",
                     "MMEW Micro_Expression/<emotion>/ folders")
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree, tree.parent], ["MMEW_Micro_Exp*.xls*", "*.xlsx"], "MMEW micro sheet")
    df = read_table(sheet, keys=("Subject", "Filename"))
    col = find_columns(df, sheet)
    folders = {p.name.lower(): p for p in tree.iterdir() if p.is_dir()}
    specs = []
    for r in df.to_dict("records"):
        clip, emotion = text_cell(r[col["clip"]]), text_cell(r[col["emotion"]])
        emotion_dir = folders.get(emotion.lower(), tree / emotion)
        specs.append({
            "problem": name_problem("emotion", emotion),  # it names the frame folder
            "row": r["_row"], "subject": text_cell(r[col["subject"]]), "clip": clip,
            **{k: r[col[k]] for k in ("onset", "apex", "offset")},
            "frame_dir": emotion_dir / clip, "frame_name": "{}.jpg",
            "au": r[col["aus"]], "emotion": emotion,
        })
    problems = Problems(sheet, database, on_error)
    return collect_samples(specs, problems, FPS, emotions, check_images), problems.skipped
