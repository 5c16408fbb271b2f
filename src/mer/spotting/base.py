"""What every spotter shares: fit on training subjects, per-position scores, peaks -> intervals.

A spotter scores each position of a video for each expression type (micro, macro), then
:func:`peak_intervals` turns the peaks above a threshold into intervals ``[peak - before,
peak + after]``, where before/after are the median onset->apex and apex->offset durations of
the training subjects' ground truths (:func:`mer.spotting.videos.expected_lengths`), taken at
the video's frame rate. The threshold of each type is the one with the best pooled F1 on
training subjects (:func:`select_thresholds`): learned spotters carve validation subjects out
of the training subjects for it (``val_subjects``), MDMD uses all of them. Nothing about the
test subject is looked at before :meth:`Spotter.spot`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.signal import find_peaks

from mer.registry import Registry
from mer.spotting.matching import counts, f1_of, match_intervals
from mer.spotting.videos import SpotVideo, expected_lengths, resample

TYPES = ("micro", "macro")
# name -> spotter class. Each spotter file registers its class (``@register_spotter``);
# :mod:`mer.spotting.registry` imports them all (not done here: config checks import this
# package and must stay light).
SPOTTERS: Registry[type] = Registry("spotter", hint="spotting=<name>, conf/spotting/<name>.yaml")


def register_spotter(name: str):
    """Class decorator adding a spotter to :data:`SPOTTERS` under ``name`` (``cls.name``)."""

    def add(cls: type) -> type:
        SPOTTERS.register(name, cls)
        cls.name = name
        return cls

    return add
PRED_COLUMNS = ["video", "database", "subject", "onset", "apex", "offset", "score", "type"]


def peak_intervals(score: np.ndarray, threshold: float, before: int, after: int,
                   distance: int | None = None) -> list[tuple[int, int, int, float]]:
    """Intervals around the peaks of a 1-D score.

    Args:
        score: (T,) per-position score.
        threshold: a peak counts when its height is >= this.
        before, after: positions taken before and after the peak.
        distance: least distance between two peaks (default ``before + after``, so that
            intervals of one type barely overlap).

    Returns:
        ``[(start, end, peak, height)]`` in positions, clipped to ``[0, T - 1]``.
    """
    score = np.asarray(score, dtype=np.float64)
    if len(score) == 0:
        return []
    # pad so that a peak on the first or last position is found too
    padded = np.concatenate([[-np.inf], score, [-np.inf]])
    peaks, props = find_peaks(padded, height=threshold,
                              distance=max(1, distance or before + after))
    out = []
    for p, h in zip(peaks - 1, props["peak_heights"]):
        out.append((max(0, p - before), min(len(score) - 1, p + after), int(p), float(h)))
    return out


def split_subjects(videos: list[SpotVideo], fraction: float, seed: int
                   ) -> tuple[list[SpotVideo], list[SpotVideo]]:
    """(fit, validation) videos: per database ``ceil(fraction * subjects)`` subjects held out
    for choosing thresholds (none when a database has one subject, or ``fraction`` is 0)."""
    rng = np.random.default_rng(seed)
    val_keys: set[str] = set()
    for db in sorted({v.database for v in videos}):
        keys = sorted({v.subject_key for v in videos if v.database == db})
        n = min(len(keys) - 1, math.ceil(fraction * len(keys))) if fraction > 0 else 0
        if n > 0:
            val_keys |= set(rng.choice(keys, size=n, replace=False).tolist())
    fit = [v for v in videos if v.subject_key not in val_keys]
    val = [v for v in videos if v.subject_key in val_keys]
    return fit, val


class Spotter:
    """Base class: ``fit(train videos)`` then ``spot(video)`` / ``scores(video)``.

    Subclasses implement :meth:`_scores` (per-position scores, (T, 2): micro, macro) and,
    when they learn, :meth:`_train`. ``params`` holds what was chosen on training subjects.
    """

    name = "spotter"
    learned = False
    threshold_mode = "absolute"   # "relative": threshold = mean + p (max - mean) per video

    def __init__(self, seed: int = 0, target_fps: float | None = 30.0,
                 thresholds: list[float] | None = None, val_subjects: float = 0.25,
                 types: list[str] | tuple[str, ...] = TYPES) -> None:
        self.seed = int(seed)
        self.target_fps = target_fps
        self.candidates = [float(t) for t in (thresholds or np.round(
            np.linspace(0.05, 0.95, 19), 3))]
        self.val_subjects = float(val_subjects)
        self.types = tuple(types)
        bad = [t for t in self.types if t not in TYPES]
        if bad:
            raise ValueError(f"spotting types {bad}: use micro and/or macro")
        self.params: dict = {}
        self.fitted = False

    # -- to implement -------------------------------------------------------------------------

    def _train(self, videos: list[SpotVideo]) -> dict:
        """Learn from ``videos`` (training subjects); returns a summary for the report."""
        return {}

    def _scores(self, video: SpotVideo) -> np.ndarray:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------------

    def prepare(self, video: SpotVideo) -> SpotVideo:
        return resample(video, self.target_fps)

    def fit(self, videos: list[SpotVideo]) -> Spotter:
        """Learn and choose every threshold and peak parameter on ``videos`` only."""
        if not videos:
            raise ValueError(f"{self.name}: no training videos")
        videos = [self.prepare(v) for v in videos]
        self.lengths = expected_lengths(videos)
        fit, val = (split_subjects(videos, self.val_subjects, self.seed) if self.learned
                    else (videos, videos))
        if not val:
            val = fit  # one training subject per database: thresholds chosen in-sample
        summary = self._train(fit) if self.learned else {}
        self.thresholds, selection = select_thresholds(self, val)
        self.params = {
            "lengths": self.lengths, "thresholds": self.thresholds, "selection": selection,
            "fit_subjects": sorted({v.subject_key for v in fit}),
            "threshold_subjects": sorted({v.subject_key for v in val}),
            "threshold_mode": self.threshold_mode, **({"training": summary} if summary else {}),
        }
        self.fitted = True
        return self

    def scores(self, video: SpotVideo) -> tuple[SpotVideo, np.ndarray]:
        """The resampled video and its (T, 2) per-position scores (micro, macro)."""
        v = self.prepare(video)
        return v, np.asarray(self._scores(v), dtype=np.float64)

    def extent(self, video: SpotVideo, kind: str) -> tuple[int, int]:
        """(before, after) in positions of ``video`` for an interval of type ``kind``."""
        ln = self.lengths[kind]
        return (max(1, int(round(ln["before_s"] * video.fps))),
                max(1, int(round(ln["after_s"] * video.fps))))

    def intervals(self, video: SpotVideo, score: np.ndarray,
                  thresholds: dict[str, float]) -> pd.DataFrame:
        """Predicted intervals (``PRED_COLUMNS``, frame numbers) of a resampled video."""
        rows = []
        for c, kind in enumerate(TYPES):
            if kind not in self.types:
                continue
            s = score[:, c]
            thr = thresholds[kind]
            if self.threshold_mode == "relative":
                thr = float(s.mean() + thr * (s.max() - s.mean())) if len(s) else thr
            before, after = self.extent(video, kind)
            for start, end, peak, h in peak_intervals(s, thr, before, after):
                onset, offset = video.frames(start, end)
                rows.append([video.video, video.database, video.subject, onset,
                             int(video.frame_numbers[peak]), offset, h, kind])
        return pd.DataFrame(rows, columns=PRED_COLUMNS)

    def spot(self, video: SpotVideo) -> pd.DataFrame:
        """Predicted intervals of one (test) video."""
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit() on training videos before spot()")
        v, s = self.scores(video)
        return self.intervals(v, s, self.thresholds)


def threshold_counts(spotter: Spotter, videos: list[SpotVideo]) -> dict[str, np.ndarray]:
    """Per type, (candidates, 3) int array of ``(tp, n_pred, n_gt)`` summed over ``videos``
    for each candidate threshold: all that choosing a threshold needs (a federated lab sends
    these counts, never its videos)."""
    scored = [spotter.scores(v) for v in videos]
    out = {kind: np.zeros((len(spotter.candidates), 3), dtype=np.int64) for kind in TYPES}
    for i, thr in enumerate(spotter.candidates):
        for v, s in scored:
            pred = spotter.intervals(v, s, {t: thr for t in TYPES})
            for kind in TYPES:
                p = pred[pred["type"] == kind]
                g = v.gt[v.gt["type"] == kind]
                tp = len(match_intervals(p[["onset", "offset"]].to_numpy(),
                                         g[["onset", "offset"]].to_numpy()))
                out[kind][i] += (tp, len(p), len(g))
    return out


def best_thresholds(candidates: list[float], totals: dict[str, np.ndarray]
                    ) -> tuple[dict[str, float], dict]:
    """Per type, the candidate with the best pooled F1 of ``totals`` (:func:`threshold_counts`,
    possibly summed over labs); ties go to the higher threshold (fewer false positives).
    Returns (thresholds, {type: [(threshold, f1)]})."""
    best, table = {}, {}
    for kind in TYPES:
        f1 = [f1_of(counts(int(n_pred), int(n_gt), int(tp))) for tp, n_pred, n_gt in totals[kind]]
        top = max(f1)
        best[kind] = max(t for t, f in zip(candidates, f1) if f == top)
        table[kind] = [(float(t), round(f, 4)) for t, f in zip(candidates, f1)]
    return best, table


def select_thresholds(spotter: Spotter, videos: list[SpotVideo]) -> tuple[dict, dict]:
    """Per type, the candidate threshold with the best pooled F1 on ``videos``."""
    return best_thresholds(spotter.candidates, threshold_counts(spotter, videos))
