"""De-identification onto a user's face image (``deidentify.face=/path/face.png``): end to end
through ``mer.run``, and the error for an image on which no face is found."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.generate.deidentify import image_face
from mer.data.generate.errors import GenerationError
from mer.run import CONFIG_DIR

pytest.importorskip("mediapipe", reason="the face image's landmarks are found by MediaPipe "
                    "(README, Face detection); without it deidentify.face cannot be used")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["data.preset=tiny", "data.workers=0",
                                            "progress=false", *overrides])


@pytest.fixture(scope="module")
def face_png(tmp_path_factory):
    """A neutral face of another SynME draw (seed 7: not one of the lab's people), as a PNG
    twice the frame size, and its source frame."""
    from mer.data import synthetic

    cfg = _compose()
    faces = tmp_path_factory.mktemp("face")
    syn = synthetic.PRESETS["tiny"](seed=7)
    root = synthetic.ensure_synme(syn, faces / "synme")
    spec = syn.databases[0]
    meta = synthetic.load_meta(root / spec.name)
    name, sub = sorted(meta["subjects"].items())[0]
    clip, info = sorted(sub["clips"].items())[0]
    frame = cv2.imread(str(root / spec.name / synthetic.FRAME_ROOT / name / clip /
                           f"img{info['onset']}.jpg"), cv2.IMREAD_COLOR)
    big = cv2.resize(frame, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    path = faces / "my face.png"
    assert cv2.imwrite(str(path), big)
    assert cfg.data.seed != 7
    return path


def test_a_face_image_gets_landmarks_from_the_detector(face_png):
    face = image_face(face_png)
    img = cv2.imread(str(face_png))
    assert face.name == "image:my face.png" and face.landmarks.shape == (68, 2)
    lo, hi = face.landmarks.min(0), face.landmarks.max(0)
    assert (lo > 0).all() and (hi < img.shape[1::-1]).all()
    assert (hi - lo).min() > 0.3 * min(img.shape[:2])  # a face, not a speck


def test_an_image_without_a_face_is_refused_naming_the_file(tmp_path):
    blank = tmp_path / "holiday.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(blank), cv2.GaussianBlur(rng.uniform(0, 255, (160, 160, 3)), (0, 0), 3)
                .astype(np.uint8))
    with pytest.raises(GenerationError, match=f"deidentify.face={blank}: no face found on "
                                              "this image.*frontal photo"):
        image_face(blank)
    with pytest.raises(GenerationError, match="missing.jpg: cannot read"):
        image_face(tmp_path / "missing.jpg")


@pytest.mark.slow
def test_deidentify_onto_a_users_face_runs_end_to_end(face_png, tmp_path):
    from mer.run import run

    cfg = _compose("+experiment=deidentify", f"deidentify.face='{face_png}'",
                   "deidentify.frames=5", "deidentify.phases=3", "trainer.max_epochs=2",
                   "protocol.fold_index=[0,4]", "protocol.workers=1", "logger=csv")
    from mer.config_check import config_problems

    assert config_problems(cfg) == []
    run(cfg, tmp_path)
    report = json.loads((tmp_path / "deidentify.json").read_text())
    assert report["new_faces"] == ["image:my face.png"] and report["synthetic"] is True
    assert report["identity"]["test_clips"] > 0
    assert ["original", "own_face", "deidentified", "recipient"] == list(report["recognition"])
    assert report["recipient_drop"] == pytest.approx(
        report["recognition"]["original"]["uf1"] - report["recognition"]["recipient"]["uf1"])
    assert "| de-identified |" in (tmp_path / "deidentify.md").read_text()
    pred = pd.read_csv(tmp_path / "predictions.csv")
    n = (pred["arm"] == "original").sum()
    assert n > 0 and all((pred["arm"] == a).sum() == n
                         for a in ("own_face", "deidentified", "recipient"))
    assert pred["deidentified"].sum() == 2 * n  # the de-identified arm and the recipient's
    # the recipient tested the same clips as the lab did
    key = ["subject", "clip"]
    assert sorted(map(tuple, pred[pred["arm"] == "recipient"][key].values)) == \
        sorted(map(tuple, pred[pred["arm"] == "original"][key].values))
    # the re-rendered clips show the user's face: each one's onset is that image, fitted
    made = [d.parent for d in (Path(cfg.paths.cache_dir) / "deidentified").glob("*/.done")
            if json.loads(d.read_text())["source"] == "face:image:my face.png"]
    assert len(made) >= len(pred) // 2
    face = cv2.imread(str(face_png), cv2.IMREAD_GRAYSCALE)
    for folder in made[:3]:
        onset = cv2.imread(str(folder / "img1.jpg"), cv2.IMREAD_GRAYSCALE)
        fitted = cv2.resize(face, onset.shape[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(onset.astype(int) - fitted.astype(int)).mean() < 4
