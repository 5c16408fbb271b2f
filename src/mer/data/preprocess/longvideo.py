"""Long-video preprocessing for spotting: per-frame ROI optical flow with head motion removed.

Interface (shared with ``mer.spotting``)::

    from mer.data.preprocess.longvideo import load_long_video_features
    feats = load_long_video_features(data_cfg, cache_dir)   # {video_id: LongVideoFeatures}
    f = feats["samm_lv/006_1"]
    f.flow          # (T, R, 2) float32: mean (u, v) per ROI, frame t -> t + k, nose flow removed
    f.crops         # (T, crop_size, crop_size) uint8: grey face crop of frame t
    f.magnitude     # (T,) float32: mean |flow - nose flow| over the whole face box
    f.head          # (T, 2) float32: the nose-region flow that was removed (head motion)
    f.valid         # (T,) bool: False where frame t had no face or frame t + k does not exist
    f.frame_numbers # (T,) int64: the frame file numbers (img<n>.jpg), increasing
    f.fps, f.k, f.roi_names (R names, :data:`ROI_NAMES`), f.problems (listed, never dropped)

``video_id`` is ``<database>/<video>`` (``casme_sq/15_0101disgustingteeth``), as in the
``video_id`` column of :func:`mer.data.sources.load_intervals`. The arrays are memory-mapped
``.npy`` files of the cache (read-only views; copy before writing into them).

Per video, frames streamed in number order (:class:`FeatureStream`; at most k + 1 frames in
memory, never the whole video):

1. **Landmarks**: detected (``detector``: ``mediapipe``; ``synthetic``: SynME-LV's known
   landmarks, :func:`mer.data.synthetic_lv.video_landmarks`, used the way SynME clips use
   theirs) at the first frame of every chunk and every ``redetect_seconds``; in between tracked
   frame to frame (pyramidal Lucas-Kanade on rigid points: face outline, nose, eye corners,
   forward-backward checked, a similarity fitted with RANSAC moves all 68); re-detected at once
   when tracking is lost (too few points pass the forward-backward check of
   ``track_error_px``). Frames where no face is found form a "no face" stretch.
2. **Crop**: an eye-level similarity per detection (:func:`mer.data.preprocess.align
   .alignment_matrix`) gives a ``size`` x ``size`` grey crop; the ROIs follow the tracked
   landmarks inside it.
3. **Flow** between frame t and frame t + k, both warped with t's crop transform, with
   ``k = max(1, round(k_seconds * fps))`` (0.2 s: 6 frames at 30 fps, 40 at 200 fps; about
   half a micro-expression), DIS by default.
4. **Features**: mean (u, v) in R = 13 boxes around landmarks (:data:`ROIS`: brows inner and
   outer, eyes, cheeks, mouth corners, lips, chin), minus the nose-tip box's flow (the head
   motion, kept in ``head``); ``magnitude`` over the landmarks' bounding box; the crop shrunk
   to ``crop_size``.

Cache (:func:`prepare_long_videos`): ``<cache_dir>/longvideo/<database>/<video>-<key>/``, the
key a sha256 of the parameters, :data:`VERSION` and the frame listing (names, sizes, mtimes).
Each chunk of ``chunk_frames`` frames is computed independently (it starts with a detection),
in worker processes, and written atomically (a temporary folder renamed into place); an
interrupted prepare recomputes only the chunks that are missing, with the same arrays. Once
all chunks of a video exist they are joined into ``features/*.npy`` (again atomically).

Bad input: a gap in the frame numbering, an unreadable or truncated frame, a frame of another
size, a stretch without a face: :class:`LongVideoError` naming the video, the frame (file)
and the fix; with ``on_error=skip`` the stretch is listed in ``problems`` and the report, its
frames ``valid=False``. Interval checks the readers cannot make (overlapping intervals, an
interval over missing frames) are in :func:`check_intervals`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd

from mer.data.preprocess.align import alignment_matrix, transform_points, warp
from mer.data.preprocess.pipeline import PreprocessError
from mer.data.workers import image_pool

VERSION = "1"  # bump when the features change for the same frames and parameters
ON_ERROR = ("raise", "skip")
DETECTORS = ("mediapipe", "synthetic")
REPORT_NAME = "prepare_report"

# name -> (iBUG landmarks averaged, offset (x, y) in inter-ocular distances, half side in IODs)
ROIS: dict[str, tuple[tuple[int, ...], tuple[float, float], float]] = {
    "brow_outer_r": ((17, 18, 19), (0.0, -0.04), 0.2),
    "brow_inner_r": ((20, 21), (0.0, -0.04), 0.18),
    "brow_inner_l": ((22, 23), (0.0, -0.04), 0.18),
    "brow_outer_l": ((24, 25, 26), (0.0, -0.04), 0.2),
    "eye_r": (tuple(range(36, 42)), (0.0, 0.0), 0.2),
    "eye_l": (tuple(range(42, 48)), (0.0, 0.0), 0.2),
    "cheek_r": ((40, 41), (0.0, 0.38), 0.2),
    "cheek_l": ((46, 47), (0.0, 0.38), 0.2),
    "mouth_corner_r": ((48,), (0.0, 0.0), 0.18),
    "mouth_corner_l": ((54,), (0.0, 0.0), 0.18),
    "upper_lip": ((50, 51, 52), (0.0, 0.0), 0.16),
    "lower_lip": ((56, 57, 58), (0.0, 0.0), 0.16),
    "chin": ((7, 8, 9), (0.0, -0.25), 0.22),
}
ROI_NAMES: list[str] = list(ROIS)
NOSE_ROI = ((29, 30), (0.0, 0.0), 0.12)  # the reference: its flow is the head motion
# Points tracked frame to frame: rigid ones (face outline, nose, eye corners), not the brows,
# lids or lips that expressions move.
TRACK_IDS = (0, 1, 2, 3, 13, 14, 15, 16, 27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45)


class LongVideoError(PreprocessError):
    """A long video that cannot be preprocessed; the message names the video, frame and fix."""


# ----------------------------------------------------------------------------- parameters


@dataclass
class LongVideoParams:
    """Parameters of long-video preprocessing (``data.longvideo``; all in the cache key).

    Attributes:
        detector: ``mediapipe``, or ``synthetic`` (SynME-LV's known landmarks).
        min_confidence: face-detection confidence (mediapipe).
        margin: crop border around the landmark box, a fraction of its side.
        size: side of the aligned grey crop the flow is computed on (px).
        crop_size: side of the grey face crop kept per frame (px).
        k_seconds: flow between t and t + round(k_seconds * fps).
        flow: ``{method: dis|farneback|tvl1, ...}`` (DIS: ``preset`` and its setters).
        redetect_seconds: re-detection interval (tracking in between).
        track_error_px: forward-backward error above which a tracked point is lost.
        chunk_frames: frames per cached chunk (each starts with a detection).
    """

    detector: str = "mediapipe"
    min_confidence: float = 0.5
    margin: float = 0.15
    size: int = 96
    crop_size: int = 32
    k_seconds: float = 0.2
    flow: dict = field(default_factory=lambda: {"method": "dis", "preset": "fast",
                                                "finest_scale": 1})
    redetect_seconds: float = 1.0
    track_error_px: float = 1.0
    chunk_frames: int = 2000

    def __post_init__(self) -> None:
        from mer.data.preprocess.flow import METHODS

        self.flow = dict(self.flow or {"method": "dis"})
        where = "data.longvideo"
        if self.detector not in DETECTORS:
            raise ValueError(f"{where}.detector={self.detector!r}: use one of {list(DETECTORS)} "
                             "(long-video features need landmarks for their ROIs)")
        if self.flow.get("method", "dis") not in METHODS:
            raise ValueError(f"{where}.flow.method={self.flow.get('method')!r}: use one of "
                             f"{list(METHODS)}")
        if self.size < 32 or not 8 <= self.crop_size <= 256:
            raise ValueError(f"{where}: need size >= 32 and 8 <= crop_size <= 256, got "
                             f"{self.size}, {self.crop_size}")
        if self.k_seconds <= 0 or self.redetect_seconds <= 0 or self.track_error_px <= 0:
            raise ValueError(f"{where}: k_seconds, redetect_seconds and track_error_px must be "
                             "> 0")
        if self.chunk_frames < 10:
            raise ValueError(f"{where}.chunk_frames={self.chunk_frames}: use >= 10 (e.g. 2000)")

    def k(self, fps: float) -> int:
        """Frames between the two frames of a flow pair at ``fps``."""
        return max(1, int(round(self.k_seconds * fps)))

    def redetect_every(self, fps: float) -> int:
        return max(1, int(round(self.redetect_seconds * fps)))

    def key(self) -> str:
        """A stable string of every parameter (part of the cache key)."""
        return json.dumps({**asdict(self), "version": VERSION}, sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def from_data_cfg(cls, data_cfg: Any) -> LongVideoParams:
        """From ``data.longvideo`` (unknown keys are errors naming them)."""
        node = data_cfg.get("longvideo") if hasattr(data_cfg, "get") else None
        d = _plain(node) or {}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"data.longvideo: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


# ----------------------------------------------------------------------------- frames


@dataclass
class VideoFrames:
    """The frame files of one video folder, by number (the last integer of the name)."""

    frame_dir: Path
    numbers: list[int]
    paths: list[str]
    gaps: list[tuple[int, int]]  # missing frame numbers, as [first, last] runs
    fingerprint: str  # sha256 of names, sizes and mtimes


def list_frames(frame_dir: str | Path) -> VideoFrames:
    """List a video's frame files (one ``os.scandir``): numbers, gaps and a fingerprint.

    Raises:
        LongVideoError: the folder is missing or holds no frame images.
    """
    from mer.data.databases.common import IMAGE_SUFFIXES, FrameIndex

    folder = Path(frame_dir)
    found: dict[int, tuple[str, int, int]] = {}
    try:
        with os.scandir(folder) as it:
            for entry in it:
                stem, suffix = os.path.splitext(entry.name)
                m = FrameIndex._NUMBER.search(stem)
                if suffix.lower() in IMAGE_SUFFIXES and m and entry.is_file():
                    st = entry.stat()
                    n = int(m.group(1))
                    if n not in found or entry.name < Path(found[n][0]).name:
                        found[n] = (entry.path, st.st_size, st.st_mtime_ns)
    except OSError as e:
        raise LongVideoError(f"cannot list the video folder {folder} ({e.strerror or e}); check "
                             "data.root and the database layout") from e
    if not found:
        raise LongVideoError(f"no frame images in the video folder {folder}; re-extract the "
                             "video's frames there")
    numbers = sorted(found)
    gaps = [(a + 1, b - 1) for a, b in zip(numbers, numbers[1:], strict=False) if b > a + 1]
    digest = hashlib.sha256()
    for n in numbers:
        path, size, mtime = found[n]
        digest.update(f"{n}\t{os.path.basename(path)}\t{size}\t{mtime}\n".encode())
    return VideoFrames(folder, numbers, [found[n][0] for n in numbers], gaps, digest.hexdigest())


def read_grey(path: str, video: str) -> np.ndarray:
    """A frame file as (H, W) uint8 grey, fully decoded (a truncated JPEG is refused: OpenCV
    would fill its missing part with grey). One read and one decode per frame: the JPEG end
    marker is looked for in the last KiB, and only when it is absent is the file decoded fully
    by PIL to tell a truncated file from one with trailing bytes."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise LongVideoError(f"video {video}: cannot read frame file {path} "
                             f"({e.strerror or e}); replace or re-extract it") from e
    if path.lower().endswith((".jpg", ".jpeg")) and b"\xff\xd9" not in data[-1024:].tobytes():
        # no end marker near the end: truncated, unless a full decode says otherwise (some
        # cameras write bytes after it)
        from mer.data.databases.common import image_problem

        if image_problem(path):
            raise LongVideoError(f"video {video}: frame file {path} is a truncated JPEG (no end "
                                 "marker); replace or re-extract it")
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise LongVideoError(f"video {video}: cannot decode frame file {path}; replace or "
                             "re-extract it")
    return image


