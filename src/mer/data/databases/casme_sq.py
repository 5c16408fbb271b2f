"""CAS(ME)^2 reader (long videos: spotting intervals, and the micro-expressions as samples).

Layout: ``<root>/rawpic/s15/15_0101disgustingteeth/img1.jpg`` (or ``rawpic_crop/``,
``cropped/``); sheet ``CAS(ME)^2code_final.xlsx`` (or ``code_final.xlsx``) in ``<root>``.

Quirks written down here:
- The first sheet has no header: ``subject, expression, onset, apex, offset, AUs, emotion,
  type, self-report``. ``subject`` is the participant number (1, 2, ...), ``expression`` is
  ``<video name>_<index>`` (``disgust1_3``).
- Two more sheets map the codes: participant number -> subject code (1 -> 15, folder
  ``s15``), video name -> video code (``disgust1`` -> ``0101``). They are recognised by their
  content, not their position; the video folder is ``<subject code>_<video code>*``
  (``15_0101disgustingteeth``).
- ``type`` reads ``macro-expression`` / ``micro-expression``.
- Frames start at ``img1``: an apex or offset of 0 means "not annotated" -> -1.
- Title lines and a header row someone added are left out; every other row is an
  expression (a non-numeric onset is that row's error, never a silent drop).
- Emotions: negative, positive, surprise, others. 30 fps.
- A sample's clip id is ``<video folder>_<onset>`` (several expressions per video).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    DatabaseError,
    Problems,
    collect_intervals,
    collect_samples,
    find_sheet,
    find_tree,
    interval_type,
    name_problem,
    onset_id,
    read_sheet,
    text_cell,
)
from mer.data.databases.registry import DATABASES, LONG_VIDEO

FPS = 30.0
EMOTIONS = ("negative", "positive", "surprise", "others")
_COLUMNS = ["subject", "expression", "onset", "apex", "offset", "au", "emotion", "type"]


def _tree(root: Path) -> Path:
    return find_tree(root, ["rawpic", "rawpic_crop", "cropped", "CASME_sq/rawpic"], "s*",
                     "CAS(ME)^2 rawpic/ folder (rawpic/s15/)")


def _tree_and_sheet(root: Path, sheet: str | Path | None) -> tuple[Path, Path]:
    tree = _tree(root)
    sheet = Path(sheet) if sheet else find_sheet(
        [root, tree.parent], ["*code_final*.xls*", "*.xlsx"], "CAS(ME)^2 code_final sheet")
    return tree, sheet


def _code_map(sheets: dict, keys: set[str], accept) -> dict[str, str]:
    """{key: code} from the sheet and column pair (key column, code column) that maps the most
    of ``keys`` to codes passing ``accept``; keys it lacks are reported per row."""
    best: dict[str, str] = {}
    for frame in sheets.values():
        cells = frame.map(text_cell)
        for a in cells.columns:
            if not keys & set(cells[a]):
                continue
            for b in cells.columns:
                pairs = {k: v for k, v in zip(cells[a], cells[b]) if k in keys}
                if b != a and len(pairs) > len(best) and all(map(accept, pairs.values())):
                    best = pairs
    return best


def _zero_is_none(cell: object) -> object:
    return -1 if text_cell(cell) == "0" else cell  # 0: not annotated (frames start at img1)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the OS: no such folder (the row says why)
        return False


def _is_data(row: dict) -> bool:
    """False for a title line (no onset and no ``<video>_<n>`` expression) or a header row (its
    onset cell reads ``onset``); every other row is an expression, checked like any other."""
    onset = text_cell(row["onset"]).lower().replace(" ", "")
    if onset in ("onset", "onsetframe"):
        return False
    return bool(onset) or re.fullmatch(r".+_[0-9]+", text_cell(row["expression"])) is not None


def _specs(root: Path, sheet: str | Path | None) -> tuple[list[dict], Path]:
    """One spec per annotated expression, with its video folder."""
    tree, sheet = _tree_and_sheet(Path(root), sheet)
    if not sheet.exists():
        read_sheet(sheet)  # raises the clear error
    sheets = read_sheet(sheet, header_row=None, sheet_name=None)
    first = next(iter(sheets.values()))
    if first.shape[1] < len(_COLUMNS):
        raise DatabaseError(f"{sheet}: the first sheet has {first.shape[1]} columns; expected "
                            f"at least {len(_COLUMNS)} ({', '.join(_COLUMNS)})")
    codes = first.iloc[:, : len(_COLUMNS)].copy()
    codes.columns = _COLUMNS
    codes["_row"] = codes.index + 1
    codes = codes[[_is_data(r) for r in codes.to_dict("records")]]  # titles, a header: left out
    subjects = {text_cell(v) for v in codes["subject"]}
    videos = {text_cell(v).rsplit("_", 1)[0] for v in codes["expression"]}
    others = dict(list(sheets.items())[1:])
    # participant number -> subject code whose folder s<code> exists
    subject_code = _code_map(others, subjects, lambda v: _is_dir(tree / f"s{v}"))
    video_code = _code_map(others, videos, lambda v: re.fullmatch("[0-9]+", v) is not None)
    specs = []
    for r in codes.to_dict("records"):
        number, expression = text_cell(r["subject"]), text_cell(r["expression"])
        name = expression.rsplit("_", 1)[0]  # disgust1_3 -> disgust1
        code, vcode = subject_code.get(number, number), video_code.get(name, "")
        subject_dir = tree / f"s{code}"
        found = []
        if vcode and not name_problem("subject", f"s{code}"):
            try:
                found = sorted(subject_dir.glob(f"{glob.escape(code)}_{vcode.zfill(4)}*"))
            except OSError:
                found = []
        video = found[0].name if found else f"{code}_{vcode.zfill(4) if vcode else name}"
        problem = "" if vcode else f"video name '{name}' is in no naming sheet of {sheet.name}"
        specs.append({
            "problem": "no participant number" if not number else problem,
            "row": r["_row"], "subject": f"s{code}", "video": video,
            "onset": r["onset"], "apex": _zero_is_none(r["apex"]),
            "offset": _zero_is_none(r["offset"]),
            "type": interval_type(r["type"]), "frame_dir": subject_dir / video,
            "au": r["au"], "emotion": r["emotion"],
        })
    return specs, sheet


def list_casme_sq_videos(root: str | Path) -> list[dict]:
    """Every video folder of the release, annotated or not (spotting counts false positives in
    all of them): ``[{"subject": "s15", "video": "15_0101disgustingteeth", "frame_dir"}]``."""
    tree = _tree(Path(root))
    return [{"subject": s.name, "video": v.name, "frame_dir": v}
            for s in sorted(tree.glob("s*")) if s.is_dir()
            for v in sorted(s.iterdir()) if v.is_dir()]


@LONG_VIDEO.register("casme_sq")
def read_casme_sq_intervals(
    root: str | Path, sheet: str | Path | None = None, database: str = "casme_sq",
    on_error: str = "raise",
) -> tuple[pd.DataFrame, list[dict]]:
    """The interval table (macro and micro) of CAS(ME)^2, and the skipped rows with reasons."""
    specs, sheet = _specs(Path(root), sheet)
    problems = Problems(sheet, database, on_error)
    return collect_intervals(specs, problems, FPS), problems.skipped


@DATABASES.register("casme_sq")
def read_casme_sq(
    root: str | Path, sheet: str | Path | None = None, database: str = "casme_sq",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True, types: Iterable[str] = ("micro",),
) -> tuple[pd.DataFrame, list[dict]]:
    """The expressions of ``types`` (default micro) as a sample table, and the skipped ones."""
    specs, sheet = _specs(Path(root), sheet)
    types = set(types)
    samples = [{**s, "clip": f"{s['video']}_{onset_id(s['onset'])}",
                "frame_name": "img{}.jpg"} for s in specs if s["type"] in types]
    problems = Problems(sheet, database, on_error)
    for s in specs:
        if s["type"] not in ("macro", "micro"):
            problems.fail(s["row"], s["subject"], s["video"],
                          "expression type is neither macro nor micro")
    return collect_samples(samples, problems, FPS, emotions, check_images), problems.skipped
