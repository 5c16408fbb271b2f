"""4DME reader (the 2D greyscale micro-expression clips).

Layout: ``<root>/gray_micro/<sub_ID>/<fold_name>/<frames>``; sheet
``4DME_Labelling_Micro_release v1.xlsx`` in ``<root>``.

Quirks written down here:
- Header ``sub_ID, fold_name, Emotion, Onset, Apex, Offset, AUs`` (plus one-hot emotion
  columns, not read).
- Older sheets end names with an apostrophe (``S01'``, ``M1_1'``): removed.
- AUs may carry ``(k)`` (``12(k)``, a static AU kept through the clip) and ``AU`` prefixes;
  both parse (``mer.data.aus``).
- A sample may carry several emotions (``Negative+Surprise``): kept as ``negative+surprise``;
  each part must be a known emotion.
- Frames are found by their number; 60 fps (the 2D stream; the 4D meshes are not read).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    Problems,
    collect_samples,
    find_columns,
    find_sheet,
    find_tree,
    read_table,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS = 60.0
EMOTIONS = ("negative", "positive", "surprise", "repression", "others")
_SEPARATORS = re.compile(r"\s*(?:[+/,&]|\band\b)\s*", re.I)


@DATABASES.register("fourdme")
def read_fourdme(
    root: str | Path, sheet: str | Path | None = None, database: str = "fourdme",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a 4DME tree into a sample table; also returns the skipped samples with reasons."""
    root = Path(root)
    tree = find_tree(root, ["gray_micro", "4DME/gray_micro"], "*/*", "4DME gray_micro/ folder")
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree.parent], ["4DME_Labelling_Micro*.xls*", "*.xlsx"], "4DME labelling sheet")
    df = read_table(sheet, keys=("sub_ID", "fold_name"))
    col = find_columns(df, sheet, extra={"subject": ["sub_ID"], "clip": ["fold_name"],
                                         "aus": ["AUs"], "emotion": ["Emotion"]})
    known = None if emotions is None else set(emotions)
    specs = []
    for r in df.to_dict("records"):
        subject, clip = text_cell(r[col["subject"]]), text_cell(r[col["clip"]])
        parts = [p.lower() for p in _SEPARATORS.split(text_cell(r[col["emotion"]])) if p]
        # several emotions: valid when every part is known ("negative+surprise")
        emotion = "+".join(parts)
        if known is not None and len(parts) > 1 and all(p in known for p in parts):
            known.add(emotion)
        specs.append({
            "row": r["_row"], "subject": subject, "clip": clip,
            **{k: r[col[k]] for k in ("onset", "apex", "offset")},
            "frame_dir": tree / subject / clip, "au": r[col["aus"]], "emotion": emotion,
        })
    problems = Problems(sheet, database, on_error)
    return collect_samples(specs, problems, FPS, known, check_images), problems.skipped
