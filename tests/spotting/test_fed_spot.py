"""Federated spotting: labs' splits, FedAvg over spotter modules, thresholds from counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer.experiments.fed_spot import federated_spotter, lab_splits
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


def test_federated_spotter_trains_by_fedavg(standin, monkeypatch):
    from mer.federated import aggregators

    videos = _labs(standin)
    splits = {db: (train, test) for db, (train, test) in lab_splits(videos, 0.3, 0).items()}
    calls = []
    real = aggregators.fedavg

    def spy(results):
        calls.append([n for _, n in results])
        return real(results)

    monkeypatch.setattr(aggregators, "fedavg", spy)
    server, history = federated_spotter({"name": "apex_score", "epochs": 1}, splits, rounds=2,
                                        local_epochs=1, seed=0)
    assert len(calls) == 3 and all(len(c) == 2 for c in calls)  # initial state + 2 rounds
    assert [h["round"] for h in history] == [1, 2] and set(history[0]["train_loss"]) == \
        {"casme_sq", "samm_lv"}
    # the initial parameters were identical at both labs; the buffers (feature scale) averaged
    assert server.fitted and set(server.thresholds) == {"micro", "macro"}
    out = server.spot(splits["casme_sq"][1][0])
    assert set(out["type"]) <= {"micro", "macro"}
