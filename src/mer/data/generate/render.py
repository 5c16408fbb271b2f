"""Rendering a driven sequence: the source face warped by a fused motion over time."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mer.data.generate.errors import GenerationError
from mer.data.generate.motion import control_points
from mer.data.generate.tps import tps_backward_map

JPEG_QUALITY = 95


def motion_at(motion: np.ndarray, t: float) -> np.ndarray:
    """(M, 2) displacements at normalised time ``t`` in [0, 1], linear between the P phase
    knots of ``motion`` (P, M, 2) (knots evenly spaced, 0 onset, 0.5 apex, 1 offset)."""
    knots = np.linspace(0.0, 1.0, len(motion))
    i = int(np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(motion) - 2))
    w = (t - knots[i]) / (knots[i + 1] - knots[i])
    return (1 - w) * motion[i] + w * motion[i + 1]


def render_sequence(source: np.ndarray, landmarks: np.ndarray, tri: np.ndarray,
                    motion: np.ndarray, n_frames: int, density: int = 1) -> list[np.ndarray]:
    """``n_frames`` frames (odd: the middle one is the apex) of the source face ``source``
    ((H, W) or (H, W, 3) uint8, neutral) moving by ``motion`` (P, M, 2) at its control points
    (its landmarks (68, 2) and the triangulation ``tri`` at ``density``, as
    :func:`~mer.data.generate.motion.control_points`). Frame 0 is ``source`` itself.

    The kornia TPS is solved at each of the P phase knots of ``motion`` (exact there); the
    backward maps of frames between two knots are blended linearly (first order in the
    displacement, which is a few pixels at most), and ``cv2.remap`` renders each frame."""
    _check_frames(n_frames)
    import torch

    points = control_points(landmarks, tri, density)
    h, w = source.shape[:2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only contend
    try:  # the TPS backward map at each phase knot (exact there), linear in between
        maps = np.stack([tps_backward_map(points, m, h, w) for m in motion])
    finally:
        torch.set_num_threads(threads)
    return _frames_from_maps(source, maps, n_frames)


def render_dense(source: np.ndarray, motion: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """``n_frames`` frames (odd: the middle one is the apex) of ``source`` ((H, W) or
    (H, W, 3) uint8, neutral) moving by the dense forward field ``motion`` (P, H, W, 2) at P
    phase knots (:func:`~mer.data.generate.dense.dense_motion`). Frame 0 is ``source``;
    the field is inverted at each knot (:func:`~mer.data.generate.dense.backward_map`) and
    the maps blended linearly between knots, as :func:`render_sequence` does."""
    from mer.data.generate.dense import backward_map

    _check_frames(n_frames)
    if motion.shape[1:3] != source.shape[:2]:
        raise GenerationError(f"dense motion of {motion.shape[2]}x{motion.shape[1]} px for a "
                              f"{source.shape[1]}x{source.shape[0]} px face")
    maps = np.stack([backward_map(m) for m in motion])
    return _frames_from_maps(source, maps, n_frames)


def _check_frames(n_frames: int) -> None:
    if n_frames < 3 or n_frames % 2 == 0:
        raise GenerationError(f"a generated clip needs an odd number of frames >= 3 (onset, "
                              f"apex in the middle, offset), got {n_frames}")


def _frames_from_maps(source: np.ndarray, maps: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """Frames at evenly spaced normalised times: the backward maps (P, H, W, 2) at the phase
    knots blended linearly between them, rendered by ``cv2.remap``; frame 0 is ``source``."""
    knots = np.linspace(0.0, 1.0, len(maps))
    frames = []
    for t in np.linspace(0.0, 1.0, n_frames):
        if t == 0.0:
            frames.append(source.copy())  # the onset is the source face itself
            continue
        i = int(np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(maps) - 2))
        wt = np.float32((t - knots[i]) / (knots[i + 1] - knots[i]))
        m = (1 - wt) * maps[i] + wt * maps[i + 1]
        frames.append(cv2.remap(source, m[..., 0], m[..., 1], cv2.INTER_CUBIC,
                                borderMode=cv2.BORDER_REFLECT))
    return frames


def write_frames(frames: list[np.ndarray], folder: Path, first: int = 1) -> Path:
    """Frames as ``folder/img{first + i}.jpg`` (the CASME II naming the readers and
    ``frame_path`` know); returns the onset frame's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        path = folder / f"img{first + i}.jpg"
        if not cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write generated frame {path}")
    return folder / f"img{first}.jpg"
