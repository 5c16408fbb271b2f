"""DFME reader (Dynamic Facial Micro-expressions: 7,526 clips, 671 participants, 200/300/500 fps).

Layout assumed: three parts, each a folder of frame folders and a label sheet::

    <root>/train/<Subject>/<Filename>/00010.jpg     (testA/, testB/ alike)
    <root>/*train*.xlsx  *testA*.xlsx  *testB*.xlsx  (or inside each part's folder; .csv too)

No real DFME sheet was available when this reader was written: the layout and the quirks below
are what the DFME paper and its challenge releases describe (subject, clip, onset, apex,
offset, emotion, frame rate and AUs; train / testA / testB), not a checked release. Where a
release differs, the error names the sheet and the column or folder it looked for; pass
``sheet={train: path, ...}`` for sheets named otherwise.

Quirks written down here (assumed):
- ``<root>`` may also be the folder above ``DFME/``; a part folder may hold the clip folders
  directly (``train/<Filename>/``, no subject level): both are accepted, per clip.
- Columns matched by their usual spellings: ``Subject`` (or ``Participant``), ``Filename``
  (``Clip``, ``Video``, ``Sample``), ``Onset``/``Apex``/``Offset`` (``... Frame`` too),
  ``FPS`` (``Frame rate``, ``FrameRate``), ``Action Units`` / ``AU`` / ``AUs``,
  ``Emotion`` / ``Estimated Emotion``.
- The frame rate is per clip (a participant was recorded at one of three cameras' rates):
  200, 300 or 500; anything else, or a blank cell, is a row error.
- ``Subject`` is written as a number (``12``) and kept as text (``"12"``), also as the folder
  name. Participant ids are taken to be global: the same id in two parts is one person (it
  stays on one side of every split).
- 7 emotions, capitalised or not: anger, contempt, disgust, fear, happiness, sadness,
  surprise. A clip listed in two parts is refused (a sample must appear once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from mer.data.databases.common import (
    DatabaseError,
    Problems,
    collect_samples,
    find_columns,
    find_tree,
    optional_column,
    read_table,
    text_cell,
)
from mer.data.databases.registry import DATABASES

FPS_CHOICES = (200.0, 300.0, 500.0)
EMOTIONS = ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise")
PARTS = ("train", "testA", "testB")
_COLUMNS = {"subject": ["Participant"], "clip": ["Clip", "Video", "Sample"],
            "aus": ["AUs"], "emotion": ["Emotion"]}
_FPS_COLUMNS = ["FPS", "Frame rate", "FrameRate", "Frame_rate"]
_SHEET_SUFFIXES = (".xlsx", ".xls", ".csv")


def _part_sheet(part: str, folders: list[Path]) -> Path:
    """The label sheet of ``part``: a spreadsheet whose name holds the part's name (any case),
    in the first of ``folders`` that has one."""
    for folder in folders:
        found = sorted(p for p in folder.glob("*") if p.is_file()
                       and p.suffix.lower() in _SHEET_SUFFIXES
                       and part.lower() in p.name.lower() and not p.name.startswith("~$"))
        if len(found) > 1:
            raise DatabaseError(f"several DFME {part} label sheets in {folder}: "
                                f"{[p.name for p in found]}; pick one with "
                                f"data.sheet={{{part}: /path/to/it}}")
        if found:
            return found[0]
    raise DatabaseError(f"no DFME {part} label sheet (a .xlsx/.xls/.csv whose name holds "
                        f"'{part}') in {[str(f) for f in folders]}; set data.sheet={{{part}: "
                        f"/path/to/it}}, or read fewer parts (data.options.parts=[train])")


def _frame_rate(value: object) -> tuple[float, str]:
    """(fps, '') or (0, the problem) of a frame-rate cell."""
    text = text_cell(value)
    if not text:
        return 0.0, "no frame rate in the sheet (DFME clips are 200, 300 or 500 fps)"
    try:
        fps = float(text.lower().removesuffix("fps").strip())
    except ValueError:
        fps = -1.0
    if fps not in FPS_CHOICES:
        return 0.0, f"frame rate {text} is not one of DFME's 200, 300 or 500 fps"
    return fps, ""


def _sheets(sheet: str | Path | Mapping | None, parts: list[str]) -> dict[str, Path]:
    if sheet is None:
        return {}
    if isinstance(sheet, Mapping):
        unknown = sorted(set(map(str, sheet)) - set(parts))
        if unknown:
            raise DatabaseError(f"data.sheet names parts {unknown} that are not read (parts: "
                                f"{parts}); use the part names as keys")
        return {str(k): Path(str(v)) for k, v in sheet.items() if v}
    if len(parts) != 1:
        raise DatabaseError(f"data.sheet={sheet} is one sheet but {len(parts)} parts are read "
                            f"({parts}); give one per part, data.sheet={{train: ..., testA: "
                            "...}, or read one part (data.options.parts=[train])")
    return {parts[0]: Path(sheet)}


@DATABASES.register("dfme")
def read_dfme(
    root: str | Path, sheet: str | Path | Mapping | None = None, database: str = "dfme",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True, parts: Iterable[str] = PARTS,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a DFME tree into a sample table (``fps`` per clip); also the skipped samples.

    ``parts``: which of ``train``, ``testA``, ``testB`` to read (all by default: the
    federated and LOSO protocols make their own splits). ``sheet``: ``{part: path}`` when
    the sheets are not found by name.
    """
    root, parts = Path(root), [str(p) for p in parts]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise DatabaseError(f"DFME parts {unknown or parts}: use some of {list(PARTS)} "
                            "(data.options.parts)")
    tree = find_tree(root, [".", "DFME", "dfme"], parts[0], f"DFME part folder {parts[0]}/")
    given = _sheets(sheet, parts)
    tables, skipped = [], []
    seen: dict[tuple[str, str], str] = {}  # (subject, clip) -> "<sheet> row <n>"
    for part in parts:
        folder = tree / part
        if not folder.is_dir():
            present = ", ".join(p for p in parts if (tree / p).is_dir())
            raise DatabaseError(f"{tree}: no DFME part folder {part}/; read the parts present "
                                f"with data.options.parts=[{present}]")
        path = given.get(part) or _part_sheet(part, [tree, folder, root])
        try:
            df = read_table(path, keys=("Subject",))
        except DatabaseError:
            df = read_table(path, keys=("Participant",))
        col = find_columns(df, path, extra=_COLUMNS)
        fps_col = optional_column(df, _FPS_COLUMNS)
        if fps_col is None:
            raise DatabaseError(f"{path}: no frame-rate column (looked for {_FPS_COLUMNS}); "
                                "DFME clips are 200, 300 or 500 fps: add the column or rename it")
        specs = []
        for r in df.to_dict("records"):
            subject, clip = text_cell(r[col["subject"]]), text_cell(r[col["clip"]])
            fps, problem = _frame_rate(r[fps_col])
            key = (subject, clip)
            if not problem and subject and clip and key in seen:
                problem = f"also in {seen[key]}: a clip belongs to one part only; remove one"
            seen.setdefault(key, f"{path} row {r['_row']}")
            frame_dir = folder / subject / clip
            if not frame_dir.is_dir() and (folder / clip).is_dir():
                frame_dir = folder / clip  # no subject level
            specs.append({
                "row": r["_row"], "subject": subject, "clip": clip, "fps": fps,
                **{k: r[col[k]] for k in ("onset", "apex", "offset")},
                "frame_dir": frame_dir, "frame_name": "{:05d}.jpg",
                "au": r[col["aus"]], "emotion": r[col["emotion"]], "problem": problem,
            })
        problems = Problems(path, database, on_error)
        tables.append(collect_samples(specs, problems, FPS_CHOICES[0], emotions, check_images))
        skipped += problems.skipped
    return pd.concat(tables, ignore_index=True), skipped
