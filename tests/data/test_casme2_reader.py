"""CASME II reader on a tree built here in the real layout, and on the real sheet."""

import cv2
import numpy as np
import pandas as pd
import pytest

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


def test_real_casme2_sheet_composite_counts(annotation_sheet, tmp_path):
    sheet = pd.read_excel(annotation_sheet("CASME2-coding.xlsx"))
    emotions = sheet["emotion"].str.lower()
    table = pd.DataFrame({"database": "casme2", "subject": sheet["Subject"], "clip":
                          sheet["Filename"], "emotion": emotions, "aus": [()] * len(sheet),
                          "row": range(2, len(sheet) + 2)})
    kept, classes, excluded = apply_label_scheme(table, "composite", "casme2")
    counts = kept["label"].value_counts().sort_index().tolist()
    # happiness 32 and surprise 25 as published; negative = disgust + repression of the sheet
    assert counts[1:] == [32, 25]
    assert counts[0] == int(emotions.isin(["disgust", "repression"]).sum())
    assert len(excluded) == int(emotions.isin(["others", "fear", "sadness"]).sum())
