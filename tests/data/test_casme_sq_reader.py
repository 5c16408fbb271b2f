"""CAS(ME)^2 reader on a tree built here in the release layout (header-less code sheet plus
the two naming sheets)."""

import pytest

from mer.data.databases import DatabaseError, read_database, read_intervals
from mer.data.labels import apply_label_scheme

# participant, expression, onset, apex, offset, AUs, emotion, type, self-report
CODES = [(1, "disgust1_1", 557, 572, 608, "4+10+14+15", "negative", "macro-expression", "d"),
         (1, "disgust1_2", 2854, 2862, 2871, "R12", "positive", "micro-expression", "h"),
         (1, "anger1_1", 100, 104, 110, "4", "negative", "micro-expression", "a"),
         (2, "disgust1_1", 30, 0, 40, "1+2", "surprise", "micro-expression", "s")]
SUBJECT_NAMES = [["s15", 15, 1], ["s16", 16, 2]]           # folder, subject code, participant
VIDEO_NAMES = [["0101", "disgust1"], ["0401", "anger1"]]   # video code, video name
VIDEO_FOLDERS = {"0101": "disgustingteeth", "0401": "anger1_sceneA"}


def build_casme_sq(build, root, codes=CODES):
    for participant, expression, onset, apex, offset, *_ in codes:
        code = {1: 15, 2: 16}[participant]
        vcode = dict((name, c) for c, name in VIDEO_NAMES)[expression.rsplit("_", 1)[0]]
        folder = root / "rawpic" / f"s{code}" / f"{code}_{vcode}{VIDEO_FOLDERS[vcode]}"
        build.frames(folder, {1, onset, apex, offset} - {0})
    build.sheet(root / "CAS(ME)^2code_final.xlsx", None, codes,
                extra={"naming rule1": SUBJECT_NAMES, "naming rule2": VIDEO_NAMES})
    return root


def test_intervals_for_spotting(build, tmp_path):
    intervals, excluded = read_intervals("casme_sq", build_casme_sq(build, tmp_path))
    assert excluded == []
    assert list(intervals["type"]) == ["macro", "micro", "micro", "micro"]
    assert list(intervals["subject"]) == ["s15", "s15", "s15", "s16"]
    assert list(intervals["video"]) == ["15_0101disgustingteeth", "15_0101disgustingteeth",
                                        "15_0401anger1_sceneA", "16_0101disgustingteeth"]
    assert list(intervals["apex"]) == [572, 2862, 104, -1]  # 0: not annotated
    assert intervals.iloc[0].aus == (4, 10, 14, 15) and list(intervals["row"]) == [1, 2, 3, 4]


def test_micro_expressions_as_samples(build, tmp_path):
    table, excluded = read_database("casme_sq", build_casme_sq(build, tmp_path))
    assert excluded == []
    assert list(table["clip"]) == ["15_0101disgustingteeth_2854", "15_0401anger1_sceneA_100",
                                   "16_0101disgustingteeth_30"]
    assert table.iloc[0].onset_path.endswith("rawpic/s15/15_0101disgustingteeth/img2854.jpg")
    assert set(table["fps"]) == {30.0}
    kept, _, _ = apply_label_scheme(table, "composite", "casme_sq")
    assert list(kept["label"]) == [1, 0, 2]
    both, _ = read_database("casme_sq", tmp_path, types=["macro", "micro"])
    assert len(both) == 4


def test_apex_before_onset(build, tmp_path):
    codes = CODES[:3] + [(2, "disgust1_1", 30, 20, 40, "1+2", "surprise", "micro", "s")]
    root = build_casme_sq(build, tmp_path, codes)
    with pytest.raises(DatabaseError, match=r"code_final.xlsx row 4 .*apex 20 outside"):
        read_database("casme_sq", root)
    table, excluded = read_database("casme_sq", root, on_error="skip")
    assert len(table) == 2 and excluded[0]["subject"] == "s16"


def test_unknown_expression_type(build, tmp_path):
    codes = CODES[:3] + [(2, "disgust1_1", 30, 35, 40, "1+2", "surprise", "meso", "s")]
    root = build_casme_sq(build, tmp_path, codes)
    with pytest.raises(DatabaseError, match=r"row 4 .*neither macro nor micro"):
        read_intervals("casme_sq", root)
    intervals, excluded = read_intervals("casme_sq", root, on_error="skip")
    assert len(intervals) == 3 and "neither macro nor micro" in excluded[0]["reason"]


def test_unknown_video_name(build, tmp_path):
    root = build_casme_sq(build, tmp_path)
    codes = CODES[:3] + [(2, "sadness3_1", 30, 35, 40, "1+2", "surprise", "micro", "s")]
    build.sheet(root / "CAS(ME)^2code_final.xlsx", None, codes,
                extra={"naming rule1": SUBJECT_NAMES, "naming rule2": VIDEO_NAMES})
    with pytest.raises(DatabaseError, match=r"row 4 .*video name 'sadness3' is in no naming "):
        read_intervals("casme_sq", root)
    intervals, excluded = read_intervals("casme_sq", root, on_error="skip")
    assert len(intervals) == 3 and excluded[0]["clip"] == "16_sadness3"
    (root / "rawpic/s15/15_0401anger1_sceneA").rename(root / "rawpic/s15/gone")
    with pytest.raises(DatabaseError, match=r"row 3 .*video folder missing: .*s15/15_0401"):
        read_intervals("casme_sq", root)


def test_data_rows_are_never_dropped_silently(build, tmp_path):
    """A row whose onset is not a number was dropped as a 'title'; a blank participant read as
    subject 's'. Title lines and a header row are still left out."""
    root = build_casme_sq(build, tmp_path)
    codes = [("CAS(ME)^2 code list",), ("subject", "expression", "onset", "apex", "offset"),
             *CODES[:3], (2, "disgust1_1", "thirty", 35, 40, "1+2", "surprise", "micro", "s"),
             (None, "disgust1_1", 30, 35, 40, "1+2", "surprise", "micro", "s")]
    build.sheet(root / "CAS(ME)^2code_final.xlsx", None, codes,
                extra={"naming rule1": SUBJECT_NAMES, "naming rule2": VIDEO_NAMES})
    with pytest.raises(DatabaseError, match=r"row 6 .*'thirty' is not a frame number"):
        read_intervals("casme_sq", root)
    intervals, excluded = read_intervals("casme_sq", root, on_error="skip")
    assert list(intervals["row"]) == [3, 4, 5]
    assert [e["reason"].split(": ", 1)[1] for e in excluded] == [
        "'thirty' is not a frame number (a whole number >= 0; blank, '/' or -1: not annotated)",
        "no participant number"]


def test_interval_past_the_last_frame(build, tmp_path):
    codes = CODES[:3] + [(2, "disgust1_1", 30, 35, 10**18, "1+2", "surprise", "micro", "s")]
    root = build_casme_sq(build, tmp_path, CODES)  # frames of the good rows only
    build.sheet(root / "CAS(ME)^2code_final.xlsx", None, codes,
                extra={"naming rule1": SUBJECT_NAMES, "naming rule2": VIDEO_NAMES})
    with pytest.raises(DatabaseError, match=r"row 4 .*offset 10{18} after the last frame on "
                                            r"disk \(40 in .*16_0101disgustingteeth\)"):
        read_intervals("casme_sq", root)
