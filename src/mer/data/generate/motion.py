"""Driving motion: what a clip does, as displacements at control points over normalised time,
and the fusion of several driving clips of one class into one motion (Chen et al., ICASSP 2025:
multi-sequence driven generation).

**Control points** are the 68 iBUG landmarks of a face's neutral (onset) frame plus points
inside the triangles of a Delaunay triangulation of them (defined once per source face, applied
by index to every driving face, so point ``i`` is the same facial place on both): at density 1
each triangle's centroid, at density L the L(L+1)/2 centroids of the upward sub-triangles of
its L-fold subdivision (a grid of flow samples inside the face hull, never on an edge, so no
point repeats).

**A driving clip's motion** (:func:`driving_motion`) is the optical flow (the data's flow
method, at the frames' own resolution) from its onset frame to the frames at the normalised
phases ``0 .. 1`` (0 onset, 0.5 apex, 1 offset; linearly between them), sampled at its control
points, minus the median displacement (the global head motion; a micro-expression moves a
small part of the face). Shape (P, M, 2).

**Fusion** (:func:`fuse_motions`): each driver's motion is carried into the source face's frame
by the similarity between the two neutral landmark sets (:mod:`mer.data.generate.align`), then
the per-point, per-phase median (or mean) over the drivers, all of the target's class: one
motion that no single driving video has, with the source's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mer.data.generate.align import transfer
from mer.data.generate.errors import GenerationError

FUSIONS = ("median", "mean")


@dataclass
class Clip:
    """One clip as generation sees it.

    Attributes:
        id: ``database/subject/clip``; subject_key: ``database/subject``.
        label: class index; onset_path: path of its onset frame (``img46.jpg``: frame numbers
            are the last digits of the file name); onset, apex, offset: frame numbers (offset
            -1 when unknown: the motion then rises to the apex and falls back symmetrically).
        landmarks: (68, 2) float64 neutral landmarks in the onset frame's pixels, or None (found
            by the face detector when needed).
        fps: frame rate.
    """

    id: str
    subject_key: str
    label: int
    onset_path: str
    onset: int
    apex: int
    offset: int = -1
    landmarks: np.ndarray | None = None
    fps: float = 200.0


def triangles(landmarks: np.ndarray) -> np.ndarray:
    """(T, 3) int landmark indices of a Delaunay triangulation of a neutral shape (68, 2)."""
    from scipy.spatial import Delaunay

    return np.asarray(Delaunay(np.asarray(landmarks, np.float64)).simplices, np.int64)


def barycentric(density: int) -> np.ndarray:
    """(L(L+1)/2, 3) barycentric weights of the inner points of a triangle at ``density`` L:
    the centroids ((i, j, k) + 1/3) / L, i + j + k = L - 1, of its L-fold subdivision's upward
    sub-triangles; L = 1: the centroid alone."""
    if not isinstance(density, int | np.integer) or density < 1:
        raise GenerationError(f"control point density {density!r}: need an integer >= 1 "
                              "(1: the triangle centroids)")
    return np.array([(i + 1 / 3, j + 1 / 3, density - 1 - i - j + 1 / 3)
                     for i in range(density) for j in range(density - i)]) / density


def control_points(landmarks: np.ndarray, tri: np.ndarray, density: int = 1) -> np.ndarray:
    """(68 + T * L(L+1)/2, 2) control points: the landmarks, then the inner points of each
    triangle of ``tri`` (:func:`barycentric`; density 1: the centroids)."""
    lm = np.asarray(landmarks, np.float64)
    if density == 1:
        return np.concatenate([lm, lm[tri].mean(axis=1)])
    inner = np.einsum("kv,tvc->tkc", barycentric(density), lm[tri]).reshape(-1, 2)
    return np.concatenate([lm, inner])


def phase_frames(onset: int, apex: int, offset: int, phases: np.ndarray) -> list[int]:
    """The frame number of each normalised phase (0 onset, 0.5 apex, 1 offset), rounded; with
    no offset after the apex, phases past 0.5 mirror the rise."""
    out = []
    for p in np.asarray(phases, np.float64):
        if p <= 0.5:
            out.append(onset + (apex - onset) * 2 * p)
        elif offset > apex:
            out.append(apex + (offset - apex) * (2 * p - 1))
        else:
            out.append(onset + (apex - onset) * 2 * (1 - p))
    return [int(round(f)) for f in out]


def read_grey(clip: Clip, k: int) -> np.ndarray:
    """Frame ``k`` of ``clip`` as a grey uint8 image (GenerationError naming the clip)."""
    from mer.data.preprocess.apex import frame_path
    from mer.data.preprocess.pipeline import PreprocessError, read_frame

    try:
        path = clip.onset_path if k == clip.onset else frame_path(clip.onset_path, clip.onset, k)
        return read_frame(path, clip.id, cv2.IMREAD_GRAYSCALE)
    except (PreprocessError, ValueError) as exc:
        raise GenerationError(f"clip {clip.id}: frame {k} cannot be read for driven generation: "
                              f"{exc}") from exc


def clip_landmarks(clip: Clip, detector=None) -> np.ndarray:
    """The clip's neutral landmarks (68, 2): known (SynME, ``mer.prepare``), else found by
    ``detector`` (:func:`mer.data.preprocess.face.make_detector`) on its onset frame.

    Raises:
        GenerationError: no landmarks known and none found, naming the clip.
    """
    if clip.landmarks is not None:
        return np.asarray(clip.landmarks, np.float64)
    return face_landmarks(read_grey(clip, clip.onset), f"clip {clip.id}", detector)


def face_landmarks(image: np.ndarray, what: str, detector=None) -> np.ndarray:
    """(68, 2) landmarks of the one face on ``image`` found by ``detector`` (default MediaPipe).

    Raises:
        GenerationError: no face / landmarks found on it (``what`` names the clip or image).
    """
    from mer.data.preprocess.face import make_detector

    det = detector if detector is not None else make_detector("mediapipe")
    face = det(image) if det is not None else None
    if face is None:
        raise GenerationError(
            f"{what}: no face landmarks found on its neutral (onset) frame, so it cannot be a "
            "source face for driven generation or de-identification. Use a frontal, "
            "uncropped face image (the whole face visible), or leave the clip out")
    return np.asarray(face.landmarks, np.float64)


def driving_flows(clip: Clip, phases: np.ndarray, flow: dict) -> np.ndarray:
    """(P, H, W, 2) float32 optical flow from the onset frame to each phase's frame, computed
    with ``flow`` (``data.flow``: ``method``, ``method_params``) at the frames' resolution."""
    from mer.data.preprocess.flow import compute_flow

    numbers = phase_frames(clip.onset, clip.apex, clip.offset, phases)
    onset = read_grey(clip, clip.onset)
    out = []
    for k in numbers:
        if k == clip.onset:
            out.append(np.zeros(onset.shape + (2,), np.float32))
            continue
        frame = read_grey(clip, k)
        if frame.shape != onset.shape:
            raise GenerationError(f"clip {clip.id}: frame {k} is {frame.shape[::-1]} but its "
                                  f"onset is {onset.shape[::-1]} (w, h); frames of a clip must "
                                  "have one size")
        out.append(compute_flow(onset, frame, flow.get("method", "tvl1"),
                                **dict(flow.get("method_params") or {})))
    return np.stack(out)


