"""Thin-plate-spline warps of a face by displacements at control points (kornia's TPS).

A motion is a set of control points ``p`` (N, 2) in frame pixels (x, y) with forward
displacements ``d`` (N, 2): the face content at ``p`` moves to ``p + d``. A frame is rendered by
backward mapping (each output pixel samples the input where its content came from), so the TPS
is fitted from the moved points ``p + d`` to ``p`` (output -> input), its kernel centred on
the second point set, as :func:`kornia.geometry.transform.get_tps_transform` documents.
Points on the frame border with zero displacement keep the background still.
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.geometry.transform import get_tps_transform, warp_image_tps, warp_points_tps


def border_points(height: int, width: int, per_side: int = 6) -> np.ndarray:
    """(4 * per_side, 2) float64 points spaced along the frame border (x, y pixels)."""
    t = np.linspace(0.0, 1.0, per_side + 1)[:-1]
    w, h = width - 1.0, height - 1.0
    top = np.stack([t * w, np.zeros_like(t)], 1)
    right = np.stack([np.full_like(t, w), t * h], 1)
    bottom = np.stack([w - t * w, np.full_like(t, h)], 1)
    left = np.stack([np.zeros_like(t), h - t * h], 1)
    return np.concatenate([top, right, bottom, left])


def _normalise(points: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Pixels -> grid_sample's half-pixel frame (align_corners=False): (2x + 1) / W - 1."""
    p = torch.as_tensor(np.asarray(points, np.float64), dtype=torch.float64)
    scale = torch.tensor([width, height], dtype=torch.float64)
    return ((2 * p + 1) / scale - 1)[None].float()


def _with_border(points: np.ndarray, disp: np.ndarray, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    anchors = border_points(height, width)
    return (np.concatenate([np.asarray(points, np.float64), anchors]),
            np.concatenate([np.asarray(disp, np.float64), np.zeros_like(anchors)]))


def tps_warp(image: np.ndarray, points: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """``image`` with its content at ``points`` moved by ``disp``, smoothly in between.

    Args:
        image: (H, W) grey or (H, W, C) uint8 frame.
        points: (N, 2) control points (x, y) in pixels; disp: (N, 2) their forward displacement.

    Returns:
        the warped frame, same shape and dtype (uint8), border reflected.
    """
    img = np.asarray(image)
    h, w = img.shape[:2]
    if not np.abs(np.asarray(disp)).any():
        return img.copy()
    p, d = _with_border(points, disp, h, w)
    src = _normalise(p, h, w)           # where the content was (input)
    dst = _normalise(p + d, h, w)       # where it is now (output)
    kernel, affine = get_tps_transform(dst, src)
    t = torch.from_numpy(img.astype(np.float32))
    t = t[None, None] if img.ndim == 2 else t.permute(2, 0, 1)[None]
    out = warp_image_tps(t, src, kernel, affine, align_corners=False, padding_mode="reflection")
    out = out[0, 0] if img.ndim == 2 else out[0].permute(1, 2, 0)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def tps_backward_map(points: np.ndarray, disp: np.ndarray, height: int, width: int
                     ) -> np.ndarray:
    """(H, W, 2) float32 map (x, y): for each output pixel, where in the input its content was,
    under the TPS that moves ``points`` by ``disp`` (the same transform as :func:`tps_warp`);
    ``cv2.remap(image, map[..., 0], map[..., 1], ...)`` renders the warped frame."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    if not np.abs(np.asarray(disp)).any():
        return grid.reshape(height, width, 2).astype(np.float32)
    p, d = _with_border(points, disp, height, width)
    src, dst = _normalise(p, height, width), _normalise(p + d, height, width)
    kernel, affine = get_tps_transform(dst, src)
    back = warp_points_tps(_normalise(grid, height, width), src, kernel, affine)[0].double()
    back_px = ((back.numpy() + 1) * np.array([width, height]) - 1) / 2
    return back_px.reshape(height, width, 2).astype(np.float32)


def tps_field(points: np.ndarray, disp: np.ndarray, height: int, width: int) -> np.ndarray:
    """The dense forward displacement field (H, W, 2) float32 the TPS interpolates from
    ``disp`` at ``points`` (and zero on the border): what a perfect optical flow of the
    warped frame against the original would give."""
    p, d = _with_border(points, disp, height, width)
    moved_ctrl = _normalise(p + d, height, width)
    kernel, affine = get_tps_transform(_normalise(p, height, width), moved_ctrl)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    moved = warp_points_tps(_normalise(grid, height, width), moved_ctrl, kernel,
                            affine)[0].double().numpy()
    moved_px = ((moved + 1) * np.array([width, height]) - 1) / 2
    return (moved_px - grid).reshape(height, width, 2).astype(np.float32)
