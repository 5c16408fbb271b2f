"""`python -m mer.run` end to end, as a user runs it (subprocess, fresh output folder)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.databases.flowcache import read_flowcache, write_flowcache
from mer.data.sources import load_samples
from mer.run import CONFIG_DIR


def run_mer(args, cache_dir, run_dir):
    cmd = [sys.executable, "-m", "mer.run", *args, f"hydra.run.dir={run_dir}", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text()), proc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mer-cache")


@pytest.mark.slow
def test_synme_loso_run_writes_honest_outputs(cache_dir, tmp_path):
    results, proc = run_mer(["+experiment=synme_ststnet", "data.preset=tiny",
                             "trainer.max_epochs=3", "logger=wandb"], cache_dir, tmp_path)
    assert results["synthetic"] is True and results["data"]["synthetic"] is True
    assert "SYNTHETIC" in proc.stdout
    m = results["metrics"]
    assert set(m["per_database"]) == {"tinyA", "tinyB"}
    assert results["protocol"] == {"name": "loso", "folds": 8, "total_folds": 8,
                                   "partial": False, "selection": "last", "val_subjects": 0,
                                   "resumed_folds": []}
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == results["data"]["n_samples"] == m["overall"]["n"]
    # every subject is tested in exactly one fold, its own
    assert (predictions["fold"] == predictions["database"] + "/" + predictions["subject"]).all()
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # W&B offline, to sync later
    for e in results["data"]["excluded"]:
        assert e["reason"]  # excluded on purpose, with the reason


@pytest.mark.slow
def test_megc2019_experiment_on_a_synme_flowcache_export(cache_dir, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny"])
    samples = load_samples(cfg.data, cache_dir)
    export = tmp_path / "flowcache"
    write_flowcache(samples, export)
    assert len(read_flowcache(export).meta) == len(samples.meta)
    results, _ = run_mer(["+experiment=megc2019_ststnet", f"data.root={export}",
                          "trainer.max_epochs=2"], cache_dir, tmp_path / "run")
    assert results["synthetic"] is True  # the export keeps the synthetic mark
    assert results["config"]["model"]["lr"] == 5e-5
    assert results["config"]["data"]["batch_size"] == 256
    assert set(results["metrics"]["per_database"]) == {"tinyA", "tinyB"}
    assert results["protocol"]["folds"] == 8



@pytest.mark.slow
def test_folds_as_separate_jobs_pool_to_the_full_run(cache_dir, tmp_path):
    from mer.collect import collect

    base = ["+experiment=synme_ststnet", "data.preset=tiny", "trainer.max_epochs=2",
            "protocol.workers=1"]
    full, _ = run_mer(base, cache_dir, tmp_path / "full")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mer.run", "-m", *base, "protocol.fold_index=0,1,2,3,4,5,6,7",
           f"hydra.sweep.dir={sweep}", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = collect([sweep])
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.runs, row.folds, row.complete) == (8, 8, True)
    # each fold seeds itself from its index: the pooled jobs equal the single full run
    assert row.uf1 == pytest.approx(full["metrics"]["overall"]["uf1"], abs=1e-4)
    assert row.uar == pytest.approx(full["metrics"]["overall"]["uar"], abs=1e-4)
