"""SAMM reader on a tree built here in the release layout (13 text rows above the header)."""

import pandas as pd
import pytest

from mer.data.databases import DatabaseError, read_database
from mer.data.labels import apply_label_scheme

HEADER = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame",
          "Duration", "Micro", "Action Units", "Estimated Emotion", "Objective Classes", "Notes"]
# subject, clip, onset, apex, offset, AUs, emotion, objective class
ROWS = [(6, "006_1_2", 5562, 5588, 5632, "4+7", "Anger", 3),
        (6, "006_1_3", 3912, "/", 3988, "R12 or R14", "Happiness", 1),
        (7, "007_3_1", 100, 104, 110, "L12C+soft focus", "Other", 7),
        (11, "011_2_1", 20, 25, 40, "1+2", "Surprise", 2)]


def build_samm(build, root, rows=ROWS, header=HEADER, above=13):
    for subject, clip, onset, apex, offset, *_ in rows:
        numbers = {onset, offset} | ({apex} if isinstance(apex, int) else set())
        build.frames(root / "SAMM" / f"{subject:03d}" / clip, numbers,
                     name=f"{subject:03d}_{{:05d}}.jpg", grey=True)
    cells = [[s, c, 1, on, ap, off, 0, "Micro - 1/2", au, em, ob, None]
             for s, c, on, ap, off, au, em, ob in rows]
    build.sheet(root / "SAMM_Micro_FACS_Codes_v2.xlsx", header, cells, above=above)
    return root


def test_reads_the_release_layout(build, tmp_path):
    table, excluded = read_database("samm", build_samm(build, tmp_path))
    assert excluded == []
    assert list(table["subject"]) == ["006", "006", "007", "011"]
    first = table.iloc[0]
    assert (first["clip"], first.onset, first.apex, first.offset) == ("006_1_2", 5562, 5588, 5632)
    assert first.onset_path.endswith("SAMM/006/006_1_2/006_05562.jpg")
    assert first.aus == (4, 7) and first.emotion == "anger" and first.objective == "III"
    assert table.iloc[1].apex == -1 and table.iloc[1].apex_path == ""  # "/" apex
    assert table.iloc[1].aus == (12, 14)  # the coder's alternatives: both kept
    assert table.iloc[2].au_unknown == ("soft focus",)  # reported, not dropped
    assert list(table["row"]) == [15, 16, 17, 18]  # 13 text rows + header on row 14
    assert set(table["fps"]) == {200.0}


def test_header_on_row_one_too(build, tmp_path):
    table, _ = read_database("samm", build_samm(build, tmp_path, above=0))
    assert list(table["row"]) == [2, 3, 4, 5]


def test_label_schemes(build, tmp_path):
    table, _ = read_database("samm", build_samm(build, tmp_path))
    kept, classes, excluded = apply_label_scheme(table, "composite", "samm")
    assert dict(zip(kept["clip"], kept["label"])) == {"006_1_2": 0, "006_1_3": 1, "011_2_1": 2}
    assert excluded[0]["clip"] == "007_3_1" and "'other'" in excluded[0]["reason"]
    kept, classes, _ = apply_label_scheme(table, "objective", "samm")
    assert [classes[i] for i in kept["label"]] == ["III", "I", "VII", "II"]  # the sheet's own
    kept, classes, _ = apply_label_scheme(table, "emotion", "samm")
    assert classes == ["anger", "happiness", "other", "surprise"]


def test_apex_outside_the_clip(build, tmp_path):
    rows = ROWS[:1] + [(6, "006_1_3", 3912, 3990, 3988, "4", "Anger", 3)] + ROWS[2:]
    root = build_samm(build, tmp_path, rows)
    with pytest.raises(DatabaseError, match=r"SAMM_Micro_FACS_Codes_v2.xlsx row 16 .*apex 3990 "
                                            r"outside the clip.*on_error=skip"):
        read_database("samm", root)
    table, excluded = read_database("samm", root, on_error="skip")
    assert list(table["clip"]) == ["006_1_2", "007_3_1", "011_2_1"]
    assert excluded == [{"database": "samm", "subject": "006", "clip": "006_1_3",
                         "reason": "SAMM_Micro_FACS_Codes_v2.xlsx row 16: apex 3990 outside the "
                                   "clip (onset 3912, offset 3988)"}]


def test_unknown_emotion_is_a_reader_error(build, tmp_path):
    rows = ROWS[:3] + [(11, "011_2_1", 20, 25, 40, "1+2", "Boredom", 2)]
    root = build_samm(build, tmp_path, rows)
    with pytest.raises(DatabaseError, match=r"row 18 .*unknown emotion 'boredom'"):
        read_database("samm", root)
    table, excluded = read_database("samm", root, on_error="skip")
    assert len(table) == 3 and "boredom" in excluded[0]["reason"]
    # a wider vocabulary, when the user says so
    table, _ = read_database("samm", root, emotions=["anger", "happiness", "other", "boredom"])
    assert list(table["emotion"])[-1] == "boredom"


