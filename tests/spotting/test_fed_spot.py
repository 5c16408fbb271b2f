"""Federated spotting: labs' splits, thresholds from counts (training through the federated
loop: test_fed_spot_loop.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer.experiments.fed_spot import lab_splits
from mer.spotting.base import best_thresholds, threshold_counts
from mer.spotting.registry import create_spotter

torch.set_num_threads(1)


def _labs(standin):
    return standin(3, 12.0) + standin(3, 6.0, {"samm_lv": 200.0}, seed=2)


def test_lab_splits_are_subject_disjoint_and_seeded_per_lab(standin):
    videos = _labs(standin)
    splits = lab_splits(videos, 0.3, seed=0)
    for db, (train, test) in splits.items():
        assert {v.database for v in train + test} == {db}
        assert not {v.subject_key for v in train} & {v.subject_key for v in test}
        assert len({v.subject_key for v in test}) == 1
    # a lab's split does not depend on the other labs
    alone = lab_splits([v for v in videos if v.database == "samm_lv"], 0.3, seed=0)
    assert [v.video for v in alone["samm_lv"][1]] == [v.video for v in splits["samm_lv"][1]]
    with pytest.raises(ValueError, match="lab casme_sq: 1 subject"):
        lab_splits(videos[:1], 0.3, seed=0)


def test_summed_lab_counts_choose_the_threshold_pooled_videos_would(standin):
    """What the server sums (each lab's TP/pred/GT counts per candidate) is exactly what
    choosing on all labs' videos together gives."""
    videos = _labs(standin)
    sp = create_spotter({"name": "mdmd"}).fit(videos[:2] + videos[3:5])
    a, b = videos[2:3], videos[5:]
    ca, cb = threshold_counts(sp, a), threshold_counts(sp, b)
    both = threshold_counts(sp, a + b)
    for kind in both:
        np.testing.assert_array_equal(ca[kind] + cb[kind], both[kind])
    summed = {k: ca[k] + cb[k] for k in ca}
    assert best_thresholds(sp.candidates, summed) == best_thresholds(sp.candidates, both)
