"""Face detection and iBUG-68 landmarks on a frame.

The detector is MediaPipe Face Mesh (``mediapipe==0.10.21``): its face detector and 468-point
mesh models ship inside the wheel, so nothing is downloaded at run time. The mesh is mapped to
the 68 iBUG points that SynME, the AU regions and the models use: each iBUG point is one mesh
vertex or the mean of two (:data:`MESH_TO_IBUG68`), except the jaw (0-16), which is the
mesh's face oval from one ear to the other resampled to 17 points equally spaced along it.

``Detector`` is the small interface the pipeline needs; :func:`make_detector` builds one by
name (``mediapipe``, or ``none`` for frames taken as they are).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

# Mesh vertices of the iBUG points 17-67 (a tuple: the mean of those vertices). Index 33 is the
# subject's right outer eye corner (image left), 263 the left one.
MESH_TO_IBUG68: dict[int, tuple[int, ...]] = {
    # brows, outer -> inner (right), inner -> outer (left): mid-line of the upper/lower contour
    17: (70, 46), 18: (63, 53), 19: (105, 52), 20: (66, 65), 21: (107, 55),
    22: (336, 285), 23: (296, 295), 24: (334, 282), 25: (293, 283), 26: (300, 276),
    # nose bridge ends (28 and 29 are spaced evenly between them) and base
    27: (168,), 30: (4,),
    31: (98,), 32: (97,), 33: (2,), 34: (326,), 35: (327,),
    # eyes: corner, two upper lid, corner, two lower lid
    36: (33,), 37: (160,), 38: (158,), 39: (133,), 40: (153,), 41: (144,),
    42: (362,), 43: (385,), 44: (387,), 45: (263,), 46: (373,), 47: (380,),
    # outer lips from the right corner, clockwise in the image; then inner lips
    48: (61,), 49: (40,), 50: (37,), 51: (0,), 52: (267,), 53: (270,), 54: (291,),
    55: (321,), 56: (314,), 57: (17,), 58: (84,), 59: (91,),
    60: (78,), 61: (81,), 62: (13,), 63: (311,), 64: (308,), 65: (402,), 66: (14,), 67: (178,),
}
# The mesh's face oval from the right ear (image left) under the chin to the left ear.
JAW_OVAL: tuple[int, ...] = (
    127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152,
    377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356,
)


class FaceNotFoundError(Exception):
    """No face was found on a frame."""


@dataclass
class Face:
    """A detected face: ``landmarks`` (68, 2) float64 iBUG points (x, y) in frame pixels."""

    landmarks: np.ndarray


class Detector(Protocol):
    """Anything that finds one face on a BGR or grey uint8 frame (None when there is none)."""

    def __call__(self, image: np.ndarray) -> Face | None: ...


def _resample(polyline: np.ndarray, n: int) -> np.ndarray:
    """(K, 2) polyline -> (n, 2) points equally spaced along its length, ends kept."""
    seg = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, polyline[:, 0]), np.interp(t, s, polyline[:, 1])], axis=1)


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """(468, 2) MediaPipe mesh points -> (68, 2) iBUG-68 points (same units)."""
    mesh = np.asarray(mesh, dtype=np.float64)
    if mesh.ndim != 2 or mesh.shape[0] < 468 or mesh.shape[1] < 2:
        raise ValueError(f"expected (468, 2) mesh points, got {mesh.shape}")
    out = np.zeros((68, 2))
    out[:17] = _resample(mesh[list(JAW_OVAL), :2], 17)
    for i, ids in MESH_TO_IBUG68.items():
        out[i] = mesh[list(ids), :2].mean(axis=0)
    out[28] = (2 * out[27] + out[30]) / 3
    out[29] = (out[27] + 2 * out[30]) / 3
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence stderr, Python's and the C++ file descriptor 2, inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class MediaPipeDetector:
    """MediaPipe Face Mesh on a single image, mapped to iBUG-68 landmarks.

    Args:
        min_confidence: minimum face-detection confidence (0-1).
        upscale_to: frames whose short side is below this are upscaled before detection
            (the detector's anchors suit faces of ~100 px and more); landmarks are mapped back.
    """

    def __init__(self, min_confidence: float = 0.5, upscale_to: int = 192) -> None:
        try:
            with _quiet_stderr():  # start-up chatter of MediaPipe's C++ side
                from mediapipe.python.solutions import face_mesh
        except ImportError as exc:
            raise ImportError(
                "face detection needs MediaPipe 0.10.21 (its face models ship in the wheel): "
                "pip install --no-deps mediapipe==0.10.21 absl-py flatbuffers attrs  "
                "(see README, 'Face detection'); or set data.face.detector=none"
            ) from exc
        self.upscale_to = int(upscale_to)
        self._first = True
        with _quiet_stderr():
            self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                            refine_landmarks=False,
                                            min_detection_confidence=float(min_confidence))

    def __call__(self, image: np.ndarray) -> Face | None:
        """image (H, W) grey or (H, W, 3) BGR uint8 -> Face, or None when no face is found."""
        image = np.asarray(image)
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        scale = max(1.0, self.upscale_to / min(h, w))
        if scale > 1.0:
            rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)),
                             interpolation=cv2.INTER_CUBIC)
        if self._first:  # the models load on the first call, with more chatter
            with _quiet_stderr():
                result = self._mesh.process(rgb)
            self._first = False
        else:
            result = self._mesh.process(rgb)
        if not result.multi_face_landmarks:
            return None
        pts = result.multi_face_landmarks[0].landmark
        hs, ws = rgb.shape[:2]
        # normalised [0, 1] image coordinates -> pixel centres at integers, original frame
        mesh = np.array([(p.x * ws, p.y * hs) for p in pts]) / scale - 0.5
        return Face(landmarks=mesh_to_ibug68(mesh))

    def close(self) -> None:
        self._mesh.close()


def make_detector(name: str, **kwargs) -> Detector | None:
    """The detector called ``name``: ``mediapipe``, or ``none`` (returns None: no detection)."""
    if name in (None, "none", "null"):
        return None
    if name == "mediapipe":
        return MediaPipeDetector(**kwargs)
    raise ValueError(f"unknown face detector {name!r}; choose mediapipe or none")
