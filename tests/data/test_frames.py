"""Truncated or corrupt frame files are refused everywhere a frame is read, naming the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data.databases.casme2 import read_casme2
from mer.data.databases.common import DatabaseError, image_problem
from mer.data.preprocess.pipeline import FlowParams, PreprocessError, flow_image, flow_images
from mer.data.preprocess.prepared import PrepareParams, prepare_clip

HEADER = ["Subject", "Filename", "Unnamed: 2", "Onset Frame", "Apex Frame", "OffsetFrame",
          "Unnamed: 6", "Action Units", "Estimated Emotion"]


def frame(seed: int, h: int = 60, w: int = 48) -> np.ndarray:
    """(h, w, 3) uint8 textured frame (JPEG-compressible, not flat)."""
    noise = np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 1.5).astype(np.uint8)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_clip(folder: Path, frames=range(10, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in frames:
        cv2.imwrite(str(folder / f"img{n}.jpg"), frame(n))
    return folder


def test_a_truncated_jpeg_still_decodes_partly_with_opencv(tmp_path):
    """The fault itself: OpenCV hands back what it could decode, the rest flat grey."""
    path = tmp_path / "img1.jpg"
    cv2.imwrite(str(path), frame(1))
    truncate(path)
    partial = cv2.imread(str(path))
    assert partial is not None and partial[-10:].std() == 0


def test_image_problem_decodes_the_whole_frame(tmp_path):
    path = tmp_path / "img1.jpg"
    cv2.imwrite(str(path), frame(1))
    assert image_problem(path) == ""
    truncate(path)
    problem = image_problem(path)
    assert str(path) in problem and "truncated" in problem


def casme2_tree(root: Path) -> Path:
    for clip in ("EP01", "EP02"):
        write_clip(root / "CASME2_RAW_selected" / "sub01" / clip)
    rows = [[1, "EP01", None, 10, 12, 15, None, "12", "happiness"],
            [1, "EP02", None, 10, 13, 15, None, "4", "disgust"]]
    pd.DataFrame(rows, columns=HEADER).to_excel(root / "CASME2-coding-1.xlsx", index=False)
    return root


def test_reader_refuses_a_truncated_apex_frame(tmp_path):
    root = casme2_tree(tmp_path)
    apex = truncate(root / "CASME2_RAW_selected" / "sub01" / "EP02" / "img13.jpg")
    with pytest.raises(DatabaseError, match="row 3") as err:
        read_casme2(root)
    assert str(apex) in str(err.value) and "truncated" in str(err.value)

    table, skipped = read_casme2(root, on_error="skip")
    assert list(table["clip"]) == ["EP01"]
    assert [s["clip"] for s in skipped] == ["EP02"] and str(apex) in skipped[0]["reason"]


def test_flow_refuses_a_truncated_frame(tmp_path):
    clip = write_clip(tmp_path / "clip")
    apex = truncate(clip / "img12.jpg")
    params = FlowParams(method="dis", work_size=32)
    with pytest.raises(PreprocessError, match="t/s/c") as err:
        flow_image(clip / "img10.jpg", apex, params, sample="t/s/c")
    assert str(apex) in str(err.value) and "truncated" in str(err.value)

    table = pd.DataFrame([{"database": "t", "subject": "s", "clip": c, "onset_path": str(on),
                           "apex_path": str(ap)}
                          for c, on, ap in [("good", clip / "img10.jpg", clip / "img11.jpg"),
                                            ("bad", clip / "img10.jpg", apex)]])
    x, kept, failures = flow_images(table, params, on_error="skip", progress=False)
    assert kept.tolist() == [0] and [f["clip"] for f in failures] == ["bad"]
    assert str(apex) in failures[0]["reason"]


@pytest.mark.parametrize("which", ["onset", "apex", "between"])
def test_prepare_refuses_a_truncated_frame(tmp_path, which):
    clip = write_clip(tmp_path / "clip")
    number = {"onset": 10, "apex": 15, "between": 12}[which]
    bad = truncate(clip / f"img{number}.jpg")
    row = {"database": "t", "subject": "s", "clip": "c", "row": 7, "onset": 10,
           "apex": -1 if which == "between" else 15, "offset": 15,
           "onset_path": str(clip / "img10.jpg"), "apex_path": str(clip / "img15.jpg")}
    params = PrepareParams(detector="none", size=32, out_size=8)
    with pytest.raises(PreprocessError, match=r"t/s/c \(sheet row 7\)") as err:
        prepare_clip(row, params)
    assert str(bad) in str(err.value) and "truncated" in str(err.value)
