"""The de-identification control arm (``deidentify.controls: [own_face]``: each clip re-rendered
on its own face by the same TPS) and the control-point density (``deidentify.density``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from mer.data.generate.deidentify import own_face
from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import GenerateParams
from mer.data.generate.motion import barycentric, control_points, triangles
from mer.data.generate.render import JPEG_QUALITY
from mer.run import CONFIG_DIR


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["data.preset=tiny", "data.workers=0",
                                            "progress=false", *overrides])


def test_own_face_arm_starts_on_each_clips_own_onset_and_is_marked(tiny_a, tmp_path):
    params = GenerateParams(drivers=1, phases=3, frames=5)
    own = own_face(tiny_a, params, tmp_path / "cache", progress=False)
    n = len(tiny_a.meta)
    assert own.x.shape == tiny_a.x.shape and np.isfinite(own.x).all()
    m = own.meta
    assert (m["arm"] == "own_face").all() and m["generated"].all()
    assert not m["deidentified"].any() and own.provenance["rerendered"] == "own_face"
    ids = [f"{d}/{s}/{c}" for d, s, c in zip(tiny_a.meta["database"], tiny_a.meta["subject"],
                                             tiny_a.meta["clip"])]
    assert m["source"].tolist() == ids == m["drivers"].tolist()  # its own face, its own motion
    for col in ("subject_key", "label", "clip"):
        assert m[col].tolist() == tiny_a.meta[col].tolist(), col
    assert np.array_equal(own.landmarks, tiny_a.landmarks)  # the same face, the same place
    moved = 0
    for orig, new in zip(tiny_a.input_source.rows, own.input_source.rows, strict=True):
        o = cv2.imread(str(orig["onset_path"]), cv2.IMREAD_UNCHANGED)
        # the onset written is the original onset frame itself (re-encoded as the JPEG it
        # is stored as): identical pixels to that encoding
        ok, buf = cv2.imencode(".jpg", o, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        onset = cv2.imread(str(new["onset_path"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(onset, cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
        apex = cv2.imread(str(new["apex_path"]), cv2.IMREAD_UNCHANGED)
        moved += int(np.abs(apex.astype(int) - onset.astype(int)).max() > 10)
        assert new["onset"] == 1 and new["apex"] == 3 and new["offset"] == 5
    assert moved == n  # and each clip's own motion moves it
    made = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "deidentified")
            .glob("*/.done")]
    assert len(made) == n and all(d["source"] == d["target"] == d["drivers"][0] for d in made)


def test_density_one_is_the_landmarks_and_centroids_and_more_points_stay_inside():
    rng = np.random.default_rng(0)
    lm = rng.uniform(0, 100, (68, 2))
    tri = triangles(lm)
    t = len(tri)
    assert np.array_equal(control_points(lm, tri), np.concatenate([lm, lm[tri].mean(1)]))
    assert np.allclose(barycentric(1), 1 / 3)
    for density in (2, 3, 4):
        w = barycentric(density)
        assert w.shape == (density * (density + 1) // 2, 3)
        assert np.allclose(w.sum(1), 1) and (w > 0).all()  # strictly inside: on no edge
        pts = control_points(lm, tri, density)
        assert pts.shape == (68 + t * len(w), 2)
        assert np.array_equal(pts[:68], lm)
        assert len(np.unique(np.round(pts, 9), axis=0)) == len(pts)  # no point repeats
        inner = pts[68:].reshape(t, len(w), 2)  # triangle by triangle, as the weights say
        assert np.allclose(inner, np.einsum("kv,tvc->tkc", w, lm[tri]))
    with pytest.raises(GenerationError, match="density 0: need an integer >= 1"):
        barycentric(0)
    with pytest.raises(GenerationError, match="density 0"):
        GenerateParams(density=0)


def test_density_one_keeps_the_cache_key_of_sequences_made_before():
    p = GenerateParams(drivers=1, phases=3, frames=5)
    old = {k: v for k, v in asdict(p).items()  # the fields before density and motion
           if k not in ("density", "motion")}
    assert p.key() == json.dumps(old, sort_keys=True, default=str)
    assert GenerateParams(drivers=1, phases=3, frames=5, density=3).key() != p.key()


def test_the_control_arm_and_density_keys_are_checked():
    from mer.config_check import config_problems

    cfg = _compose("+experiment=deidentify")
    assert list(cfg.deidentify.controls) == ["own_face"] and cfg.deidentify.density == 1
    assert config_problems(cfg) == []
    bad = config_problems(_compose("+experiment=deidentify", "deidentify.controls=[other]",
                                   "deidentify.density=0", "deidentify.compare_density=x",
                                   "deidentify.motion=flow", "deidentify.compare_motion=3",
                                   "data.augment.motion=sparse"))
    text = "\n".join(bad)
    for key in ("deidentify.controls", "deidentify.density", "deidentify.compare_density",
                "deidentify.motion", "deidentify.compare_motion", "data.augment.motion"):
        assert key in text, key
    assert config_problems(_compose("+experiment=deidentify", "deidentify.controls=[]",
                                    "deidentify.compare_density=3",
                                    "deidentify.compare_motion=dense")) == []


def test_the_report_splits_the_drop_into_motion_transfer_and_identity():
    from mer.experiments.deidentify import markdown

    def m(uf1):
        return {"n": 6, "uf1": uf1, "uar": uf1, "accuracy": uf1}

    r = {"label": "synthetic (SynME)", "command": "cmd", "model": "ststnet",
         "protocol": {"name": "loso", "folds": 2, "selection": "last", "epochs": 2},
         "new_faces": ["a"], "density": 1,
         "recognition": {"original": m(0.7), "own_face": m(0.65), "deidentified": m(0.55)},
         "uf1_drop": 0.15, "margin": 0.1, "within_margin": False,
         "drop_split": {"motion_transfer": 0.05, "identity_change": 0.10},
         "identity": {"classifier": "LBPH", "subjects": 4, "train_images": 8, "test_clips": 4,
                      "accuracy_original": 1.0, "accuracy_deidentified": 0.0,
                      "accuracy_by_arm": {"original": 1.0, "own_face": 1.0,
                                          "deidentified": 0.0}, "chance": 0.25}}
    text = markdown(r)
    assert "| own_face | 6 | 0.6500 |" in text and "| own_face | 1.0000 |" in text
    assert "motion transfer (original -> own_face) +0.0500" in text
    assert "identity change (own_face -> deidentified) +0.1000" in text
    assert "(margin 0.1: NOT within)" in text
    assert "(motion=tps)" in text
    assert "recipient" not in text  # no recipient arm: no line about one
    with_recipient = markdown({**r, "recipient_drop": 0.04, "recipient_within_margin": True})
    assert "UF1 drop against the lab's own +0.0400 (margin 0.1: within)" in with_recipient
    assert "pixel by pixel (motion=dense)" in markdown({**r, "motion": "dense"})


def test_concat_marks_every_arm(tiny_a, tmp_path):
    from mer.experiments.deidentify import concat

    own = own_face(tiny_a, GenerateParams(drivers=1, phases=3, frames=5), tmp_path / "c",
                   progress=False)
    both = concat(tiny_a, own)
    n = len(tiny_a.meta)
    assert both.meta["arm"].tolist() == ["original"] * n + ["own_face"] * n
    assert both.meta["generated"].tolist() == [False] * n + [True] * n
    assert not both.meta["deidentified"].any()
    assert [Path(r["onset_path"]) for r in both.input_source.rows[:n]] == \
        [Path(r["onset_path"]) for r in tiny_a.input_source.rows]


def test_arms_share_each_clips_driving_flows(tiny_a, tmp_path, monkeypatch):
    """Every arm (own face, de-identified, another motion model) re-renders the same clips'
    motion: their driving flows are computed once per clip, and reused give the same frames."""
    import mer.data.generate.generator as generator

    calls = []
    real = generator.driving_flows
    monkeypatch.setattr(generator, "driving_flows",
                        lambda clip, *a, **k: calls.append(clip.id) or real(clip, *a, **k))
    three = tiny_a.subset(np.arange(3))
    store: dict = {}
    shared = own_face(three, GenerateParams(drivers=1, phases=3, frames=5), tmp_path / "a",
                      progress=False, flow_store=store)
    own_face(three, GenerateParams(drivers=1, phases=3, frames=5, motion="dense"),
             tmp_path / "a", progress=False, flow_store=store)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 3
    alone = own_face(three, GenerateParams(drivers=1, phases=3, frames=5), tmp_path / "b",
                     progress=False)
    assert len(calls) == 6  # no store: computed again
    np.testing.assert_array_equal(shared.x, alone.x)
