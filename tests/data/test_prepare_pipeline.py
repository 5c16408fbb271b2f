"""The full pipeline with a stand-in face detector (no MediaPipe): the apex on the face,
remembered failures, messages that fit ``on_error``, a read-only cache, and the prepare report.
"""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.preprocess import pipeline, prepared
from mer.data.preprocess.align import alignment_matrix, transform_points
from mer.data.preprocess.apex import estimate_apex, face_mask
from mer.data.preprocess.cache import CacheError, FlowCache
from mer.data.preprocess.face import Face
from mer.data.preprocess.pipeline import PreprocessError
from mer.data.preprocess.prepared import PrepareParams, prepare_clip, prepare_table
from mer.data.synthetic import _draw_identity, _landmarks_units, _to_px, tiny_synme_config
from mer.run import CONFIG_DIR

SIZE = 64
PARAMS = PrepareParams(size=SIZE, out_size=8, method="dis")  # detector: the stand-in below


def face_landmarks(scale: float = 2.0) -> np.ndarray:
    """(68, 2) iBUG points of a SynME identity, in a frame ``scale`` times SynME's size."""
    spec = tiny_synme_config().databases[0]
    ident = _draw_identity(np.random.default_rng(0), spec)
    return _to_px(ident, _landmarks_units(ident)) * scale


LANDMARKS = face_landmarks()
FRAME_HW = (192, 176)


def texture(seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, FRAME_HW).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return cv2.normalize(img, None, 30, 220, cv2.NORM_MINMAX).astype(np.uint8)


def stand_in(monkeypatch, blank_is_faceless: bool = True) -> dict[str, int]:
    """Replace the detector: the fixed LANDMARKS on a textured frame, no face on a flat one.
    Counts detector loads and detections."""
    calls = {"load": 0, "detect": 0}

    def detect(image: np.ndarray) -> Face | None:
        calls["detect"] += 1
        if blank_is_faceless and image.std() < 1:
            return None
        return Face(landmarks=LANDMARKS.copy())

    def load(params):
        calls["load"] += 1
        return detect

    monkeypatch.setattr(prepared, "_detector", load)
    return calls


def write_frames(folder: Path, frames: list[np.ndarray], first: int = 10) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        paths.append(folder / f"img{first + i}.png")
        cv2.imwrite(str(paths[-1]), f)
    return paths


def row_of(paths: list[Path], apex: int = -1, clip: str = "c", first: int = 10) -> dict:
    return {"database": "t", "subject": "s", "clip": clip, "row": 5, "onset": first,
            "apex": apex, "offset": first + len(paths) - 1, "onset_path": str(paths[0]),
            "apex_path": str(paths[apex - first]) if apex >= 0 else "", "fps": 100.0}


def bump(centre: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:FRAME_HW[0], 0:FRAME_HW[1]].astype(np.float32)
    d2 = (xx - np.float32(centre[0])) ** 2 + (yy - np.float32(centre[1])) ** 2
    return np.exp(-d2 / np.float32(2 * sigma**2)).astype(np.float32)


# ------------------------------------------------------------------------------ the apex


def test_apex_is_estimated_on_the_face_not_the_background(tmp_path, monkeypatch):
    stand_in(monkeypatch)
    m = alignment_matrix(LANDMARKS, SIZE, PARAMS.margin)
    # background (hair) above the brows, inside the crop but outside the landmarks' hull
    inv = cv2.invertAffineTransform(m)
    bg_centre = inv @ np.array([SIZE / 2, 5.0, 1.0])
    assert not face_mask(transform_points(LANDMARKS, m), SIZE)[:12].any()
    mouth = LANDMARKS[48:68].mean(0)
    face_bump, bg_bump = bump(mouth, 6.0), bump(bg_centre, 5.0)
    face_amp = [0, 0.6, 1.2, 2.0, 1.2, 0.6, 0.3, 0.0]   # face peaks at frame 13
    bg_amp = [0, 0.5, 1.0, 1.5, 2.5, 3.5, 4.5, 3.0]     # hair moves more, peaking at frame 16
    base = texture()
    yy, xx = np.mgrid[0:FRAME_HW[0], 0:FRAME_HW[1]].astype(np.float32)
    frames = [cv2.remap(base, xx - a * face_bump - b * bg_bump, yy, cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_REFLECT) for a, b in zip(face_amp, bg_amp)]
    paths = write_frames(tmp_path / "clip", frames)
    crops = [prepared.warp(f, m, SIZE) for f in frames]
    assert estimate_apex(crops, list(range(10, 18))) == 16  # the whole crop: the hair wins

    entry = prepare_clip(row_of(paths), PARAMS)
    assert int(entry["apex"]) == 13


