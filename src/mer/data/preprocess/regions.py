"""Landmark-driven AU regions: the four FED-PsyAU regions and per-landmark flow patches.

The regions are those of the DPK-GAT model (``mer.models.dpk_gat.AU_REGIONS``; a test keeps
the two equal): brows (AU1/2/4), eyes and cheeks (AU5/6/7), nose (AU9/10), mouth and chin
(AU12/14/15/17), each a set of iBUG-68 landmarks.
"""

from __future__ import annotations

import cv2
import numpy as np

# name -> (iBUG landmark indices, the AUs the region feeds)
AU_REGIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "brows": (tuple(range(17, 27)), (1, 2, 4)),
    "eyes_cheeks": (tuple(range(36, 48)) + (1, 2, 14, 15), (5, 6, 7)),
    "nose": (tuple(range(27, 36)), (9, 10)),
    "mouth_chin": (tuple(range(48, 60)) + (7, 8, 9), (12, 14, 15, 17)),
}


def face_polygon(landmarks: np.ndarray) -> np.ndarray:
    """(P, 2) convex polygon of the face: the landmarks' hull with the forehead (the brows
    raised by the brow-to-eye distance). landmarks (68, 2) iBUG (x, y)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    rise = float(np.mean(lm[36:48, 1]) - np.mean(lm[17:27, 1]))
    forehead = lm[17:27] - [0.0, max(rise, 0.0)]
    hull = cv2.convexHull(np.concatenate([lm, forehead]).astype(np.float32))
    return hull[:, 0, :].astype(np.float64)


def region_boxes(landmarks: np.ndarray, pad: float = 2.0) -> dict[str, np.ndarray]:
    """Bounding box ``[x0, y0, x1, y1]`` (pixels, padded by ``pad``) of each AU region.

    landmarks (68, 2) -> {region name: (4,) float64}.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    out = {}
    for name, (ids, _) in AU_REGIONS.items():
        pts = lm[list(ids)]
        out[name] = np.concatenate([pts.min(axis=0) - pad, pts.max(axis=0) + pad])
    return out


def region_masks(landmarks: np.ndarray, size: int, radius: float = 3.0) -> dict[str, np.ndarray]:
    """(size, size) bool mask per region: the convex hull of its landmarks, grown by ``radius``.

    landmarks (68, 2) in the pixel frame of a ``size`` x ``size`` image.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    r = max(1, int(round(radius)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    out = {}
    for name, (ids, _) in AU_REGIONS.items():
        mask = np.zeros((size, size), np.uint8)
        hull = cv2.convexHull(np.round(lm[list(ids)]).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
        out[name] = cv2.dilate(mask, kernel).astype(bool)
    return out


def landmark_patches(image: np.ndarray, landmarks: np.ndarray, side: int = 5) -> np.ndarray:
    """Bilinear ``side`` x ``side`` patches at 1-pixel spacing centred on each landmark.

    Args:
        image: (C, H, W) float array (a flow image).
        landmarks: (L, 2) pixel points (x, y), pixel centres at integers.
        side: patch side in pixels.

    Returns:
        (L, C, side, side) float32; outside the image reads the nearest border pixel.
    """
    img = np.asarray(image, dtype=np.float32)
    offsets = np.arange(side, dtype=np.float32) - (side - 1) / 2
    out = np.empty((len(landmarks), img.shape[0], side, side), np.float32)
    for i, (x, y) in enumerate(np.asarray(landmarks, dtype=np.float32)):
        mx, my = np.meshgrid(x + offsets, y + offsets)
        for c in range(img.shape[0]):
            out[i, c] = cv2.remap(img[c], mx, my, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
    return out
