"""SAMM Long Videos reader (spotting intervals, and the micro-expressions as samples).

Layout: ``<root>/SAMM_longvideos/006_1/006_1_0001.jpg`` (or ``SAMM_longvideos_crop/``); sheet
``SAMM_LongVideos_V*_Release.xlsx`` in ``<root>``.

Quirks written down here:
- About 10 text rows above the header; the header row is found by ``Subject``/``Filename``.
- ``Filename`` names the expression (``006_1_2``); its video is the first two parts
  (``006_1``, the frame folder). ``Subject`` is an integer -> ``%03d``.
- ``Type`` reads ``Macro`` or ``Micro - 1/2``; 343 macro + 159 micro in V2.
- No emotion column: emotions come from the SAMM micro sheet when given (``micro_sheet``,
  matched by ``Filename``), else "".
- 200 fps; frames are found by their number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    Problems,
    collect_intervals,
    collect_samples,
    find_column,
    find_columns,
    find_sheet,
    find_tree,
    interval_type,
    read_table,
    subject_id,
    text_cell,
)
from mer.data.databases.registry import DATABASES, LONG_VIDEO

FPS = 200.0


def _tree(root: Path) -> Path:
    return find_tree(root, ["SAMM_longvideos", "SAMM_longvideos_crop", "."], "[0-9]*_*",
                     "SAMM_longvideos/ folder (SAMM_longvideos/006_1/)")


def list_samm_lv_videos(root: str | Path) -> list[dict]:
    """Every video folder of the release, annotated or not (spotting counts false positives in
    all of them): ``[{"subject": "006", "video": "006_1", "frame_dir"}]``."""
    return [{"subject": subject_id(v.name.split("_")[0], "{:03d}"), "video": v.name,
             "frame_dir": v}
            for v in sorted(_tree(Path(root)).iterdir())
            if v.is_dir() and re.fullmatch(r"[0-9]+_[0-9]+", v.name)]


def _specs(
    root: Path, sheet: str | Path | None, micro_sheet: str | Path | None
) -> tuple[list[dict], Path]:
    tree = _tree(root)
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree.parent], ["SAMM_LongVideos*.xls*", "*.xlsx"], "SAMM-LV release sheet")
    df = read_table(sheet, keys=("Subject", "Filename"))
    col = find_columns(df, sheet, keys=("subject", "clip", "onset", "apex", "offset", "aus"))
    col["type"] = find_column(df, ["Type"], sheet, "type (macro/micro)")
    emotions = _micro_emotions(Path(micro_sheet)) if micro_sheet else {}
    specs = []
    for r in df.to_dict("records"):
        name = text_cell(r[col["clip"]])
        video = "_".join(name.split("_")[:2])  # 006_1_2 -> 006_1
        specs.append({
            "row": r["_row"], "subject": subject_id(r[col["subject"]], "{:03d}"),
            "video": video, "name": name,
            **{k: r[col[k]] for k in ("onset", "apex", "offset")},
            "type": interval_type(r[col["type"]]), "frame_dir": tree / video,
            "au": r[col["aus"]], "emotion": emotions.get(name, ""),
        })
    return specs, sheet


def _micro_emotions(sheet: Path) -> dict[str, str]:
    """{Filename: emotion} from the SAMM micro sheet."""
    df = read_table(sheet, keys=("Subject", "Filename"))
    name = find_column(df, ["Filename"], sheet, "filename")
    emotion = find_column(df, ["Estimated Emotion", "emotion"], sheet, "emotion")
    return {text_cell(n): text_cell(e).lower() for n, e in zip(df[name], df[emotion])}


@LONG_VIDEO.register("samm_lv")
def read_samm_lv_intervals(
    root: str | Path, sheet: str | Path | None = None, database: str = "samm_lv",
    on_error: str = "raise", micro_sheet: str | Path | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """The interval table (macro and micro) of SAMM-LV, and the skipped rows with reasons."""
    specs, sheet = _specs(Path(root), sheet, micro_sheet)
    problems = Problems(sheet, database, on_error)
    return collect_intervals(specs, problems, FPS), problems.skipped


@DATABASES.register("samm_lv")
def read_samm_lv(
    root: str | Path, sheet: str | Path | None = None, database: str = "samm_lv",
    on_error: str = "raise", emotions: Iterable[str] | None = None,
    check_images: bool = True, types: Iterable[str] = ("micro",),
    micro_sheet: str | Path | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """The expressions of ``types`` (default micro) as a sample table, and the skipped ones.

    The clip id is the sheet's ``Filename`` (``006_1_2``), as in SAMM's micro release.
    """
    specs, sheet = _specs(Path(root), sheet, micro_sheet)
    types = set(types)
    problems = Problems(sheet, database, on_error)
    samples = []
    for s in specs:
        if s["type"] not in ("macro", "micro"):
            problems.fail(s["row"], s["subject"], s["name"],
                          "expression type is neither macro nor micro")
        elif s["type"] in types:
            samples.append({**s, "clip": s["name"]})
    return collect_samples(samples, problems, FPS, emotions, check_images), problems.skipped
