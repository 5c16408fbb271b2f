"""Cross-database protocols: train on some databases, test on others (``cross_db``), leave one
database out (``lodo``), and the 5 objective classes of the MEGC2018 cross-database setting."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mer.data.labels import apply_label_scheme
from mer.data.samples import FlowSamples
from mer.engine.protocols import ProtocolError, cross_db_folds, lodo_folds
from mer.engine.runner import make_folds, protocol_total_folds


def make_samples(databases=("dbA", "dbB", "dbC"), n_subjects=4, per_subject=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for db in databases:
        for s in range(n_subjects):
            for c in range(per_subject):
                rows.append({"database": db, "subject": f"sub{s:02d}", "clip": f"EP{c}",
                             "label": int(rng.integers(0, 3))})
    x = rng.random((len(rows), 3, 28, 28)).astype(np.float32)
    return FlowSamples(x, pd.DataFrame(rows), ["negative", "positive", "surprise"])


def protocol(**kw):
    base = {"name": "loso", "select": "last", "val_subjects": 0, "workers": 1,
            "fold_index": None, "train": None, "test": None}
    return OmegaConf.create({**base, **kw})


def test_cross_db_trains_on_train_databases_and_tests_every_test_sample_once():
    samples = make_samples()
    db = samples.meta["database"].to_numpy()
    (fold,) = cross_db_folds(samples, train=["dbA"], test=["dbB", "dbC"])
    assert fold.name == "dbA->dbB+dbC"
    assert set(db[fold.train_idx]) == {"dbA"}
    assert set(db[fold.test_idx]) == {"dbB", "dbC"}
    assert sorted(fold.test_idx) == list(np.flatnonzero(db != "dbA"))  # each once
    assert len(fold.val_idx) == 0


def test_cross_db_one_side_given_means_the_rest_on_the_other():
    samples = make_samples()
    db = samples.meta["database"].to_numpy()
    (fold,) = cross_db_folds(samples, train=["dbA", "dbB"], test=None)
    assert set(db[fold.test_idx]) == {"dbC"}
    (fold,) = cross_db_folds(samples, train=None, test=["dbB"])
    assert set(db[fold.train_idx]) == {"dbA", "dbC"}


def test_cross_db_validation_subjects_come_from_training_databases_only():
    samples = make_samples()
    keys, db = samples.meta["subject_key"].to_numpy(), samples.meta["database"].to_numpy()
    (fold,) = cross_db_folds(samples, train=["dbA", "dbB"], test=["dbC"], val_subjects=2, seed=1)
    val = set(keys[fold.val_idx])
    assert len(val) == 2 and set(db[fold.val_idx]) <= {"dbA", "dbB"}
    assert not val & set(keys[fold.train_idx])
    assert "dbC" not in set(db[fold.train_idx]) | set(db[fold.val_idx])


@pytest.mark.parametrize("train,test,match", [
    (["dbA"], ["dbA"], "both"),
    (["dbX"], ["dbB"], "dbX.*not in the data.*dbA"),
    (None, None, "protocol.train"),
    (["dbA", "dbB", "dbC"], None, "no database left to test"),
])
def test_cross_db_refuses_overlap_unknown_and_missing_databases(train, test, match):
    with pytest.raises(ProtocolError, match=match):
        cross_db_folds(make_samples(), train=train, test=test)


def test_cross_db_refuses_databases_of_the_same_people():
    samples = make_samples(databases=("samm", "samm_lv"))
    with pytest.raises(ProtocolError, match="same people"):
        cross_db_folds(samples, train=["samm"], test=["samm_lv"])


def test_lodo_holds_each_database_out_once_and_tests_every_sample_once():
    samples = make_samples()
    db, keys = samples.meta["database"].to_numpy(), samples.meta["subject_key"].to_numpy()
    folds = lodo_folds(samples, val_subjects=0.25, seed=0)
    assert [f.name for f in folds] == ["dbA", "dbB", "dbC"]
    covered = np.concatenate([f.test_idx for f in folds])
    assert sorted(covered) == list(range(len(samples.meta)))  # every sample tested once
    for f in folds:
        assert set(db[f.test_idx]) == {f.name}
        assert f.name not in set(db[f.train_idx]) | set(db[f.val_idx])  # no test-db sample
        assert not set(keys[f.test_idx]) & (set(keys[f.train_idx]) | set(keys[f.val_idx]))
        assert len(set(keys[f.val_idx])) == round(0.25 * 8)


def test_lodo_needs_two_databases():
    with pytest.raises(ProtocolError, match="at least 2 databases"):
        lodo_folds(make_samples(databases=("dbA",)))


def test_make_folds_dispatches_on_the_protocol_name():
    samples = make_samples()
    assert [f.name for f in make_folds(samples, protocol(name="lodo"), 0)] == \
        ["dbA", "dbB", "dbC"]
    assert protocol_total_folds(samples, protocol(name="lodo")) == 3
    folds = make_folds(samples, protocol(name="cross_db", train=["dbA"], test=["dbB"]), 0)
    assert [f.name for f in folds] == ["dbA->dbB"]
    assert protocol_total_folds(samples, protocol(name="loso")) == 12
    assert [f.name for f in make_folds(samples, protocol(name="lodo", fold_index=1), 0)] == \
        ["dbB"]
    with pytest.raises(ProtocolError, match="unknown protocol 'nope'.*lodo"):
        make_folds(samples, protocol(name="nope"), 0)


def test_objective5_keeps_classes_one_to_five_and_says_why_it_drops_the_rest():
    table = pd.DataFrame({
        "database": ["a"] * 4, "subject": ["s1"] * 4, "clip": ["c1", "c2", "c3", "c4"],
        "emotion": ["x"] * 4, "objective": ["", "", "III", "VII"],
        "aus": [(6, 12), (1, 2, 4), (), ()], "row": [2, 3, 4, 5]})
    kept, classes, excluded = apply_label_scheme(table, "objective5", "samm")
    assert classes == ["I", "II", "III", "IV", "V"]
    assert kept["clip"].tolist() == ["c1", "c3"] and kept["label"].tolist() == [0, 2]
    assert [e["clip"] for e in excluded] == ["c2", "c4"]
    assert "VI" in excluded[0]["reason"] and "I..V" in excluded[0]["reason"]


@pytest.mark.slow
def test_lodo_end_to_end_on_tiny_synme_holds_each_synthetic_database_out(tmp_path):
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mer.run", "protocol=lodo", "data.preset=tiny",
           "trainer.max_epochs=1", "protocol.workers=1", "logger=csv", "progress=false",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    p = results["protocol"]
    assert p["name"] == "lodo" and p["folds"] == p["total_folds"] == 2 and not p["partial"]
    assert p["test_databases"] == {"tinyA": ["tinyA"], "tinyB": ["tinyB"]}
    assert p["train_databases"] == {"tinyA": ["tinyB"], "tinyB": ["tinyA"]}
    assert set(results["metrics"]["per_database"]) == {"tinyA", "tinyB"}
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert (predictions["fold"] == predictions["database"]).all()  # held out in its own fold
    assert len(predictions) == results["metrics"]["overall"]["n"] == results["data"]["n_samples"]
    assert "lodo" in proc.stdout and "SYNTHETIC" in proc.stdout


def test_cross_db_warns_of_test_classes_never_seen_in_training():
    s = make_samples()
    labels = s.meta["label"].to_numpy().copy()
    labels[s.meta["database"].to_numpy() == "dbA"] = 0  # dbA (train) shows only class 0
    labels[s.meta["database"].to_numpy() == "dbB"] = [1, 2] * 6
    s.meta["label"] = labels
    with pytest.warns(UserWarning, match=r"\['positive', 'surprise'\] \(12 test clips\)"):
        cross_db_folds(s, ["dbA"], ["dbB"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cross_db_folds(s, ["dbA", "dbB"], ["dbC"])  # every class is trained on: no warning
