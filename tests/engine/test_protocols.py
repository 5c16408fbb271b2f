import numpy as np
import pandas as pd
import pytest
import torch

from mer.data.samples import FlowSamples
from mer.engine.protocols import Fold, ProtocolError, check_split, loso_folds, run_folds


def make_samples(n_subjects=6, per_subject=5, databases=("dbA", "dbB"), seed=0, separable=True):
    """Random flow images whose class shows as a bright quadrant (learnable)."""
    rng = np.random.default_rng(seed)
    rows, xs = [], []
    for db in databases:
        for s in range(n_subjects):
            for c in range(per_subject):
                label = int(rng.integers(0, 3))
                x = rng.random((3, 28, 28)).astype(np.float32) * 0.5
                if separable:
                    x[:, :14, label * 9:label * 9 + 9] += 0.5
                xs.append(x)
                rows.append({"database": db, "subject": f"sub{s:02d}", "clip": f"EP{c}",
                             "label": label})
    return FlowSamples(np.stack(xs), pd.DataFrame(rows), ["negative", "positive", "surprise"])


def test_loso_one_fold_per_subject_and_no_leak():
    samples = make_samples()
    folds = loso_folds(samples)
    keys = samples.meta["subject_key"]
    assert len(folds) == keys.nunique() == 12  # same "sub00" in two databases = two people
    covered = np.concatenate([f.test_idx for f in folds])
    assert sorted(covered) == list(range(len(samples.meta)))  # each sample tested exactly once
    for f in folds:
        assert set(keys[f.test_idx]) == {f.name}
        assert f.name not in set(keys[f.train_idx])


def test_validation_subjects_come_from_training_subjects():
    samples = make_samples()
    for f in loso_folds(samples, val_subjects=0.25, seed=3):
        keys = samples.meta["subject_key"]
        val, train = set(keys[f.val_idx]), set(keys[f.train_idx])
        assert len(val) == round(0.25 * 11)
        assert not val & train and f.name not in val


def test_check_split_rejects_leaks_and_empty_sides():
    samples = make_samples(n_subjects=3, databases=("dbA",))
    keys = samples.meta["subject_key"].to_numpy()
    a = np.flatnonzero(keys == "dbA/sub00")
    leak = Fold(0, "dbA/sub00", np.arange(len(keys)), a, np.array([], dtype=int))
    with pytest.raises(ProtocolError, match="both train and test"):
        check_split(samples, leak)
    with pytest.raises(ProtocolError, match="empty train"):
        check_split(samples, Fold(0, "x", np.array([], dtype=int), a, np.array([], dtype=int)))
    with pytest.raises(ProtocolError, match="at least 2 subjects"):
        loso_folds(make_samples(n_subjects=1, databases=("dbA",)))


SPEC = {
    "model": {"name": "ststnet", "lr": 5e-3, "weight_decay": 0.0, "optimizer": "adam",
              "kwargs": {}},
    "trainer": {"max_epochs": 8, "accelerator": "cpu", "devices": 1, "deterministic": True},
    "batch_size": 16, "shuffle": True, "seed": 7, "select": "last", "log_dir": None,
}