def test_face_mask_is_the_landmarks_hull():
    square = np.array([[10, 10], [30, 10], [30, 30], [10, 30]] * 17, np.float64)
    mask = face_mask(square, 40)
    assert mask.shape == (40, 40) and mask[20, 20] and not mask[5, 20] and not mask[20, 35]
    assert abs(int(mask.sum()) - 21 * 21) <= 42


# ----------------------------------------------------------------- failures and messages


def test_failures_are_remembered_until_the_input_changes(tmp_path, monkeypatch):
    calls = stand_in(monkeypatch)
    paths = write_frames(tmp_path / "clip", [np.full(FRAME_HW, 128, np.uint8)] * 3)
    table = pd.DataFrame([row_of(paths, apex=12)])
    root = tmp_path / "cache"
    first = prepare_table(table, PARAMS, FlowCache(root), on_error="skip", progress=False)
    assert first.kept.size == 0 and calls == {"load": 1, "detect": 1}
    reason = first.failures[0]["reason"]
    assert "no face found" in reason

    again = prepare_table(table, PARAMS, FlowCache(root), on_error="skip", progress=False)
    assert calls == {"load": 1, "detect": 1}  # neither the detector loaded nor run again
    assert first.remembered == 0 and again.remembered == 1 and again.computed == 0
    assert again.failures[0]["reason"].startswith(reason)
    assert "remembered" in again.failures[0]["reason"]
    with pytest.raises(PreprocessError, match="no face found.*remembered"):
        prepare_table(table, PARAMS, FlowCache(root), progress=False)
    assert calls["load"] == 1

    cv2.imwrite(str(paths[0]), texture(1))  # new input: tried again (and now found)
    third = prepare_table(table, PARAMS, FlowCache(root), on_error="skip", progress=False)
    assert calls["load"] == 2 and third.kept.tolist() == [0] and not third.failures


def test_no_face_message_fits_the_mode(tmp_path, monkeypatch):
    stand_in(monkeypatch)
    paths = write_frames(tmp_path / "clip", [np.full(FRAME_HW, 128, np.uint8)] * 3)
    table = pd.DataFrame([row_of(paths, apex=12)])
    with pytest.raises(PreprocessError, match="no face found.*set data.on_error=skip"):
        prepare_table(table, PARAMS, None, progress=False)
    res = prepare_table(table, PARAMS, None, on_error="skip", progress=False)
    reason = res.failures[0]["reason"]
    assert "no face found" in reason and "img10.png" in reason
    assert "on_error" not in reason  # it is already skip


def test_non_finite_flow_is_refused(tmp_path, monkeypatch):
    real = pipeline.compute_flow

    def with_nan(*args, **kwargs):
        flow = real(*args, **kwargs)
        flow[3, 4, 0] = np.nan
        return flow

    monkeypatch.setattr(prepared, "compute_flow", with_nan)
    paths = write_frames(tmp_path / "clip", [texture(0), texture(0), texture(1)])
    with pytest.raises(PreprocessError, match=r"t/s/c \(sheet row 5\).*non-finite"):
        prepare_clip(row_of(paths, apex=12), PrepareParams(detector="none", size=SIZE,
                                                           out_size=8, method="dis"))


# --------------------------------------------------------------------- a read-only cache


