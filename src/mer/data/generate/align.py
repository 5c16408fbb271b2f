"""Alignment of two neutral faces, so that a driving motion keeps the source's geometry.

A driving clip's motion is taken relative to the driving face's own neutral landmarks (its
onset frame), as displacements at control points defined on the landmarks. The similarity
(scale, rotation, translation; Umeyama's least-squares fit) from the driving neutral shape to
the source neutral shape carries those displacement *vectors* into the source frame (scale
and rotation only: a displacement has no position). The displacements are then applied at the
**source's own** control points, so the face that moves is the source's, with its own
proportions; only the motion comes from the driver.
"""

from __future__ import annotations

import numpy as np


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991) between (N, 2) shapes.

    Returns:
        (s, R (2, 2), t (2,)), R a proper rotation (det +1).
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"similarity: two (N, 2) shapes with N >= 2 needed, got {src.shape} "
                         f"and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(sig) @ sign) / var) if var > 0 else 1.0
    return s, rot, mu_d - s * rot @ mu_s


def transfer(disp: np.ndarray, driver_neutral: np.ndarray, source_neutral: np.ndarray
             ) -> np.ndarray:
    """Displacements (..., N, 2) measured on the driving face, expressed in the source's frame:
    rotated and scaled by the similarity from the driving neutral landmarks (68, 2) to the
    source's (68, 2)."""
    s, rot, _ = similarity(driver_neutral, source_neutral)
    return np.asarray(disp, np.float64) @ (s * rot).T
