"""SMIC-HS reader on a tree built here in the release layout (no sheet; labels are folders)."""

import pytest

from mer.data.databases import DatabaseError, read_database
from mer.data.labels import apply_label_scheme

# subject, emotion folder, clip, first frame, number of frames
CLIPS = [("s1", "negative", "s1_ne_01", 46433, 5), ("s1", "positive", "s1_po_01", 100, 4),
         ("s2", "surprise", "s2_sur_01", 7, 3), ("s10", "negative", "s10_ne_02", 1, 3)]


def build_smic(build, root, clips=CLIPS):
    for subject, emotion, clip, first, n in clips:
        build.frames(root / "SMIC_all_raw/HS" / subject / "micro" / emotion / clip,
                     range(first, first + n), name="image{:06d}.bmp")
    build.frames(root / "SMIC_all_raw/HS/s1/non_micro/s1_nm_01", range(3), name="image{:06d}.bmp")
    return root


def test_walks_the_micro_folders(build, tmp_path):
    table, excluded = read_database("smic", build_smic(build, tmp_path))
    assert excluded == []
    assert list(table["clip"]) == ["s1_ne_01", "s1_po_01", "s2_sur_01", "s10_ne_02"]
    assert list(table["subject"]) == ["s1", "s1", "s2", "s10"]
    first = table.iloc[0]
    assert (first.onset, first.apex, first.offset) == (46433, -1, 46437)  # first..last frame
    assert first.apex_path == "" and first.onset_path.endswith("s1_ne_01/image046433.bmp")
    assert list(table["emotion"]) == ["negative", "positive", "surprise", "negative"]
    assert set(table["au_raw"]) == {""} and set(table["fps"]) == {100.0}
    kept, classes, dropped = apply_label_scheme(table, "composite", "smic")
    assert list(kept["label"]) == [0, 1, 2, 0] and dropped == []


def test_hs_folder_as_root(build, tmp_path):
    table, _ = read_database("smic", build_smic(build, tmp_path) / "SMIC_all_raw/HS")
    assert len(table) == 4


def test_empty_clip_folder(build, tmp_path):
    root = build_smic(build, tmp_path)
    (root / "SMIC_all_raw/HS/s2/micro/surprise/s2_sur_02").mkdir()
    with pytest.raises(DatabaseError, match=r"\(s2 s2_sur_02\): no frame images in .*s2_sur_02"):
        read_database("smic", root)
    table, excluded = read_database("smic", root, on_error="skip")
    assert len(table) == 4 and excluded[0]["clip"] == "s2_sur_02"


def test_unreadable_onset_frame(build, tmp_path):
    root = build_smic(build, tmp_path)
    (root / "SMIC_all_raw/HS/s1/micro/positive/s1_po_01/image000100.bmp").write_text("oops")
    with pytest.raises(DatabaseError, match=r"unreadable image .*image000100\.bmp"):
        read_database("smic", root)


def test_unknown_emotion_folder(build, tmp_path):
    root = build_smic(build, tmp_path, CLIPS + [("s2", "happy", "s2_ha_01", 1, 2)])
    with pytest.raises(DatabaseError, match=r"unknown emotion 'happy'"):
        read_database("smic", root)
    table, excluded = read_database("smic", root, on_error="skip")
    assert len(table) == 4 and "'happy'" in excluded[0]["reason"]


def test_not_a_smic_tree(tmp_path):
    with pytest.raises(DatabaseError, match=r"no SMIC-HS subject folders"):
        read_database("smic", tmp_path)


def test_folder_name_with_unicode_digits(build, tmp_path):
    """'²' in a clip folder name: str.isdigit() accepted it and int() raised ValueError."""
    root = build_smic(build, tmp_path, CLIPS + [("s2", "surprise", "s2_sur_0²", 1, 2)])
    table, excluded = read_database("smic", root)
    assert excluded == [] and "s2_sur_0²" in set(table["clip"]) and len(table) == 5
