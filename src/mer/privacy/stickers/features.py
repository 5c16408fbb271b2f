"""Per-site motion of a clip: what the attacker measures without asking the recogniser.

For each sticker site (:data:`mer.privacy.stickers.placement.SITES`) the mean magnitude of the
onset -> apex optical flow over a disc around the site's centre, after removing the face's
global motion (the median flow over the face: head drift). The attacker computes these with
mer's own flow (:func:`mer.data.preprocess.flow.compute_flow`) on the clip's frames.
"""

from __future__ import annotations

import math

import numpy as np

from mer.privacy.stickers.placement import SITES, face_area, face_mask, site_centre


def site_motion(flow: np.ndarray, landmarks: np.ndarray, disc_fraction: float = 0.04
                ) -> np.ndarray:
    """(S,) mean residual flow magnitude (px) around each site, in :data:`SITES` order.

    Args:
        flow: (H, W, 2) onset -> apex flow (u, v) in pixels.
        landmarks: (68, 2) landmarks in the flow's pixel frame.
        disc_fraction: the disc's area as a fraction of the face area (a sticker's size).
    """
    flow = np.asarray(flow, dtype=np.float64)
    h, w = flow.shape[:2]
    lm = np.asarray(landmarks, dtype=np.float64)
    on_face = face_mask(lm, (h, w)) > 0.5
    drift = np.median(flow[on_face], axis=0) if on_face.any() else np.zeros(2)
    mag = np.linalg.norm(flow - drift, axis=-1)
    radius = max(1.0, math.sqrt(disc_fraction * face_area(lm) / math.pi))
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros(len(SITES))
    for k, site in enumerate(SITES):
        cx, cy = site_centre(lm, site)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        out[k] = float(mag[disc].mean()) if disc.any() else 0.0
    return out


def clip_motion(onset_path: str, apex_path: str, landmarks: np.ndarray, work_size: int,
                method: str = "dis", disc_fraction: float = 0.04, clip: str = "") -> np.ndarray:
    """(S,) :func:`site_motion` of a clip from its frame files, on the frames as mer's flow
    pipeline sees them (grey, resized to ``work_size`` squared).

    Args:
        landmarks: (68, 2) onset landmarks in the frame's pixel frame.
        method: flow method (``mer.data.preprocess.flow.METHODS``); DIS is fast and enough to
            rank sites.
    """
    import cv2

    from mer.data.preprocess.flow import compute_flow
    from mer.data.preprocess.pipeline import read_frame

    onset = read_frame(onset_path, clip or str(onset_path), cv2.IMREAD_GRAYSCALE)
    apex = read_frame(apex_path, clip or str(apex_path), cv2.IMREAD_GRAYSCALE)
    h, w = onset.shape
    size = (work_size, work_size)
    flow = compute_flow(cv2.resize(onset, size, interpolation=cv2.INTER_AREA),
                        cv2.resize(apex, size, interpolation=cv2.INTER_AREA), method)
    scale = np.array([work_size / w, work_size / h])
    lm = (np.asarray(landmarks, dtype=np.float64) + 0.5) * scale - 0.5
    return site_motion(flow, lm, disc_fraction)
