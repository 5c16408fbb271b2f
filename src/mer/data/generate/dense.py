"""Dense motion transfer: a driving clip's whole optical flow field carried onto a source face,
pixel by pixel (``motion: dense``), instead of its samples at sparse control points densified
by a TPS (``motion: tps``, :mod:`mer.data.generate.motion`).

The sparse model keeps what ~180 control points can say; a micro-expression's motion is a few
pixels over small regions (a brow's inner corner, a lip corner), and what falls between the
points is smoothed away. Here every pixel of the source face takes the flow of the *same facial
place* on the driving face:

- **Correspondence** (:func:`landmark_map`): a TPS fitted on the 68 neutral landmarks maps each
  source pixel to the driving frame, so the driver's brow motion lands on the source's brow
  whatever their proportions (on its own face: the identity).
- **Vectors**: the driver's flow, minus its median over the driver's face (global head motion,
  as the sparse model removes its median over the control points), sampled there and rotated
  and scaled by the similarity between the two neutral shapes
  (:func:`~mer.data.generate.align.transfer`).
- **Support** (:func:`face_weight`): the source's face polygon (landmark hull plus forehead,
  :func:`~mer.data.preprocess.regions.face_polygon`), feathered, so the background stays still
  and the edge does not tear.
- **Fusion**: several drivers' fields, each carried to the source, combined per pixel and
  phase by the median (or mean), as the sparse model does per control point.

Rendering (:func:`backward_map`) inverts the forward field by fixed-point iteration.
"""

from __future__ import annotations

import cv2
import numpy as np

from mer.data.generate.align import similarity
from mer.data.generate.errors import GenerationError

FEATHER = 0.04  # feathering of the face support: Gaussian sigma, a fraction of the face size
INVERSE_STEPS = 3  # fixed-point steps of backward_map (displacements are a few pixels)


def _normalised(points: np.ndarray, height: int, width: int):
    import torch

    p = torch.as_tensor(np.asarray(points, np.float64), dtype=torch.float64)
    return ((2 * p + 1) / torch.tensor([width, height], dtype=torch.float64) - 1)[None]


def landmark_map(source_landmarks: np.ndarray, driver_landmarks: np.ndarray, height: int,
                 width: int, driver_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 2) float32: for each pixel (x, y) of the source frame (H, W), the same facial
    place on the driving frame (pixels), by the TPS that takes the source's neutral landmarks
    (68, 2) onto the driver's (affine far from them). ``driver_size`` (h, w) of the driving
    frame (default: the source's)."""
    import torch
    from kornia.geometry.transform import get_tps_transform, warp_points_tps

    src = np.asarray(source_landmarks, np.float64)
    drv = np.asarray(driver_landmarks, np.float64)
    dh, dw = driver_size or (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    if src.shape == drv.shape and np.allclose(src, drv) and (dh, dw) == (height, width):
        return grid.reshape(height, width, 2).astype(np.float32)  # its own face: the identity
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small systems: more threads only contend
    try:
        s_n, d_n = _normalised(src, height, width), _normalised(drv, dh, dw)
        kernel, affine = get_tps_transform(s_n, d_n)
        out = warp_points_tps(_normalised(grid, height, width), d_n, kernel, affine)[0]
    finally:
        torch.set_num_threads(threads)
    px = ((out.double().numpy() + 1) * np.array([dw, dh]) - 1) / 2
    return px.reshape(height, width, 2).astype(np.float32)


def face_weight(landmarks: np.ndarray, height: int, width: int,
                feather: float = FEATHER) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the face polygon (hull and forehead), its edge feathered by a
    Gaussian of ``feather`` x the face's size."""
    from mer.data.preprocess.regions import face_polygon

    poly = face_polygon(landmarks)
    mask = np.zeros((height, width), np.float32)
    cv2.fillConvexPoly(mask, np.rint(poly).astype(np.int32), 1.0)
    size = float(np.ptp(np.asarray(landmarks, np.float64), axis=0).max())
    sigma = max(feather * size, 0.5)
    return cv2.GaussianBlur(mask, (0, 0), sigma)


def _head_motion_removed(flow: np.ndarray, weight: np.ndarray) -> np.ndarray:
    inside = weight > 0.5
    if not inside.any():
        return flow
    return flow - np.median(flow[inside], axis=0)


def dense_motion(flows: np.ndarray, driver_landmarks: np.ndarray,
                 source_landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(P, H, W, 2) float32 forward displacement of each source pixel at each phase: a driving
    clip's flows (P, h, w, 2) (onset -> each phase, at its own frame size) carried onto the
    source face (neutral landmarks (68, 2), frame H x W). See the module doc."""
    flows = np.asarray(flows, np.float32)
    dh, dw = flows.shape[1:3]
    where = landmark_map(source_landmarks, driver_landmarks, height, width, (dh, dw))
    s, rot, _ = similarity(driver_landmarks, source_landmarks)
    carry = (s * rot).T.astype(np.float32)
    driver_face = face_weight(driver_landmarks, dh, dw)
    support = face_weight(source_landmarks, height, width)[..., None]
    out = np.empty((len(flows), height, width, 2), np.float32)
    for p, flow in enumerate(flows):
        moved = _head_motion_removed(flow, driver_face)
        sampled = cv2.remap(np.ascontiguousarray(moved), where[..., 0], where[..., 1],
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[p] = (sampled @ carry) * support
    return out


def fuse_dense(motions: list[np.ndarray], how: str = "median") -> np.ndarray:
    """One (P, H, W, 2) field from several drivers' fields already on the source face: their
    per-pixel, per-phase median (or mean)."""
    if not motions:
        raise GenerationError("no driving clip to fuse: a generated sequence needs at least one")
    if how not in ("median", "mean"):
        raise GenerationError(f"unknown fusion {how!r}: use one of ['median', 'mean']")
    if len(motions) == 1:
        return np.asarray(motions[0], np.float32)
    stack = np.stack(motions)
    return (np.median(stack, axis=0) if how == "median" else stack.mean(axis=0)).astype(
        np.float32)


def backward_map(field: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 ``cv2.remap`` map rendering the forward displacement ``field``
    (H, W, 2): output pixel y samples the input at x with x + field(x) = y, solved by
    x <- y - field(x) from x = y (:data:`INVERSE_STEPS` steps)."""
    h, w = field.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = np.stack([xx, yy], -1)
    x = grid.copy()
    for _ in range(INVERSE_STEPS):
        at = cv2.remap(np.ascontiguousarray(field, np.float32), x[..., 0], x[..., 1],
                       cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        x = grid - at
    return x
