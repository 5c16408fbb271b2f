"""Helpers shared by the database readers: sheet loading, column variants, frames, clear errors.

Every reader follows the same steps: read its sheet (:func:`read_table` finds the header row
itself, wherever the release put it), pick columns by their known spellings
(:func:`find_column`), find each clip's frames (:class:`FrameIndex`), check the clip
(:func:`check_clip`) and either raise a :class:`DatabaseError` naming the file, the row and the
fix, or skip the sample and list it with its reason (:class:`Problems`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
ON_ERROR = ("raise", "skip")


class DatabaseError(ValueError):
    """A problem with a database on disk: the message names the file/row and the fix."""


def read_sheet(path: Path, header_row: int | None = 0, sheet_name: int | str | None = 0):
    """Read an annotation sheet (.xlsx/.xls/.csv); DatabaseError naming the file if it is absent
    or not a readable spreadsheet (a text file renamed, an empty or damaged file...)."""
    path = Path(path)
    if not path.exists():
        raise DatabaseError(f"annotation sheet not found: {path}. Point data.sheet at it.")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, header=header_row)
        return pd.read_excel(path, header=header_row, sheet_name=sheet_name)
    except (ValueError, OSError, KeyError, IndexError, EOFError) as e:
        if isinstance(e, DatabaseError):
            raise
        if isinstance(e, pd.errors.EmptyDataError) or path.stat().st_size == 0:
            why = "it is empty"
        else:
            why = f"it is not a readable {path.suffix or 'spreadsheet'} file ({e})"
        raise DatabaseError(f"annotation sheet {path} cannot be read: {why}. Point data.sheet "
                            "at the release's annotation sheet, or re-save it from a "
                            "spreadsheet program.") from e


def _norm(text: object) -> str:
    return re.sub(r"[\s_]+", "", str(text)).lower()


def read_table(
    path: str | Path, keys: Iterable[str] = ("subject",), sheet_name: int | str = 0,
    max_header_row: int = 40,
) -> pd.DataFrame:
    """A sheet as a table, its header being the first row that names every one of ``keys``.

    Releases put text above the table (SAMM: 13 rows, SAMM-LV: about 10); re-saved copies have
    the header on row 1. The returned frame has a ``_row`` column: the 1-based sheet row of each
    record, for error messages. Blank rows are dropped.
    """
    path = Path(path)
    raw = read_sheet(path, header_row=None, sheet_name=sheet_name)
    wanted = [_norm(k) for k in keys]
    for h in range(min(len(raw), max_header_row)):
        cells = {_norm(c) for c in raw.iloc[h] if not _is_blank(c)}
        if all(k in cells for k in wanted):
            break
    else:
        raise DatabaseError(
            f"{path}: no header row naming {list(keys)} in its first {max_header_row} rows. "
            "Check that this is the annotation sheet, or rename the header cells."
        )
    columns: list[str] = []
    for j, c in enumerate(raw.iloc[h]):
        name = f"Unnamed: {j}" if _is_blank(c) else str(c).strip()
        columns.append(name if name not in columns else f"{name}.{j}")  # names stay unique
    table = raw.iloc[h + 1:].copy()
    table.columns = columns
    table["_row"] = table.index + 1  # pandas index 0 is sheet row 1
    table = table.dropna(how="all", subset=columns)
    return table.reset_index(drop=True)


def find_column(df: pd.DataFrame, variants: list[str], sheet: Path, what: str) -> str:
    """The first column of ``df`` matching one of ``variants`` (case and space insensitive)."""
    found = optional_column(df, variants)
    if found is not None:
        return found
    raise DatabaseError(
        f"{sheet}: no {what} column (looked for {variants}; found "
        f"{[str(c) for c in df.columns if c != '_row']}). Rename the column or fix the header row."
    )


# The columns of a recognition sheet, with the header spellings met across the databases
# (matching ignores case, spaces and underscores: "OnsetFrame" also finds "Onset Frame").
SHEET_COLUMNS: dict[str, list[str]] = {
    "subject": ["Subject"],
    "clip": ["Filename"],
    "onset": ["OnsetFrame", "Onset"],
    "apex": ["ApexFrame", "Apex"],
    "offset": ["OffsetFrame", "Offset"],
    "aus": ["Action Units", "AU"],
    "emotion": ["Estimated Emotion", "emotion"],
}
_COLUMN_WHAT = {"clip": "filename", "aus": "action units"}


def find_columns(df: pd.DataFrame, sheet: Path, keys: Iterable[str] = tuple(SHEET_COLUMNS),
                 extra: dict[str, list[str]] | None = None) -> dict[str, str]:
    """``key -> column`` for the standard ``keys`` (:data:`SHEET_COLUMNS`); ``extra`` holds a
    database's own spellings, tried first. DatabaseError names the sheet and a missing key."""
    extra = extra or {}
    return {k: find_column(df, [*extra.get(k, []), *SHEET_COLUMNS[k]], sheet,
                           _COLUMN_WHAT.get(k, k)) for k in keys}