def test_missing_apex_frame(build, tmp_path):
    root = build_samm(build, tmp_path)
    (root / "SAMM/011/011_2_1/011_00025.jpg").unlink()
    with pytest.raises(DatabaseError, match=r"row 18 .*apex frame missing: .*011_00025\.jpg"):
        read_database("samm", root)


def test_sheet_without_emotion_column(build, tmp_path):
    header = [h if h != "Estimated Emotion" else "Feeling" for h in HEADER]
    root = build_samm(build, tmp_path, header=header)
    with pytest.raises(DatabaseError, match=r"SAMM_Micro_FACS_Codes_v2.xlsx: no emotion column"):
        read_database("samm", root)


def test_no_header_row_found(build, tmp_path):
    root = build_samm(build, tmp_path)
    build.sheet(root / "SAMM_Micro_FACS_Codes_v2.xlsx", ["Who", "What"], [[1, 2]], above=3)
    with pytest.raises(DatabaseError, match=r"no header row naming \['Subject', 'Filename'\]"):
        read_database("samm", root)


def test_real_sheet_through_the_reader(annotation_sheet, build, tmp_path):
    """The real SAMM sheet, frames written for each row: composite 92/26/15, objective I..VII."""
    sheet = annotation_sheet("SAMM-coding.xlsx")
    real = pd.read_excel(sheet)
    for r in real.to_dict("records"):
        subject = f"{int(r['Subject']):03d}"
        frames = {int(r[k]) for k in ("Onset Frame", "Apex Frame", "Offset Frame")}
        build.frames(tmp_path / "SAMM" / subject / str(r["Filename"]), frames,
                     name=f"{subject}_{{:05d}}.jpg", grey=True)
    table, excluded = read_database("samm", tmp_path, sheet=sheet, check_images=False)
    assert excluded == [] and len(table) == len(real) == 159
    assert table["subject"].nunique() == 29 and table["clip"].is_unique
    kept, classes, dropped = apply_label_scheme(table, "composite", "samm")
    counts = kept["label"].value_counts().sort_index().tolist()
    assert classes == ["negative", "positive", "surprise"] and counts == [92, 26, 15]
    assert kept["subject"].nunique() == 28
    assert len(dropped) == 26 and all("'other'" in d["reason"] for d in dropped)
    kept, classes, _ = apply_label_scheme(table, "objective", "samm")
    by_class = kept["label"].map(lambda i: classes[i]).value_counts().to_dict()
    assert by_class == {"VII": 84, "I": 24, "III": 20, "II": 13, "IV": 8, "VI": 7, "V": 3}
    unknown = {row: toks for row, toks in zip(table["row"], table["au_unknown"]) if toks}
    assert unknown == {122: ("soft focus",)}  # sheet row 122: "R14+17+soft focus"


@pytest.mark.parametrize("objective,problem", [
    ("①", r"objective class '①' is not one of I\.\.VII \(or 1\.\.7\)"),
    ("²", r"objective class '²' is not one of I\.\.VII"),
    (9, r"objective class '9' is not one of I\.\.VII"),
    ("VIII", r"objective class 'VIII' is not one of I\.\.VII"),
])
def test_objective_class_outside_i_to_vii_is_a_row_error(build, tmp_path, objective, problem):
    """'①'/'²' passed str.isdigit() and raised ValueError; 9 and VIII were kept as classes."""
    rows = ROWS[:3] + [(11, "011_2_1", 20, 25, 40, "1+2", "Surprise", objective)]
    root = build_samm(build, tmp_path, rows)
    with pytest.raises(DatabaseError, match=r"row 18 \(011 011_2_1\): " + problem):
        read_database("samm", root)
    table, excluded = read_database("samm", root, on_error="skip")
    assert list(table["row"]) == [15, 16, 17] and "objective class" in excluded[0]["reason"]


def test_subject_cell_in_unicode_digits(build, tmp_path):
    """'²' as subject: ValueError from int(); now the folder it names is missing, at its row."""
    root = build_samm(build, tmp_path)
    cells = [["²", "011_2_1", 1, 20, 25, 40, 0, "Micro", "1+2", "Surprise", 2, None]]
    build.sheet(root / "SAMM_Micro_FACS_Codes_v2.xlsx", HEADER, cells, above=13)
    with pytest.raises(DatabaseError, match=r"row 15 \(² 011_2_1\): frame folder missing"):
        read_database("samm", root)
    assert read_database("samm", root, on_error="skip")[1][0]["subject"] == "²"
