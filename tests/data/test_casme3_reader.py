"""CAS(ME)^3 Part A reader on a tree built here in the release layout, and on the real sheet."""

import pandas as pd
import pytest

from mer.data.databases import DatabaseError, read_database
from mer.data.labels import apply_label_scheme

HEADER = ["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion",
          "AU_Split"]
ROWS = [("spNO.1", "a", 355, 359, 360, 5, "II", "others"),
        ("spNO.1", "b", 166, 175, 179, "4", "III", "disgust"),
        ("spNO.1", "b", 300, 306, 310, "R12", "I", "happy"),  # "b" again: a second ME
        ("spNO.2", "e", 62, 68, 96, "L1+2", "II", "surprise")]


def build_casme3(build, root, rows=ROWS):
    for subject, video, onset, apex, offset, *_ in rows:
        build.frames(root / "part_A" / subject / video / "color", {onset, apex, offset},
                     name="{}.jpg")
        build.frames(root / "part_A" / subject / video / "depth", {onset}, name="{}.png")
    cells = [[*r, None] for r in rows]
    build.sheet(root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", HEADER, cells)
    return root


def test_reads_the_release_layout(build, tmp_path):
    table, excluded = read_database("casme3", build_casme3(build, tmp_path))
    assert excluded == []
    assert list(table["clip"]) == ["a_355", "b_166", "b_300", "e_62"]  # unique by onset
    assert list(table["subject"]) == ["spNO.1", "spNO.1", "spNO.1", "spNO.2"]
    b = table.iloc[1]
    assert b.onset_path.endswith("part_A/spNO.1/b/color/166.jpg")
    assert b.apex_path.endswith("part_A/spNO.1/b/color/175.jpg")
    assert list(table["aus"]) == [(5,), (4,), (12,), (1, 2)]
    assert list(table["objective"]) == ["II", "III", "I", "II"]
    assert set(table["fps"]) == {30.0}


def test_label_schemes(build, tmp_path):
    table, _ = read_database("casme3", build_casme3(build, tmp_path))
    kept, classes, _ = apply_label_scheme(table, "objective", "casme3")
    assert [classes[i] for i in kept["label"]] == ["II", "III", "I", "II"]
    kept, classes, _ = apply_label_scheme(table, "emotion", "casme3")
    assert classes == ["disgust", "happy", "others", "surprise"]
    kept, classes, dropped = apply_label_scheme(table, "composite", "casme3")
    assert dict(zip(kept["clip"], kept["label"])) == {"b_166": 0, "b_300": 1, "e_62": 2}
    assert dropped[0]["clip"] == "a_355"


def test_duplicate_subject_clip_onset(build, tmp_path):
    rows = ROWS + [("spNO.1", "b", 166, 170, 179, "4", "III", "disgust")]
    root = build_casme3(build, tmp_path, rows)
    with pytest.raises(DatabaseError, match=r"row 6 \(spNO.1 b_166\): duplicate of row 3"):
        read_database("casme3", root)
    table, excluded = read_database("casme3", root, on_error="skip")
    assert len(table) == 4 and excluded[0]["reason"].startswith(
        "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx row 6: duplicate of row 3")


def test_missing_onset_frame(build, tmp_path):
    root = build_casme3(build, tmp_path)
    (root / "part_A/spNO.2/e/color/62.jpg").unlink()
    with pytest.raises(DatabaseError, match=r"row 5 .*onset frame missing: .*spNO.2/e/color/62"):
        read_database("casme3", root)


def test_offset_before_onset(build, tmp_path):
    rows = ROWS[:3] + [("spNO.2", "e", 62, 68, 40, "L1+2", "II", "surprise")]
    with pytest.raises(DatabaseError, match=r"row 5 .*offset 40 before onset 62"):
        read_database("casme3", build_casme3(build, tmp_path, rows))


def test_sheet_without_onset(build, tmp_path):
    root = build_casme3(build, tmp_path)
    sheet = root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx"
    pd.read_excel(sheet).drop(columns=["Onset"]).to_excel(sheet, index=False)
    with pytest.raises(DatabaseError, match=r"JpgIndex_v2.xlsx: no onset column"):
        read_database("casme3", root)


def test_real_sheet_through_the_reader(annotation_sheet, build, tmp_path):
    """The real Part A sheet with frames written per row: 860 unique samples, sheet classes."""
    sheet = annotation_sheet("cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")
    real = pd.read_excel(sheet)
    for r in real.to_dict("records"):
        build.frames(tmp_path / r["Subject"] / str(r["Filename"]) / "color",
                     {int(r["Onset"]), int(r["Apex"]), int(r["Offset"])}, name="{}.jpg")
    table, excluded = read_database("casme3", tmp_path, sheet=sheet, check_images=False)
    assert excluded == [] and len(table) == len(real) == 860
    assert table["subject"].nunique() == 94
    assert not table.duplicated(["subject", "clip"]).any()
    # offset 0 (not annotated) in two rows of spNO.40 e -> -1
    no_offset = table[table["offset"] < 0]
    assert list(zip(no_offset["row"], no_offset["clip"])) == [(798, "e_1812"), (800, "e_2327")]
    assert (table["clip"] != table["clip"].str.split("_").str[0]).all()
    kept, classes, _ = apply_label_scheme(table, "objective", "casme3")
    counts = kept["label"].map(lambda i: classes[i]).value_counts().to_dict()
    assert counts == real["Objective class"].value_counts().to_dict() == {
        "VII": 373, "III": 234, "II": 151, "V": 47, "IV": 37, "I": 15, "VI": 3}
    kept, classes, _ = apply_label_scheme(table, "emotion", "casme3")
    assert kept["label"].map(lambda i: classes[i]).value_counts().to_dict() == {
        "disgust": 250, "surprise": 187, "others": 161, "fear": 86, "anger": 64, "sad": 57,
        "happy": 55}
    assert table["au_unknown"].map(len).sum() == 0  # every AU string of the sheet parses


def test_objective_and_frames_checked_per_row(build, tmp_path):
    """VIII was kept as a class; an offset of 10**18 and a negative apex were kept."""
    root = build_casme3(build, tmp_path)
    sheet = root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx"
    for bad, problem in [((62, 68, 96, "L1+2", "VIII"), r"objective class 'VIII'"),
                         ((62, 68, 10**18, "L1+2", "II"), r"offset 10{18} after the last frame"),
                         ((62, -3, 96, "L1+2", "II"), r"negative frame number -3"),
                         ((62, 68, 96, -4, "II"), r"AU -4 is not a FACS code")]:
        onset, apex, offset, au, objective = bad
        cells = [[*r, None] for r in ROWS[:3]] + [
            ["spNO.2", "e", onset, apex, offset, au, objective, "surprise", None]]
        build.sheet(sheet, HEADER, cells)
        with pytest.raises(DatabaseError, match=r"row 5 \(spNO.2 e_62\): " + problem):
            read_database("casme3", root)
        table, excluded = read_database("casme3", root, on_error="skip")
        assert list(table["row"]) == [2, 3, 4] and excluded[0]["clip"] == "e_62"


def test_blank_filename_is_no_clip(build, tmp_path):
    """A blank Filename made the clip id '_62' and looked for frames in spNO.2/color."""
    root = build_casme3(build, tmp_path)
    cells = [[*r, None] for r in ROWS[:3]] + [["spNO.2", None, 62, 68, 96, "4", "II", "fear", None]]
    build.sheet(root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", HEADER, cells)
    with pytest.raises(DatabaseError, match=r"row 5 \(spNO.2 \): no subject or no clip name"):
        read_database("casme3", root)


def test_onset_written_as_text_is_the_same_clip(build, tmp_path):
    """Found by the fuzz test: onset '166.0' (text) made clip 'b_166.0' beside 'b_166', so the
    same expression was read twice."""
    root = build_casme3(build, tmp_path)
    cells = [[*r, None] for r in ROWS] + [["spNO.1", "b", "166.0", 175, 179, "4", "III",
                                           "disgust", None]]
    build.sheet(root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", HEADER, cells)
    with pytest.raises(DatabaseError, match=r"row 6 \(spNO.1 b_166\): duplicate of row 3"):
        read_database("casme3", root)
