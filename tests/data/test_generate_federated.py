"""data.augment.generate in federated runs: each lab augments its own training split inside the
lab (sources and drivers from its own training subjects only: no test subject's face or motion,
no other lab's clip), generated rows marked and never tested; where a run would ignore the key,
the config check refuses it."""

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
from omegaconf import open_dict

from mer.config_rules import ConfigError
from mer.data.generate.augment import clip_ids
from mer.engine.protocols import ProtocolError, augment_folds
from mer.federated.loop import make_clients
from mer.federated.protocols import augment_labs, client_loso_folds
from mer.run import CONFIG_DIR

MAGENTA = np.array([255, 0, 255])  # BGR: a colour no SynME face or background has
AUG = ["data.augment.generate=1", "data.augment.drivers=2", "data.augment.phases=3",
       "data.augment.frames=5"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["+experiment=fed_psyau", "data.preset=tiny",
                                            "data.workers=0", "progress=false", *overrides])


@pytest.fixture(scope="module")
def tiny():
    """SynME tiny (labs tinyA and tinyB, 4 subjects each), from the default cache."""
    from mer.data.sources import load_samples

    cfg = _cfg()
    return load_samples(cfg.data, cfg.paths.cache_dir)


def _magenta(image: np.ndarray) -> int:
    return int((np.abs(image.astype(int) - MAGENTA).max(axis=-1) < 40).sum())


def _marked(samples, painted: set[str], cornered: set[str], tmp: Path):
    """A copy whose frames live in ``tmp``: clips of subjects in ``painted`` wholly magenta
    (landmarks NaN: any use of their face or motion shows), clips of ``cornered`` subjects with
    a magenta 12 x 12 corner (a face used as a source carries it into the generated frames)."""
    rows = []
    keys = samples.meta["subject_key"].to_numpy()
    for row, key in zip(samples.input_source.rows, keys, strict=True):
        dst = tmp / row["database"] / row["subject"] / row["clip"]
        shutil.copytree(Path(row["onset_path"]).parent, dst)
        for f in dst.glob("*.jpg") if key in painted | cornered else ():
            img = cv2.imread(str(f))
            if key in painted:
                img[:] = MAGENTA
            else:
                img[:12, :12] = MAGENTA
            cv2.imwrite(str(f), img)
        rows.append({**row, "onset_path": str(dst / Path(row["onset_path"]).name)})
    lm = samples.landmarks.copy()
    lm[np.isin(keys, list(painted))] = np.nan
    return replace(samples, landmarks=lm, input_source=replace(samples.input_source, rows=rows))


def test_each_lab_augments_inside_itself_from_its_own_training_subjects(tiny, tmp_path):
    cfg = _cfg(*AUG)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "cache")  # generated frames land here
    clients = make_clients(cfg, tiny)
    keys = tiny.meta["subject_key"].to_numpy()
    tested = {k for c in clients for k in keys[c.test_idx]}
    lab_b = next(c for c in clients if c.name == "tinyB")
    data = _marked(tiny, painted=tested, cornered=set(keys[lab_b.train_idx]),
                   tmp=tmp_path / "frames")
    out, (labs,), summary = augment_labs(cfg, data, [clients], ["seed0"], tmp_path / "run")
    n = len(tiny.meta)
    ids = np.array(clip_ids(out.meta))
    assert summary["tested"] == 0 and summary["within"] == "each lab"
    for old, new in zip(clients, labs, strict=True):
        assert np.array_equal(new.test_idx, old.test_idx)  # nothing added to a test split
        added = np.setdiff1d(new.train_idx, old.train_idx)
        assert len(added) == len(old.train_idx) and (added >= n).all()  # K = 1 per clip
        gen = out.meta.iloc[added]
        assert gen["generated"].all() and summary["per_fold"][old.name] == len(added)
        own_clips, own_subjects = set(ids[old.train_idx]), set(keys[old.train_idx])
        for _, g in gen.iterrows():  # the ids: this lab's training clips and subjects only
            assert g["source"] in own_clips and g["target"] in own_clips
            assert set(g["drivers"].split(";")) <= own_clips
            assert set(g["from_subjects"].split(";")) <= own_subjects
            assert not set(g["from_subjects"].split(";")) & tested
        # the pixels: no test subject's face; lab A's sequences carry nothing of lab B
        frames = [f for i in added for f in
                  Path(out.input_source.rows[i]["onset_path"]).parent.glob("img*.jpg")]
        assert len(frames) == 5 * len(added)
        magenta = [_magenta(cv2.imread(str(f))) for f in frames]
        assert max(magenta) < 400  # never a painted (test) face: that is the whole frame
        if old.name == "tinyA":
            assert max(magenta) == 0
        else:  # the check sees a source face: lab B's sequences show B's corner mark
            assert min(magenta) > 50
    assert not out.meta["generated"].iloc[:n].any() and out.meta["generated"].iloc[n:].all()
    csv = pd.read_csv(tmp_path / "run" / "generated.csv")
    assert len(csv) == summary["n_generated"] and set(csv["trained_in_folds"]) == {"tinyA",
                                                                                 "tinyB"}


