"""CASME II reader on a tree built here in the real layout, and on the real sheet."""

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data.databases import read_database
from mer.data.databases.casme2 import read_casme2
from mer.data.databases.common import DatabaseError
from mer.data.labels import LabelError, apply_label_scheme

HEADER = ["Subject", "Filename", "Unnamed: 2", "Onset Frame", "Apex Frame", "OffsetFrame",
          "Unnamed: 6", "Action Units", "Estimated Emotion"]


def build_tree(root, rows, frames=range(10, 20)):
    """rows: (subject int, clip, onset, apex, offset, aus, emotion)."""
    for subject, clip, *_ in rows:
        d = root / "CASME2_RAW_selected" / f"sub{subject:02d}" / clip
        d.mkdir(parents=True, exist_ok=True)
        for n in frames:
            cv2.imwrite(str(d / f"img{n}.jpg"), np.full((20, 16, 3), n, np.uint8))
    cells = [[s, c, None, on, ap, off, None, au, em] for s, c, on, ap, off, au, em in rows]
    df = pd.DataFrame(cells, columns=HEADER)
    df = df.rename(columns={"Unnamed: 2": "", "Unnamed: 6": " "})
    df.to_excel(root / "CASME2-coding-20140508.xlsx", index=False)
    return root


ROWS = [(1, "EP02_01f", 10, 13, 18, "12", "happiness"),
        (1, "EP03_02", 11, "/", 19, "4+7", "disgust"),
        (2, "EP01_01", 10, 15, 19, "R14", "repression"),
        (2, "EP04_03", 10, 12, 16, "1+2", "surprise"),
        (3, "EP05_02", 12, 14, 17, "soft", "others")]


def test_reads_the_real_layout(tmp_path):
    table, skipped = read_casme2(build_tree(tmp_path, ROWS))
    assert not skipped
    assert list(table["subject"]) == ["sub01", "sub01", "sub02", "sub02", "sub03"]
    first = table.iloc[0]
    assert (first.onset, first.apex, first.offset, first.aus) == (10, 13, 18, (12,))
    assert first.onset_path.endswith("sub01/EP02_01f/img10.jpg")
    assert table.iloc[1].apex == -1 and table.iloc[1].apex_path == ""  # "/" apex
    assert list(table["row"]) == [2, 3, 4, 5, 6]


def test_composite_labels_and_exclusions(tmp_path):
    table, _ = read_casme2(build_tree(tmp_path, ROWS))
    kept, classes, excluded = apply_label_scheme(table, "composite", "casme2")
    assert classes == ["negative", "positive", "surprise"]
    assert dict(zip(kept["clip"], kept["label"])) == {
        "EP02_01f": 1, "EP03_02": 0, "EP01_01": 0, "EP04_03": 2}
    assert excluded == [{"database": "casme2", "subject": "sub03", "clip": "EP05_02",
                         "reason": "MEGC2019 composite excludes 'others' for casme2"}]


def test_missing_frame_names_row_and_file(tmp_path):
    root = build_tree(tmp_path, ROWS)
    (root / "CASME2_RAW_selected/sub02/EP01_01/img15.jpg").unlink()
    with pytest.raises(DatabaseError, match=r"row 4 .*img15\.jpg"):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert len(table) == 4 and "img15.jpg" in skipped[0]["reason"]


def test_sheet_without_a_needed_column(tmp_path):
    root = build_tree(tmp_path, ROWS)
    df = pd.read_excel(root / "CASME2-coding-20140508.xlsx").drop(columns=["Apex Frame"])
    df.to_excel(root / "CASME2-coding-20140508.xlsx", index=False)
    with pytest.raises(DatabaseError, match="no apex column"):
        read_casme2(root)


def test_unknown_emotion_names_the_row(tmp_path):
    rows = ROWS[:2] + [(2, "EP01_01", 10, 15, 19, "4", "boredom")]
    table, _ = read_casme2(build_tree(tmp_path, rows))
    with pytest.raises(LabelError, match="row 4 .*boredom"):
        apply_label_scheme(table, "composite", "casme2")


