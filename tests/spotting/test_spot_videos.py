"""Spotting's view of long videos: resampling, positions <-> frames, targets, lengths."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mer.spotting.videos import (
    GT_COLUMNS,
    SpotDataError,
    SpotVideo,
    expected_lengths,
    gaussian_targets,
    resample,
)


def _video(fps=200.0, t=1400, gt_rows=(), first=1):
    return SpotVideo(video="db/v", database="db", subject="s1", fps=fps, k=40,
                     frame_numbers=np.arange(first, first + t), flow=np.zeros((t, 3, 2), "f4"),
                     crops=np.zeros((t, 4, 4), "u1"), magnitude=np.zeros(t, "f4"),
                     roi_names=["a", "b", "c"], gt=pd.DataFrame(list(gt_rows), columns=GT_COLUMNS))


def test_resample_keeps_frame_numbers_and_seconds():
    v = _video(gt_rows=[(101, 141, 201, "micro", "negative", (), 1)])
    r = resample(v, 30.0)
    assert r.block == 7 and r.fps == pytest.approx(200 / 7) and r.k == 6
    assert r.length == 200 and r.frame_numbers[1] == 8
    # positions -> frames covers whole blocks, inclusive
    assert r.frames(0, 1) == (1, 14)
    assert r.positions([1, 7, 8, 1400]).tolist() == [0, 0, 1, 199]
    assert resample(v, None) is v and resample(_video(fps=30.0), 30.0).block == 1


def test_expected_lengths_are_seconds_of_the_source_video_after_resampling():
    # onset->apex 40 frames, apex->offset 60 frames at 200 fps: 0.2 s and 0.3 s, whatever the
    # positions per second the spotter works at
    v = _video(gt_rows=[(101, 141, 201, "micro", "negative", (), 1)])
    for video in (v, resample(v, 30.0)):
        ln = expected_lengths([video])["micro"]
        assert (ln["before_s"], ln["after_s"], ln["n"]) == (pytest.approx(0.2),
                                                           pytest.approx(0.3), 1)
    assert expected_lengths([v])["macro"]["n"] == 0  # fallback, said so


def test_gaussian_targets_peak_at_apex_inside_the_interval():
    v = _video(fps=30.0, t=100, gt_rows=[(11, 15, 21, "micro", "", (), 1),
                                         (51, 60, 80, "macro", "", (), 2)])
    y = gaussian_targets(v)
    assert y[14, 0] == 1.0 and y[59, 1] == 1.0
    assert y[:10, 0].max() == 0 and y[21:, 0].max() == 0   # zero outside [onset, offset]
    assert y[:, 0].argmax() == 14 and y[:, 1].argmax() == 59


def test_bad_features_are_named():
    with pytest.raises(SpotDataError, match="db/v: frame numbers not increasing at position 2"):
        SpotVideo(video="db/v", database="db", subject="s", fps=30.0, k=6,
                  frame_numbers=np.array([1, 2, 2]), flow=np.zeros((3, 1, 2)), crops=None,
                  magnitude=np.zeros(3), roi_names=["a"])
    with pytest.raises(SpotDataError, match=r"db/v: flow \(3, 1\) is not \(T=3, R, 2\)"):
        SpotVideo(video="db/v", database="db", subject="s", fps=30.0, k=6,
                  frame_numbers=np.arange(3), flow=np.zeros((3, 1)), crops=None,
                  magnitude=np.zeros(3), roi_names=["a"])
