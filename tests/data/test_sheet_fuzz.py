"""Hypothesis fuzz of the annotation-sheet readers (CASME II, SAMM, CAS(ME)^3; issue 12).

The contract, for every sheet row: either accepted, with ints inside their ranges (onset <= apex
<= offset, -1: not annotated; onset and apex frames on disk, the offset not past the last one;
AUs 1..99; subject and clip non-empty; a known emotion; objective '' or I..VII), or rejected by a
DatabaseError naming the sheet and the row. With ``on_error=skip`` nothing raises and every row
is either in the table or listed with its row and reason; with ``raise`` the error names the first
listed row. Cells are drawn with what they should read as (a known answer), as bad (the row must
be rejected) or as free text (only the contract is checked).

The frame trees are built once per module; each example writes one small sheet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mer.data.databases import DatabaseError, casme2, casme3, read_database, samm
from mer.data.labels import OBJECTIVE_CLASSES

BAD, FREE = object(), object()  # expected value of a cell: must reject / not known here
ROMAN = dict(enumerate(OBJECTIVE_CLASSES, 1))


@dataclass
class Reader:
    """One database: its tree, its sheet's header, and how its cells read."""

    name: str
    header: list[str]
    subjects: list[tuple[object, str]]  # (cell, subject id) of the folders on disk
    clips: list[str]                    # clip (video) folders under every subject
    frames: dict[str, set[int]]         # clip folder -> frame numbers on disk
    emotions: tuple[str, ...]
    objective: bool = False
    clip_has_onset: bool = False        # CAS(ME)^3: clip id "<Filename>_<Onset>"
    root: Path | None = None


FRAMES = {"A": set(range(10, 20)), "B": set(range(10, 20)) - {15}}  # B: a gap at 15
READERS = {
    "casme2": Reader("casme2", ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame",
                                "Action Units", "Estimated Emotion"],
                     [(1, "sub01"), ("1", "sub01"), ("sub02", "sub02")],
                     ["EP01_01", "EP02_01f"], {}, casme2.EMOTIONS),
    "samm": Reader("samm", ["Subject", "Filename", "Onset Frame", "Apex Frame", "Offset Frame",
                            "Action Units", "Estimated Emotion", "Objective Classes"],
                   [(6, "006"), ("006", "006"), (7, "007")], ["006_1_2", "006_1_3"], {},
                   samm.EMOTIONS, objective=True),
    "casme3": Reader("casme3", ["Subject", "Filename", "Onset", "Apex", "Offset", "AU",
                                "emotion", "Objective class"],
                     [("spNO.1", "spNO.1"), ("spNO.2", "spNO.2")], ["a", "b"], {},
                     casme3.EMOTIONS, objective=True, clip_has_onset=True),
}


def _frame_dir(reader: Reader, subject: str, clip: str) -> Path:
    root = reader.root
    if reader.name == "casme2":
        return root / "CASME2_RAW_selected" / subject / clip
    if reader.name == "samm":
        return root / "SAMM" / subject / clip
    return root / "part_A" / subject / clip / "color"


