"""MEGC interval matching: hand-computed cases and an independent brute-force matcher."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.spotting.matching import (
    IntervalError,
    counts,
    evaluate,
    iou_matrix,
    match_intervals,
)


def _iou(a, b):
    """IoU by counting frames: the definition, not the formula."""
    fa, fb = set(range(a[0], a[1] + 1)), set(range(b[0], b[1] + 1))
    return len(fa & fb) / len(fa | fb)


def test_iou_counts_frames_inclusively():
    # [0, 9] and [5, 14]: 5 shared frames of 15 -> 1/3 (half-open math would say 5/15 too,
    # but [0, 0] vs [0, 0] shows the difference: 1 frame, IoU 1, not 0/0)
    assert iou_matrix([[0, 9]], [[5, 14]])[0, 0] == pytest.approx(5 / 15)
    assert iou_matrix([[0, 0]], [[0, 0]])[0, 0] == 1.0
    assert iou_matrix([[0, 4]], [[5, 9]])[0, 0] == 0.0  # adjacent, no shared frame


def test_iou_exactly_half_is_a_true_positive():
    # [0, 9] vs [0, 19]: 10 of 20 frames -> IoU exactly 0.5 -> TP
    assert _iou((0, 9), (0, 19)) == 0.5
    assert match_intervals([[0, 9]], [[0, 19]]) == [(0, 0, 0.5)]
    # one frame less: 9/20 -> not a TP
    assert match_intervals([[0, 8]], [[0, 19]]) == []
    # [0, 2] vs [1, 3]: 2 of 4 frames: 0.5 (half-open [0,2) vs [1,3) would give 1/3)
    assert match_intervals([[0, 2]], [[1, 3]]) == [(0, 0, 0.5)]


def test_prediction_overlapping_two_ground_truths_matches_one():
    # GTs [0, 9] and [10, 19]; prediction [0, 19] has IoU 0.5 with each: one TP, one FN
    pairs = match_intervals([[0, 19]], [[0, 9], [10, 19]])
    assert len(pairs) == 1
    ann, table = evaluate(
        pd.DataFrame({"video": ["v"], "onset": [0], "offset": [19], "type": ["micro"]}),
        pd.DataFrame({"video": ["v", "v"], "onset": [0, 10], "offset": [9, 19],
                      "type": ["micro", "micro"]}))
    c = table["overall"]["micro"]
    assert (c["tp"], c["fp"], c["fn"]) == (1, 0, 1)
    assert c["f1"] == pytest.approx(2 / 3)
    assert ann["tp"].tolist() == [True]


def test_two_predictions_on_one_ground_truth_one_is_a_false_positive():
    pairs = match_intervals([[1, 10], [0, 10]], [[0, 10]])
    assert pairs == [(1, 0, 1.0)]  # one TP: the prediction with the larger IoU (1 > 10/11)
    c = counts(2, 1, 1)
    assert (c["fp"], c["fn"], c["precision"], c["recall"]) == (1, 0, 0.5, 1.0)


def test_maximum_matching_not_greedy():
    # Greedy by IoU would give P0 to G0 (IoU .8) and leave P1 unmatched; the maximum matching
    # pairs P0-G1 and P1-G0: 2 TPs.
    pred = [[0, 9], [0, 7]]
    gt = [[1, 9], [2, 12]]
    iou = iou_matrix(pred, gt)
    assert iou[0, 0] > 0.5 and iou[0, 1] >= 0.5 and iou[1, 0] >= 0.5 and iou[1, 1] < 0.5
    assert len(match_intervals(pred, gt)) == 2


def test_empty_videos_and_no_predictions():
    gt = pd.DataFrame({"video": ["a", "a"], "onset": [0, 50], "offset": [10, 80],
                       "type": ["micro", "macro"], "database": ["d1", "d1"]})
    none = pd.DataFrame(columns=["video", "onset", "offset", "type"])
    videos = pd.DataFrame({"video": ["a", "b"], "database": ["d1", "d2"]})
    _, table = evaluate(none, gt, videos)
    a, b = table["per_video"]["a"], table["per_video"]["b"]
    assert (a["all"]["tp"], a["all"]["fn"], a["all"]["fp"]) == (0, 2, 0)
    assert a["all"]["f1"] == 0.0 and a["all"]["precision"] is None
    assert a["all"]["recall"] == 0.0
    # b: nothing to find and nothing predicted: every ratio undefined
    assert b["all"] == {"tp": 0, "fp": 0, "fn": 0, "n_pred": 0, "n_gt": 0, "precision": None,
                        "recall": None, "f1": None}
    assert table["per_database"]["d2"]["all"]["f1"] is None
    assert table["overall"]["all"]["fn"] == 2


def test_types_are_matched_apart_and_pooled_in_all():
    gt = pd.DataFrame({"video": ["v", "v"], "onset": [0, 100], "offset": [10, 140],
                       "type": ["micro", "macro"]})
    # a "macro" prediction on the micro GT does not count; the macro one does
    pred = pd.DataFrame({"video": ["v", "v"], "onset": [0, 100], "offset": [10, 140],
                         "type": ["macro", "macro"], "score": [0.9, 0.8]})
    ann, table = evaluate(pred, gt)
    o = table["overall"]
    assert (o["micro"]["tp"], o["micro"]["fn"], o["micro"]["fp"]) == (0, 1, 0)
    assert (o["macro"]["tp"], o["macro"]["fp"]) == (1, 1)
    assert (o["all"]["tp"], o["all"]["fp"], o["all"]["fn"]) == (1, 1, 1)
    assert o["all"]["f1"] == pytest.approx(2 / (2 + 1 + 1))
    assert ann["matched_gt"].tolist() == [-1, 1] and "score" in ann


def test_pooled_f1_is_not_the_mean_of_video_f1s():
    gt = pd.DataFrame({"video": ["a"] * 3 + ["b"], "onset": [0, 100, 200, 0],
                       "offset": [10, 110, 210, 10], "type": ["micro"] * 4,
                       "database": ["x"] * 4})
    pred = pd.DataFrame({"video": ["a", "a", "a", "b"], "onset": [0, 100, 200, 50],
                         "offset": [10, 110, 210, 60], "type": ["micro"] * 4})
    _, table = evaluate(pred, gt)
    # a: 3 TP; b: 1 FP 1 FN -> pooled 2*3 / (6 + 1 + 1) = 0.75 (video mean would be 0.5)
    assert table["overall"]["micro"]["f1"] == pytest.approx(0.75)
    assert table["per_database"]["x"]["micro"]["f1"] == pytest.approx(0.75)


def test_bad_intervals_are_named():
    with pytest.raises(IntervalError, match="interval 1 .*onset after offset"):
        iou_matrix([[0, 5], [9, 3]], [[0, 1]])
    with pytest.raises(IntervalError, match="whole numbers"):
        iou_matrix([[0.5, 5]], [[0, 1]])
    with pytest.raises(IntervalError, match="type 'mikro'"):
        evaluate(pd.DataFrame({"video": ["v"], "onset": [0], "offset": [1], "type": ["mikro"]}),
                 pd.DataFrame(columns=["video", "onset", "offset", "type"]))
    with pytest.raises(IntervalError, match="video 'z'"):
        evaluate(pd.DataFrame({"video": ["z"], "onset": [0], "offset": [1], "type": ["micro"]}),
                 pd.DataFrame(columns=["video", "onset", "offset", "type"]),
                 pd.DataFrame({"video": ["a"], "database": ["d"]}))


# -- against an independent brute-force matcher ---------------------------------------------


def brute_force_max_matching(pred, gt, threshold=0.5):
    """Largest number of one-to-one (pred, gt) pairs with IoU >= threshold, by enumerating
    every injective assignment of predictions to ground truths or to nothing."""
    eligible = [[_iou(p, g) >= threshold for g in gt] for p in pred]
    best = 0
    options = [None] + list(range(len(gt)))
    for assign in itertools.product(options, repeat=len(pred)):
        used = [g for g in assign if g is not None]
        if len(used) != len(set(used)):
            continue
        if all(g is None or eligible[i][g] for i, g in enumerate(assign)):
            best = max(best, len(used))
    return best


interval = st.tuples(st.integers(0, 40), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=200, deadline=None)
@given(st.lists(interval, max_size=5), st.lists(interval, max_size=5))
def test_matching_equals_brute_force(pred, gt):
    pairs = match_intervals(pred, gt)
    assert len(pairs) == brute_force_max_matching(pred, gt)
    # one-to-one, and every pair really has IoU >= 0.5 (counted frame by frame)
    assert len({p for p, _, _ in pairs}) == len(pairs) == len({g for _, g, _ in pairs})
    for p, g, v in pairs:
        assert v == pytest.approx(_iou(pred[p], gt[g])) and _iou(pred[p], gt[g]) >= 0.5


@settings(max_examples=100, deadline=None)
@given(st.lists(interval, max_size=5), st.lists(interval, max_size=5))
def test_f1_from_brute_force_counts(pred, gt):
    tp = brute_force_max_matching(pred, gt)
    ann, table = evaluate(
        pd.DataFrame({"video": ["v"] * len(pred), "onset": [p[0] for p in pred],
                      "offset": [p[1] for p in pred], "type": ["micro"] * len(pred)}),
        pd.DataFrame({"video": ["v"] * len(gt), "onset": [g[0] for g in gt],
                      "offset": [g[1] for g in gt], "type": ["micro"] * len(gt)}),
        pd.DataFrame({"video": ["v"], "database": ["d"]}))
    c = table["overall"]["all"]
    denom = 2 * tp + (len(pred) - tp) + (len(gt) - tp)
    assert c["tp"] == tp == int(ann["tp"].sum())
    assert c["f1"] == (None if denom == 0 else pytest.approx(2 * tp / denom))
    assert np.all(ann.loc[ann["tp"], "iou"] >= 0.5)
