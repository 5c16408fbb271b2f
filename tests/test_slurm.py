"""Sweeps through hydra-submitit-launcher: the SLURM config, and real submitit jobs with its
local executor (each sweep point / LOSO fold its own process), collected by mer.collect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _launcher(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher)


def test_slurm_launcher_config_has_the_usual_keys():
    conf = _launcher(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                      "hydra.launcher.timeout_min=30"])
    assert conf["_target_"].endswith("SlurmLauncher")
    assert conf["partition"] == "gpu" and conf["timeout_min"] == 30
    for key in ("gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism"):
        assert conf[key] is not None
    local = _launcher(["hydra/launcher=local"])
    assert local["_target_"].endswith("LocalLauncher") and local["cpus_per_task"] == 1


def _sweep(args: list[str], sweep: Path, cache: Path) -> None:
    """Run a multirun; the data cache is filled first (concurrent jobs only read it)."""
    from mer.data.sources import load_samples

    cache = os.environ.get("MER_CACHE_DIR") or str(cache)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", f"paths.cache_dir={cache}"])
    load_samples(cfg.data, cfg.paths.cache_dir)
    cmd = [sys.executable, "-m", "mer.run", "-m", *args, f"hydra.sweep.dir={sweep}",
           "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MER_CACHE_DIR": cache})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_loso_folds_as_submitit_jobs_are_collected(tmp_path):
    """Each LOSO fold of SynME tiny is one submitit job (its own process and .submitit log);
    mer.collect pools the 8 jobs into one complete result."""
    from mer.collect import collect

    sweep = tmp_path / "sweep"
    _sweep(["hydra/launcher=submitit_local", "+experiment=synme_ststnet", "data.preset=tiny",
            "trainer.max_epochs=1", "protocol.workers=1",
            "protocol.fold_index=0,1,2,3,4,5,6,7"], sweep, tmp_path / "cache")
    jobs = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 8  # eight separate submitit jobs, each with its pickled result
    table = collect([sweep])
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.runs, row.folds, row.complete) == (8, 8, True)


@pytest.mark.slow
def test_federated_sweep_through_submitit_and_collect(tmp_path):
    """Two seeds of the main job (FED-PsyAU, 1 round) as submitit jobs; the summary has one
    federated row per job (``python -m mer.collect``)."""
    sweep = tmp_path / "sweep"
    _sweep(["hydra/launcher=local", "+experiment=fed_psyau", "data.preset=tiny",
            "federated.rounds=1", "federated.eval_every=1", "federated.baselines=false",
            "seed=1,2"], sweep, tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "mer.collect", str(sweep)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 2
    assert set(table["rule"]) == {"fedprox"} and set(table["rounds"]) == {1}
    assert {("seed=1" in o, "seed=2" in o) for o in table["overrides"]} == \
        {(True, False), (False, True)}
