"""SAMM reader (micro-expression clips).

Layout: ``<root>/SAMM/006/006_1_2/006_05562.jpg`` (``<root>`` may also be the ``SAMM`` folder
itself); sheet ``SAMM_Micro_FACS_Codes_v2.xlsx`` in ``<root>`` or in ``SAMM/``.

Quirks written down here:
- The release sheet has 13 text rows above the header; re-saved copies have it on row 1. The
  header row is found by its ``Subject`` and ``Filename`` cells.
- ``Subject`` is read as an integer (``6``); folders are ``%03d`` (``006``).
- Frames are ``<subject>_<frame:05d>.jpg``, greyscale, 200 fps.
- Emotions are capitalised (``Anger``); ``Estimated Emotion`` (release) / ``emotion``.
- ``Objective Classes`` is an integer 1..7 -> ``I``..``VII`` (anything else: a row error).
- AU strings carry sides, intensities, alternatives and notes (``R12orR14``, ``4A/B``,
  ``ref(24)``, ``soft focus``); see ``mer.data.aus``.
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
    optional_column,
    read_table,
    subject_id,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS = 200.0
EMOTIONS = ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise", "other")


@DATABASES.register("samm")
def read_samm(
    root: str | Path, sheet: str | Path | None = None, database: str = "samm",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a SAMM tree into a sample table; also returns the skipped samples with reasons."""
    root = Path(root)
    tree = find_tree(root, ["SAMM", "."], "[0-9][0-9][0-9]", "SAMM subject folders (006/)")
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree], ["SAMM_Micro_FACS_Codes*.xls*", "*.xlsx"], "SAMM coding sheet")
    df = read_table(sheet, keys=("Subject", "Filename"))
    col = find_columns(df, sheet)
    objective = optional_column(df, ["Objective Classes", "Objective Class"])
    specs = []
    for r in df.to_dict("records"):
        subject = subject_id(r[col["subject"]], "{:03d}")  # 6 -> 006
        clip = text_cell(r[col["clip"]])
        specs.append({
            "row": r["_row"], "subject": subject, "clip": clip,
            **{k: r[col[k]] for k in ("onset", "apex", "offset")},
            "frame_dir": tree / subject / clip, "frame_name": f"{subject}_{{:05d}}.jpg",
            "au": r[col["aus"]], "emotion": r[col["emotion"]],
            "objective": objective_name(r[objective]) if objective else "",
        })
    problems = Problems(sheet, database, on_error)
    return collect_samples(specs, problems, FPS, emotions, check_images), problems.skipped
