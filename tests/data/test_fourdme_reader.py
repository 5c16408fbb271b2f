"""4DME reader on a tree built here in the release layout (trailing apostrophes, (k) AUs)."""

import pytest

from mer.data.databases import DatabaseError, read_database
from mer.data.labels import apply_label_scheme

HEADER = ["sub_ID", "fold_name", "Emotion", "Onset", "Apex", "Offset", "AUs"]
# older sheets end names with an apostrophe
ROWS = [("S01'", "S01_M1_1'", "Positive", 10, 14, 20, "AU12(k)+AU6"),
        ("S01", "S01_M2_1", "Negative+Surprise", 5, 8, 12, "AU4+AU1+AU2"),
        ("S02", "S02_M1_3", "Surprise", 3, 6, 9, "1+2")]


def build_fourdme(build, root, rows=ROWS):
    for subject, clip, _, onset, apex, offset, _ in rows:
        build.frames(root / "gray_micro" / subject.rstrip("'") / clip.rstrip("'"),
                     {onset, apex, offset}, name="frame_{:04d}.png", grey=True)
    build.sheet(root / "4DME_Labelling_Micro_release v1.xlsx", HEADER, rows)
    return root


def test_reads_the_release_layout(build, tmp_path):
    table, excluded = read_database("fourdme", build_fourdme(build, tmp_path))
    assert excluded == []
    assert list(table["subject"]) == ["S01", "S01", "S02"]
    assert list(table["clip"]) == ["S01_M1_1", "S01_M2_1", "S02_M1_3"]
    assert list(table["aus"]) == [(12, 6), (4, 1, 2), (1, 2)]  # "(k)": static, still an AU
    assert list(table["emotion"]) == ["positive", "negative+surprise", "surprise"]
    assert table.iloc[0].onset_path.endswith("gray_micro/S01/S01_M1_1/frame_0010.png")
    kept, classes, excluded = apply_label_scheme(table, "composite", "fourdme")
    assert list(kept["label"]) == [1, 2]
    assert "several emotions" in excluded[0]["reason"]


def test_unknown_emotion_part(build, tmp_path):
    rows = ROWS[:2] + [("S02", "S02_M1_3", "Surprise+Awe", 3, 6, 9, "1+2")]
    with pytest.raises(DatabaseError, match=r"row 4 .*unknown emotion 'surprise\+awe'"):
        read_database("fourdme", build_fourdme(build, tmp_path, rows))


def test_frame_cell_that_is_not_a_number(build, tmp_path):
    rows = ROWS[:2] + [("S02", "S02_M1_3", "Surprise", 3, "six", 9, "1+2")]
    root = build_fourdme(build, tmp_path, [r if r[4] != "six" else (*r[:4], 6, *r[5:])
                                           for r in rows])
    build.sheet(root / "4DME_Labelling_Micro_release v1.xlsx", HEADER, rows)
    with pytest.raises(DatabaseError, match=r"row 4 \(S02 S02_M1_3\): 'six' is not a frame"):
        read_database("fourdme", root)
