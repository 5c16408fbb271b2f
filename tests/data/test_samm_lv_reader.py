"""SAMM Long Videos reader on a tree built here in the release layout (~10 rows above the
header)."""

import pytest

from mer.data.databases import DatabaseError, read_database, read_intervals
from mer.data.labels import apply_label_scheme

HEADER = ["Subject", "Filename", "Inducement Code", "Onset", "Apex", "Offset", "Duration",
          "Type", "Action Units", "Notes"]
# subject, expression, onset, apex, offset, type, AUs
ROWS = [(6, "006_1_1", 566, 648, 743, "Macro", "4+7"),
        (6, "006_1_2", 5562, 5588, 5632, "Micro - 1/2", "4+7"),
        (6, "006_2_1", 10, -1, 60, "Micro - 1/2", "R12B"),
        (7, "007_3_1", 3306, 3342, 3382, "Micro - 1/2", "24")]


def build_samm_lv(build, root, rows=ROWS):
    for _, name, onset, apex, offset, *_ in rows:
        video = "_".join(name.split("_")[:2])
        build.frames(root / "SAMM_longvideos" / video, {onset, apex, offset} - {-1},
                     name=f"{video}_{{:05d}}.jpg", grey=True)
    cells = [[s, n, 1, on, ap, off, off - on + 1, t, au, None] for s, n, on, ap, off, t, au in rows]
    build.sheet(root / "SAMM_LongVideos_V2_Release.xlsx", HEADER, cells, above=10)
    return root


def test_intervals_for_spotting(build, tmp_path):
    intervals, excluded = read_intervals("samm_lv", build_samm_lv(build, tmp_path))
    assert excluded == []
    assert list(intervals["video"]) == ["006_1", "006_1", "006_2", "007_3"]
    assert list(intervals["type"]) == ["macro", "micro", "micro", "micro"]
    assert list(intervals["subject"]) == ["006", "006", "006", "007"]
    assert list(intervals["row"]) == [12, 13, 14, 15]  # 10 text rows + header on row 11
    assert intervals.iloc[2].apex == -1 and set(intervals["fps"]) == {200.0}


def test_micro_expressions_as_samples(build, tmp_path):
    table, excluded = read_database("samm_lv", build_samm_lv(build, tmp_path))
    assert excluded == []
    assert list(table["clip"]) == ["006_1_2", "006_2_1", "007_3_1"]
    assert table.iloc[0].onset_path.endswith("SAMM_longvideos/006_1/006_1_05562.jpg")
    assert set(table["emotion"]) == {""}  # the long-video sheet has no emotions
    kept, classes, _ = apply_label_scheme(table, "objective", "samm_lv")
    assert [classes[i] for i in kept["label"]] == ["III", "I", "VII"]  # from the AUs


def test_emotions_from_the_micro_sheet(build, tmp_path):
    root = build_samm_lv(build, tmp_path)
    micro = build.sheet(tmp_path / "SAMM_Micro_FACS_Codes_v2.xlsx",
                        ["Subject", "Filename", "Estimated Emotion"],
                        [[6, "006_1_2", "Anger"], [7, "007_3_1", "Other"]], above=13)
    table, _ = read_database("samm_lv", root, micro_sheet=micro)
    assert list(table["emotion"]) == ["anger", "", "other"]


def test_missing_video_folder(build, tmp_path):
    root = build_samm_lv(build, tmp_path)
    for f in (root / "SAMM_longvideos/007_3").iterdir():
        f.unlink()
    (root / "SAMM_longvideos/007_3").rmdir()
    with pytest.raises(DatabaseError, match=r"V2_Release.xlsx row 15 .*video folder missing"):
        read_intervals("samm_lv", root)
    table, excluded = read_database("samm_lv", root, on_error="skip")
    assert list(table["clip"]) == ["006_1_2", "006_2_1"]
    assert excluded[0]["clip"] == "007_3_1" and "frame folder missing" in excluded[0]["reason"]


def test_sheet_without_type_column(build, tmp_path):
    root = build_samm_lv(build, tmp_path)
    build.sheet(root / "SAMM_LongVideos_V2_Release.xlsx", HEADER[:7] + HEADER[8:],
                [[6, "006_1_1", 1, 566, 648, 743, 178, "4+7", None]], above=10)
    with pytest.raises(DatabaseError, match=r"no type \(macro/micro\) column"):
        read_intervals("samm_lv", root)


def test_blank_filename_and_offset_past_the_video(build, tmp_path):
    """A blank Filename gave an interval with video '' (the frame folder was the tree itself);
    an offset of 10**18 was never checked against the frames on disk."""
    root = build_samm_lv(build, tmp_path)
    cells = [[s, n, 1, on, ap, off, 1, t, au, None] for s, n, on, ap, off, t, au in ROWS[:2]]
    cells += [[6, None, 1, 10, 20, 60, 51, "Micro - 1/2", "4", None],
              [7, "007_3_1", 1, 3306, 3342, 10**18, 1, "Micro - 1/2", "24", None]]
    build.sheet(root / "SAMM_LongVideos_V2_Release.xlsx", HEADER, cells, above=10)
    with pytest.raises(DatabaseError, match=r"row 14 \(006 \): no video name"):
        read_intervals("samm_lv", root)
    intervals, excluded = read_intervals("samm_lv", root, on_error="skip")
    assert list(intervals["row"]) == [12, 13]
    assert [e["reason"] for e in excluded] == [
        "SAMM_LongVideos_V2_Release.xlsx row 14: no video name",
        "SAMM_LongVideos_V2_Release.xlsx row 15: offset 1000000000000000000 after the last "
        f"frame on disk (3382 in {root / 'SAMM_longvideos/007_3'})"]