# ----------------------------------------------------------------------------- features


class FrameFeatures(NamedTuple):
    """One frame's output of :class:`FeatureStream` (shapes in the module docstring)."""

    number: int
    flow: np.ndarray  # (R, 2)
    head: np.ndarray  # (2,)
    magnitude: float
    crop: np.ndarray  # (crop_size, crop_size) uint8
    valid: bool


@dataclass
class _Pending:
    number: int
    matrix_id: int
    matrix: np.ndarray | None
    crop: np.ndarray | None  # (size, size) grey under ``matrix``
    landmarks: np.ndarray | None  # (68, 2) in crop pixels
    small: np.ndarray


def _roi_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R + 1, 68) landmark-averaging weights, (R + 1, 2) offsets and (R + 1,) half sides in
    IODs; row 0 is the nose reference, rows 1.. the ROIs in :data:`ROI_NAMES` order."""
    specs = [NOSE_ROI, *ROIS.values()]
    weights = np.zeros((len(specs), 68))
    for i, (ids, _, _) in enumerate(specs):
        weights[i, list(ids)] = 1.0 / len(ids)
    return (weights, np.array([s[1] for s in specs], np.float64),
            np.array([s[2] for s in specs], np.float64))


_ROI_WEIGHTS, _ROI_OFFSETS, _ROI_HALF = _roi_tables()


def roi_boxes(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(R + 1, 4) int boxes ``x0, y0, x1, y1`` (end exclusive, at least 1 px, inside the
    ``size`` crop): row 0 the nose reference, then the ROIs; landmarks (68, 2) crop pixels."""
    lm = np.asarray(landmarks, np.float64)
    iod = float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0))) or 1.0
    centre = _ROI_WEIGHTS @ lm + _ROI_OFFSETS * iod
    half = np.maximum(1.0, _ROI_HALF * iod)[:, None]
    lo = np.clip(np.rint(centre - half), 0, size - 1).astype(np.int64)
    hi = np.clip(np.rint(centre + half) + 1, lo + 1, size).astype(np.int64)
    return np.concatenate([lo, hi], axis=1)


