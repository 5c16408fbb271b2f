"""data.augment.generate: the leakage test (no face or motion of a held-out subject is ever
used: ids and pixels) and the generated-label test (generated clips marked in every output)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.generate.augment import clip_ids, clips_of, generate_for_folds
from mer.data.generate.generator import DrivenGenerator, GenerateParams
from mer.engine.protocols import ProtocolError, augment_folds, loso_folds
from mer.run import CONFIG_DIR

MAGENTA = np.array([255, 0, 255])  # BGR: a colour no SynME face or background has
PARAMS = GenerateParams(drivers=2, phases=3, frames=5)


def _magenta_pixels(image: np.ndarray) -> int:
    return int((np.abs(image.astype(int) - MAGENTA).max(axis=-1) < 40).sum())


def _poisoned(samples, subject_key: str, tmp: Path):
    """A copy of the samples whose frames live in ``tmp``; the subject's frames are painted
    magenta and its landmarks made NaN (any use of its face or motion shows)."""
    rows = []
    for row, key in zip(samples.input_source.rows, samples.meta["subject_key"], strict=True):
        src = Path(row["onset_path"]).parent
        dst = tmp / row["database"] / row["subject"] / row["clip"]
        shutil.copytree(src, dst)
        if key == subject_key:
            for f in dst.glob("*.jpg"):
                img = cv2.imread(str(f))
                cv2.imwrite(str(f), np.broadcast_to(MAGENTA, img.shape).astype(np.uint8))
        rows.append({**row, "onset_path": str(dst / Path(row["onset_path"]).name)})
    lm = samples.landmarks.copy()
    lm[samples.meta["subject_key"].to_numpy() == subject_key] = np.nan
    return replace(samples, landmarks=lm,
                   input_source=replace(samples.input_source, rows=rows))


def test_no_face_or_motion_of_a_test_subject_is_ever_used(tiny_a, tmp_path):
    folds = loso_folds(tiny_a)
    fold = folds[0]
    test_subject = tiny_a.meta["subject_key"].iloc[fold.test_idx[0]]
    data = _poisoned(tiny_a, test_subject, tmp_path / "frames")
    cache = tmp_path / "cache"
    out, new = augment_folds(data, [fold], lambda s, f: generate_for_folds(
        s, f, 1, PARAMS, cache, seed=0, workers=0, progress=False))
    added = np.setdiff1d(new[0].train_idx, fold.train_idx)
    assert len(added) == len(fold.train_idx)  # one per training clip (K = 1)
    assert np.array_equal(new[0].test_idx, fold.test_idx)
    gen = out.meta.iloc[added]
    assert gen["generated"].all() and not out.meta["generated"].iloc[:len(data.meta)].any()
    for col in ("source", "drivers", "from_subjects", "subject_key"):  # the ids
        assert not gen[col].str.contains(test_subject, regex=False).any(), col
    assert gen["from_subjects"].str.split(";").map(len).max() >= 2  # several people's motion
    assert (gen["drivers"].str.split(";").map(len) == 2).all()
    frames = sorted((cache / "generated").glob("*/img*.jpg"))  # the pixels
    assert len(frames) == 5 * len(gen)
    assert all(_magenta_pixels(cv2.imread(str(f))) == 0 for f in frames)
    assert np.isfinite(out.x).all()
    # the same check catches a leak: a sequence made on the test subject's face is magenta
    clips = clips_of(replace(data, landmarks=tiny_a.landmarks))  # (NaN ones would raise)
    ids = clip_ids(data.meta)
    leak = DrivenGenerator(clips, PARAMS, tmp_path / "leak")
    t = ids[fold.train_idx[0]]
    rec = leak.generate(t, ids[fold.test_idx[0]], [t])
    assert _magenta_pixels(cv2.imread(rec["apex_path"])) > 1000


def test_the_hook_refuses_generated_samples_made_from_held_out_subjects(tiny_a):
    fold = loso_folds(tiny_a)[0]
    held_out = tiny_a.meta["subject_key"].iloc[fold.test_idx[0]]
    train_key = tiny_a.meta["subject_key"].iloc[fold.train_idx[0]]

    def augmenter(from_subjects: str, into: str = "train"):
        def run(s, folds):
            meta = pd.concat([s.meta.assign(generated=False, from_subjects=""),
                              s.meta.iloc[[fold.train_idx[0]]].assign(
                                  generated=True, from_subjects=from_subjects, clip="gen_x")],
                             ignore_index=True)
            out = replace(s, x=np.concatenate([s.x, s.x[:1]]), meta=meta, landmarks=None,
                          input_source=None)
            n = len(s.meta)
            f = folds[0]
            if into == "train":
                return out, [replace(f, train_idx=np.append(f.train_idx, n))]
            return out, [replace(f, test_idx=np.append(f.test_idx, n))]
        return run

    out, _ = augment_folds(tiny_a, [fold], augmenter(train_key))  # a clean one passes
    assert out.meta["generated"].sum() == 1
    with pytest.raises(ProtocolError, match=f"gen_x.*{held_out}"):
        augment_folds(tiny_a, [fold], augmenter(f"{train_key};{held_out}"))
    with pytest.raises(ProtocolError, match="changed its test split"):
        augment_folds(tiny_a, [fold], augmenter(train_key, into="test"))


@pytest.mark.slow
def test_generated_clips_are_labelled_in_every_output_and_never_tested(tmp_path):
    from mer.engine.runner import run_recognition

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "data.preset=tiny", "data.workers=0", "data.augment.generate=1",
            "data.augment.drivers=2", "data.augment.phases=3", "data.augment.frames=5",
            "protocol.fold_index=[0,5]", "protocol.workers=1", "trainer.max_epochs=1",
            "progress=false"])  # the default cache: SynME tiny is made once per suite
    results = run_recognition(cfg, tmp_path / "run")
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert "generated" in pred and not pred["generated"].any()
    assert not pred["clip"].str.startswith("gen_").any()
    gen = pd.read_csv(tmp_path / "run" / "generated.csv")
    assert gen["generated"].all() and len(gen) == results["generated"]["n_generated"] > 0
    assert gen["source"].str.count("/").eq(2).all() and gen["drivers"].str.len().gt(0).all()
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["generated"]["tested"] == 0
    assert on_disk["data"]["n_samples"] == 23  # the real clips of SynME tiny
    for fold, n in on_disk["generated"]["per_fold"].items():
        used = gen["trained_in_folds"].fillna("").str.split(";").map(
            lambda folds, name=fold: name in folds)
        assert used.sum() == n > 0
        # never a generated sample made from the fold's own (test) subject
        assert not gen[used]["from_subjects"].str.contains(fold, regex=False).any()