def optional_column(df: pd.DataFrame, variants: list[str]) -> str | None:
    """Like :func:`find_column`, but None when the sheet has no such column."""
    norm = {_norm(c): c for c in reversed(list(df.columns))}
    return next((norm[_norm(v)] for v in variants if _norm(v) in norm), None)


def _is_blank(value: object) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return str(value).strip() == ""


NOT_ANNOTATED = -1  # the frame number of an apex / offset the sheet does not give
_MISSING_TEXT = ("/", "-", "nan", "-1")
_WHOLE = re.compile(r"[0-9]{1,15}(?:\.0*)?")  # "46", "46.0"; 15 digits: past any video
_DECIMAL = re.compile(r"-?[0-9]*\.[0-9]+|-?[0-9]+\.[0-9]*")
_ASCII_INT = re.compile(r"[0-9]{1,15}")
_FRAME_HELP = "a whole number >= 0; blank, '/' or -1: not annotated"


def frame_number(value: object) -> int:
    """A frame cell as an int >= 0, or -1 (:data:`NOT_ANNOTATED`) when blank, ``/``, ``-`` or -1
    (CASME II writes ``/`` for an unknown apex, SAMM-LV -1).

    DatabaseError (the caller names the row) for anything else: text, a fraction (``46.5``),
    another negative number, ``inf`` / ``1e400`` or more than 15 digits.
    """
    if _is_blank(value):
        return NOT_ANNOTATED
    if isinstance(value, (bool, np.bool_)):
        raise DatabaseError(f"{value} is not a frame number ({_FRAME_HELP})")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise DatabaseError(f"'{value}' is not a frame number ({_FRAME_HELP})")
        if not float(value).is_integer():
            raise DatabaseError(f"{value} is not a whole frame number ({_FRAME_HELP})")
        number = int(value)
    else:
        text = str(value).strip().rstrip("'").strip()
        if text in _MISSING_TEXT:
            return NOT_ANNOTATED
        body = text[1:] if text.startswith("-") else text
        if _WHOLE.fullmatch(body):
            number = int(body.split(".")[0]) * (-1 if body is not text else 1)
        elif _DECIMAL.fullmatch(text) and len(text) <= 40:
            raise DatabaseError(f"{text} is not a whole frame number ({_FRAME_HELP})")
        else:
            shown = text if len(text) <= 40 else f"{text[:40]}..."
            raise DatabaseError(f"'{shown}' is not a frame number ({_FRAME_HELP})")
    if number == NOT_ANNOTATED:
        return NOT_ANNOTATED
    if number < 0:
        raise DatabaseError(f"negative frame number {number} ({_FRAME_HELP})")
    return number


