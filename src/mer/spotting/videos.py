"""Long videos as spotters see them: per-frame features plus the ground-truth intervals.

A :class:`SpotVideo` is one video's long-video features (``mer.data.preprocess.longvideo``:
ROI flow between frame t and t+k with head motion removed, small grey face crops, whole-face
magnitude) and its annotated intervals. Spotters work on *positions* 0..T-1; the frames they
stand for are ``frame_numbers`` (a position may stand for ``block`` frames after
:func:`resample`). Ground truths and predictions are in frame numbers, inclusive.

:func:`load_videos` builds them from a data config through the data layer's
``load_intervals`` and ``load_long_video_features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

GT_COLUMNS = ["onset", "apex", "offset", "type", "emotion", "aus", "row"]


class SpotDataError(ValueError):
    """Long-video data that spotting cannot use; the message names the video and the fix."""


@dataclass
class SpotVideo:
    """One long video for spotting.

    Attributes:
        video: unique id (``<database>/<video>``).
        database, subject: where it comes from; ``subject_key`` = ``<database>/<subject>``.
        fps: frames per second of ``frame_numbers``' source video.
        k: flow step in positions (flow[t] is the motion from position t to t + k).
        frame_numbers: (T,) int64 first frame number of each position, increasing.
        flow: (T, R, 2) float32 ROI mean flow (u, v), head motion removed.
        crops: (T, H, W) uint8 grey face crops, or None.
        magnitude: (T,) float32 whole-face motion magnitude.
        roi_names: R names.
        gt: ground-truth intervals (``GT_COLUMNS``), frame numbers inclusive.
        block: frames each position stands for (1 unless resampled).
        frame_dir: the video's frame folder ("" for features without frames on disk).
        valid: (T,) bool, False where no face was found (None: all valid).
    """

    video: str
    database: str
    subject: str
    fps: float
    k: int
    frame_numbers: np.ndarray
    flow: np.ndarray
    crops: np.ndarray | None
    magnitude: np.ndarray
    roi_names: list[str]
    gt: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=GT_COLUMNS))
    block: int = 1
    frame_dir: str = ""
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        t = len(self.frame_numbers)
        if self.flow.ndim != 3 or self.flow.shape[0] != t or self.flow.shape[2] != 2:
            raise SpotDataError(f"video {self.video}: flow {self.flow.shape} is not (T={t}, R, 2)"
                                "; re-run python -m mer.prepare for it")
        if len(self.magnitude) != t or (self.crops is not None and len(self.crops) != t):
            raise SpotDataError(f"video {self.video}: magnitude/crops lengths differ from the "
                                f"{t} frame numbers; re-run python -m mer.prepare for it")
        if t and np.any(np.diff(self.frame_numbers) <= 0):
            i = int(np.nonzero(np.diff(self.frame_numbers) <= 0)[0][0])
            raise SpotDataError(f"video {self.video}: frame numbers not increasing at position "
                                f"{i + 1} ({self.frame_numbers[i]} -> "
                                f"{self.frame_numbers[i + 1]})")

    @property
    def subject_key(self) -> str:
        return f"{self.database}/{self.subject}"

    @property
    def length(self) -> int:
        return len(self.frame_numbers)

    @property
    def last_frame(self) -> int:
        return int(self.frame_numbers[-1]) + self.block - 1

    def positions(self, frames: np.ndarray | list[int]) -> np.ndarray:
        """Position of each frame number (the position whose block holds it)."""
        pos = np.searchsorted(self.frame_numbers, np.asarray(frames), side="right") - 1
        return pos.clip(0, self.length - 1)

    def frames(self, start: int, end: int) -> tuple[int, int]:
        """Frame interval ``[onset, offset]`` (inclusive) of positions ``start..end``."""
        start, end = max(0, int(start)), min(self.length - 1, int(end))
        return int(self.frame_numbers[start]), int(self.frame_numbers[end]) + self.block - 1


def resample(video: SpotVideo, target_fps: float | None) -> SpotVideo:
    """The video at about ``target_fps`` positions per second: blocks of
    ``round(fps / target_fps)`` frames, flow and magnitude averaged over a block, the first
    crop kept. ``None`` or a rate at or above ``fps``: the video itself."""
    if not target_fps or video.fps <= target_fps * 1.5:
        return video
    s = int(round(video.fps / target_fps))
    n = video.length // s
    if n < 2:
        return video

    def pool(a: np.ndarray) -> np.ndarray:
        return a[: n * s].reshape(n, s, *a.shape[1:]).mean(axis=1).astype(a.dtype)

    return replace(video, fps=video.fps / s, k=max(1, int(round(video.k / s))),
                   frame_numbers=video.frame_numbers[: n * s: s].copy(), flow=pool(video.flow),
                   magnitude=pool(video.magnitude),
                   crops=None if video.crops is None else video.crops[: n * s: s].copy(),
                   block=video.block * s, valid=None if video.valid is None else
                   video.valid[: n * s].reshape(n, s).all(axis=1))


def frame_features(video: SpotVideo) -> np.ndarray:
    """(T, 2R + 1) float32 per-position vector: ROI flow (u, v) and the face magnitude."""
    t = video.length
    return np.concatenate([video.flow.reshape(t, -1), video.magnitude.reshape(t, 1)],
                          axis=1).astype(np.float32)


def gaussian_targets(video: SpotVideo, types: tuple[str, ...] = ("micro", "macro"),
                     width: float = 0.25) -> np.ndarray:
    """(T, len(types)) apex-score targets: for each ground truth a pseudo-Gaussian peaking at 1
    on its apex position, sigma = ``width`` x its length in positions, zero outside
    ``[onset, offset]``; overlapping ones take the maximum."""
    y = np.zeros((video.length, len(types)), dtype=np.float32)
    pos = np.arange(video.length)
    for r in video.gt.itertuples():
        if r.type not in types:
            continue
        on, ap, off = video.positions([r.onset, r.apex if r.apex >= 0 else
                                       (r.onset + r.offset) // 2, r.offset])
        sigma = max(1.0, width * (off - on + 1))
        g = np.exp(-0.5 * ((pos[on: off + 1] - ap) / sigma) ** 2)
        c = types.index(r.type)
        y[on: off + 1, c] = np.maximum(y[on: off + 1, c], g)
    return y


def expected_lengths(videos: list[SpotVideo]) -> dict[str, dict[str, float]]:
    """Per type, the median onset->apex and apex->offset durations in seconds of the
    ground truths of ``videos`` (training subjects only), and how many there were. A type
    without any falls back to typical values (micro 0.15 + 0.2 s, macro 0.6 + 0.9 s)."""
    # ground truths are in the source video's frames: its rate is fps * block
    rows = [(r.type, (r.apex - r.onset) / (v.fps * v.block), (r.offset - r.apex) /
             (v.fps * v.block)) for v in videos for r in v.gt.itertuples() if r.apex >= 0]
    out = {}
    for kind, default in (("micro", (0.15, 0.2)), ("macro", (0.6, 0.9))):
        d = np.array([(a, b) for t, a, b in rows if t == kind])
        out[kind] = ({"before_s": float(np.median(d[:, 0])), "after_s": float(np.median(d[:, 1])),
                      "n": len(d)} if len(d) else
                     {"before_s": default[0], "after_s": default[1], "n": 0})
    return out


def load_videos(data_cfg, cache_dir: str | Path) -> tuple[list[SpotVideo], dict]:
    """The long videos of a data config with their ground truths, and the provenance
    (``synthetic``; ``excluded``: intervals left out with the reason; ``problems``: frame
    stretches without a face or missing).

    Uses ``mer.data.sources.load_intervals`` (interval table and videos) and
    ``mer.data.preprocess.longvideo.load_long_video_features`` (features per video, prepared
    on first use)."""
    from mer.data.preprocess.longvideo import load_long_video_features
    from mer.data.sources import load_intervals

    tables = load_intervals(data_cfg, Path(cache_dir))
    features = load_long_video_features(data_cfg, Path(cache_dir))
    provenance = {**dict(tables.provenance), "synthetic": bool(tables.synthetic),
                  "excluded": list(tables.excluded),
                  "problems": [p for f in features.values() for p in (f.problems or [])]}
    return assemble(tables.intervals, tables.videos, features), provenance


def video_id(database: str, video: str) -> str:
    return f"{database}/{video}"


def assemble(intervals: pd.DataFrame, video_table: pd.DataFrame,
             features: dict) -> list[SpotVideo]:
    """SpotVideos from the interval table, the video table (``database, subject, video``,
    ``fps``) and the features keyed by video id (``<database>/<video>`` or the bare video)."""
    out = []
    for v in video_table.itertuples():
        vid = video_id(v.database, v.video)
        f = features.get(vid, features.get(v.video))
        if f is None:
            raise SpotDataError(f"video {vid}: no long-video features; run python -m "
                                "mer.prepare with this data config first")
        gt = intervals[(intervals["database"] == v.database) & (intervals["video"] == v.video)]
        gt = gt.reindex(columns=GT_COLUMNS).reset_index(drop=True)
        gt["apex"] = gt["apex"].fillna(-1).astype(int)
        last = int(f.frame_numbers[-1])
        late = gt[gt["offset"] > last]
        if len(late):
            r = late.iloc[0]
            raise SpotDataError(f"video {vid}: interval (sheet row {r['row']}) ends at frame "
                                f"{r['offset']} but the features stop at frame {last}; "
                                "re-run python -m mer.prepare or fix the sheet")
        out.append(SpotVideo(
            video=vid, database=str(v.database), subject=str(v.subject), fps=float(f.fps),
            k=int(f.k), frame_numbers=np.asarray(f.frame_numbers, dtype=np.int64),
            flow=np.asarray(f.flow, dtype=np.float32), crops=None if f.crops is None else
            np.asarray(f.crops), magnitude=np.asarray(f.magnitude, dtype=np.float32),
            roi_names=list(f.roi_names), gt=gt, frame_dir=str(getattr(v, "frame_dir", "") or ""),
            valid=None if getattr(f, "valid", None) is None else np.asarray(f.valid, bool)))
    return out