def roi_features(flow: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(R, 2) ROI mean flow minus the nose flow, (2,) nose flow, whole-face magnitude.

    Args:
        flow: (S, S, 2) float32 flow on the crop; landmarks: (68, 2) in the crop's pixels.

    The magnitude is the mean of |flow - nose flow| over the landmarks' bounding box.
    """
    size = flow.shape[0]
    boxes = roi_boxes(landmarks, size)
    integral = cv2.integral(np.ascontiguousarray(flow, np.float32), sdepth=cv2.CV_64F)
    x0, y0, x1, y1 = boxes.T
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    means = sums / ((x1 - x0) * (y1 - y0))[:, None]
    nose = means[0]
    lm = np.asarray(landmarks, np.float64)
    lo = np.clip(np.floor(lm.min(axis=0)).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(lm.max(axis=0)).astype(int) + 1, lo + 1, size)
    face = flow[lo[1]:hi[1], lo[0]:hi[0]] - nose.astype(np.float32)
    magnitude = float(np.sqrt((face * face).sum(-1)).mean())
    return (means[1:] - nose).astype(np.float32), nose.astype(np.float32), magnitude


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, shift) taking src to dst."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    var = (a * a).sum()
    if var <= 1e-12:
        return np.array([[1.0, 0, md[0] - ms[0]], [0, 1.0, md[1] - ms[1]]])
    c = ((a * b).sum()) / var  # s cos
    d = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum() / var  # s sin
    rot = np.array([[c, -d], [d, c]])
    return np.hstack([rot, (md - rot @ ms)[:, None]])


class _Flow:
    """Dense flow with a reusable DIS object (creating one per pair costs more than the flow)."""

    def __init__(self, spec: dict) -> None:
        from mer.data.preprocess.flow import DIS_PRESETS, DIS_SETTERS, compute_flow

        spec = dict(spec)
        self.method = spec.pop("method", "dis")
        self.params = spec
        self._compute = compute_flow
        self._dis = None
        if self.method == "dis":
            preset = spec.get("preset", "fast")
            if preset not in DIS_PRESETS:
                raise ValueError(f"data.longvideo.flow.preset={preset!r}: use one of "
                                 f"{sorted(DIS_PRESETS)}")
            self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
            for name, value in spec.items():
                if name != "preset":
                    if name not in DIS_SETTERS:
                        raise ValueError(f"data.longvideo.flow.{name}: unknown DIS parameter; "
                                         f"known: {['preset', *sorted(DIS_SETTERS)]}")
                    getattr(self._dis, DIS_SETTERS[name])(value)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self._dis is not None:
            return self._dis.calc(a, b, None)
        return self._compute(a, b, self.method, **self.params)


Detect = Callable[[int, np.ndarray], "np.ndarray | None"]


class FeatureStream:
    """Per-frame features of one video from a stream of frames (memory: k + 1 crops).

    Args:
        fps: the video's frame rate; params: :class:`LongVideoParams`.
        detect: ``detect(frame number, grey frame) -> (68, 2) landmarks in frame pixels``, or
            None when there is no face.
        video: the video's name, for messages.
        on_error: ``raise`` (:class:`LongVideoError` at the first frame without a face) or
            ``skip`` (the stretch goes to :attr:`problems`; its frames are ``valid=False``).
        start_position: position (0-based, among the video's frames) of the first frame fed;
            detection is forced at every multiple of ``params.chunk_frames`` and of the
            re-detection interval, so a video fed whole or chunk by chunk gives the same
            features.

    After :meth:`run`: :attr:`detections` (frame numbers where the detector ran),
    :attr:`lost` (where tracking was lost), :attr:`problems` (no-face stretches).
    """

    def __init__(self, fps: float, params: LongVideoParams, detect: Detect, video: str = "video",
                 on_error: str = "raise", start_position: int = 0) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {list(ON_ERROR)}")
        self.fps, self.params, self.detect, self.video = float(fps), params, detect, video
        self.on_error, self.position = on_error, int(start_position)
        self.k, self.every = params.k(fps), params.redetect_every(fps)
        self.flow = _Flow(params.flow)
        self.detections: list[int] = []
        self.lost: list[int] = []
        self.problems: list[dict] = []
        self._matrix: np.ndarray | None = None
        self._matrix_id = 0
        self._landmarks: np.ndarray | None = None  # (68, 2) crop pixels
        self._prev: np.ndarray | None = None  # previous crop under the current matrix
        self._prev_number: int | None = None
        self._shape: tuple[int, ...] | None = None
        self._noface: list[int] | None = None  # [first, last] of the current stretch

    # -- landmarks
    def _detect(self, number: int, grey: np.ndarray) -> bool:
        self.detections.append(number)
        found = self.detect(number, grey)
        if found is None:
            self._matrix = self._landmarks = self._prev = None
            return False
        lm = np.asarray(found, np.float64)
        if lm.shape != (68, 2) or not np.isfinite(lm).all():
            raise LongVideoError(f"video {self.video} frame {number}: the detector gave "
                                 f"landmarks of shape {lm.shape} (need 68 finite points)")
        self._matrix = alignment_matrix(lm, self.params.size, self.params.margin)
        self._matrix_id += 1
        self._landmarks = transform_points(lm, self._matrix)
        return True

    def _track(self, crop: np.ndarray) -> bool:
        """Move the landmarks from the previous crop to ``crop``; False when tracking is lost."""
        pts = self._landmarks[list(TRACK_IDS)].astype(np.float32).reshape(-1, 1, 2)
        lk = {"winSize": (11, 11), "maxLevel": 2,
              "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03)}
        new, st, _ = cv2.calcOpticalFlowPyrLK(self._prev, crop, pts, None, **lk)
        if new is None:
            return False
        back, st2, _ = cv2.calcOpticalFlowPyrLK(crop, self._prev, new, None, **lk)
        if back is None:
            return False
        err = np.linalg.norm((back - pts).reshape(-1, 2), axis=1)
        good = (st.ravel() == 1) & (st2.ravel() == 1) & (err < self.params.track_error_px)
        if good.sum() < max(6, len(TRACK_IDS) // 2):
            return False
        src, dst = pts[good].reshape(-1, 2).astype(np.float64), new[good].reshape(-1, 2)
        m = _similarity(src, dst)
        resid = np.linalg.norm(transform_points(src, m) - dst, axis=1)
        inliers = resid < self.params.track_error_px  # one refit without the outliers
        if inliers.sum() < 6:
            return False
        m = _similarity(src[inliers], dst[inliers])
        self._landmarks = transform_points(self._landmarks, m)
        return True

    def _no_face(self, number: int, path: str) -> None:
        if self.on_error == "raise":
            where = f" ({path})" if path else ""
            raise LongVideoError(
                f"video {self.video}: no face found on frame {number}{where}; check the "
                "frames (the face must be visible), lower data.longvideo.min_confidence, or "
                "set data.on_error=skip to spot on the other frames (the stretch is listed in "
                "the prepare report)")
        if self._noface is not None and self._noface[1] == self._prev_number:
            self._noface[1] = number
        else:
            self._noface = [number, number]
            self.problems.append({"video": self.video, "frames": self._noface,
                                  "reason": "no face found"})

    def _own(self, number: int, grey: np.ndarray, path: str) -> _Pending:
        pos = self.position
        self.position += 1
        gap = self._prev_number is not None and number != self._prev_number + 1
        force = pos % self.every == 0 or pos % self.params.chunk_frames == 0 or gap
        crop = None
        if self._matrix is not None and not force:
            crop = warp(grey, self._matrix, self.params.size)
            if not self._track(crop):
                self.lost.append(number)
                crop = None
        if crop is None:
            if self._detect(number, grey):
                crop = warp(grey, self._matrix, self.params.size)
            else:
                self._no_face(number, path)
        self._prev_number = number
        self._prev = crop
        c = self.params.crop_size
        if crop is None:
            return _Pending(number, 0, None, None, None, np.zeros((c, c), np.uint8))
        small = cv2.resize(crop, (c, c), interpolation=cv2.INTER_AREA)
        return _Pending(number, self._matrix_id, self._matrix, crop, self._landmarks.copy(),
                        small)

    def _finish(self, p: _Pending, partner: np.ndarray | None) -> FrameFeatures:
        if partner is None or p.crop is None:
            return FrameFeatures(p.number, np.zeros((len(ROIS), 2), np.float32),
                                 np.zeros(2, np.float32), 0.0, p.small, False)
        flow = self.flow(p.crop, partner)
        if not np.isfinite(flow).all():
            raise LongVideoError(f"video {self.video}: optical flow from frame {p.number} to "
                                 f"{p.number + self.k} gave non-finite values; check the frames "
                                 "or use another data.longvideo.flow.method")
        rois, head, magnitude = roi_features(flow, p.landmarks)
        return FrameFeatures(p.number, rois, head, magnitude, p.small, True)

    def run(self, frames: Iterable[tuple[int, Any]],
            n_own: int | None = None) -> Iterator[FrameFeatures]:
        """Yield one :class:`FrameFeatures` per own frame, in order.

        Args:
            frames: ``(number, image)`` in increasing number order; ``image`` is a grey or BGR
                uint8 array, or a path (read with :func:`read_grey`).
            n_own: how many of them are this stream's own frames; the rest (up to k more) only
                serve as the t + k partners of the last ones (a chunk's look-ahead).
        """
        pending: deque[_Pending] = deque()
        last_number: int | None = None
        for i, (number, image) in enumerate(frames):
            number = int(number)
            if last_number is not None and number <= last_number:
                raise LongVideoError(f"video {self.video}: frame {number} comes after frame "
                                     f"{last_number}; frames must be fed in increasing order")
            last_number = number
            path = image if isinstance(image, str | os.PathLike) else ""
            grey = read_grey(str(image), self.video) if path else np.asarray(image)
            if grey.dtype != np.uint8 or grey.ndim not in (2, 3):
                raise LongVideoError(f"video {self.video}: frame {number} is a {grey.dtype} image "
                                     f"of shape {grey.shape}; frames must be 8-bit grey (H, W) "
                                     "or BGR (H, W, 3) images")
            if grey.ndim == 3:
                grey = cv2.cvtColor(grey, cv2.COLOR_BGR2GRAY)
            if self._shape is None:
                self._shape = grey.shape
            elif grey.shape != self._shape:
                raise LongVideoError(f"video {self.video}: frame {number} {path} is "
                                     f"{grey.shape[1]}x{grey.shape[0]}, the video's first frame "
                                     f"{self._shape[1]}x{self._shape[0]}; all frames of a video "
                                     "must have one size")
            own = n_own is None or i < n_own
            current = self._own(number, grey, str(path)) if own else None
            while pending and pending[0].number + self.k <= number:
                p = pending.popleft()
                partner = None
                if p.number + self.k == number and p.crop is not None:
                    if current is not None and current.matrix_id == p.matrix_id:
                        partner = current.crop
                    else:
                        partner = warp(grey, p.matrix, self.params.size)
                yield self._finish(p, partner)
            if current is not None:
                pending.append(current)
            elif not pending:
                return
        while pending:  # no frame t + k: the end of the video (or of the look-ahead)
            yield self._finish(pending.popleft(), None)


# ----------------------------------------------------------------------------- detectors

_DETECTOR_CACHE: dict[tuple, Any] = {}


def make_detect(spec: dict[str, Any]) -> Detect:
    """A ``detect(number, grey)`` function from a picklable spec.

    ``{"kind": "synthetic", "meta": <db folder>, "video": <name>}``: SynME-LV's landmarks;
    ``{"kind": "mediapipe", "min_confidence": 0.5}``: MediaPipe Face Mesh.
    """
    kind = spec["kind"]
    if kind == "synthetic":
        from mer.data.synthetic_lv import load_lv_meta, video_landmarks

        key = ("synthetic", str(spec["meta"]))
        if key not in _DETECTOR_CACHE:
            _DETECTOR_CACHE[key] = load_lv_meta(spec["meta"])
        meta = _DETECTOR_CACHE[key]
        if spec["video"] not in meta["videos"]:
            raise LongVideoError(f"{spec['meta']}: no SynME-LV video {spec['video']!r} in its "
                                 "meta.json; data.longvideo.detector=synthetic only works on "
                                 "SynME-LV")
        plan = meta["videos"][spec["video"]]["plan"]
        return lambda number, grey: video_landmarks(plan, number)
    if kind == "mediapipe":
        from mer.data.preprocess.face import make_detector

        key = ("mediapipe", float(spec.get("min_confidence", 0.5)))
        if key not in _DETECTOR_CACHE:
            _DETECTOR_CACHE[key] = make_detector("mediapipe", min_confidence=key[1])
        detector = _DETECTOR_CACHE[key]

        def detect(number: int, grey: np.ndarray) -> np.ndarray | None:
            face = detector(grey)
            return None if face is None else face.landmarks

        return detect
    raise ValueError(f"unknown detector kind {kind!r}; use one of {list(DETECTORS)}")


# ----------------------------------------------------------------------------- chunks and cache

_ARRAYS = ("flow", "head", "magnitude", "crops", "frame_numbers", "valid")


def _empty_arrays(n: int, params: LongVideoParams) -> dict[str, np.ndarray]:
    c = params.crop_size
    return {"flow": np.zeros((n, len(ROIS), 2), np.float32), "head": np.zeros((n, 2), np.float32),
            "magnitude": np.zeros(n, np.float32), "crops": np.zeros((n, c, c), np.uint8),
            "frame_numbers": np.zeros(n, np.int64), "valid": np.zeros(n, bool)}


def collect(features: Iterable[FrameFeatures], n: int,
            params: LongVideoParams) -> dict[str, np.ndarray]:
    """Stack ``n`` :class:`FrameFeatures` into the arrays of :class:`LongVideoFeatures`."""
    out = _empty_arrays(n, params)
    i = -1
    for i, f in enumerate(features):
        out["flow"][i], out["head"][i], out["magnitude"][i] = f.flow, f.head, f.magnitude
        out["crops"][i], out["frame_numbers"][i], out["valid"][i] = f.crop, f.number, f.valid
    if i + 1 != n:
        raise LongVideoError(f"expected {n} frames of features, got {i + 1}")
    return out


def iter_chunks(features: Iterable[FrameFeatures],
                params: LongVideoParams) -> Iterator[dict[str, np.ndarray]]:
    """Group a stream's :class:`FrameFeatures` into arrays of ``chunk_frames`` frames (the last
    chunk shorter): what a whole video streamed through one :class:`FeatureStream` gives,
    chunk by chunk, in memory bounded by one chunk (``scripts/bench_spotting.py``)."""
    buffer: list[FrameFeatures] = []
    for f in features:
        buffer.append(f)
        if len(buffer) == params.chunk_frames:
            yield collect(buffer, len(buffer), params)
            buffer = []
    if buffer:
        yield collect(buffer, len(buffer), params)


def _write_dir(final: Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write arrays (.npy) and ``info.json`` into a temporary folder renamed to ``final``."""
    from mer.data.io import describe_write_error

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "info.json").write_text(json.dumps(info))
        if final.exists():  # another process finished it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():
            return
        err = describe_write_error(final, e)
        raise (err or e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def chunk_dir(video_dir: Path, chunk: int) -> Path:
    return video_dir / f"chunk_{chunk:05d}"


def _chunk_work(task: dict[str, Any]) -> tuple[str, int, str | None, dict[str, Any]]:
    """Worker: compute one chunk and write it; errors travel back as text."""
    video_id, chunk = task["video_id"], task["chunk"]
    try:
        t0 = time.perf_counter()
        params = LongVideoParams(**task["params"])
        stream = FeatureStream(task["fps"], params, make_detect(task["detect"]), video_id,
                               task["on_error"], start_position=task["start"])
        frames = list(zip(task["numbers"], task["paths"], strict=True))
        arrays = collect(stream.run(frames, n_own=task["n_own"]), task["n_own"], params)
        info = {"chunk": chunk, "frames": [task["numbers"][0], task["numbers"][task["n_own"] - 1]],
                "detections": stream.detections, "lost": stream.lost,
                "problems": stream.problems, "seconds": time.perf_counter() - t0}
        _write_dir(Path(task["dir"]), arrays, info)
        return video_id, chunk, None, info
    except PreprocessError as e:
        return video_id, chunk, str(e), {}
    except (OSError, ValueError) as e:
        return video_id, chunk, f"{type(e).__name__}: {e}", {}


def _run_tasks(tasks: list[dict], workers: int) -> Iterator[tuple[str, int, str | None, dict]]:
    if workers <= 1 or len(tasks) <= 1:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # as in the workers: results do not depend on the worker count
        try:
            for task in tasks:
                yield _chunk_work(task)
        finally:
            cv2.setNumThreads(threads)
        return
    with image_pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(_chunk_work, tasks, chunksize=1)


@dataclass
class LongVideoFeatures:
    """Features of one long video (shapes in the module docstring).

    ``flow`` (T, R, 2) float32, ``head`` (T, 2) float32, ``magnitude`` (T,) float32,
    ``crops`` (T, C, C) uint8, ``frame_numbers`` (T,) int64, ``valid`` (T,) bool; ``fps``,
    ``k`` (flow from t to t + k), ``roi_names`` (R); ``problems``: stretches listed with their
    reason (``{"video", "frames": [first, last], "reason"}``).
    """

    video_id: str
    database: str
    subject: str
    video: str
    flow: np.ndarray
    crops: np.ndarray
    magnitude: np.ndarray
    head: np.ndarray
    valid: np.ndarray
    frame_numbers: np.ndarray
    fps: float
    k: int
    roi_names: list[str]
    problems: list[dict] = field(default_factory=list)
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.frame_numbers)


@dataclass
class LongVideoSet:
    """Output of :func:`prepare_long_videos`: the features and what happened."""

    features: dict[str, LongVideoFeatures]
    videos: pd.DataFrame
    intervals: pd.DataFrame
    problems: list[dict]  # frame stretches: gaps, no face
    excluded: list[dict]  # intervals left out (reader or long-video checks)
    warnings: list[dict]  # intervals kept but over frames without a face
    stats: dict[str, Any]
    synthetic: bool


def _video_key(params: LongVideoParams, frames: VideoFrames, fps: float, detect: dict) -> str:
    text = json.dumps({"params": params.key(), "frames": frames.fingerprint, "fps": fps,
                       "detector": detect["kind"], "version": VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _chunk_tasks(video: dict[str, Any], frames: VideoFrames, params: LongVideoParams,
                 vdir: Path, on_error: str, detect: dict) -> list[dict]:
    fps = float(video["fps"])
    k, n, size = params.k(fps), len(frames.numbers), params.chunk_frames
    tasks = []
    for c in range(math.ceil(n / size)):
        if (chunk_dir(vdir, c) / "info.json").exists():
            continue
        lo, hi = c * size, min(n, (c + 1) * size)
        last = frames.numbers[hi - 1]
        end = hi
        while end < n and frames.numbers[end] <= last + k:  # the look-ahead partners
            end += 1
        tasks.append({"video_id": video["video_id"], "chunk": c, "fps": fps,
                      "params": asdict(params), "detect": detect, "on_error": on_error,
                      "start": lo, "n_own": hi - lo, "numbers": frames.numbers[lo:end],
                      "paths": frames.paths[lo:end], "dir": str(chunk_dir(vdir, c))})
    return tasks


def _consolidate(vdir: Path, n_chunks: int, n: int, params: LongVideoParams,
                 info: dict[str, Any]) -> None:
    """Join the chunks into ``features/`` (streamed chunk by chunk into .npy memmaps)."""
    from numpy.lib.format import open_memmap

    final = vdir / "features"
    tmp = vdir / f".features.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        template = _empty_arrays(0, params)
        outs = {name: open_memmap(tmp / f"{name}.npy", mode="w+", dtype=arr.dtype,
                                  shape=(n, *arr.shape[1:])) for name, arr in template.items()}
        problems, detections, lost, seconds, at = [], 0, 0, 0.0, 0
        for c in range(n_chunks):
            cdir = chunk_dir(vdir, c)
            cinfo = json.loads((cdir / "info.json").read_text())
            length = None
            for name, out in outs.items():
                part = np.load(cdir / f"{name}.npy", mmap_mode="r")
                length = len(part) if length is None else length
                if len(part) != length or part.shape[1:] != out.shape[1:]:
                    raise LongVideoError(f"cache chunk {cdir} is damaged ({name}.npy has shape "
                                         f"{part.shape}); delete {cdir} and prepare again")
                out[at:at + length] = part
            at += length
            problems += cinfo["problems"]
            detections += len(cinfo["detections"])
            lost += len(cinfo["lost"])
            seconds += cinfo["seconds"]
        if at != n:
            raise LongVideoError(f"cache of {vdir}: the chunks hold {at} frames, the video {n}; "
                                 f"delete {vdir} and prepare again")
        for out in outs.values():
            out.flush()
        del outs
        merged = _merge_stretches(problems)
        (tmp / "info.json").write_text(json.dumps({
            **info, "n_frames": n, "chunks": n_chunks, "problems": merged,
            "detections": detections, "tracking_lost": lost, "compute_seconds": seconds}))
        if not final.exists():
            os.rename(tmp, final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for c in range(n_chunks):
        shutil.rmtree(chunk_dir(vdir, c), ignore_errors=True)


def _merge_stretches(problems: list[dict]) -> list[dict]:
    """Join no-face stretches that continue across a chunk boundary."""
    out: list[dict] = []
    for p in problems:
        if out and out[-1]["reason"] == p["reason"] and p["frames"][0] <= out[-1]["frames"][1] + 1:
            out[-1] = {**out[-1], "frames": [out[-1]["frames"][0], p["frames"][1]]}
        else:
            out.append(dict(p))
    return out


def _load_features(vdir: Path, video: dict[str, Any], params: LongVideoParams,
                   synthetic: bool) -> LongVideoFeatures:
    final = vdir / "features"
    info = json.loads((final / "info.json").read_text())
    arrays = {}
    for name in _ARRAYS:
        try:
            arrays[name] = np.load(final / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise LongVideoError(f"cache file {final / (name + '.npy')} cannot be read ({e}); "
                                 f"delete {vdir} and prepare again") from e
        if len(arrays[name]) != info["n_frames"]:
            raise LongVideoError(f"cache file {final / (name + '.npy')} holds "
                                 f"{len(arrays[name])} frames, not {info['n_frames']}; delete "
                                 f"{vdir} and prepare again")
    return LongVideoFeatures(
        video_id=video["video_id"], database=video["database"], subject=video["subject"],
        video=video["video"], flow=arrays["flow"], crops=arrays["crops"],
        magnitude=arrays["magnitude"], head=arrays["head"], valid=arrays["valid"],
        frame_numbers=arrays["frame_numbers"], fps=float(video["fps"]), k=params.k(video["fps"]),
        roi_names=list(info["roi_names"]), problems=info["problems"], synthetic=synthetic)


def _detect_spec(params: LongVideoParams, video: dict[str, Any]) -> dict[str, Any]:
    if params.detector == "synthetic":
        meta = video.get("synthetic_meta")
        if not meta:
            raise LongVideoError(f"video {video['video_id']}: data.longvideo.detector=synthetic "
                                 "needs SynME-LV (data=synme_lv); use mediapipe for real videos")
        return {"kind": "synthetic", "meta": meta, "video": video["video"]}
    return {"kind": "mediapipe", "min_confidence": params.min_confidence}


def prepare_videos(
    videos: pd.DataFrame, params: LongVideoParams, cache_dir: str | Path, workers: int = 0,
    on_error: str = "raise", progress: bool = True, synthetic: bool = False,
) -> tuple[dict[str, LongVideoFeatures], list[dict], dict[str, Any]]:
    """Features of every video of a video table, through the chunk cache.

    Args:
        videos: ``video_id, database, subject, video, frame_dir, fps`` (optional
            ``synthetic_meta``: the SynME-LV database folder, for ``detector=synthetic``).
        params: :class:`LongVideoParams`; cache_dir: ``<cache_dir>/longvideo/`` holds the cache.
        workers: processes over chunks (0/1: this process; results do not depend on it).
        on_error: ``raise`` or ``skip`` (gaps and no-face stretches listed, frames invalid).

    Returns:
        ({video_id: LongVideoFeatures}, problems, stats: chunks computed / cached, frames,
        seconds, frames per second of the computing).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {list(ON_ERROR)}")
    t0 = time.perf_counter()
    root = Path(cache_dir) / "longvideo"
    problems: list[dict] = []
    jobs, tasks = [], []
    for video in videos.to_dict("records"):
        frames = list_frames(video["frame_dir"])
        for a, b in frames.gaps:
            reason = (f"frames {a}..{b} missing in {frames.frame_dir} (the numbering jumps "
                      f"from {a - 1} to {b + 1})")
            if on_error == "raise":
                raise LongVideoError(
                    f"video {video['video_id']}: {reason}; re-extract the missing frames, or set "
                    "data.on_error=skip to use the frames present (the gap is listed in the "
                    "prepare report)")
            problems.append({"video": video["video_id"], "frames": [a, b],
                             "reason": "frames missing (gap in the numbering)"})
        detect = _detect_spec(params, video)
        key = _video_key(params, frames, float(video["fps"]), detect)
        vdir = root / str(video["database"]) / f"{video['video']}-{key[:16]}"
        n_chunks = math.ceil(len(frames.numbers) / params.chunk_frames)
        jobs.append((video, frames, vdir, n_chunks))
        if not (vdir / "features" / "info.json").exists():
            tasks += _chunk_tasks(video, frames, params, vdir, on_error, detect)
    total = sum(len(j[1].numbers) for j in jobs)
    computed_frames = sum(t["n_own"] for t in tasks)
    t1 = time.perf_counter()
    columns = [TextColumn("[bold]prepare long videos"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, disable=not progress or not tasks) as bar:
        job = bar.add_task("chunks", total=len(tasks))
        for video_id, chunk, error, _ in _run_tasks(tasks, workers):
            if error is not None:
                raise LongVideoError(error if video_id in error else
                                     f"video {video_id} chunk {chunk}: {error}")
            bar.advance(job)
    t2 = time.perf_counter()
    features = {}
    for video, frames, vdir, n_chunks in jobs:
        if not (vdir / "features" / "info.json").exists():
            _consolidate(vdir, n_chunks, len(frames.numbers), params, {
                "video_id": video["video_id"], "roi_names": ROI_NAMES,
                "fps": float(video["fps"]), "k": params.k(video["fps"]),
                "params": json.loads(params.key())})
        feats = _load_features(vdir, video, params, synthetic)
        if feats.problems and on_error == "raise":
            p = feats.problems[0]
            raise LongVideoError(
                f"video {video['video_id']}: {p['reason']} on frames {p['frames'][0]}.."
                f"{p['frames'][1]} (found by an earlier prepare with data.on_error=skip); fix "
                f"the frames, or keep data.on_error=skip (delete {vdir} to compute again)")
        problems += feats.problems
        features[video["video_id"]] = feats
    stats = {"videos": len(jobs), "frames": total, "chunks_computed": len(tasks),
             "chunks_total": sum(j[3] for j in jobs), "frames_computed": computed_frames,
             "seconds": {"list": t1 - t0, "compute": t2 - t1, "load": time.perf_counter() - t2},
             "frames_per_second": computed_frames / (t2 - t1) if computed_frames else None,
             "cache": str(root)}
    return features, problems, stats


# ----------------------------------------------------------------------------- intervals


def check_intervals(
    intervals: pd.DataFrame, videos: pd.DataFrame, on_error: str = "raise",
) -> tuple[pd.DataFrame, list[dict]]:
    """Checks of the ground truth the readers cannot make (they see rows, not videos).

    Refused: an interval overlapping an earlier one of the same video (sorted by onset), an
    interval over frames missing from the video folder. Under ``raise`` a
    :class:`LongVideoError` naming the video, the frames and the sheet rows; under ``skip``
    the interval is left out and listed (``{"database", "subject", "clip", "reason"}``).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {list(ON_ERROR)}")
    if "gaps" in videos:
        gaps = dict(zip(videos["video_id"], videos["gaps"], strict=True))
    else:
        gaps = {v: list_frames(d).gaps for v, d in zip(videos["video_id"], videos["frame_dir"],
                                                           strict=True)}
    keep, excluded = [], []
    table = intervals.sort_values(["video_id", "onset", "offset"], kind="stable")
    last: dict[str, Any] = {}
    for idx, r in zip(table.index, table.to_dict("records"), strict=True):
        problem = ""
        prev = last.get(r["video_id"])
        if prev is not None and r["onset"] <= prev["offset"]:
            problem = (f"interval {r['onset']}..{r['offset']} (sheet row {r['row']}) overlaps "
                       f"interval {prev['onset']}..{prev['offset']} (sheet row {prev['row']})")
        for a, b in gaps.get(r["video_id"], []):
            if not problem and a <= r["offset"] and r["onset"] <= b:
                problem = (f"interval {r['onset']}..{r['offset']} (sheet row {r['row']}) covers "
                           f"missing frames {a}..{b}")
        if problem:
            if on_error == "raise":
                raise LongVideoError(
                    f"video {r['video_id']}: {problem}; fix the annotation sheet or the frames, "
                    "or set data.on_error=skip to leave the interval out (it is listed in the "
                    "report)")
            excluded.append({"database": r["database"], "subject": r["subject"],
                             "clip": r["video"], "reason": f"{r['video_id']}: {problem}"})
            continue
        keep.append(idx)
        last[r["video_id"]] = r
    kept_set = set(keep)
    kept = intervals.loc[[i for i in intervals.index if i in kept_set]]
    return kept.reset_index(drop=True), excluded


def faceless_intervals(intervals: pd.DataFrame, problems: list[dict]) -> list[dict]:
    """Intervals (kept) that overlap a stretch without a face: a spotter cannot see them."""
    out = []
    for r in intervals.to_dict("records"):
        for p in problems:
            a, b = p["frames"]
            if p["video"] == r["video_id"] and a <= r["offset"] and r["onset"] <= b:
                out.append({"video": r["video_id"], "frames": [int(r["onset"]), int(r["offset"])],
                            "reason": f"interval (sheet row {r['row']}) over frames {a}..{b}: "
                                      f"{p['reason']}; kept (a spotter that misses it is "
                                      "scored as missing it)"})
                break
    return out


# ----------------------------------------------------------------------------- data configs


def is_long_video(data_cfg: Any) -> bool:
    """Whether ``mer.prepare`` prepares this data config as long videos: SynME-LV, or any
    config with ``long_videos: true`` (a real CAS(ME)^2 / SAMM-LV for spotting)."""
    return data_cfg.get("kind") == "synme_lv" or bool(data_cfg.get("long_videos", False))


def prepare_long_videos(data_cfg: Any, cache_dir: str | Path, workers: int | None = None,
                        on_error: str | None = None, progress: bool = True) -> LongVideoSet:
    """Intervals, videos and features of a long-video data config (computing what is missing).

    ``workers`` defaults to ``data.workers``, ``on_error`` to ``data.on_error``.
    """
    from mer.data.sources import data_workers, load_intervals

    on_error = on_error or data_cfg.get("on_error", "raise")
    workers = data_workers(data_cfg) if workers is None else workers
    params = LongVideoParams.from_data_cfg(data_cfg)
    lv = load_intervals(data_cfg, cache_dir)
    features, problems, stats = prepare_videos(lv.videos, params, cache_dir, workers, on_error,
                                               progress, lv.synthetic)
    warnings = faceless_intervals(lv.intervals, problems)
    return LongVideoSet(features, lv.videos, lv.intervals, problems, lv.excluded, warnings,
                        stats, lv.synthetic)


def load_long_video_features(data_cfg: Any, cache_dir: str | Path) -> dict[str, LongVideoFeatures]:
    """``{video_id: LongVideoFeatures}`` of a long-video data config (prepared if missing)."""
    return prepare_long_videos(data_cfg, cache_dir).features


def config_id(data_cfg: Any) -> str:
    """Short hash naming what a long-video data config prepares."""
    d = _plain(data_cfg) if not isinstance(data_cfg, dict) else dict(data_cfg)
    d = {k: v for k, v in d.items() if k not in ("batch_size", "shuffle", "workers", "on_error",
                                                 "label_scheme", "families", "prepared")}
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return f"{d.get('name', 'data')}-lv-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def build_report(lv: LongVideoSet, data_cfg: Any, seconds: float) -> dict[str, Any]:
    """The prepare report of a long-video data config."""
    counts: dict[str, dict[str, int]] = {}
    for db, kind in zip(lv.intervals["database"], lv.intervals["type"], strict=True):
        row = counts.setdefault(str(db), {"micro": 0, "macro": 0})
        row[str(kind)] = row.get(str(kind), 0) + 1
    videos = []
    for v in lv.videos.to_dict("records"):
        f = lv.features[v["video_id"]]
        videos.append({"video_id": v["video_id"], "subject": v["subject"], "fps": f.fps,
                       "k": f.k, "frames": len(f), "valid_frames": int(np.sum(f.valid))})
    return {"kind": "long_videos", "data": str(data_cfg.get("name")),
            "config_id": config_id(data_cfg), "synthetic": lv.synthetic,
            "params": json.loads(LongVideoParams.from_data_cfg(data_cfg).key()),
            "roi_names": ROI_NAMES, "videos": videos, "intervals": counts,
            "problems": lv.problems, "excluded": lv.excluded, "warnings": lv.warnings,
            "stats": lv.stats, "seconds": {"total": seconds}}


def report_markdown(report: dict[str, Any]) -> str:
    """The long-video prepare report as a short markdown page."""
    st = report["stats"]
    fps = st.get("frames_per_second")
    lines = [f"# Prepare report: {report['data']} (long videos)", "",
             f"{st['videos']} videos, {st['frames']} frames; chunks computed "
             f"{st['chunks_computed']} of {st['chunks_total']}"
             + (f" at {fps:.0f} frames/s" if fps else "")
             + (" (synthetic data: SynME-LV)" if report["synthetic"] else "") + ".", "",
             "## Intervals", "", "| database | micro | macro |", "|---|---|---|"]
    for db, row in report["intervals"].items():
        lines.append(f"| {db} | {row.get('micro', 0)} | {row.get('macro', 0)} |")
    lines += ["", "## Videos", "", "| video | subject | fps | k | frames | valid |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {v['video_id']} | {v['subject']} | {v['fps']:g} | {v['k']} | {v['frames']} | "
              f"{v['valid_frames']} |" for v in report["videos"]]
    for title, key in (("Frame stretches left out", "problems"),
                       ("Intervals excluded", "excluded"), ("Warnings", "warnings")):
        items = report[key]
        lines += ["", f"## {title} ({len(items)})", ""]
        if not items:
            lines.append("None.")
        for e in items:
            where = e.get("video") or f"{e.get('database')}/{e.get('clip')}"
            frames = f" frames {e['frames'][0]}..{e['frames'][1]}" if "frames" in e else ""
            lines.append(f"- {where}{frames}: {str(e['reason']).replace(chr(10), ' ')}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: str | Path) -> Path:
    """``prepare_report.json`` and ``.md`` into ``folder`` (atomically); the JSON path."""
    from mer.data.io import atomic_write_json, atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / f"{REPORT_NAME}.md", report_markdown(report))
    atomic_write_json(folder / f"{REPORT_NAME}.json", report, indent=1, default=str)
    return folder / f"{REPORT_NAME}.json"


def prepare_report(data_cfg: Any, cache_dir: str | Path,
                   out_dir: str | Path | None = None) -> dict[str, Any]:
    """Prepare a long-video data config; write the report into ``out_dir`` and next to the
    cache (``<cache_dir>/longvideo/runs/<config_id>/``); return it."""
    t0 = time.perf_counter()
    lv = prepare_long_videos(data_cfg, cache_dir)
    report = build_report(lv, data_cfg, time.perf_counter() - t0)
    if out_dir is not None:
        write_report(report, out_dir)
    write_report(report, Path(cache_dir) / "longvideo" / "runs" / report["config_id"])
    return report

