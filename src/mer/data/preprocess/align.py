"""Eye-level alignment and a square crop of the face, driven by iBUG-68 landmarks.

One similarity transform (rotation + uniform scale + shift) per clip, found on the onset
frame's landmarks and applied to every frame of the clip, so the face does not move between
frames because of the crop. Pixel centres sit at integer coordinates throughout.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

RIGHT_EYE = slice(36, 42)  # subject's right eye (image left)
LEFT_EYE = slice(42, 48)


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle (degrees) of the line from the right eye centre to the left one; 0 = level."""
    lm = np.asarray(landmarks, dtype=np.float64)
    d = lm[LEFT_EYE].mean(axis=0) - lm[RIGHT_EYE].mean(axis=0)
    return math.degrees(math.atan2(d[1], d[0]))


def alignment_matrix(landmarks: np.ndarray, size: int, margin: float = 0.1) -> np.ndarray:
    """(2, 3) affine map from frame pixels to a ``size`` x ``size`` crop with the eyes level.

    The face box is the bounding box of the rotated landmarks, made square around its centre
    and grown by ``margin`` of its side on each side (the forehead, above the brows, gets the
    extra margin iBUG points do not cover: the box is also raised by a tenth of its side).

    Args:
        landmarks: (68, 2) iBUG points (x, y) in frame pixels.
        size: side of the output crop in pixels.
        margin: extra border, a fraction of the face box side, on each side.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be (68, 2), got {lm.shape}")
    centre = lm.mean(axis=0)
    rot = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), eye_angle(lm), 1.0)
    upright = lm @ rot[:, :2].T + rot[:, 2]
    lo, hi = upright.min(axis=0), upright.max(axis=0)
    side = float((hi - lo).max()) * (1 + 2 * margin)
    box_centre = (lo + hi) / 2 - [0.0, 0.1 * float((hi - lo).max())]
    scale = size / side
    # frame -> upright -> crop: scale about the box centre, box centre -> crop centre
    m = np.vstack([rot, [0, 0, 1]])
    shift = np.array([[scale, 0, (size - 1) / 2 - scale * box_centre[0]],
                      [0, scale, (size - 1) / 2 - scale * box_centre[1]], [0, 0, 1]])
    return (shift @ m)[:2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Apply a (2, 3) affine ``matrix`` to an (H, W[, C]) image -> (size, size[, C]).

    Bilinear when enlarging; when shrinking (scale < 1) the image is first blurred to avoid
    aliasing. Border pixels are replicated.
    """
    scale = math.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2])))
    if scale < 0.8:
        sigma = 0.5 * (1 / scale - 1) ** 0.5 * 1.2
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    # warpAffine maps pixel centres at integers to integers, as the matrix assumes
    return cv2.warpAffine(image, np.asarray(matrix, np.float64), (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 2) points through a (2, 3) affine matrix -> (N, 2) float64."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def resize_points(points: np.ndarray, from_size: int, to_size: int) -> np.ndarray:
    """(N, 2) pixel points of a ``from_size`` square image -> the ``to_size`` resize of it."""
    s = to_size / from_size
    return (np.asarray(points, dtype=np.float64) + 0.5) * s - 0.5