def test_unreadable_image(tmp_path):
    root = build_tree(tmp_path, ROWS)
    (root / "CASME2_RAW_selected/sub02/EP04_03/img10.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatabaseError, match=r"row 5 .*unreadable image .*img10\.jpg"):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert "EP04_03" not in set(table["clip"]) and skipped[0]["clip"] == "EP04_03"


def test_onset_after_apex(tmp_path):
    rows = ROWS[:2] + [(2, "EP01_01", 16, 15, 19, "R14", "repression")] + ROWS[3:]
    with pytest.raises(DatabaseError, match=r"row 4 .*apex 15 outside the clip \(onset 16"):
        read_casme2(build_tree(tmp_path, rows))


def test_duplicate_sample(tmp_path):
    rows = ROWS + [(1, "EP02_01f", 10, 13, 18, "12", "happiness")]
    root = build_tree(tmp_path, rows)
    with pytest.raises(DatabaseError, match=r"row 7 \(sub01 EP02_01f\): duplicate of row 2"):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert len(table) == 5 and "duplicate of row 2" in skipped[0]["reason"]


def test_real_casme2_sheet_composite_counts(annotation_sheet, tmp_path):
    """The real sheet through the reader (frames written per row): composite 88/32/25."""
    sheet = annotation_sheet("CASME2-coding.xlsx")
    real = pd.read_excel(sheet)
    for r in real.to_dict("records"):
        d = tmp_path / "CASME2_RAW_selected" / f"sub{int(r['Subject']):02d}" / r["Filename"]
        d.mkdir(parents=True, exist_ok=True)
        for n in {int(r["Onset Frame"]), int(r["Apex Frame"]), int(r["OffsetFrame"])}:
            cv2.imwrite(str(d / f"img{n}.jpg"), np.zeros((4, 4), np.uint8))
    table, skipped = read_database("casme2", tmp_path, sheet=sheet, check_images=False)
    assert skipped == [] and len(table) == len(real) == 250
    kept, classes, excluded = apply_label_scheme(table, "composite", "casme2")
    assert kept["label"].value_counts().sort_index().tolist() == [88, 32, 25]
    assert kept["subject"].nunique() == 24
    emotions = table["emotion"]
    # the emotion exclusions, plus the two clips of COMPOSITE_EXCLUDED_CLIPS (both disgust)
    assert len(excluded) == int(emotions.isin(["others", "fear", "sadness"]).sum()) + 2 == 105
    clips = {(e["subject"], e["clip"]) for e in excluded if "apex" in e["reason"]}
    assert clips == {("sub04", "EP12_01f"), ("sub05", "EP09_05f")}
    kept, classes, _ = apply_label_scheme(table, "casme2_5class", "casme2")
    assert kept["label"].map(lambda i: classes[i]).value_counts().to_dict() == {
        "others": 94, "disgust": 63, "happiness": 32, "repression": 27, "surprise": 25}


# --- issue 12: nothing silent, nothing lost (bad cells are row errors, never raw exceptions) ---

def _rewrite_sheet(root, rows):
    """The sheet of ``root`` rewritten with ``rows`` (frames left as they are)."""
    cells = [[s, c, None, on, ap, off, None, au, em] for s, c, on, ap, off, au, em in rows]
    pd.DataFrame(cells, columns=HEADER).to_excel(root / "CASME2-coding-20140508.xlsx",
                                                 index=False)
    return root


@pytest.mark.parametrize("onset,apex,offset,problem", [
    ("inf", 15, 19, r"'inf' is not a frame number"),
    (10, "1e400", 19, r"'1e400' is not a frame number"),
    (10, 13.5, 19, r"13\.5 is not a whole frame number"),
    (10, "13.5", 19, r"13\.5 is not a whole frame number"),
    (10, 15, -7, r"negative frame number -7"),
    (10, -5, 19, r"negative frame number -5"),
    (10, 15, 10**18, r"offset 1000000000000000000 after the last frame on disk \(19 in "),
    (10, 15, 25, r"offset 25 after the last frame on disk \(19 in .*sub02/EP01_01\)"),
    (10, 15, "9" * 5000, r"'9{20}.*' is not a frame number"),
])
def test_bad_frame_cells_are_row_errors(tmp_path, onset, apex, offset, problem):
    """Overflow, fractions, negatives and offsets past the frames on disk name the row; with
    on_error=skip the row is listed and the others are kept."""
    root = build_tree(tmp_path, ROWS)
    rows = ROWS[:2] + [(2, "EP01_01", onset, apex, offset, "R14", "repression")] + ROWS[3:]
    _rewrite_sheet(root, rows)
    with pytest.raises(DatabaseError, match=r"row 4 \(sub02 EP01_01\): " + problem):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert list(table["row"]) == [2, 3, 5, 6]
    assert [s["clip"] for s in skipped] == ["EP01_01"]
    assert skipped[0]["reason"].startswith("CASME2-coding-20140508.xlsx row 4: ")


def test_minus_one_and_blank_still_mean_not_annotated(tmp_path):
    root = build_tree(tmp_path, ROWS)
    _rewrite_sheet(root, [(1, "EP02_01f", 10, -1, 18.0, "12", "happiness"),
                          (1, "EP03_02", 11, None, -1, "4+7", "disgust")])
    table, _ = read_casme2(root)
    assert list(table["apex"]) == [-1, -1] and list(table["offset"]) == [18, -1]
    assert table["onset"].map(type).tolist() == [int, int]


@pytest.mark.parametrize("subject,clip,problem", [
    (1, "E" * 300, r"clip name 'E{20}.*' is 300 bytes long: a file name holds at most 255"),
    (1, "é" * 200, r"clip name 'é{20}.*' is 400 bytes long"),
    (1, "../sub01/EP02_01f", r"clip name '\.\./sub01/EP02_01f' is not a folder name \(holds '/'"),
    ("²", "EP01_01", r"frame folder missing: .*CASME2_RAW_selected/²/EP01_01"),
    ("①", "EP01_01", r"frame folder missing: .*CASME2_RAW_selected/①/EP01_01"),
    ("9" * 5000, "EP01_01", r"subject name '9{20}.*' is 5000 bytes long"),
])
def test_bad_names_are_row_errors(tmp_path, subject, clip, problem):
    """Over-long names raised OSError, '²'/'①' ValueError; '../' read another clip's frames."""
    root = _rewrite_sheet(build_tree(tmp_path, ROWS), ROWS[:2] + [
        (subject, clip, 10, 15, 19, "R14", "repression")] + ROWS[3:])
    with pytest.raises(DatabaseError, match=r"row 4 .*" + problem):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert list(table["row"]) == [2, 3, 5, 6] and len(skipped) == 1
    assert skipped[0]["reason"].startswith("CASME2-coding-20140508.xlsx row 4: ")


@pytest.mark.parametrize("au,problem", [
    (-4, r"AU -4 is not a FACS code \(1\.\.99\)"),
    (1000, r"AU 1000 is not a FACS code \(1\.\.99\)"),
    ("4+AU100", r"AU 100 is not a FACS code"),
    (4.5, r"AU 4\.5 is not a FACS code"),
])
def test_au_cells_outside_facs_are_row_errors(tmp_path, au, problem):
    root = _rewrite_sheet(build_tree(tmp_path, ROWS), ROWS[:2] + [
        (2, "EP01_01", 10, 15, 19, au, "repression")] + ROWS[3:])
    with pytest.raises(DatabaseError, match=r"row 4 \(sub02 EP01_01\): " + problem):
        read_casme2(root)
    table, skipped = read_casme2(root, on_error="skip")
    assert len(table) == 4 and "not a FACS code" in skipped[0]["reason"]


def test_a_sheet_with_a_header_and_no_rows_is_named(tmp_path):
    """Was 'LOSO needs at least 2 subjects, found 0' later on, naming no sheet."""
    root = _rewrite_sheet(build_tree(tmp_path, ROWS), [])
    with pytest.raises(DatabaseError, match=r"casme2: .*has a header but no sample rows"):
        read_database("casme2", root)