def test_folds_learn_and_do_not_depend_on_worker_count():
    samples = make_samples(n_subjects=3)
    folds = loso_folds(samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers run one thread each: compare like with like
    try:
        serial = run_folds(samples, folds, SPEC, workers=1, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    parallel = run_folds(samples, folds, SPEC, workers=2, show_progress=False)
    for a, b in zip(serial, parallel):
        assert a["fold"] == b["fold"]
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    pred = np.concatenate([r["probs"].argmax(1) for r in serial])
    truth = np.concatenate([samples.labels[f.test_idx] for f in folds])
    assert (pred == truth).mean() > 0.6  # separable data: well above chance (1/3)


def test_interrupted_run_resumes_only_unfinished_folds(tmp_path, monkeypatch):
    import mer.engine.protocols as protocols

    samples = make_samples(n_subjects=2)
    folds = loso_folds(samples)
    spec = {**SPEC, "trainer": {**SPEC["trainer"], "max_epochs": 2}}
    first = run_folds(samples, folds, spec, workers=1, show_progress=False, done_dir=tmp_path)
    (tmp_path / "dbB_sub01.npz").unlink()  # as if the run died before this fold finished

    trained = []
    real = protocols.train_fold
    monkeypatch.setattr(protocols, "train_fold",
                        lambda s, f, *a, **k: trained.append(f.name) or real(s, f, *a, **k))
    again = run_folds(samples, folds, spec, workers=1, show_progress=False, done_dir=tmp_path,
                      resume=True)
    assert trained == ["dbB/sub01"]
    for a, b in zip(first, again):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-6)
    # a different recipe does not reuse the saved folds
    other = {**spec, "seed": 8}
    trained.clear()
    run_folds(samples, folds, other, workers=1, show_progress=False, done_dir=tmp_path,
              resume=True)
    assert len(trained) == len(folds)


def test_epoch_selection_on_validation_subjects(tmp_path):
    """``select=val_uf1`` predicts the test subject with the epoch of best validation UF1 (a
    middle one here: the validation subject's labels disagree with the pattern the model
    learns), not the last; the per-epoch models come from runs stopped after k epochs."""
    samples = make_samples(n_subjects=4, databases=("dbA",), per_subject=6, seed=1)
    keys = samples.meta["subject_key"].to_numpy()
    val = np.flatnonzero(keys == "dbA/sub01")
    samples.meta.loc[val, "label"] = (samples.meta.loc[val, "label"] + 1) % 3
    fold = Fold(0, "dbA/sub00", np.flatnonzero(np.isin(keys, ["dbA/sub02", "dbA/sub03"])),
                np.flatnonzero(keys == "dbA/sub00"), val)
    check_split(samples, fold)
    epochs = 4
    spec = {**SPEC, "select": "val_uf1", "log_dir": str(tmp_path),
            "trainer": {**SPEC["trainer"], "max_epochs": epochs}}
    (result,) = run_folds(samples, [fold], spec, workers=1, show_progress=False)
    logged = pd.read_csv(tmp_path / "folds" / "dbA_sub00" / "metrics.csv")
    val_uf1 = logged.dropna(subset=["val_uf1"]).sort_values("epoch")["val_uf1"].to_numpy()
    assert len(val_uf1) == epochs
    best = int(np.argmax(val_uf1))
    assert (val_uf1 == val_uf1[best]).sum() == 1 and best != epochs - 1  # a unique middle best
    (ckpt,) = (tmp_path / "checkpoints" / "dbA_sub00").glob("*.ckpt")
    assert ckpt.name.startswith(f"epoch={best}-")

    def probs_after(k: int) -> np.ndarray:  # the same training, stopped after k epochs
        last = {**SPEC, "select": "last", "trainer": {**SPEC["trainer"], "max_epochs": k}}
        return run_folds(samples, [fold], last, workers=1, show_progress=False)[0]["probs"]

    np.testing.assert_allclose(result["probs"], probs_after(best + 1), rtol=0, atol=1e-6)
    assert np.abs(result["probs"] - probs_after(epochs)).max() > 1e-3  # not the last epoch


def test_selection_without_validation_subjects_is_refused():
    from omegaconf import OmegaConf

    from mer.engine.runner import make_folds

    protocol = OmegaConf.create({"name": "loso", "select": "val_uf1", "val_subjects": 0})
    with pytest.raises(ProtocolError, match="validation subjects"):
        make_folds(make_samples(), protocol, seed=0)


def _prior_by_hand(samples, idx) -> np.ndarray:
    """Row-normalised AU co-occurrence of the annotated samples at ``idx``."""
    from mer.data.aus import PSYAU_AUS

    counts = np.zeros((len(PSYAU_AUS), len(PSYAU_AUS)))
    for i in idx:
        row = samples.meta.iloc[int(i)]
        if row["has_aus"]:
            on = [PSYAU_AUS.index(a) for a in row["aus"] if a in PSYAU_AUS]
            counts[np.ix_(on, on)] += 1
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1e-12), 0.0)


def test_each_loso_fold_counts_the_dpk_gat_prior_on_its_training_subjects(monkeypatch):
    """The model a LOSO fold trains holds the prior of that fold's training samples, counted
    here from the sample table, not the one with the test subject's clips."""
    import mer.engine.build as build

    samples = make_samples(n_subjects=3, databases=("dbA",), per_subject=4)
    rng = np.random.default_rng(0)
    samples.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 6, 12, 14, 15, 16], 3,
                                                            replace=False))
                           for _ in range(len(samples.meta))]
    samples.meta["has_aus"] = rng.random(len(samples.meta)) > 0.2
    built = []
    real = build.build_module
    monkeypatch.setattr(build, "build_module",
                        lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    folds = loso_folds(samples)
    spec = {**SPEC, "model": {"name": "dpk_gat", "lr": 1e-3, "weight_decay": 0.0,
                              "optimizer": "adam", "kwargs": {}},
            "trainer": {**SPEC["trainer"], "max_epochs": 1, "limit_train_batches": 0}}
    run_folds(samples, folds, spec, workers=1, show_progress=False)  # built, not trained
    assert len(built) == len(folds) == 3
    for fold, module in zip(folds, built):
        prior = module.net.data_prior.numpy()
        np.testing.assert_allclose(prior, _prior_by_hand(samples, fold.train_idx), atol=1e-6)
        with_test = np.concatenate([fold.train_idx, fold.test_idx])
        assert not np.allclose(prior, _prior_by_hand(samples, with_test), atol=1e-4)