def sample_field(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) bilinear samples of a (H, W, 2) field at (N, 2) points (x, y), border clamped."""
    pts = np.asarray(points, np.float32)
    mx, my = pts[:, 0].reshape(1, -1), pts[:, 1].reshape(1, -1)
    out = cv2.remap(np.ascontiguousarray(field, np.float32), mx, my, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, 2).astype(np.float64)


def driving_motion(flows: np.ndarray, landmarks: np.ndarray, tri: np.ndarray,
                   density: int = 1) -> np.ndarray:
    """(P, M, 2) displacements of a driving clip at its control points (on its own neutral
    landmarks ``landmarks`` with the source's triangulation ``tri``, :func:`control_points` at
    ``density``), global motion removed."""
    points = control_points(landmarks, tri, density)
    disp = np.stack([sample_field(f, points) for f in flows])
    return disp - np.median(disp, axis=1, keepdims=True)


def check_classes(target: Clip, drivers: list[Clip], class_names: list[str] | None = None
                  ) -> None:
    """GenerationError when a driving clip's class differs from the target's, naming both."""
    def name(k: int) -> str:
        return class_names[k] if class_names and 0 <= k < len(class_names) else str(k)

    for d in drivers:
        if d.label != target.label:
            raise GenerationError(
                f"driving clip {d.id} is of class {name(d.label)!r} but the target {target.id} "
                f"is {name(target.label)!r}: a generated sequence fuses the motion of driving "
                "clips of its own class only (the label would lie). Drive it with clips of "
                f"class {name(target.label)!r}")


def fuse_motions(motions: list[np.ndarray], driver_landmarks: list[np.ndarray],
                 source_landmarks: np.ndarray, how: str = "median") -> np.ndarray:
    """One (P, M, 2) motion in the source's frame from several drivers' (P, M, 2) motions.

    Each is rotated and scaled by the similarity from its driver's neutral landmarks to the
    source's, then the drivers are combined per point and phase by ``how`` (median | mean).
    """
    if how not in FUSIONS:
        raise GenerationError(f"unknown fusion {how!r}: use one of {list(FUSIONS)}")
    if not motions:
        raise GenerationError("no driving clip to fuse: a generated sequence needs at least one")
    aligned = np.stack([transfer(m, lm, source_landmarks)
                        for m, lm in zip(motions, driver_landmarks, strict=True)])
    return np.median(aligned, axis=0) if how == "median" else aligned.mean(axis=0)