def _frame_name(reader: Reader, subject: str) -> str:
    return {"casme2": "img{}.jpg", "samm": f"{subject}_{{:05d}}.jpg"}.get(reader.name, "{}.jpg")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The three frame trees (first clip: frames 10..19; second: the same but 15)."""
    for reader in READERS.values():
        reader.root = tmp_path_factory.mktemp(reader.name)
        for _, subject in reader.subjects:
            for clip, frames in zip(reader.clips, FRAMES.values()):
                reader.frames[clip] = frames
                folder = _frame_dir(reader, subject, clip)
                folder.mkdir(parents=True, exist_ok=True)
                for n in frames:
                    name = _frame_name(reader, subject).format(n)
                    cv2.imwrite(str(folder / name), np.full((6, 5), n, np.uint8))
    return READERS


# --- cells, each with what it should read as --------------------------------------------------

_free_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).map(
    lambda t: (t.lstrip("="), FREE))  # "=...": a formula to openpyxl


def _frame_repr(n: int) -> st.SearchStrategy:
    return st.sampled_from([(n, n), (float(n), n), (str(n), n), (f"{n}.0", n), (f" {n} ", n)])


_missing = st.sampled_from([(None, -1), ("/", -1), (-1, -1), ("-1", -1), ("-", -1)])
_bad_frame = st.sampled_from(["inf", "1e400", "-inf", 12.5, "12.5", -7, "-7", -2, "abc", "²",
                              "①", True, "9" * 30, "1/2"]).map(lambda c: (c, BAD))
_any_frame = st.one_of(st.integers(7, 22).flatmap(_frame_repr), _missing, _bad_frame,
                       st.just((10**18, 10**18)), _free_text)


@st.composite
def _frames(draw) -> list[tuple[object, object]]:
    """Three frame cells: often a consistent onset <= apex <= offset, written in any form."""
    if draw(st.booleans()):
        on, ap, off = sorted(draw(st.lists(st.integers(9, 21), min_size=3, max_size=3)))
        cells = [draw(_frame_repr(n)) for n in (on, ap, off)]
        for i in (1, 2):  # apex / offset not annotated
            if draw(st.integers(0, 4)) == 0:
                cells[i] = draw(_missing)
        if draw(st.integers(0, 3)) == 0:
            cells[draw(st.integers(0, 2))] = draw(_bad_frame)
        return cells
    return [draw(_any_frame) for _ in range(3)]


@st.composite
def _good_frames(draw) -> list[tuple[object, object]]:
    """onset <= apex <= offset, on disk in both clips (10..19 but 15), in any written form."""
    on, ap, off = sorted(draw(st.lists(st.sampled_from([10, 11, 12, 14, 16, 19]), min_size=3,
                                       max_size=3)))
    cells = [draw(_frame_repr(n)) for n in (on, ap, off)]
    for i in (1, 2):  # apex / offset not annotated
        if draw(st.integers(0, 4)) == 0:
            cells[i] = draw(_missing)
    return cells


@st.composite
def _cells(draw, reader: Reader) -> tuple:
    """One row: all good (half the time), one column bad or free, or anything."""
    good = [st.sampled_from(reader.subjects), st.sampled_from([(c, c) for c in reader.clips]),
            _good_frames(),
            st.sampled_from([("4+7", (4, 7)), (12, (12,)), ("R12", (12,)), ("L1+2", (1, 2)),
                             ("AU99", (99,)), ("1+2+1", (1, 2)), (None, ()),
                             ("soft focus", ())]),
            st.sampled_from([(e, e) for e in reader.emotions]
                            + [(e.title(), e) for e in reader.emotions]),
            st.sampled_from([(i, r) for i, r in ROMAN.items()]
                            + [(r, r) for r in OBJECTIVE_CLASSES] + [("iii", "III"), (None, "")])
            if reader.objective else st.just((None, ""))]
    bad = [st.sampled_from([(None, BAD), ("²", BAD), ("①", BAD), ("x" * 300, BAD),
                            ("../x", BAD), (99, BAD), (".", BAD)]),
           st.sampled_from([(None, BAD), ("E" * 300, BAD), ("é" * 200, BAD), ("a/b", BAD),
                            ("..", BAD), ("nope", BAD)]),
           _frames(),
           st.sampled_from([-4, 1000, 0, 4.5, "AU100", "R0", "4+-4", True, "12+100"]).map(
               lambda c: (c, BAD)),
           st.sampled_from([(None, BAD), ("boredom", BAD)]),
           st.sampled_from([0, 8, "VIII", "①", "²", 3.5, "x"]).map(lambda c: (c, BAD))
           if reader.objective else st.just((None, ""))]
    free = [_free_text, _free_text, _frames(), _free_text, _free_text, _free_text]
    mode = draw(st.integers(0, 3))
    if mode <= 1:
        return tuple(draw(g) for g in good)
    if mode == 2:
        k = draw(st.integers(0, len(good) - 1))
        other = draw(st.sampled_from([bad[k], free[k]]))
        return tuple(draw(other if i == k else g) for i, g in enumerate(good))
    return tuple(draw(st.one_of(*c)) for c in zip(good, bad, free))


# --- the contract ------------------------------------------------------------------------------

def _write(reader: Reader, rows: list) -> Path:
    sheet = reader.root.parent / f"{reader.name}-sheet" / "sheet.xlsx"
    sheet.parent.mkdir(exist_ok=True)
    wb = openpyxl.Workbook()
    wb.active.append(reader.header)
    for cells in rows:
        wb.active.append(_write_cells(reader, cells))
    wb.save(sheet)
    return sheet


def _expected(reader: Reader, cells) -> dict | object:
    """What one row should give: a dict of values (accepted), BAD or FREE."""
    (_, subject), (clip_cell, clip), frames, (_, aus), (_, emotion), (_, objective) = cells
    values = [subject, clip, *(e for _, e in frames), aus, emotion, objective]
    if any(v is BAD for v in values):
        return BAD
    if any(v is FREE for v in values):
        return FREE
    onset, apex, offset = (e for _, e in frames)
    on_disk = reader.frames[clip]
    if (onset < 0 or 0 <= offset < onset or (apex >= 0 and (apex < onset or 0 <= offset < apex))
            or onset not in on_disk or (apex >= 0 and apex not in on_disk)
            or offset > max(on_disk)):
        return BAD
    if reader.clip_has_onset:
        clip = f"{clip}_{onset}"  # the frame number, however the cell writes it
    return {"subject": subject, "clip": clip, "onset": onset, "apex": apex, "offset": offset,
            "aus": aus, "emotion": emotion, "objective": objective}


def _check_contract(reader: Reader, sheet: Path, rows: list, table: pd.DataFrame,
                    skipped: list[dict]) -> None:
    written = {i + 2 for i, r in enumerate(rows)  # blank rows are no rows
               if any(v is not None and v != "" for v in _write_cells(reader, r))}
    listed = []
    for s in skipped:
        m = re.match(rf"{re.escape(sheet.name)} row (\d+): .+", s["reason"])
        assert m, f"skipped sample without its sheet row: {s}"
        listed.append(int(m.group(1)))
    accepted = list(table["row"])
    assert sorted(accepted + listed) == sorted(written), "a row lost or counted twice"
    for col in ("onset", "apex", "offset", "row"):
        assert table.empty or pd.api.types.is_integer_dtype(table[col])
    keys = set()
    for r in table.to_dict("records"):
        frames = {int(re.search(r"([0-9]+)[^0-9]*$", p.stem).group(1))
                  for p in Path(r["frame_dir"]).iterdir()}
        on, ap, off = r["onset"], r["apex"], r["offset"]
        assert on in frames and (ap == -1 or (on <= ap and ap in frames)), r
        assert off == -1 or (max(on, ap) <= off <= max(frames)), r
        assert all(isinstance(a, int) and 1 <= a <= 99 for a in r["aus"]), r
        assert r["subject"] and r["clip"] and r["emotion"] in reader.emotions, r
        assert r["objective"] in ("", *OBJECTIVE_CLASSES), r
        assert (r["subject"], r["clip"]) not in keys
        keys.add((r["subject"], r["clip"]))
    # the known answers
    by_row = {r["row"]: r for r in table.to_dict("records")}
    seen: set[tuple] = set()
    for i, cells in enumerate(rows):
        row, want = i + 2, _expected(reader, cells)
        if row not in written or want is FREE:
            event("row: free text, contract only")
        elif want is BAD or (want["subject"], want["clip"]) in seen:  # bad, or a duplicate
            event("row: known bad")
            assert row in listed, f"row {row} should be rejected: {cells}"
        else:
            event("row: known good")
            assert row in by_row, f"row {row} should be accepted: {cells} -> {skipped}"
            got = {k: by_row[row][k] for k in want}
            assert got == {**want, "aus": tuple(want["aus"])}, cells
        if row in by_row:
            seen.add((by_row[row]["subject"], by_row[row]["clip"]))


def _write_cells(reader: Reader, cells) -> list:
    (s, _), (c, _), frames, (au, _), (em, _), (ob, _) = cells
    return [s, c, *(f for f, _ in frames), au, em] + ([ob] if reader.objective else [])


def _fuzz(reader: Reader, rows: list) -> None:
    sheet = _write(reader, rows)
    table, skipped = read_database(reader.name, reader.root, sheet=sheet, on_error="skip")
    _check_contract(reader, sheet, rows, table, skipped)
    if skipped:
        first = re.match(r".+? row (\d+):", skipped[0]["reason"]).group(1)
        with pytest.raises(DatabaseError) as e:
            read_database(reader.name, reader.root, sheet=sheet)
        assert str(e.value).startswith(f"{sheet} row {first} (")
    else:
        again, _ = read_database(reader.name, reader.root, sheet=sheet)
        pd.testing.assert_frame_equal(again, table)


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(READERS))
@FUZZ
@given(data=st.data())
def test_every_row_accepted_in_range_or_rejected_by_row(trees, name, data):
    reader = trees[name]
    rows = data.draw(st.lists(_cells(reader), min_size=1, max_size=5), label="rows")
    _fuzz(reader, rows)
