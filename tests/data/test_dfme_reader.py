"""DFME reader on a tree built here in the layout the reader assumes (module docstring of
mer.data.databases.dfme: no real DFME sheet was available to check it)."""

import pytest

from mer.data.databases import DatabaseError, read_database
from mer.data.databases.dfme import EMOTIONS
from mer.data.labels import apply_label_scheme

HEADER = ["Subject", "Filename", "Onset", "Apex", "Offset", "FPS", "Action Units", "Emotion"]
PARTS = {
    "train": [(1, "1_0001", 10, 25, 60, 200, "4+7", "Anger"),
              (1, "1_0002", 5, 40, 90, 300, "L14", "contempt"),
              (2, "2_0001", 100, 160, 240, 500, "9+10", "Disgust")],
    "testA": [(3, "3_0001", 1, 30, 70, 200, "1+2+4", "Fear"),
              (3, "3_0002", 2, 20, 50, 300, "6+12", "Happiness")],
    "testB": [(4, "4_0001", 3, 50, 120, 500, "15+17", "Sadness"),
              (5, "5_0001", 7, 19, 44, 200, "1+2", "Surprise")],
}
SHEETS = {"train": "DFME_train_label.xlsx", "testA": "DFME_testA_label.xlsx",
          "testB": "DFME_testB_label.xlsx"}


def build_dfme(build, root, parts=PARTS, sheets=SHEETS):
    for part, rows in parts.items():
        for subject, clip, onset, apex, offset, *_ in rows:
            build.frames(root / part / str(subject) / clip, {onset, apex, offset},
                         name="{:05d}.jpg")
        build.sheet(root / sheets[part], HEADER, rows)
    return root


def test_reads_all_three_parts_with_their_frame_rates(build, tmp_path):
    table, excluded = read_database("dfme", build_dfme(build, tmp_path))
    assert excluded == []
    assert list(table["clip"]) == ["1_0001", "1_0002", "2_0001", "3_0001", "3_0002", "4_0001",
                                   "5_0001"]
    assert list(table["subject"]) == ["1", "1", "2", "3", "3", "4", "5"]
    assert list(table["fps"]) == [200.0, 300.0, 500.0, 200.0, 300.0, 500.0, 200.0]
    assert list(table["aus"])[:3] == [(4, 7), (14,), (9, 10)]
    assert set(table["emotion"]) == set(EMOTIONS)  # lower-cased, all 7
    first = table.iloc[0]
    assert first.onset_path.endswith("train/1/1_0001/00010.jpg")
    assert first.apex_path.endswith("train/1/1_0001/00025.jpg")
    assert table.iloc[3].frame_dir.endswith("testA/3/3_0001")


def test_seven_emotion_classes():
    assert EMOTIONS == ("anger", "contempt", "disgust", "fear", "happiness", "sadness",
                        "surprise")


def test_emotion_scheme_gives_the_seven_classes(build, tmp_path):
    table, _ = read_database("dfme", build_dfme(build, tmp_path))
    kept, classes, dropped = apply_label_scheme(table, "emotion", "dfme")
    assert classes == list(EMOTIONS) and len(kept) == 7 and dropped == []
    kept, classes, _ = apply_label_scheme(table, "composite", "dfme")
    assert [classes[i] for i in kept["label"]] == [
        "negative", "negative", "negative", "negative", "positive", "negative", "surprise"]


def test_one_part_only(build, tmp_path):
    root = build_dfme(build, tmp_path, {"train": PARTS["train"]})
    with pytest.raises(DatabaseError, match=r"testA.*options.parts=\[train\]"):
        read_database("dfme", root)
    table, _ = read_database("dfme", root, parts=["train"])
    assert len(table) == 3


def test_frame_rate_outside_200_300_500_is_a_row_error(build, tmp_path):
    parts = {**PARTS, "train": PARTS["train"][:2] + [(2, "2_0001", 100, 160, 240, 250, "9",
                                                      "Disgust")]}
    root = build_dfme(build, tmp_path, parts)
    with pytest.raises(DatabaseError, match=r"DFME_train_label.xlsx row 4 \(2 2_0001\): frame "
                                            r"rate 250 .*200, 300 or 500"):
        read_database("dfme", root)
    table, excluded = read_database("dfme", root, on_error="skip")
    assert len(table) == 6 and "frame rate 250" in excluded[0]["reason"]


def test_blank_frame_rate_is_a_row_error(build, tmp_path):
    parts = {**PARTS, "testB": [(4, "4_0001", 3, 50, 120, None, "15+17", "Sadness")]}
    root = build_dfme(build, tmp_path, parts)
    with pytest.raises(DatabaseError, match=r"testB_label.xlsx row 2 \(4 4_0001\): no frame rate"):
        read_database("dfme", root)


def test_a_clip_listed_in_two_parts_is_refused(build, tmp_path):
    parts = {**PARTS, "testA": PARTS["testA"] + [PARTS["train"][0]]}
    root = build_dfme(build, tmp_path, parts)
    with pytest.raises(DatabaseError, match=r"DFME_testA_label.xlsx row 4 \(1 1_0001\): also "
                                            r"in .*DFME_train_label.xlsx row 2"):
        read_database("dfme", root)


def test_missing_apex_frame_names_the_file(build, tmp_path):
    root = build_dfme(build, tmp_path)
    (root / "testA/3/3_0002/00020.jpg").unlink()
    with pytest.raises(DatabaseError, match=r"testA_label.xlsx row 3 .*apex frame missing: "
                                            r".*testA/3/3_0002/00020.jpg"):
        read_database("dfme", root)


def test_unknown_emotion_is_a_row_error(build, tmp_path):
    parts = {**PARTS, "testB": [(4, "4_0001", 3, 50, 120, 500, "15", "others")]}
    with pytest.raises(DatabaseError, match=r"row 2 .*unknown emotion 'others'"):
        read_database("dfme", build_dfme(build, tmp_path, parts))


def test_frames_without_a_subject_level(build, tmp_path):
    """Part folders holding the clip folders directly (no subject level) are read too."""
    for part, rows in PARTS.items():
        for _, clip, onset, apex, offset, *_ in rows:
            build.frames(tmp_path / part / clip, {onset, apex, offset}, name="{:05d}.jpg")
        build.sheet(tmp_path / part / SHEETS[part], HEADER, rows)  # sheets beside the frames
    table, _ = read_database("dfme", tmp_path)
    assert table.iloc[0].frame_dir.endswith("train/1_0001") and len(table) == 7


def test_no_sheet_for_a_part_says_where_it_looked(build, tmp_path):
    root = build_dfme(build, tmp_path)
    (root / SHEETS["testB"]).unlink()
    with pytest.raises(DatabaseError, match=r"no DFME testB label sheet"):
        read_database("dfme", root)
