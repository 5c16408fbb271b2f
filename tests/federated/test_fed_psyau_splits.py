"""FED-PsyAU's own federated settings: DFME in 5 and CAS(ME)^3 in 2 subject-disjoint clients,
on the real databases' names and on the SynME stand-ins shaped like them."""

import json

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mer.data import synthetic
from mer.data.samples import FlowSamples
from mer.federated.loop import make_clients
from mer.federated.partition import check_partition
from mer.run import CONFIG_DIR

SETTINGS = {"fed_psyau_dfme": ("dfme", 5), "fed_psyau_casme3": ("casme3", 2)}


def composed(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def samples_like(preset: str | None = None, database: str | None = None, subjects: int = 0,
                 clips: int = 3) -> FlowSamples:
    """Tiny flow images with the subjects of a SynME preset, or of one real database."""
    if preset:
        dbs = [(d.name, d.n_subjects) for d in synthetic.PRESETS[preset]().databases]
    else:
        dbs = [(database, subjects)]
    rows = [{"database": db, "subject": f"sub{s:02d}", "clip": f"EP{c}", "label": (s + c) % 3}
            for db, n in dbs for s in range(n) for c in range(clips)]
    x = np.random.default_rng(0).random((len(rows), 3, 8, 8), dtype=np.float32)
    return FlowSamples(x, pd.DataFrame(rows), ["negative", "positive", "surprise"])


def assert_paper_split(samples, clients, count):
    keys = samples.meta["subject_key"].to_numpy()
    check_partition(samples, clients)  # no sample / subject in two clients or on both sides
    assert len(clients) == count
    owned = [set(keys[np.concatenate([c.train_idx, c.test_idx])]) for c in clients]
    assert all(len(o) >= 2 for o in owned)  # a subject-disjoint train/test split each
    assert set().union(*owned) == set(keys)  # every subject in one client
    assert sum(map(len, owned)) == len(set(keys))  # ... and only one
    covered = np.sort(np.concatenate([np.r_[c.train_idx, c.test_idx] for c in clients]))
    assert covered.tolist() == list(range(len(keys)))  # nothing dropped


@pytest.mark.parametrize("experiment", sorted(SETTINGS))
def test_the_experiments_compose_with_the_papers_client_counts(experiment):
    database, count = SETTINGS[experiment]
    cfg = composed(f"+experiment={experiment}")
    assert cfg.name == experiment and cfg.data.kind == "synme" and cfg.data.preset == database
    assert cfg.federated.num_clients == count and cfg.federated.partition.kind == "iid"
    assert cfg.model.name == "dpk_gat" and cfg.federated.rule.name == "fedprox"
    real = composed(f"+experiment={experiment}", f"data={database}", "data.root=/x")
    assert real.data.kind == database and real.federated.num_clients == count
    from mer.config_check import check_config

    check_config(cfg)
    check_config(real)


@pytest.mark.parametrize("experiment", sorted(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_real_database_splits_are_subject_disjoint_with_the_papers_counts(experiment, seed):
    database, count = SETTINGS[experiment]
    cfg = composed(f"+experiment={experiment}", f"seed={seed}")
    samples = samples_like(database=database, subjects=23)
    assert_paper_split(samples, make_clients(cfg, samples), count)


@pytest.mark.parametrize("experiment,preset", [
    ("fed_psyau_dfme", "dfme"), ("fed_psyau_dfme", "dfme_tiny"),
    ("fed_psyau_casme3", "casme3"), ("fed_psyau_casme3", "casme3_tiny")])
def test_stand_in_splits_are_subject_disjoint_with_the_papers_counts(experiment, preset):
    _, count = SETTINGS[experiment]
    cfg = composed(f"+experiment={experiment}", f"data.preset={preset}")
    samples = samples_like(preset)
    assert_paper_split(samples, make_clients(cfg, samples), count)


def test_the_dfme_stand_in_has_dfmes_classes_and_frame_rates():
    for preset in ("dfme", "dfme_tiny"):
        dbs = synthetic.PRESETS[preset]().databases
        assert sorted(d.fps for d in dbs) == [200, 300, 500]
        for d in dbs:
            assert sorted(d.emotion_weights) == ["anger", "contempt", "disgust", "fear",
                                                 "happiness", "sadness", "surprise"]
    for preset in ("casme3", "casme3_tiny"):
        (db,) = synthetic.PRESETS[preset]().databases
        assert db.fps == 30 and db.n_subjects >= 4  # 2 clients x 2 subjects


def test_every_preset_database_has_a_family_in_the_data_config():
    families = OmegaConf.load(f"{CONFIG_DIR}/data/synme.yaml").families
    for name, make in synthetic.PRESETS.items():
        for d in make().databases:
            assert d.name in families, f"preset {name}: database {d.name} has no family"


def _flowcache_like(tmp_path, database, subjects, classes):
    from mer.data.databases.flowcache import write_flowcache

    rows = [{"database": database, "subject": f"s{s:02d}", "clip": f"c{c}",
             "label": (s + c) % len(classes)} for s in range(subjects) for c in range(2)]
    x = np.random.default_rng(0).random((len(rows), 3, 28, 28), dtype=np.float32) * 0.5
    for i, r in enumerate(rows):
        x[i, r["label"] % 3, 8:20, 8:20] += 0.5
    write_flowcache(FlowSamples(x, pd.DataFrame(rows), list(classes)), tmp_path / "cache")
    return tmp_path / "cache"


@pytest.mark.slow  # 20-30 s each on 2 shared cores
@pytest.mark.parametrize("experiment", sorted(SETTINGS))
def test_each_experiment_runs_one_round_on_tiny_data(experiment, tmp_path, monkeypatch):
    """The shipped experiment (DPK-GAT, P-FedProx, the paper's clients), one round, on a tiny
    flow cache named like the real database."""
    from mer.run import run

    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "mer-cache"))
    database, count = SETTINGS[experiment]
    classes = ["anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"] \
        if database == "dfme" else ["negative", "positive", "surprise"]
    root = _flowcache_like(tmp_path, database, 2 * count + 1, classes)
    cfg = composed(f"+experiment={experiment}", "data=flowcache", f"data.root={root}",
                   f"data.class_names=[{','.join(classes)}]", "data.batch_size=8",
                   "federated.rounds=1", "federated.local_epochs=1", "federated.eval_every=1",
                   "federated.baselines=false", "logger=csv", "progress=false")
    run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    fed = results["federated"]
    assert results["config"]["name"] == experiment
    assert sorted(fed["clients"]) == [f"client{i}" for i in range(count)]
    assert sum(c["subjects"] for c in fed["clients"].values()) == 2 * count + 1
    assert [c["round"] for c in fed["curves"]] == [1]
    assert fed["final"]["pooled_global"]["n"] == sum(c["test"] for c in fed["clients"].values())


@pytest.mark.slow
@pytest.mark.parametrize("experiment,preset", [("fed_psyau_dfme", "dfme_tiny"),
                                               ("fed_psyau_casme3", "casme3_tiny")])
def test_each_experiment_runs_one_round_on_its_synme_stand_in(experiment, preset, tmp_path):
    import os
    import subprocess
    import sys

    _, count = SETTINGS[experiment]
    cmd = [sys.executable, "-m", "mer.run", f"+experiment={experiment}", f"data.preset={preset}",
           "federated.rounds=1", "federated.local_epochs=1", "federated.baselines=false",
           "logger=csv", "progress=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["synthetic"] is True
    assert len(results["federated"]["clients"]) == count