def text_cell(value: object) -> str:
    """A name cell as text: ints stay ints (``6.0`` -> ``6``), trailing apostrophes removed."""
    if _is_blank(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().rstrip("'").strip()


def subject_id(value: object, fmt: str) -> str:
    """Subject cell -> folder name: ASCII integers formatted with ``fmt`` (``sub{:02d}``), other
    text kept as it is (``²`` and ``①`` pass ``str.isdigit()`` but are no numbers)."""
    text = text_cell(value)
    return fmt.format(int(text)) if _ASCII_INT.fullmatch(text) else text


def onset_id(value: object) -> str:
    """The onset cell as a clip-id suffix (``b_166``): its frame number however the cell writes
    it (``166``, ``166.0``, ``" 166"``), else the text (the row is rejected for its onset)."""
    try:
        return str(frame_number(value))
    except DatabaseError:
        return text_cell(value)


MAX_NAME_BYTES = 255  # a file or folder name on Linux, macOS and Windows file systems


def name_problem(what: str, name: str) -> str:
    """'' when ``name`` can be one folder or file name, else why not (``what``: ``clip name``).

    Names from sheets become path parts: an empty one, ``.``/``..``, one holding ``/`` (it
    would read another folder's frames) or longer than 255 bytes (the OS refuses it) is no name.
    """
    shown = name if len(name) <= 40 else f"{name[:40]}..."
    if not name:
        return f"no {what}"
    if name in (".", "..") or "/" in name or "\0" in name:
        return f"{what} '{shown}' is not a folder name (holds '/', NUL or is '.' / '..')"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return (f"{what} '{shown}' is {size} bytes long: a file name holds at most "
                f"{MAX_NAME_BYTES}")
    return ""


def objective_name(value: object) -> str:
    """Sheet objective class (``3``, ``3.0``, ``III``, ``iii``) -> ``III``; '' when blank.

    Anything else is returned as written (upper case); :func:`collect_samples` rejects it.
    """
    from mer.data.labels import OBJECTIVE_CLASSES

    text = text_cell(value).upper()
    if _ASCII_INT.fullmatch(text) and 1 <= int(text) <= len(OBJECTIVE_CLASSES):
        return OBJECTIVE_CLASSES[int(text) - 1]
    return text


class FrameIndex:
    """Image files of a folder by frame number (the last integer in the file name).

    ``img46.jpg``, ``reg_img46.jpg``, ``006_05562.jpg``, ``175.jpg`` and ``image046433.bmp``
    all work. Each folder is listed once (long videos hold thousands of frames and many
    samples).
    """

    _NUMBER = re.compile(r"([0-9]+)[^0-9]*$")

    def __init__(self) -> None:
        self._folders: dict[Path, dict[int, Path]] = {}
        self._errors: dict[Path, str] = {}

    def __call__(self, folder: Path) -> dict[int, Path]:
        folder = Path(folder)
        if folder not in self._folders:
            frames: dict[int, Path] = {}
            try:
                if folder.is_dir():
                    for p in sorted(folder.iterdir()):
                        m = self._NUMBER.search(p.stem)
                        if p.suffix.lower() in IMAGE_SUFFIXES and m:
                            frames.setdefault(int(m.group(1)), p)
            except OSError as e:  # a name too long, no permission: said by :meth:`problem`
                self._errors[folder] = f"cannot list frame folder {folder} ({e.strerror or e})"
            self._folders[folder] = frames
        return self._folders[folder]

    def problem(self, folder: Path, what: str = "frame folder") -> str:
        """'' when ``folder`` is a folder that could be listed, else what is wrong."""
        folder = Path(folder)
        self(folder)
        if folder in self._errors:
            return self._errors[folder]
        try:
            return "" if folder.is_dir() else f"{what} missing: {folder}"
        except OSError as e:
            return f"cannot list {what} {folder} ({e.strerror or e})"


def clip_frames(frame_dir: str | Path, onset: int, offset: int) -> list[Path]:
    """The frame files of a clip, onset..offset inclusive, in frame order (for preprocessing).

    ``offset < 0`` means up to the last frame of the folder.
    """
    frames = FrameIndex()(Path(frame_dir))
    last = offset if offset >= 0 else max(frames, default=-1)
    return [frames[n] for n in sorted(frames) if onset <= n <= last]


def image_problem(path: str | Path) -> str:
    """'' when ``path`` decodes fully as an image, else what is wrong (naming the file).

    The whole image is decoded (not only the header): a truncated JPEG, which OpenCV would
    hand back with its missing part flat grey, is refused here.
    """
    from PIL import ImageFile

    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a library may have relaxed it process-wide
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises several kinds
        return f"unreadable image {path} ({type(e).__name__}: {e}); replace or re-extract it"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return ""


def check_clip(
    frame_dir: Path, frames: dict[int, Path], onset: int, apex: int, offset: int,
    check_images: bool = True, frame_name: str = "{}", folder_problem: str = "",
) -> tuple[str, Path | None, Path | None]:
    """(problem or '', onset frame path, apex frame path or None) of one clip.

    Checked: onset <= apex <= offset (apex / offset -1: not annotated), the folder
    (``folder_problem``: what :meth:`FrameIndex.problem` found), onset and apex frames on disk,
    the offset not after the last frame on disk, the images (``check_images``).
    ``frame_name`` (``img{}.jpg``) only names the expected file in messages.
    """
    problem = frame_order_problem(onset, apex, offset, "clip")
    if problem:
        return problem, None, None
    if folder_problem:
        return folder_problem, None, None
    if not frames:
        return f"no frame images in {frame_dir}", None, None
    if onset not in frames:
        return f"onset frame missing: {frame_dir / frame_name.format(onset)}", None, None
    if apex >= 0 and apex not in frames:
        return f"apex frame missing: {frame_dir / frame_name.format(apex)}", None, None
    problem = frame_range_problem(frame_dir, frames, onset, apex, offset)
    if problem:
        return problem, None, None
    onset_path, apex_path = frames[onset], frames[apex] if apex >= 0 else None
    if check_images:
        for p in (onset_path, apex_path):
            problem = image_problem(p) if p is not None else ""
            if problem:
                return problem, None, None
    return "", onset_path, apex_path


def frame_order_problem(onset: int, apex: int, offset: int, what: str = "clip") -> str:
    """'' when onset <= apex <= offset (apex / offset -1: not annotated), else the problem."""
    if onset < 0:
        return "no onset frame in the sheet"
    if 0 <= offset < onset:
        return f"offset {offset} before onset {onset}"
    if apex >= 0 and (apex < onset or 0 <= offset < apex):
        return f"apex {apex} outside the {what} (onset {onset}, offset {offset})"
    return ""


def frame_range_problem(
    frame_dir: Path, frames: dict[int, Path], onset: int, apex: int, offset: int
) -> str:
    """'' when the annotated frames lie within the frame numbers found on disk, else the
    problem (an offset of 10**18 is no frame of any video)."""
    if not frames:
        return f"no frame images in {frame_dir}"
    first, last = min(frames), max(frames)
    for name, n in (("onset", onset), ("apex", apex), ("offset", offset)):
        if n >= 0 and not first <= n <= last:
            side = "before the first" if n < first else "after the last"
            return f"{name} {n} {side} frame on disk ({first if n < first else last} in " \
                   f"{frame_dir})"
    return ""


class Problems:
    """Per-row problems of one reader run: raise, or skip the sample and list it (never silent).

    Args:
        source: the sheet (or folder) the rows come from, named in every message.
        database: database name written into each skipped record.
        on_error: ``raise`` (a DatabaseError at the first problem) or ``skip``.
    """

    def __init__(self, source: Path, database: str, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise DatabaseError(f"on_error='{on_error}': use one of {ON_ERROR}")
        self.source, self.database, self.on_error = Path(source), database, on_error
        self.skipped: list[dict] = []
        self._seen: dict[tuple, int | None] = {}

    def fail(self, row: int | None, subject: str, clip: str, problem: str) -> None:
        """Record one sample's problem: raise DatabaseError, or list it as skipped."""
        where = f"{self.source} row {row}" if row is not None else str(self.source)
        if self.on_error == "skip":
            name = f"{self.source.name} row {row}" if row is not None else str(self.source)
            self.skipped.append({"database": self.database, "subject": subject, "clip": clip,
                                 "reason": f"{name}: {problem}"})
            return
        subject, clip = (t if len(t) <= 60 else f"{t[:60]}..." for t in (subject, clip))
        raise DatabaseError(
            f"{where} ({subject} {clip}): {problem}. Fix the sheet or the frames, or set "
            "data.on_error=skip to leave the sample out (it is then listed in the report)."
        )

    def duplicate(self, row: int | None, subject: str, clip: str, onset: int) -> bool:
        """True (and the problem recorded) when (subject, clip) was seen before.

        Clip ids must be unique within a subject (flow caches and reports are keyed by them);
        readers of databases with several MEs per video put the onset into the clip id.
        """
        key = (subject, clip)
        if key in self._seen:
            self.fail(row, subject, clip, f"duplicate of row {self._seen[key]} (same subject "
                      f"and clip, onset {onset}); each sample must appear once")
            return True
        self._seen[key] = row
        return False


def check_emotion(emotion: str, known: Iterable[str] | None) -> str:
    """'' when ``emotion`` is one of ``known`` (None: anything goes), else the problem."""
    if known is None or emotion in set(known):
        return ""
    return (f"unknown emotion '{emotion}' (this database uses {sorted(set(known))}; pass "
            "emotions=[...] to the reader to accept more)")


def au_problem(cell: object) -> str:
    """'' when every number of the AU ``cell`` is a FACS code (``mer.data.aus.AU_RANGE``)."""
    from mer.data.aus import AU_RANGE, parse_au_string

    parsed = parse_au_string(cell)
    if not parsed.invalid:
        return ""
    shown = parsed.raw if len(parsed.raw) <= 40 else f"{parsed.raw[:40]}..."
    return (f"AU {parsed.invalid[0]} is not a FACS code ({AU_RANGE.start}..{AU_RANGE.stop - 1}) "
            f"in the AU cell '{shown}'")


def objective_problem(objective: str) -> str:
    """'' when ``objective`` is blank or one of I..VII, else the problem."""
    from mer.data.labels import OBJECTIVE_CLASSES

    if not objective or objective in OBJECTIVE_CLASSES:
        return ""
    shown = objective if len(objective) <= 40 else f"{objective[:40]}..."
    return f"objective class '{shown}' is not one of I..VII (or 1..7)"


def collect_samples(
    specs: Iterable[dict], problems: Problems, fps: float, emotions: Iterable[str] | None = None,
    check_images: bool = True, index: FrameIndex | None = None,
) -> pd.DataFrame:
    """Check each sample a reader found and build the sample table (``mer.data.samples``).

    Each spec holds ``row, subject, clip, onset, apex, offset`` (sheet cells or ints),
    ``frame_dir``, ``au`` (the AU cell), ``emotion`` and optionally ``objective``, ``fps`` and
    ``frame_name`` (the file name pattern, for messages), ``problem`` (one the reader found).
    A sample with a problem goes to ``problems``: a subject or clip that is no folder name,
    frame cells that are no frame numbers (text, fractions, negatives, ``inf``), apex outside
    the clip, frames missing, past the last frame on disk or unreadable, an unknown emotion, an
    objective class outside I..VII, AU numbers that are no FACS code, a duplicate
    (subject, clip). Accepted samples hold ints with onset <= apex <= offset (-1: not
    annotated), all within the frames on disk.
    """
    from mer.data.aus import parse_au_string
    from mer.data.samples import SAMPLE_COLUMNS

    index, records = index or FrameIndex(), []
    for s in specs:
        row, subject, clip = s["row"], s["subject"], s["clip"]
        if s.get("problem") or not subject or not clip:
            problems.fail(row, subject, clip, s.get("problem") or "no subject or no clip name")
            continue
        try:
            onset, apex, offset = (frame_number(s[k]) for k in ("onset", "apex", "offset"))
        except DatabaseError as e:
            problems.fail(row, subject, clip, str(e))
            continue
        emotion = text_cell(s["emotion"]).lower()
        objective = s.get("objective", "")
        frame_dir = Path(s["frame_dir"])
        problem = (name_problem("subject name", subject) or name_problem("clip name", clip)
                   or check_emotion(emotion, emotions) or objective_problem(objective)
                   or au_problem(s["au"]))
        if not problem:
            problem, onset_path, apex_path = check_clip(
                frame_dir, index(frame_dir), onset, apex, offset, check_images,
                s.get("frame_name", "{}"), index.problem(frame_dir))
        if problem:
            problems.fail(row, subject, clip, problem)
            continue
        if problems.duplicate(row, subject, clip, onset):
            continue
        parsed = parse_au_string(s["au"])
        records.append({
            "database": problems.database, "subject": subject, "clip": clip, "onset": onset,
            "apex": apex, "offset": offset, "frame_dir": str(frame_dir),
            "onset_path": str(onset_path), "apex_path": str(apex_path) if apex_path else "",
            "au_raw": parsed.raw, "aus": parsed.aus, "au_unknown": parsed.unknown,
            "emotion": emotion, "objective": objective, "fps": s.get("fps", fps),
            "row": row,
        })
    return pd.DataFrame(records, columns=SAMPLE_COLUMNS)


def find_sheet(folders: Iterable[Path], patterns: Iterable[str], what: str) -> Path:
    """The first file matching one of ``patterns`` (globs) in one of ``folders``."""
    folders, patterns = list(folders), list(patterns)
    for pattern in patterns:
        for folder in folders:
            found = sorted(Path(folder).glob(pattern))
            if found:
                return found[0]
    raise DatabaseError(f"no {what} ({' or '.join(patterns)}) in {[str(f) for f in folders]}; "
                        "set data.sheet to its path")


def find_tree(root: Path, names: Iterable[str], probe: str, what: str) -> Path:
    """The first folder ``root/name`` (``.`` is root itself) holding entries matching ``probe``.

    Releases are unpacked with or without their top folder; this accepts both.
    """
    names = list(names)
    for name in names:
        folder = Path(root) / name
        if folder.is_dir() and next(folder.glob(probe), None) is not None:
            return folder
    raise DatabaseError(f"{root}: no {what} (looked for {probe} in {names}); point data.root "
                        "at the folder that holds the release")


def interval_type(value: object) -> str:
    """``macro`` / ``micro`` from the sheets' spellings (``macro-expression``, ``Micro - 1/2``)."""
    text = text_cell(value).lower()
    if "micro" in text:
        return "micro"
    if "macro" in text:
        return "macro"
    return ""


def collect_intervals(specs: Iterable[dict], problems: Problems, fps: float) -> pd.DataFrame:
    """The interval table of a long-video database (``mer.data.samples.INTERVAL_COLUMNS``).

    Each spec holds ``row, subject, video, onset, apex, offset, type, frame_dir, au, emotion``
    and optionally ``problem`` (one the reader found). Checked: the subject and video names,
    frame numbers, onset <= apex <= offset, the type, the AU numbers, the video folder, and the
    frames within the frame numbers found in it.
    """
    from mer.data.aus import parse_au_string
    from mer.data.samples import INTERVAL_COLUMNS

    index, records = FrameIndex(), []
    for s in specs:
        row, subject, video = s["row"], s["subject"], s["video"]
        problem = s.get("problem") or name_problem("subject", subject) or name_problem(
            "video name", video)
        if problem:
            problems.fail(row, subject, video, problem)
            continue
        try:
            onset, apex, offset = (frame_number(s[k]) for k in ("onset", "apex", "offset"))
        except DatabaseError as e:
            problems.fail(row, subject, video, str(e))
            continue
        frame_dir = Path(s["frame_dir"])
        problem = frame_order_problem(onset, apex, offset, "interval")
        if not problem and s["type"] not in ("macro", "micro"):
            problem = "expression type is neither macro nor micro"
        problem = (problem or au_problem(s["au"]) or index.problem(frame_dir, "video folder")
                   or frame_range_problem(frame_dir, index(frame_dir), onset, apex, offset))
        if problem:
            problems.fail(row, subject, video, problem)
            continue
        parsed = parse_au_string(s["au"])
        records.append({
            "database": problems.database, "subject": subject, "video": video, "onset": onset,
            "apex": apex, "offset": offset, "type": s["type"], "au_raw": parsed.raw,
            "aus": parsed.aus, "au_unknown": parsed.unknown,
            "emotion": text_cell(s["emotion"]).lower(), "frame_dir": str(frame_dir),
            "fps": fps, "row": row,
        })
    return pd.DataFrame(records, columns=INTERVAL_COLUMNS)
