"""The flow-cache exchange format of public MER code (STSTNet, HTNet style).

Layout under ``root``::

    flowcache.csv                           dataset,sub,filename_o,label[,emotion,synthetic,...]
    <sub>_<filename_o> .png                 flat folder: one image per CSV row
    <sub>/u_test/<label>/<sub>_<clip> .png  LOSO tree: that subject's own samples
    <sub>/u_train/<label>/...               ... and everyone else's

Note the space before ``.png`` in the image names. The reader also accepts names without the
space (``<sub>_<filename_o>.png``) when the spaced name is absent.

Labels are class indices: 0 negative, 1 positive, 2 surprise (the MEGC2019 composite) unless
other ``class_names`` are given.

Each PNG is an (H, W, 3) uint8 image, square (28x28 usually). Its channels, in the array order
``cv2.imread`` returns (index 0, 1, 2), are the normalised u, v and optical strain, stored as
``round(x * 255)``. The writer uses ``cv2.imwrite`` of that array and the reader ``cv2.imread``,
so a round trip is exact to 1/255. (OpenCV stores array channel 0 as the PNG's *blue* channel:
a reader that decodes to RGB, e.g. PIL, sees (strain, v, u).)

Subject ids must identify a person across the whole cache, because LOSO folders group by
them: the same ``sub`` under two ``dataset`` values is refused by the reader. The writer avoids
it by writing such ids as ``<database>_<subject>`` (all rows then), and the reader returns them
as written.

A CSV column ``synthetic`` with a true value (true/1/yes) marks the samples as synthetic (SynME).

What the reader refuses or reports (nothing is dropped silently):

- a CSV with a header but no rows, a row whose image is missing (the row and the PNG are
  named), an unreadable or odd-sized PNG, a label outside the classes;
- a cache whose samples all have one label: training and UAR need at least two classes;
- a PNG of the flat folder that no CSV row lists is *left out with a warning* (a CSV may
  select a subset of a folder, e.g. one database of the composite) and listed in the samples'
  ``excluded`` (reason: no row in the CSV) and ``provenance["unlisted_images"]``; a LOSO tree
  must match the CSV exactly (an image without a row is an error there).

**AUs.** The format carries no AUs. ``sheets=`` (the databases' annotation sheets: a list, the
database of each detected from its content, or ``{database: path}``) joins them by database,
subject and clip (:func:`join_sheet_aus`): the cache's ``dataset`` names the database
(:data:`DATASET_ALIASES`), subject ids are normalised explicitly (:func:`canonical_subject`:
``1`` in the CASME II sheet is ``sub01`` in the cache, ``6`` in SAMM's is ``006``). SMIC has no
AUs and stays masked. A clip without a sheet row is an error naming it, or, with
``on_unmatched="mask"``, kept with its AU loss masked; either way the counts are printed and
kept in ``provenance["au_join"]`` (results.json).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mer.data.samples import FlowSamples

log = logging.getLogger(__name__)

CLASS_NAMES = ("negative", "positive", "surprise")
CSV_COLUMNS = ("dataset", "sub", "filename_o", "label")
TREE_DATABASE = "flowcache"
_TRUE = {"true", "1", "yes"}


class FlowCacheError(Exception):
    """A flow cache on disk is malformed; the message names the file or CSV row."""


def image_name(sub: str, clip: str) -> str:
    """The PNG name of a sample: ``<sub>_<clip> .png`` (with the space)."""
    return f"{sub}_{clip} .png"


def _fallback_name(sub: str, clip: str) -> str:
    return f"{sub}_{clip}.png"


# ----------------------------------------------------------------------------------- reading


def _find_csv(root: Path, csv: str | os.PathLike | None) -> Path | None:
    if csv is not None:
        path = Path(csv)
        if not path.is_absolute() and not path.is_file():
            path = root / path
        if not path.is_file():
            raise FlowCacheError(f"CSV {csv} not found (looked also in {root})")
        return path
    found = sorted(root.glob("*.csv"))
    if len(found) > 1:
        raise FlowCacheError(f"{root} holds several CSV files {[p.name for p in found]}; pass "
                             "csv=<the one describing the images>")
    return found[0] if found else None


def _read_csv(path: Path, n_classes: int, class_names: list[str]) -> pd.DataFrame:
    """The CSV as text, validated; adds ``_row`` (1-based file row, header = 1)."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FlowCacheError(f"cannot parse CSV {path}: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise FlowCacheError(f"{path}: missing column(s) {missing}; found {list(df.columns)}; "
                             f"a flow-cache CSV needs {list(CSV_COLUMNS)} (other columns may "
                             "follow)")
    clashes = [c for c in ("database", "subject", "clip") if c in df.columns]
    if clashes:
        raise FlowCacheError(f"{path}: column(s) {clashes} clash with the names mer gives to "
                             "dataset/sub/filename_o; rename them")
    for col in CSV_COLUMNS:
        df[col] = df[col].str.strip()
    if df.empty:
        raise FlowCacheError(f"{path} has a header but no rows; list one sample per row "
                             f"({','.join(CSV_COLUMNS)}), or remove the CSV to read the LOSO "
                             "folders alone")
    df["_row"] = np.arange(len(df)) + 2

    labels = []
    for rec in df.to_dict("records"):
        where = f"{path} row {rec['_row']}"
        for col in ("dataset", "sub", "filename_o"):
            if not rec[col]:
                raise FlowCacheError(f"{where}: empty '{col}'; fill it in or remove the row")
            if "/" in rec[col] or "\\" in rec[col]:
                raise FlowCacheError(f"{where}: '{col}' = {rec[col]!r} contains a path "
                                     "separator; ids must be plain names")
        label = rec["label"]
        if not re.fullmatch(r"\d+", label) or int(label) >= n_classes:
            raise FlowCacheError(f"{where}: label {label!r} is not a class index 0..{n_classes - 1}"
                                 f" ({', '.join(class_names)}); fix the label or pass the "
                                 "cache's class_names")
        labels.append(int(label))
    df["label"] = np.asarray(labels, dtype=np.int64)

    datasets = df.groupby("sub")["dataset"].unique()
    for sub, names in datasets.items():
        if len(names) > 1:
            rows = [int(df.loc[(df["sub"] == sub) & (df["dataset"] == d), "_row"].iloc[0])
                    for d in names]
            raise FlowCacheError(
                f"{path}: subject id {sub!r} appears under datasets {list(names)} (rows {rows}); "
                "they are different people but LOSO folders would merge them. Prefix the subject "
                "ids with the dataset name (e.g. 'samm_006') in the CSV and the PNG names"
            )
    dup = df[df.duplicated(["sub", "filename_o"], keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = dup.loc[(dup["sub"] == first["sub"]) & (dup["filename_o"] == first["filename_o"]),
                       "_row"].tolist()
        raise FlowCacheError(f"{path}: sub={first['sub']!r} filename_o={first['filename_o']!r} "
                             f"appears on rows {rows}; each sample must be listed once")
    return df


def _read_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, square, as cv2.imread gives it."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FlowCacheError(f"cannot decode {path} (corrupt or not a PNG); re-export it")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise FlowCacheError(f"{path}: expected an 8-bit 3-channel image (u, v, strain), got "
                             f"dtype {image.dtype}, shape {image.shape}")
    if image.shape[0] != image.shape[1]:
        raise FlowCacheError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, not square")
    return image


def _stack(images: list[np.ndarray], paths: list[Path]) -> np.ndarray:
    """List of (H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]; all sizes must agree."""
    if not images:
        raise FlowCacheError("the flow cache holds no samples")
    for image, path in zip(images, paths, strict=True):
        if image.shape != images[0].shape:
            raise FlowCacheError(f"{path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} "
                                 f"is {images[0].shape[1]}x{images[0].shape[0]}; all images of "
                                 "a cache must have one size")
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def _row_images(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(spaced name, fallback name) of each CSV row's image."""
    return [(image_name(s, c), _fallback_name(s, c))
            for s, c in zip(df["sub"], df["filename_o"], strict=True)]


def _find_image_dir(root: Path, df: pd.DataFrame, csv_path: Path) -> Path | None:
    """The folder holding the flat images: root, or the one subfolder holding any of them.

    Any row counts (not only the first): a folder missing some images is still found, and
    :func:`_read_flat` then names the rows whose image is missing.
    """
    names = _row_images(df)
    dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.png")))
    holding = [d for d in dirs
               if any((d / a).is_file() or (d / b).is_file() for a, b in names)]
    if root in holding or not holding:
        return root if holding else None
    if len(holding) > 1:
        raise FlowCacheError(f"the images of {csv_path} are in several folders "
                             f"{[str(d) for d in holding]}; pass root=<the image folder> and "
                             "csv=<the CSV path>")
    return holding[0]


def _read_flat(image_dir: Path, df: pd.DataFrame, csv_path: Path
               ) -> tuple[np.ndarray, list[Path]]:
    """(N, 3, H, W) images of the CSV rows, and the PNGs of ``image_dir`` no row lists."""
    images, paths = [], []
    for rec in df.to_dict("records"):
        sub, clip = rec["sub"], rec["filename_o"]
        path = image_dir / image_name(sub, clip)
        if not path.is_file():
            path = image_dir / _fallback_name(sub, clip)
        if not path.is_file():
            raise FlowCacheError(
                f"{csv_path} row {rec['_row']} (sub={sub}, filename_o={clip}): image "
                f"{image_dir / image_name(sub, clip)!s} not found; add it or remove the row"
            )
        images.append(_read_png(path))
        paths.append(path)
    used = set(paths)
    unlisted = sorted(p for p in image_dir.glob("*.png")
                      if p.is_file() and not p.name.startswith(".") and p not in used)
    return _stack(images, paths), unlisted


def _unlisted_records(unlisted: list[Path], csv_path: Path) -> list[dict]:
    """``excluded`` records of flat-folder PNGs that no CSV row lists (also logged)."""
    if unlisted:
        log.warning("%d PNG(s) in %s have no row in %s and are left out: %s; add rows for them "
                    "or move them out of the folder", len(unlisted), unlisted[0].parent,
                    csv_path, [p.name for p in unlisted])
    return [{"database": TREE_DATABASE, "subject": "",
             "clip": p.name[: -len(".png")].rstrip(" "),
             "reason": f"{p} has no row in {csv_path}: left out; add a row for it or move it "
                       "out of the folder"} for p in unlisted]


def _label_dirs(split: Path, n_classes: int) -> list[tuple[int, Path]]:
    out = []
    for d in sorted(split.iterdir()):
        if d.name.startswith("."):
            continue
        if not d.is_dir() or not re.fullmatch(r"\d+", d.name) or int(d.name) >= n_classes:
            raise FlowCacheError(f"{d}: expected only label folders 0..{n_classes - 1} in "
                                 f"{split}; move or remove it, or pass the cache's class_names")
        out.append((int(d.name), d))
    return out


def _pngs(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() != ".png"]
    if others:
        log.warning("ignoring non-PNG files in %s: %s", folder, others)
    return [p for p in files if p.suffix.lower() == ".png"]


def _clip_of(name: str, subject: str) -> str:
    stem = name[: -len(".png")].rstrip(" ")
    prefix = f"{subject}_"
    return stem[len(prefix):] if stem.startswith(prefix) else stem


def _read_tree(root: Path, n_classes: int) -> tuple[list[dict], list[Path]]:
    """The samples of a LOSO tree: every ``<subject>/u_test/<label>/*.png``, checked."""
    subjects = sorted(d for d in root.iterdir() if d.is_dir() and (d / "u_test").is_dir())
    if not subjects:
        raise FlowCacheError(f"{root} holds neither a CSV nor LOSO folders "
                             "<subject>/u_test/<label>/*.png; is this a flow cache?")
    records, paths = [], []
    owner: dict[str, Path] = {}  # file name -> its u_test path
    tests: dict[str, set[tuple[int, str]]] = {}
    for sdir in subjects:
        tests[sdir.name] = set()
        for label, ldir in _label_dirs(sdir / "u_test", n_classes):
            for png in _pngs(ldir):
                if png.name in owner:
                    raise FlowCacheError(f"{png} is also in {owner[png.name]}; a sample must be "
                                         "in the u_test folder of exactly one subject")
                owner[png.name] = png
                tests[sdir.name].add((label, png.name))
                records.append({"database": TREE_DATABASE, "subject": sdir.name,
                                "clip": _clip_of(png.name, sdir.name), "label": label})
                paths.append(png)
    everyone = set().union(*tests.values())
    for sdir in subjects:
        train_dir = sdir / "u_train"
        if not train_dir.is_dir():
            continue
        train = {(label, png.name) for label, ldir in _label_dirs(train_dir, n_classes)
                 for png in _pngs(ldir)}
        expected = everyone - tests[sdir.name]
        if train != expected:
            missing = sorted(n for _, n in expected - train)[:3]
            extra = sorted(f"{lab}/{n}" for lab, n in train - expected)[:3]
            raise FlowCacheError(
                f"{train_dir}: {len(train)} images but the other subjects' u_test folders hold "
                f"{len(expected)} (missing e.g. {missing}; unexpected, not in any other u_test "
                f"or under another label, e.g. {extra}); each sample must be in the u_test of "
                "exactly one subject and in every other subject's u_train"
            )
    return records, paths


def _match_tree(root: Path, df: pd.DataFrame, csv_path: Path, n_classes: int) -> np.ndarray:
    """Images of the CSV rows taken from the LOSO tree (when there is no flat folder)."""
    records, paths = _read_tree(root, n_classes)
    by_key = {(r["subject"], r["clip"]): (r, p) for r, p in zip(records, paths, strict=True)}
    images, used = [], []
    for rec in df.to_dict("records"):
        key = (rec["sub"], rec["filename_o"])
        if key not in by_key:
            raise FlowCacheError(
                f"{csv_path} row {rec['_row']} (sub={key[0]}, filename_o={key[1]}): image "
                f"{image_name(*key)} found neither in {root} nor in "
                f"{root / key[0] / 'u_test'}; add it or remove the row"
            )
        tree_rec, path = by_key.pop(key)
        if tree_rec["label"] != rec["label"]:
            raise FlowCacheError(f"{csv_path} row {rec['_row']}: label {rec['label']} but {path} "
                                 f"is filed under label {tree_rec['label']}; make them agree")
        images.append(_read_png(path))
        used.append(path)
    if by_key:
        extra = [str(p) for _, p in list(by_key.values())[:3]]
        raise FlowCacheError(f"{len(by_key)} image(s) of the LOSO tree have no row in "
                             f"{csv_path}, e.g. {extra}; add rows for them or remove them")
    return _stack(images, used)


def read_flowcache(
    root: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    class_names: tuple[str, ...] | list[str] = CLASS_NAMES,
    sheets: list | dict | None = None,
    on_unmatched: str = "raise",
) -> FlowSamples:
    """Read a flow cache into model-ready samples.

    With a CSV (``csv=``, or the one ``*.csv`` in ``root``) each row is one sample, its image
    ``<sub>_<filename_o> .png`` taken from ``root`` (or the one subfolder of ``root`` holding
    the images; failing both, from the LOSO tree). Without a CSV, every
    ``<subject>/u_test/<label>/*.png`` is a sample of that subject, database ``flowcache``.

    Args:
        root: the cache folder.
        csv: the CSV file (absolute, or relative to ``root``).
        class_names: class index -> name, for the labels.
        sheets: annotation sheets whose AUs are joined to the samples (:func:`join_sheet_aus`).
        on_unmatched: ``raise`` (a clip without a sheet row is an error) or ``mask``.

    Returns:
        FlowSamples with x (N, 3, H, W) float32 in [0, 1] (channels u, v, strain); meta with
        ``database, subject, clip, label`` and the CSV's other columns (as text); flat-folder
        PNGs without a CSV row in ``excluded`` and ``provenance["unlisted_images"]``.

    Raises:
        FlowCacheError: naming the file or CSV row at fault.
    """
    root = Path(root)
    if not root.is_dir():
        raise FlowCacheError(f"flow cache folder {root} does not exist")
    class_names = list(class_names)
    n_classes = len(class_names)
    csv_path = _find_csv(root, csv)
    synthetic = False
    unlisted: list[Path] = []
    if csv_path is None:
        records, paths = _read_tree(root, n_classes)
        x = _stack([_read_png(p) for p in paths], paths)
        meta = pd.DataFrame(records)
        layout = "tree"
    else:
        df = _read_csv(csv_path, n_classes, class_names)
        image_dir = _find_image_dir(root, df, csv_path)
        if image_dir is not None:
            x, unlisted = _read_flat(image_dir, df, csv_path)
            layout = "flat"
        elif any((d / "u_test").is_dir() for d in root.iterdir() if d.is_dir()):
            x, layout = _match_tree(root, df, csv_path, n_classes), "tree"
        else:
            first = df.iloc[0]
            raise FlowCacheError(
                f"none of the {len(df)} images listed in {csv_path} was found: row "
                f"{first['_row']} (sub={first['sub']}, filename_o={first['filename_o']}) expects "
                f"{root / image_name(first['sub'], first['filename_o'])!s} (or in one "
                "subfolder of it, or the LOSO folders <sub>/u_test/<label>/); put the images "
                "there or pass root=<the image folder>"
            )
        if "synthetic" in df:
            synthetic = bool(df["synthetic"].str.strip().str.lower().isin(_TRUE).any())
        meta = df.drop(columns=[c for c in ("_row", "synthetic", "subject_key") if c in df])
        meta = meta.rename(columns={"dataset": "database", "sub": "subject",
                                    "filename_o": "clip"})
    source = root if csv_path is None else csv_path
    present = sorted(set(meta["label"].astype(int)))
    if len(present) < 2:
        raise FlowCacheError(
            f"{source}: training and UAR need at least two classes, found only "
            f"'{class_names[present[0]]}' (label {present[0]}, all {len(meta)} samples) in "
            f"{source}; add samples of the other classes or check the labels"
        )
    provenance = {"format": "flowcache", "root": str(root),
                  "csv": None if csv_path is None else str(csv_path), "layout": layout,
                  "unlisted_images": [p.name for p in unlisted]}
    samples = FlowSamples(x=x, meta=meta, class_names=class_names, synthetic=synthetic,
                          provenance=provenance,
                          excluded=_unlisted_records(unlisted, source) if unlisted else [])
    return join_sheet_aus(samples, sheets, on_unmatched) if sheets else samples


# ------------------------------------------------------------------------------- AU join

# The cache's ``dataset`` values (lower case) -> the database whose sheet gives its AUs.
DATASET_ALIASES = {
    "casme2": "casme2", "casmeii": "casme2", "casme_2": "casme2", "casme_ii": "casme2",
    "samm": "samm",
    "casme3": "casme3", "cas(me)3": "casme3", "cas(me)^3": "casme3", "casme^3": "casme3",
    "smic": "smic", "smic-hs": "smic", "smic_hs": "smic", "smichs": "smic",
}
NO_AU_DATABASES = ("smic",)  # no AU annotation: masked, never unmatched
# Subject ids, however written (cache or sheet) -> the form of the database's folders.
SUBJECT_FORMS: dict[str, tuple[str, str]] = {
    "casme2": (r"(?:sub)?0*([0-9]+)", "sub{:02d}"),   # 1, 01, sub1, sub01 -> sub01
    "samm": (r"0*([0-9]+)", "{:03d}"),                # 6, 006 -> 006
    "casme3": (r"spno\.?0*([0-9]+)", "spNO.{}"),      # spNO.1, spno1 -> spNO.1
}
_ON_UNMATCHED = ("raise", "mask")


def canonical_subject(database: str, value: object) -> str | None:
    """A subject id as the database's folders write it (``casme2``: ``1`` / ``sub1`` /
    ``casme2_sub01`` -> ``sub01``; ``samm``: ``6`` / ``samm_006`` -> ``006``; ``casme3``:
    ``spNO.1``), or None when ``value`` has no such form (never guessed)."""
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if text.lower().startswith(f"{database}_"):  # write_flowcache's <database>_<subject>
        text = text[len(database) + 1:]
    pattern, fmt = SUBJECT_FORMS[database]
    m = re.fullmatch(pattern, text, flags=re.IGNORECASE)
    return fmt.format(int(m.group(1))) if m else None


def _sheet_rows(path: Path) -> pd.DataFrame:
    """A recognition sheet as ``subject, clip, onset, au, row`` (raw cells)."""
    from mer.data.databases.common import DatabaseError, find_columns, read_table

    try:
        df = read_table(path, keys=("Subject", "Filename"))
        col = find_columns(df, path, keys=("subject", "clip", "onset", "aus"))
    except DatabaseError as exc:
        raise FlowCacheError(f"AU sheet {path}: {exc}") from None
    return pd.DataFrame({"subject": df[col["subject"]], "clip": df[col["clip"]],
                         "onset": df[col["onset"]], "au": df[col["aus"]], "row": df["_row"]})


def sheet_database(path: str | os.PathLike, rows: pd.DataFrame | None = None) -> str:
    """The database an annotation sheet belongs to, from its content: CAS(ME)^3 subjects are
    ``spNO.<n>``, SAMM clips ``<nnn>_<n>_<n>``, CASME II clips ``EP<nn>_<nn>...``; the kind
    most rows show. FlowCacheError when no kind fits most rows."""
    rows = _sheet_rows(Path(path)) if rows is None else rows
    subjects, clips = rows["subject"].astype(str), rows["clip"].astype(str)
    votes = {"casme3": subjects.str.fullmatch(r"spNO\.[0-9]+", case=False).mean(),
             "samm": clips.str.fullmatch(r"[0-9]{3}_[0-9]+_[0-9]+").mean(),
             "casme2": clips.str.fullmatch(r"EP[0-9]+_[0-9]+\w*", case=False).mean()}
    best = max(votes, key=votes.get)
    if len(rows) == 0 or votes[best] < 0.5:
        raise FlowCacheError(f"cannot tell which database the sheet {path} belongs to (its "
                             "subjects and clips look like none of CASME II, SAMM, "
                             "CAS(ME)^3); give it by name: data.sheets={casme2: " + str(path)
                             + "}")
    return best


def _sheet_table(database: str, path: Path, rows: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """``(subject, clip) -> {aus, au_raw, row}`` of one sheet, subjects normalised."""
    from mer.data.aus import parse_au_string
    from mer.data.databases.common import au_problem, onset_id, text_cell

    table: dict[tuple[str, str], dict] = {}
    for r in rows.to_dict("records"):
        subject = canonical_subject(database, text_cell(r["subject"]))
        clip = text_cell(r["clip"])
        if subject is None or not clip:
            raise FlowCacheError(f"{path} row {r['row']}: subject {r['subject']!r} / clip "
                                 f"{r['clip']!r} is no {database} sample id; fix the row or "
                                 "give the sheet of the right database")
        if database == "casme3":  # mer's CAS(ME)^3 clip ids: <Filename>_<Onset>
            clip = f"{clip}_{onset_id(r['onset'])}"
        problem = au_problem(r["au"])
        if problem:
            raise FlowCacheError(f"{path} row {r['row']} ({subject} {clip}): {problem}; fix "
                                 "the AU cell")
        if (subject, clip) in table:
            raise FlowCacheError(f"{path} rows {table[subject, clip]['row']} and {r['row']} "
                                 f"are both {subject}/{clip}; keep one")
        parsed = parse_au_string(r["au"])
        table[subject, clip] = {"aus": parsed.aus, "au_raw": parsed.raw, "row": int(r["row"])}
    return table


def _given_sheets(sheets: list | Mapping | str | os.PathLike) -> dict[str, Path]:
    """``{database: sheet}`` from a list (databases detected) or a mapping (checked)."""
    out: dict[str, Path] = {}
    if isinstance(sheets, str | os.PathLike):
        sheets = [sheets]
    items = [(str(k), p) for k, p in sheets.items()] if isinstance(sheets, Mapping) else \
        [(None, p) for p in sheets]  # a list (or a Hydra ListConfig)
    for name, p in items:
        path = Path(str(p)).expanduser()
        if not path.is_file():
            raise FlowCacheError(f"AU sheet {path} not found; fix data.sheets")
        detected = sheet_database(path)
        if name is not None and name != detected:
            raise FlowCacheError(f"data.sheets.{name}={path} looks like a {detected} sheet "
                                 f"(its subjects and clips); give it as data.sheets.{detected}")
        if detected in out:
            raise FlowCacheError(f"two {detected} sheets in data.sheets ({out[detected]} and "
                                 f"{path}); give one per database")
        out[detected] = path
    return out


def join_sheet_aus(samples: FlowSamples, sheets: list | dict,
                   on_unmatched: str = "raise") -> FlowSamples:
    """Join the AUs of annotation ``sheets`` to flow-cache samples; meta gains ``aus`` (tuples),
    ``au_raw`` and ``has_aus`` (the AU-loss mask: False for SMIC and unmatched clips).

    Args:
        samples: from :func:`read_flowcache`: meta ``database`` (the CSV's ``dataset``),
            ``subject``, ``clip``.
        sheets: ``[path, ...]`` (each sheet's database detected, :func:`sheet_database`) or
            ``{database: path}`` (checked against the detection).
        on_unmatched: ``raise``: a clip of a database other than SMIC without a sheet row is an
            error naming it; ``mask``: kept, AU loss masked, listed in the report.

    Returns:
        The samples with the AU columns and ``provenance["au_join"]``: the sheets, the counts
        matched / unmatched / without AUs, per database, and the unmatched clips.

    Raises:
        FlowCacheError: naming the sheet row, the cache's dataset or the clips at fault.
    """
    if on_unmatched not in _ON_UNMATCHED:
        raise FlowCacheError(f"on_unmatched={on_unmatched!r}: use one of {_ON_UNMATCHED}")
    given = _given_sheets(sheets)
    tables = {db: _sheet_table(db, path, _sheet_rows(path)) for db, path in given.items()}
    meta = samples.meta.copy()
    unknown = sorted({str(d) for d in meta["database"]
                      if str(d).strip().lower() not in DATASET_ALIASES})
    if unknown:
        raise FlowCacheError(
            f"flow cache dataset '{unknown[0]}' names no database with AU sheets; the AU join "
            f"knows {sorted(set(DATASET_ALIASES.values()))} (written e.g. "
            f"{sorted(DATASET_ALIASES)[:6]}...): rename the dataset column of the cache's CSV")
    aus, raw, has, unmatched = [], [], [], []
    counts: dict[str, dict[str, int]] = {}
    no_aus: dict[str, int] = {}
    for r in meta.itertuples():
        db = DATASET_ALIASES[str(r.database).strip().lower()]
        c = counts.setdefault(db, {"matched": 0, "unmatched": 0})
        hit, reason = None, ""
        if db in NO_AU_DATABASES:
            no_aus[db] = no_aus.get(db, 0) + 1
        elif db not in tables:
            reason = f"no sheet for {db} (data.sheets)"
        else:
            subject = canonical_subject(db, r.subject)
            hit = tables[db].get((subject, str(r.clip).strip())) if subject else None
            reason = "" if hit else (f"no row in {given[db]}" if subject else
                                     f"subject id {r.subject!r} has no {db} form "
                                     f"({SUBJECT_FORMS[db][1].format(1)})")
        if reason:
            c["unmatched"] += 1
            unmatched.append({"database": db, "subject": str(r.subject), "clip": str(r.clip),
                              "reason": reason})
        elif hit is not None:
            c["matched"] += 1
        aus.append(hit["aus"] if hit else ())
        raw.append(hit["au_raw"] if hit else "")
        has.append(hit is not None)
    per_db = {db: {**c, "sheet_rows": len(tables.get(db, {})),
                   "sheet_rows_unused": len(tables.get(db, {})) - c["matched"]}
              for db, c in sorted(counts.items()) if db not in NO_AU_DATABASES}
    n_with = len(meta) - sum(no_aus.values())
    line = (f"flow cache AUs: {sum(has)} of {n_with} clips matched to "
            f"{', '.join(f'{db} {path.name}' for db, path in given.items())}"
            + "".join(f"; {db} {c['matched']}/{c['matched'] + c['unmatched']}"
                      for db, c in per_db.items())
            + f"; {len(unmatched)} unmatched"
            + "".join(f"; {db} {n} clips have no AUs (masked)" for db, n in no_aus.items()))
    if unmatched and on_unmatched == "raise":
        shown = ", ".join(f"{u['database']}/{u['subject']}/{u['clip']} ({u['reason']})"
                          for u in unmatched[:5])
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise FlowCacheError(
            f"AU join: {len(unmatched)} of {n_with} clips have no AUs: {shown}{more}. Check "
            "the sheets (data.sheets) and the cache's ids, or set data.on_unmatched=mask to "
            "train them with their AU loss masked (listed in results.json)")
    print(line)
    meta["aus"], meta["au_raw"], meta["has_aus"] = aus, raw, has
    provenance = {**samples.provenance, "au_join": {
        "sheets": {db: str(p) for db, p in given.items()}, "matched": int(sum(has)),
        "unmatched": len(unmatched), "no_aus": no_aus, "per_database": per_db,
        "unmatched_clips": unmatched, "on_unmatched": on_unmatched}}
    return FlowSamples(samples.x, meta, samples.class_names, samples.excluded,
                       samples.synthetic, provenance, samples.landmarks)


# ----------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_flowcache(
    samples: FlowSamples,
    root: str | os.PathLike,
    loso_tree: bool = True,
    csv_name: str = "flowcache.csv",
) -> list[str]:
    """Write samples as a flow cache: flat folder + CSV, and the LOSO tree when ``loso_tree``.

    ``root`` must be new or empty; the cache is written into a temporary sibling folder and
    renamed into place when complete, so a failed export leaves nothing behind. Values are
    stored as ``round(x * 255)``. Subject ids that
    occur under several databases are written as ``<database>_<subject>`` (for all rows).

    Args:
        samples: x (N, 3, H, W) in [0, 1], H == W; meta with ``database, subject, clip, label``.
        root: the folder to create.
        loso_tree: also write ``<subject>/u_train|u_test/<label>/`` copies.
        csv_name: name of the CSV file.

    Returns:
        Notes on what the writer changed or what a reader must know (also logged).
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FlowCacheError(f"{root} is not empty; write a flow cache into a new folder")
    x = np.asarray(samples.x)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise FlowCacheError(f"flow cache images must be (N, 3, H, H); got {x.shape}")
    if not np.isfinite(x).all() or x.min(initial=0) < -1e-6 or x.max(initial=0) > 1 + 1e-6:
        raise FlowCacheError("flow images must be normalised to [0, 1] before writing")
    meta = samples.meta
    database = meta["database"].astype(str).tolist()
    subject = meta["subject"].astype(str).tolist()
    clip = meta["clip"].astype(str).tolist()
    label = meta["label"].astype(np.int64).tolist()
    notes = []

    owners = pd.DataFrame({"d": database, "s": subject}).groupby("s")["d"].nunique()
    if (owners > 1).any():
        shared = sorted(owners.index[owners > 1])[:5]
        subject = [f"{d}_{s}" for d, s in zip(database, subject, strict=True)]
        notes.append(f"subject ids {shared} occur in several databases; all subject ids were "
                     "written as <database>_<subject> and read back that way")
    for i, (s, c) in enumerate(zip(subject, clip, strict=True)):
        for value in (s, c):
            if not value or "/" in value or "\\" in value:
                raise FlowCacheError(f"sample {i} ({database[i]}/{s}/{c}): ids must be "
                                     "non-empty plain names")
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(subject, clip, strict=True)):
        if key in seen:
            raise FlowCacheError(f"samples {seen[key]} and {i} are both {key[0]}_{key[1]}; each "
                                 "(subject, clip) must be unique")
        seen[key] = i
    bad = [v for v in label if not 0 <= v < len(samples.class_names)]
    if bad:
        raise FlowCacheError(f"labels {sorted(set(bad))[:5]} are outside "
                             f"0..{samples.num_classes - 1}")
    if list(samples.class_names) != list(CLASS_NAMES):
        notes.append(f"class names are {list(samples.class_names)}, not the usual "
                     f"{list(CLASS_NAMES)}: read it back with class_names=")

    images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    encoded = []
    for image in images:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
        if not ok:
            raise FlowCacheError("PNG encoding failed")
        encoded.append(buf.tobytes())
    names = [image_name(s, c) for s, c in zip(subject, clip, strict=True)]

    # Written into a temporary sibling folder, renamed into place when complete: a failure
    # (a full disk...) leaves neither a half-written cache nor the temporary folder.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for name, data in zip(names, encoded, strict=True):
            (tmp / name).write_bytes(data)
        table = pd.DataFrame({"dataset": database, "sub": subject, "filename_o": clip,
                              "label": label})
        if "emotion" in meta:
            table["emotion"] = meta["emotion"].to_numpy()
        table["synthetic"] = bool(samples.synthetic)
        table.to_csv(tmp / csv_name, index=False)
        if loso_tree:
            for owner in sorted(set(subject)):
                for name, data, s, lab in zip(names, encoded, subject, label, strict=True):
                    split = "u_test" if s == owner else "u_train"
                    folder = tmp / owner / split / str(lab)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp made it private; a cache folder is not
        os.replace(tmp, root)  # root is absent or an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        log.info("write_flowcache %s: %s", root, note)
    return notes