@pytest.mark.slow
def test_federated_loso_folds_augment_each_lab_without_the_held_out_subject(tiny, tmp_path):
    cfg = _cfg(*AUG, "federated.protocol.kind=loso")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "cache")
    folds = client_loso_folds(tiny, make_clients(cfg, tiny))[:2]  # two held-out subjects
    out, groups, summary = augment_labs(cfg, tiny, [fc for _, fc in folds],
                                        [s for s, _ in folds], tmp_path)
    keys = out.meta["subject_key"].to_numpy()
    assert summary["tested"] == 0
    for (subject, old), new in zip(folds, groups, strict=True):
        for a, b in zip(old, new, strict=True):
            added = np.setdiff1d(b.train_idx, a.train_idx)
            assert np.array_equal(a.test_idx, b.test_idx) and len(added) == len(a.train_idx)
            used = {s for f in out.meta["from_subjects"].iloc[added] for s in f.split(";")}
            assert subject not in used and used <= set(keys[a.train_idx])
            assert summary["per_fold"][f"{subject}:{a.name}"] == len(added)


def test_the_hook_refuses_a_sequence_made_from_another_labs_clip(tiny):
    cfg = _cfg()
    clients = make_clients(cfg, tiny)
    a, b = clients
    other = tiny.meta["subject_key"].iloc[b.train_idx[0]]
    own = tiny.meta["subject_key"].iloc[a.train_idx[0]]

    def augmenter(from_subjects: str):
        def run(s, labs):
            row = s.meta.iloc[[a.train_idx[0]]].assign(generated=True, clip="gen_x",
                                                       from_subjects=from_subjects)
            meta = pd.concat([s.meta.assign(generated=False, from_subjects=""), row],
                             ignore_index=True)
            out = replace(s, x=np.concatenate([s.x, s.x[:1]]), meta=meta, landmarks=None,
                          input_source=None)
            n = len(s.meta)
            return out, [replace(labs[0], train_idx=np.append(labs[0].train_idx, n)), labs[1]]
        return run

    out, _ = augment_folds(tiny, clients, augmenter(own))  # the lab's own subject: fine
    assert out.meta["generated"].sum() == 1
    with pytest.raises(ProtocolError, match=f"'{a.name}'.*gen_x.*{other}.*outside its "
                                            "training subjects"):
        augment_folds(tiny, clients, augmenter(f"{own};{other}"))


@pytest.mark.parametrize("experiment", ["privacy_audit", "dp_curve", "sticker_audit", "deidentify",
                                        "generate_augment"])
def test_runs_that_would_ignore_the_key_refuse_it(experiment):
    from mer.config_check import config_problems

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}",
                                           "data.augment.generate=1"])
        plain = compose("config", overrides=[f"+experiment={experiment}"])
    problems = [p for p in config_problems(cfg) if p.startswith("data.augment.generate=1")]
    assert len(problems) == 1 and "would be ignored" in problems[0]
    assert not [p for p in config_problems(plain) if "data.augment" in p]
    assert not [p for p in config_problems(_cfg(*AUG)) if "data.augment" in p]


def test_the_flower_apps_refuse_it():
    pytest.importorskip("flwr")
    from mer.federated.flower.common import compose_config

    with pytest.raises(ConfigError, match="Flower apps.*would be ignored.*mer.run"):
        compose_config("+experiment=fed_psyau data.preset=tiny data.augment.generate=1")
    assert compose_config("+experiment=fed_psyau data.preset=tiny").data.augment.generate == 0


@pytest.mark.slow
def test_a_federated_run_marks_generated_rows_and_never_tests_them(tmp_path):
    from mer.federated.runner import run_federated_experiment

    cfg = _cfg(*AUG, "federated.rounds=1", "federated.local_epochs=1", "logger=csv")
    results = run_federated_experiment(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    gen = on_disk["generated"]
    clients = on_disk["federated"]["clients"]
    assert gen["tested"] == 0 and gen["n_generated"] == results["generated"]["n_generated"]
    assert gen["per_fold"] == {"tinyA": clients["tinyA"]["train"] // 2,
                               "tinyB": clients["tinyB"]["train"] // 2}  # real + K=1 each
    assert on_disk["data"]["n_samples"] == 23  # the real clips of SynME tiny
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert "generated" in pred and not pred["generated"].any()
    assert not pred["clip"].str.startswith("gen_").any()
    rows = pd.read_csv(tmp_path / "generated.csv")
    assert rows["generated"].all() and len(rows) == gen["n_generated"]
    for lab in ("tinyA", "tinyB"):  # each lab's sequences made from its own clips
        mine = rows[rows["trained_in_folds"] == lab]
        assert len(mine) == gen["per_fold"][lab]
        assert mine["source"].str.startswith(f"{lab}/").all()
        assert mine["drivers"].str.split(";").map(
            lambda ds, lab=lab: all(d.startswith(f"{lab}/") for d in ds)).all()
