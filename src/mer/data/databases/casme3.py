"""CAS(ME)^3 Part A reader (micro-expressions).

Layout: ``<root>/spNO.1/b/color/175.jpg`` (the depth stream beside ``color/`` is not read;
``<root>`` may also be the folder above ``part_A/`` or ``data/part_A/``); sheet
``cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx`` in ``<root>`` or beside the tree.

Quirks written down here:
- One frame folder per video (``spNO.1/b/color/``) and several MEs per video: the sheet's
  ``Filename`` (``b``) repeats within a subject. The clip id is ``<Filename>_<Onset>``
  (``b_166``) so that it stays unique.
- Frames are numbered from the video's start (``175.jpg``); 30 fps.
- ``Objective class`` is written ``I``..``VII`` (anything else: a row error); emotions
  lower-case, ``happy``/``sad`` (not happiness/sadness).
- AU strings use side prefixes ``L``/``R``/``B``/``T`` (``R12``, ``L1+2``, ``T18``).
- An offset of 0 means "not annotated" (two rows of v2, spNO.40 e): offset = -1.
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
    objective_name,
    onset_id,
    optional_column,
    read_table,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS = 30.0
EMOTIONS = ("anger", "disgust", "fear", "happy", "others", "sad", "surprise")
_TREES = [".", "part_A", "Part_A", "data/part_A", "part_A/data/part_A"]


@DATABASES.register("casme3")
def read_casme3(
    root: str | Path, sheet: str | Path | None = None, database: str = "casme3",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a CAS(ME)^3 Part A tree into a sample table; also returns the skipped samples."""
    root = Path(root)
    tree = find_tree(root, _TREES, "spNO.*", "CAS(ME)^3 subject folders (spNO.1/)")
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree], ["*ME_label*.xls*", "*.xlsx"], "CAS(ME)^3 Part A ME label sheet")
    df = read_table(sheet, keys=("Subject", "Filename"))
    col = find_columns(df, sheet)
    objective = optional_column(df, ["Objective class", "Objective classes"])
    specs = []
    for r in df.to_dict("records"):
        subject, video = text_cell(r[col["subject"]]), text_cell(r[col["clip"]])
        offset = r[col["offset"]]
        if text_cell(offset) == "0":  # 0: offset not annotated
            offset = -1
        specs.append({
            "row": r["_row"], "subject": subject,
            # "b" repeats: "b_166" does not; no Filename: no clip
            "clip": f"{video}_{onset_id(r[col['onset']])}" if video else "",
            "onset": r[col["onset"]], "apex": r[col["apex"]], "offset": offset,
            "frame_dir": tree / subject / video / "color", "frame_name": "{}.jpg",
            "au": r[col["aus"]], "emotion": r[col["emotion"]],
            "objective": objective_name(r[objective]) if objective else "",
        })
    problems = Problems(sheet, database, on_error)
    return collect_samples(specs, problems, FPS, emotions, check_images), problems.skipped
