"""Apex estimation for databases without an apex annotation (SMIC): the frame of largest
motion relative to onset.

Each candidate frame's flow from onset (DIS, fast and good at small motion) is reduced to its
local part: the best affine fit of the flow (head translation, rotation, zoom) is subtracted.
Its score is the mean of the largest 5% residual magnitudes (a micro-expression moves a small
part of the face); the apex is the candidate with the largest score. Only the face counts when
a mask is given: the pipeline passes :func:`face_mask` (the convex hull of the 68 landmarks),
so hair, background and clothes moving in the crop's corners do not pick the apex.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from mer.data.preprocess.flow import compute_flow


def face_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixels inside the convex hull of ``landmarks``.

    landmarks: (68, 2) iBUG points (x, y) in the pixels of a ``size`` x ``size`` crop.
    """
    points = np.round(np.asarray(landmarks, dtype=np.float64)).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(points), 1)
    return mask.astype(bool)


def frame_path(onset_path: str | Path, onset: int, k: int) -> Path:
    """Path of frame ``k`` of a clip, from the onset frame's path and number.

    The onset number is the last run of its digits in the file name (``img46.jpg``,
    ``006_05562.jpg``); zero padding is kept.
    """
    p = Path(onset_path)
    matches = list(re.finditer(r"\d+", p.stem))
    if not matches or int(matches[-1].group()) != int(onset):
        raise ValueError(f"{p}: the file name does not end with the onset number {onset}")
    m = matches[-1]
    digits = m.group()
    number = str(k).zfill(len(digits)) if digits.startswith("0") else str(k)
    return p.with_name(p.stem[:m.start()] + number + p.stem[m.end():] + p.suffix)


def local_motion(flow: np.ndarray, mask: np.ndarray | None = None, top: float = 0.05) -> float:
    """Mean of the largest ``top`` fraction of residual magnitudes after an affine fit.

    flow: (H, W, 2) flow; mask: optional (H, W) bool of the pixels that count.
    """
    h, w = flow.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    keep = np.ones((h, w), bool) if mask is None else np.asarray(mask, bool)
    basis = np.stack([xx[keep], yy[keep], np.ones(int(keep.sum()))], axis=1).astype(np.float64)
    f = flow[keep].astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, f, rcond=None)
    mag = np.linalg.norm(f - basis @ coef, axis=1)
    k = max(1, int(round(top * mag.size)))
    return float(np.partition(mag, mag.size - k)[-k:].mean())


def motion_curve(frames: list[np.ndarray], mask: np.ndarray | None = None,
                 method: str = "dis") -> np.ndarray:
    """(T,) local motion score (:func:`local_motion`) from ``frames[0]`` to each frame.

    frames: T (H, W) uint8 grey frames; mask: optional (H, W) bool of the pixels that count.
    The first entry is 0.
    """
    curve = np.zeros(len(frames), np.float64)
    for i in range(1, len(frames)):
        curve[i] = local_motion(compute_flow(frames[0], frames[i], method), mask)
    return curve


def estimate_apex(frames: list[np.ndarray], numbers: list[int], mask: np.ndarray | None = None,
                  method: str = "dis") -> int:
    """The frame number (from ``numbers``) of largest motion relative to ``frames[0]``.

    frames: T >= 2 (H, W) uint8 grey frames, onset first; numbers: their T frame numbers.
    """
    if len(frames) != len(numbers) or len(frames) < 2:
        raise ValueError("estimate_apex needs >= 2 frames and one number per frame")
    curve = motion_curve(frames, mask, method)
    return int(numbers[int(np.argmax(curve))])
