"""Federated and privacy commands end to end, as a user runs them (subprocess, tiny SynME)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def run_mer(args, cache_dir, out, multirun=False):
    where = f"hydra.sweep.dir={out}" if multirun else f"hydra.run.dir={out}"
    cmd = [sys.executable, "-m", "mer.run", *(["-m"] if multirun else []), *args, where,
           "progress=false", "data.preset=tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mer-cache")


@pytest.mark.parametrize("privacy", ["ckks", "secagg", "dp"])
def test_fed_psyau_runs_under_each_protection(privacy, cache_dir, tmp_path):
    run_mer(["+experiment=fed_psyau", f"privacy={privacy}", "federated.rounds=2",
             "federated.baselines=false", "logger=csv"], cache_dir, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    fed = results["federated"]
    assert fed["privacy"]["name"] == privacy and results["synthetic"] is True
    if privacy == "dp":  # epsilon per client, growing with the rounds
        eps = [r["privacy"]["clients"] for r in fed["rounds"]]
        assert all(0 < eps[0][c] < eps[1][c] for c in eps[0])
        assert fed["privacy"]["clients"] == eps[1]
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]


def test_a_sweep_runs_and_collects_into_one_table(cache_dir, tmp_path):
    run_mer(["+experiment=fed_psyau", "federated=fedavg,scaffold", "federated.num_clients=2,4",
             "model=ststnet", "federated.rounds=1", "federated.baselines=false"],
            cache_dir, tmp_path, multirun=True)
    proc = subprocess.run([sys.executable, "-m", "mer.collect", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "summary.csv")
    assert len(table) == 4 and set(table["federated"]) == {"fedavg", "scaffold"}
    assert sorted(table["clients"]) == [2, 2, 4, 4] and table["synthetic"].all()
    runs = list(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 4  # one offline W&B run per point, grouped by experiment name


def test_privacy_audit_writes_the_trade_off_table(cache_dir, tmp_path):
    run_mer(["+experiment=privacy_audit", "audit.rounds=1", "audit.inversion.samples=1",
             "audit.inversion.steps=20",
             "audit.settings=[{name: none, privacy: none}, {name: dp, privacy: dp}]"],
            cache_dir, tmp_path)
    report = json.loads((tmp_path / "audit.json").read_text())
    none, dp = report["settings"]
    assert none["epsilon"] is None and dp["epsilon"] > 0
    assert 0 <= none["mia"]["auc"] <= 1 and none["inversion"]["psnr"] > 0
    table = (tmp_path / "audit.md").read_text()
    assert "SYNTHETIC" in table and "| dp |" in table
    assert (tmp_path / "audit.png").stat().st_size > 0
