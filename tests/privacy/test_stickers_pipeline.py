"""Stickered SynME clips through mer's flow pipeline, and the sticker audit's honest split."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from mer.data.preprocess.pipeline import FlowParams
from mer.experiments.sticker_audit import make_clips, split_subjects
from mer.privacy.stickers import Sticker, StickerError, StickerStyle
from mer.privacy.stickers.pipeline import stickered_flows, stickered_pair
from mer.privacy.stickers.styles import render_alpha
from mer.run import CONFIG_DIR


@pytest.fixture(scope="module")
def tiny():
    from mer.data.sources import load_samples

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny"])
    return load_samples(cfg.data, cfg.paths.cache_dir, prepared=False)


def test_no_sticker_reproduces_the_pipelines_flow_exactly(tiny, tmp_path):
    clips = make_clips(tiny)
    x = stickered_flows(clips, [(0, None), (5, None)], FlowParams(), tmp_path)
    assert np.array_equal(x[0], tiny.x[0]) and np.array_equal(x[1], tiny.x[5])


def test_a_sticker_changes_the_frames_only_under_it_and_changes_the_flow(tiny, tmp_path):
    clips = make_clips(tiny)
    sticker = Sticker(StickerStyle("b", "circle"), "mouth_l", 0.05)
    (onset, apex), outlines = stickered_pair(clips[2], sticker)
    (clean_onset, clean_apex), _ = stickered_pair(clips[2], None)
    for frame, clean, outline in ((onset, clean_onset, outlines[0]),
                                  (apex, clean_apex, outlines[1])):
        alpha = render_alpha(outline, frame.shape)
        assert np.array_equal(frame[alpha == 0], clean[alpha == 0])
        assert (frame[alpha > 0.9] != clean[alpha > 0.9]).mean() > 0.9
    x = stickered_flows(clips, [(2, sticker)], FlowParams(), tmp_path)
    assert x.shape == (1, 3, 28, 28) and np.abs(x[0] - tiny.x[2]).mean() > 1e-3


def test_a_sticker_larger_than_a_synme_face_names_the_clip(tiny, tmp_path):
    clips = make_clips(tiny)
    with pytest.raises(StickerError, match=rf"{clips[1].name}.*larger than the face"):
        stickered_flows(clips, [(1, Sticker(StickerStyle("b"), "nose", 1.2))], FlowParams(),
                        tmp_path)


def test_roles_are_subject_disjoint_per_database_and_seeded(tiny):
    roles = split_subjects(tiny, 0.3, 0.3, seed=3)
    keys = tiny.meta["subject_key"].to_numpy()
    sets = {r: set(keys[v]) for r, v in roles.items()}
    assert not (sets["train"] & sets["test"] or sets["train"] & sets["reference"]
                or sets["reference"] & sets["test"])
    assert sum(len(v) for v in roles.values()) == len(keys)
    for db in set(tiny.meta["database"]):
        for r, v in roles.items():
            assert (tiny.meta["database"].to_numpy()[v] == db).any(), (db, r)
    again = split_subjects(tiny, 0.3, 0.3, seed=3)
    assert all(np.array_equal(roles[r], again[r]) for r in roles)