def test_read_only_prepare_cache_fails_before_computing(tmp_path, monkeypatch):
    computed = []
    real = prepared.prepare_clip
    monkeypatch.setattr(prepared, "prepare_clip", lambda *a: computed.append(1) or real(*a))
    paths = write_frames(tmp_path / "clip", [texture(0), texture(1), texture(2)])
    root = tmp_path / "cache"
    root.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own name)
        if dir is not None and (Path(dir) == root or root in Path(dir).parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    params = PrepareParams(detector="none", size=SIZE, out_size=8, method="dis")
    with pytest.raises(CacheError, match="not writable") as err:
        prepare_table(pd.DataFrame([row_of(paths, apex=12)]), params, FlowCache(root),
                      progress=False)
    assert str(root) in str(err.value) and computed == []


# ------------------------------------------------------------------------- the report


HEADER = ["Subject", "Filename", "Unnamed: 2", "Onset Frame", "Apex Frame", "OffsetFrame",
          "Unnamed: 6", "Action Units", "Estimated Emotion"]


def casme2_tree(root: Path) -> Path:
    """Three clips: EP01 with an apex, EP02 without (estimated), EP03 without a face."""
    rng = np.random.default_rng(0)
    clips = {"EP01": texture(1), "EP02": texture(2), "EP03": np.full(FRAME_HW, 128, np.uint8)}
    yy, xx = np.mgrid[0:FRAME_HW[0], 0:FRAME_HW[1]].astype(np.float32)
    move = bump(LANDMARKS[48:68].mean(0), 6.0)
    for clip, base in clips.items():
        amps = np.array([0, 0.5, 1.5, 1.0, 0.5, 0.2]) + rng.uniform(0, 0.05, 6)
        frames = [cv2.remap(base, xx - np.float32(a) * move, yy, cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_REFLECT) for a in amps]
        write_frames(root / "CASME2_RAW_selected" / "sub01" / clip, frames)
    rows = [[1, "EP01", None, 10, 13, 15, None, "12", "happiness"],
            [1, "EP02", None, 10, "/", 15, None, "4", "disgust"],
            [1, "EP03", None, 10, 12, 15, None, "1", "surprise"]]
    pd.DataFrame(rows, columns=HEADER).to_excel(root / "CASME2-coding-1.xlsx", index=False)
    return root


def test_prepare_report_lists_apex_and_remembered_failures(tmp_path, monkeypatch):
    from mer.prepare import prepare

    calls = stand_in(monkeypatch)
    root = casme2_tree(tmp_path / "CASME2")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=casme2", f"data.root={root}", "data.workers=0", "data.on_error=skip",
            f"paths.cache_dir={tmp_path / 'cache'}", "+data.face={detector: mediapipe}",
            f"data.flow={{method: dis, work_size: {SIZE}, out_size: 8}}"])
    report = prepare(cfg, tmp_path / "run1")
    by_clip = {a["clip"]: a for a in report["apex"]}
    assert set(by_clip) == {"EP01", "EP02"}
    assert (by_clip["EP01"]["apex"], by_clip["EP01"]["estimated"]) == (13, False)
    assert by_clip["EP02"]["estimated"] is True and 11 <= by_clip["EP02"]["apex"] <= 13
    md = (tmp_path / "run1" / "prepare_report.md").read_text()
    assert "## Apex" in md and f"| sub01 | EP02 | 10 | {by_clip['EP02']['apex']} |" in md
    assert [e["clip"] for e in report["excluded"]] == ["EP03"]
    assert "no face found" in report["excluded"][0]["reason"]
    assert report["cache"]["failures_remembered"] == 0

    loads = calls["load"]
    second = prepare(cfg, tmp_path / "run2")
    assert calls["load"] == loads  # nothing to compute: the detector is not even loaded
    assert second["cache"]["failures_remembered"] == 1
    assert "remembered" in second["excluded"][0]["reason"]
    saved = json.loads((tmp_path / "run2" / "prepare_report.json").read_text())
    assert saved["apex"] == report["apex"]
    assert "remembered from an earlier run" in (tmp_path / "run2" / "prepare_report.md"
                                                ).read_text()
