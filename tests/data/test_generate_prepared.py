"""data.augment.generate on mer.prepare's aligned crops (data.prepared): generation runs on whole
frames (the crop's landmarks mapped back through each clip's alignment matrix), and the
generated clips reach the model through the very pipeline of the real ones (face found on the
generated onset, same alignment, flow on the crop)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.generate.augment import clip_ids, clips_of, generate_for_folds, generated_flow
from mer.data.generate.generator import DrivenGenerator, GenerateParams
from mer.engine.protocols import augment_folds, loso_folds
from mer.run import CONFIG_DIR

pytest.importorskip("mediapipe", reason="mer.prepare's face detection needs mediapipe")
PARAMS = GenerateParams(drivers=2, phases=3, frames=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mer-cache-generate-prepared")


@pytest.fixture(scope="module")
def prepared_a(cache):
    """SynME tiny's colour database through mer.prepare's full pipeline (aligned crops)."""
    from mer.data.sources import load_samples

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", "data.workers=0",
                                           f"paths.cache_dir={cache}", "data.prepared=true"])
    s = load_samples(cfg.data, cache)
    assert s.input_source.matrices is not None  # the aligned crops, not whole frames
    return s.subset(np.flatnonzero(s.meta["database"].to_numpy() == "tinyA"))


def test_crop_landmarks_map_back_to_the_detectors_frame_landmarks(prepared_a):
    from mer.data.preprocess.face import make_detector

    detector = make_detector("mediapipe")
    clips = clips_of(prepared_a)
    for cid in clip_ids(prepared_a.meta)[:4]:
        frame = cv2.imread(clips[cid].onset_path)
        np.testing.assert_allclose(clips[cid].landmarks, detector(frame).landmarks, atol=1e-3)


def test_prepared_crops_are_augmented_through_the_prepare_pipeline(prepared_a, cache):
    from mer.data.preprocess.apex import frame_path
    from mer.data.preprocess.prepared import PrepareParams, prepare_clip

    fold = loso_folds(prepared_a)[0]
    test_subject = prepared_a.meta["subject_key"].iloc[fold.test_idx[0]]
    out, (new,) = augment_folds(prepared_a, [fold], lambda s, f: generate_for_folds(
        s, f, 1, PARAMS, cache, seed=0, workers=0, progress=False))
    n = len(prepared_a.meta)
    added = np.setdiff1d(new.train_idx, fold.train_idx)
    assert len(added) == len(fold.train_idx) and np.array_equal(new.test_idx, fold.test_idx)
    gen = out.meta.iloc[added]
    assert gen["generated"].all() and not gen["from_subjects"].str.contains(test_subject).any()
    assert out.provenance["generated"]["flow_path"] == "mer.prepare (aligned crops)"
    src = out.input_source
    assert len(src.rows) == len(src.matrices) == len(out.x) == len(out.landmarks)
    assert np.isfinite(out.landmarks[n:]).all()
    assert (out.landmarks[n:] > 0).all() and (out.landmarks[n:] < out.x.shape[-1]).all()
    # each generated clip's x is what mer.prepare makes of its frames, with the real clips'
    # parameters (detector, alignment, flow at the crop size)
    settings = {k: v for k, v in prepared_a.provenance["prepare"]["params"].items()
                if k != "version"}
    for i in added[:2]:
        row = src.rows[i]
        row = {**row, "apex_path": str(frame_path(row["onset_path"], row["onset"], row["apex"]))}
        entry = prepare_clip(row, PrepareParams(**settings))
        np.testing.assert_allclose(out.x[i], entry["flow"], atol=1e-6)
        np.testing.assert_allclose(src.matrices[i], entry["matrix"], atol=1e-9)
    # the source's alignment is (nearly) the generated clip's: the onset is the source's face
    for i in added:
        s = clip_ids(out.meta).index(out.meta["source"].iloc[i])
        assert np.abs(src.matrices[i] - src.matrices[s]).max() < 2.0


@pytest.mark.slow
def test_own_motion_regenerated_on_prepared_crops_gives_the_clips_own_flow(prepared_a, cache):
    """A clip re-rendered from its own motion on its own face, through generated_flow, has a
    flow image like its real one (the same path), and unlike the other clips' flow."""
    clips = clips_of(prepared_a)
    ids = clip_ids(prepared_a.meta)
    gen = DrivenGenerator(clips, GenerateParams(drivers=1, phases=5, frames=9),
                          cache / "own", prepared_a.class_names)
    rows = []
    for i, cid in enumerate(ids):
        r = gen.generate(cid, cid, [cid])
        rows.append({"database": "tinyA", "subject": cid.split("/")[1], "clip": f"own{i}",
                     "onset": 1, "apex": r["apex"], "offset": r["offset"],
                     "onset_path": r["onset_path"], "apex_path": r["apex_path"], "fps": 200.0})
    x, _, _ = generated_flow(prepared_a, pd.DataFrame(rows), cache, workers=0, progress=False)

    def corr(a: np.ndarray, b: np.ndarray) -> float:  # u and v channels
        return float(np.mean([np.corrcoef(a[k].ravel(), b[k].ravel())[0, 1] for k in (0, 1)]))

    own = [corr(x[i], prepared_a.x[i]) for i in range(len(ids))]
    other = [corr(x[i], prepared_a.x[j]) for i in range(len(ids)) for j in range(len(ids))
             if j != i]
    assert np.median(own) > 0.5 and np.median(own) > np.median(other) + 0.3


def test_deidentified_prepared_crops_keep_the_clips_motion(prepared_a, cache):
    """De-identification on aligned crops: the new faces go through mer.prepare's pipeline too
    (their own alignment matrices and detected landmarks), and the motion survives."""
    from mer.data.generate.deidentify import deidentify, synme_faces

    faces = synme_faces("tiny", 7, cache)  # other people
    d = deidentify(prepared_a, faces, GenerateParams(drivers=1, phases=3, frames=5), cache,
                   progress=False)
    n = len(prepared_a.meta)
    assert d.x.shape == prepared_a.x.shape and d.input_source.matrices.shape == (n, 2, 3)
    assert np.isfinite(d.landmarks).all() and d.meta["deidentified"].all()
    # another face: another alignment than the original clip's
    assert np.abs(d.input_source.matrices - prepared_a.input_source.matrices).max() > 1.0
    corr = [np.mean([np.corrcoef(d.x[i, k].ravel(), prepared_a.x[i, k].ravel())[0, 1]
                     for k in (0, 1)]) for i in range(n)]
    assert np.median(corr) > 0.4
