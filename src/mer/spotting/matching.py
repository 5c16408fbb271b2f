"""MEGC interval evaluation: IoU matching, TP/FP/FN and precision, recall, F1 tables.

The protocol of the MEGC spotting challenges (MEGC2019-2025):

- Intervals are frame intervals **inclusive at both ends**: ``[onset, offset]`` holds
  ``offset - onset + 1`` frames. IoU of a prediction ``P`` and a ground truth ``G``::

      |P ∩ G| / |P ∪ G|  =  inter / (len(P) + len(G) - inter),
      inter = max(0, min(P.offset, G.offset) - max(P.onset, G.onset) + 1)

  (MEGC writes it ``(W_spotted ∩ W_GT) / (W_spotted ∪ W_GT) >= k`` with ``k = 0.5``.)
- A prediction is a true positive when its IoU with a ground truth is ``>= 0.5``; each ground
  truth is matched at most once and each prediction at most once. Where several pairings are
  possible (a prediction overlapping two ground truths, two predictions on one), the matching
  is a **maximum** one (the most TPs; among those, the largest summed IoU), found by
  :func:`match_intervals` (an assignment problem, solved exactly).
- ``FP = predictions - TP``, ``FN = ground truths - TP``. Micro- and macro-expressions are
  evaluated apart (micro predictions against micro ground truths, macro against macro);
  ``all`` adds their counts. Tables are *pooled*: counts summed over videos, then
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
  ``F1 = 2 TP / (2 TP + FP + FN)`` (MEGC's overall figure), per video, per database and
  overall. A ratio with a zero denominator (no prediction, no ground truth) is ``None``: it is
  undefined, not 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLD = 0.5
TYPES = ("micro", "macro")
SCOPES = TYPES + ("all",)


class IntervalError(ValueError):
    """An interval that cannot be evaluated (onset after offset, a non-integer frame...)."""


def _as_intervals(intervals: Sequence | np.ndarray, what: str) -> np.ndarray:
    """(N, 2) int64 array of ``[onset, offset]`` rows, checked."""
    arr = np.asarray(intervals, dtype=np.float64).reshape(-1, 2) if len(intervals) else \
        np.zeros((0, 2))
    if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
        bad = int(np.nonzero(~np.isfinite(arr).all(1) | (arr != np.round(arr)).any(1))[0][0])
        raise IntervalError(f"{what} interval {bad} {arr[bad].tolist()}: frames must be whole "
                            "numbers; round the spotter's output to frames")
    arr = arr.astype(np.int64)
    bad = np.nonzero(arr[:, 0] > arr[:, 1])[0]
    if len(bad):
        i = int(bad[0])
        raise IntervalError(f"{what} interval {i} [{arr[i, 0]}, {arr[i, 1]}]: onset after "
                            "offset; swap them or drop the interval")
    return arr


def iou_matrix(pred: Sequence | np.ndarray, gt: Sequence | np.ndarray) -> np.ndarray:
    """IoU of every prediction with every ground truth, frames inclusive.

    Args:
        pred: (P, 2) ``[onset, offset]`` frame numbers.
        gt: (G, 2) the same.

    Returns:
        (P, G) float64 in [0, 1].
    """
    p, g = _as_intervals(pred, "predicted"), _as_intervals(gt, "ground-truth")
    inter = (np.minimum(p[:, None, 1], g[None, :, 1]) - np.maximum(p[:, None, 0], g[None, :, 0])
             + 1).clip(min=0)
    lp, lg = p[:, 1] - p[:, 0] + 1, g[:, 1] - g[:, 0] + 1
    return inter / (lp[:, None] + lg[None, :] - inter)


def match_intervals(
    pred: Sequence | np.ndarray, gt: Sequence | np.ndarray, threshold: float = IOU_THRESHOLD
) -> list[tuple[int, int, float]]:
    """A maximum one-to-one matching of predictions to ground truths with IoU >= threshold.

    Among the matchings with the most pairs, the one with the largest summed IoU.

    Args:
        pred: (P, 2) predicted ``[onset, offset]``.
        gt: (G, 2) ground-truth ``[onset, offset]``.
        threshold: IoU needed for a pair (MEGC: 0.5, inclusive).

    Returns:
        ``[(pred_index, gt_index, iou), ...]`` sorted by prediction index.
    """
    iou = iou_matrix(pred, gt)
    if iou.size == 0:
        return []
    # IoU is a ratio of integers: compare with a tolerance so that 0.5 counts as 0.5.
    ok = iou >= threshold - 1e-12
    if not ok.any():
        return []
    big = float(min(iou.shape)) + 1.0  # one more pair always beats any IoU sum
    weight = np.where(ok, big + iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return sorted((int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if ok[r, c])


def counts(n_pred: int, n_gt: int, tp: int) -> dict:
    """TP/FP/FN and the MEGC ratios of one scope (``None`` where a ratio is 0/0)."""
    fp, fn = n_pred - tp, n_gt - tp
    return {
        "tp": int(tp), "fp": int(fp), "fn": int(fn), "n_pred": int(n_pred), "n_gt": int(n_gt),
        "precision": tp / n_pred if n_pred else None,
        "recall": tp / n_gt if n_gt else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
    }


def _add(a: dict, b: dict) -> dict:
    return counts(a["n_pred"] + b["n_pred"], a["n_gt"] + b["n_gt"], a["tp"] + b["tp"])


PRED_COLUMNS = ("video", "onset", "offset", "type")
GT_COLUMNS = ("video", "onset", "offset", "type")


def _check_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IntervalError(f"{what} table lacks columns {missing}; it has {list(df.columns)}")
    bad = sorted(set(df["type"]) - set(TYPES))
    if bad:
        raise IntervalError(f"{what} table: type {bad[0]!r} in row "
                            f"{int(np.nonzero(df['type'].to_numpy() == bad[0])[0][0])}: "
                            f"use one of {list(TYPES)}")


def evaluate(predictions: pd.DataFrame, ground_truth: pd.DataFrame,
             videos: pd.DataFrame | None = None, threshold: float = IOU_THRESHOLD
             ) -> tuple[pd.DataFrame, dict]:
    """Match predictions to ground truths per video and type, and the MEGC tables.

    Args:
        predictions: one row per predicted interval: ``video, onset, offset, type``
            (micro/macro) and any other columns (e.g. ``score``), kept.
        ground_truth: one row per annotated interval: ``video, onset, offset, type``.
        videos: ``video, database`` of every evaluated video, including those with no
            ground truth and no prediction (default: the videos seen in either table, with
            ``database`` taken from the ground truth or predictions when they have it).
        threshold: IoU for a true positive.

    Returns:
        ``(annotated, table)``: ``annotated`` is ``predictions`` plus ``matched_gt`` (the
        ground truth's row label in ``ground_truth``, or -1), ``iou`` and ``tp`` (bool);
        ``table`` is ``{"overall": {scope: counts}, "per_database": {db: {scope: counts}},
        "per_video": {video: {scope: counts}}}`` with scope micro, macro, all (see
        :func:`counts`).
    """
    _check_columns(predictions, PRED_COLUMNS, "prediction")
    _check_columns(ground_truth, GT_COLUMNS, "ground-truth")
    if videos is None:
        frames = [df[[c for c in ("video", "database") if c in df.columns]]
                  for df in (ground_truth, predictions)]
        videos = pd.concat(frames, ignore_index=True).drop_duplicates("video")
        if "database" not in videos:
            videos = videos.assign(database="all")
        videos["database"] = videos["database"].fillna("all")
    unknown = sorted((set(predictions["video"]) | set(ground_truth["video"]))
                     - set(videos["video"]))
    if unknown:
        raise IntervalError(f"intervals of video {unknown[0]!r} but it is not among the "
                            "evaluated videos; add it to `videos`")
    annotated = predictions.copy()
    annotated["matched_gt"] = -1
    annotated["iou"] = 0.0
    annotated["tp"] = False
    per_video: dict[str, dict] = {}
    pred_groups = dict(tuple(predictions.groupby(["video", "type"], sort=False)))
    gt_groups = dict(tuple(ground_truth.groupby(["video", "type"], sort=False)))
    for video in videos["video"]:
        scopes = {}
        for kind in TYPES:
            p = pred_groups.get((video, kind), predictions.iloc[:0])
            g = gt_groups.get((video, kind), ground_truth.iloc[:0])
            pairs = match_intervals(p[["onset", "offset"]].to_numpy(),
                                    g[["onset", "offset"]].to_numpy(), threshold)
            for pi, gi, v in pairs:
                label = p.index[pi]
                annotated.loc[label, ["matched_gt", "iou", "tp"]] = [g.index[gi], v, True]
            scopes[kind] = counts(len(p), len(g), len(pairs))
        scopes["all"] = _add(scopes["micro"], scopes["macro"])
        per_video[str(video)] = scopes
    db_of = dict(zip(videos["video"].astype(str), videos["database"].astype(str)))
    return annotated, {
        "overall": pool(per_video.values()),
        "per_database": {db: pool(per_video[v] for v in per_video if db_of[v] == db)
                         for db in sorted(set(db_of.values()))},
        "per_video": per_video,
    }


def pool(tables: Iterable[dict]) -> dict:
    """Sum the counts of several videos' ``{scope: counts}`` and recompute the ratios."""
    total = {s: counts(0, 0, 0) for s in SCOPES}
    for t in tables:
        total = {s: _add(total[s], t[s]) for s in SCOPES}
    return total


def f1_of(c: dict) -> float:
    """The F1 of a counts dict, 0.0 where it is undefined (for ranking settings)."""
    return float(c["f1"] or 0.0)
