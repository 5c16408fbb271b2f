"""MMEW reader on a tree built here in the release layout (frames grouped by emotion)."""

import pytest

from mer.data.databases import DatabaseError, read_database

HEADER = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units",
          "Estimated Emotion", "remarks"]
ROWS = [("S01", "happiness_1", 1, 18, 41, "6+12", "happiness"),
        ("S01", "surprise_3", 1, 12, 30, "1+2+5", "surprise"),
        ("S02", "others_7", 2, 9, 25, "L14", "others")]


def build_mmew(build, root, rows=ROWS):
    for _, clip, onset, apex, offset, _, emotion in rows:
        build.frames(root / "Micro_Expression" / emotion / clip, {onset, apex, offset},
                     name="{}.jpg")
    build.sheet(root / "MMEW_Micro_Exp.xlsx", HEADER, [[*r, None] for r in rows])
    return root


def test_reads_the_release_layout(build, tmp_path):
    table, excluded = read_database("mmew", build_mmew(build, tmp_path))
    assert excluded == []
    assert list(table["subject"]) == ["S01", "S01", "S02"]
    assert table.iloc[0].apex_path.endswith("Micro_Expression/happiness/happiness_1/18.jpg")
    assert list(table["aus"]) == [(6, 12), (1, 2, 5), (14,)]
    assert set(table["fps"]) == {90.0}


def test_missing_frame_and_skip(build, tmp_path):
    root = build_mmew(build, tmp_path)
    (root / "Micro_Expression/surprise/surprise_3/12.jpg").unlink()
    with pytest.raises(DatabaseError, match=r"MMEW_Micro_Exp.xlsx row 3 .*apex frame missing"):
        read_database("mmew", root)
    table, excluded = read_database("mmew", root, on_error="skip")
    assert list(table["clip"]) == ["happiness_1", "others_7"]
    assert excluded[0]["reason"].startswith("MMEW_Micro_Exp.xlsx row 3: apex frame missing")


def test_unknown_emotion(build, tmp_path):
    rows = ROWS[:2] + [("S02", "contempt_1", 2, 9, 25, "L14", "contempt")]
    with pytest.raises(DatabaseError, match=r"row 4 .*unknown emotion 'contempt'"):
        read_database("mmew", build_mmew(build, tmp_path, rows))


def test_emotion_that_is_no_folder_name(build, tmp_path):
    """The emotion names the frame folder: '../happiness' read frames outside the tree, a blank
    one read Micro_Expression/<clip> (with emotions=None, which accepts any word)."""
    root = build_mmew(build, tmp_path)
    build.frames(root / "happiness" / "c1", {1, 2, 3}, name="{}.jpg")  # beside the tree
    build.frames(root / "Micro_Expression" / "c2", {1, 2, 3}, name="{}.jpg")
    rows = ROWS + [("S03", "c1", 1, 2, 3, "4", "../happiness"), ("S03", "c2", 1, 2, 3, "4", None)]
    build.sheet(root / "MMEW_Micro_Exp.xlsx", HEADER, [[*r, None] for r in rows])
    table, excluded = read_database("mmew", root, on_error="skip", emotions=None)
    assert list(table["row"]) == [2, 3, 4]
    assert [e["reason"] for e in excluded] == [
        "MMEW_Micro_Exp.xlsx row 5: emotion '../happiness' is not a folder name (holds '/', "
        "NUL or is '.' / '..')", "MMEW_Micro_Exp.xlsx row 6: no emotion"]
