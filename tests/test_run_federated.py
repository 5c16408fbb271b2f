"""Federated and privacy commands end to end: as a user runs them (subprocess, tiny SynME;
slow), and their fast siblings, the same configs composed from conf/ and run in-process on a
tiny flow cache (seconds)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.run import CONFIG_DIR


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


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["ckks", "secagg", "dp"])
def test_fed_psyau_runs_under_each_protection(privacy, cache_dir, tmp_path):
    secure = ["privacy.min_clients=2"] if privacy in ("ckks", "secagg") else []  # 2 labs
    run_mer(["+experiment=fed_psyau", f"privacy={privacy}", *secure, "federated.rounds=2",
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# fast siblings: the same configs, composed from conf/ and run in-process on a tiny flow cache
# ---------------------------------------------------------------------------------------------

FAST = ["+experiment=fed_psyau", "model=ststnet", "data=flowcache", "data.batch_size=8",
        "federated.baselines=false", "logger=csv", "progress=false"]


@pytest.fixture(scope="module")
def flowcache(tmp_path_factory):
    """3 databases x 3 subjects x 2 clips of 28x28 flow whose class lights up a channel."""
    from mer.data.databases.flowcache import write_flowcache
    from mer.data.samples import FlowSamples

    rows = [{"database": f"db{d}", "subject": f"d{d}s{s}", "clip": f"c{c}", "label": (s + c) % 3}
            for d in range(3) for s in range(3) for c in range(2)]
    x = np.random.default_rng(0).random((len(rows), 3, 28, 28), dtype=np.float32) * 0.5
    for i, r in enumerate(rows):
        x[i, r["label"], 8:20, 8:20] += 0.5
    root = tmp_path_factory.mktemp("flowcache") / "cache"
    write_flowcache(FlowSamples(x, pd.DataFrame(rows), ["negative", "positive", "surprise"]),
                    root)
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "mer-cache"))


def composed(flowcache, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*FAST, f"data.root={flowcache}", *overrides])


def run_in_process(cfg, run_dir):
    from mer.run import run

    run(cfg, run_dir)
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def unprotected(flowcache, tmp_path_factory):
    """The same run without protection: predictions.csv."""
    run_dir = tmp_path_factory.mktemp("none")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MER_CACHE_DIR", str(run_dir / "mer-cache"))
        run_in_process(composed(flowcache, "privacy=none", "federated.rounds=2"), run_dir)
    return pd.read_csv(run_dir / "predictions.csv")


@pytest.mark.parametrize("privacy", ["ckks", "secagg", "dp", "central_dp"])
def test_each_protection_runs_from_the_composed_config(privacy, flowcache, unprotected,
                                                       tmp_path, monkeypatch):
    """Fast sibling of test_fed_psyau_runs_under_each_protection: ``privacy=...`` reaches
    the rounds; under secure aggregation the server adds only byte payloads and the run
    predicts as the unprotected one, DP reports a growing epsilon (per client under dp, the
    server's under central_dp)."""
    from mer.federated.loop import FederatedRun

    payloads = []
    server_sum = FederatedRun.server_sum
    monkeypatch.setattr(FederatedRun, "server_sum",
                        lambda self, sent: payloads.append(sent) or server_sum(self, sent))
    results = run_in_process(composed(flowcache, f"privacy={privacy}", "federated.rounds=2"),
                             tmp_path)
    fed = results["federated"]
    assert fed["privacy"]["name"] == results["config"]["privacy"]["name"] == privacy
    assert pd.read_csv(tmp_path / "rounds.csv")["round"].tolist() == [1, 2]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert fed["final"]["pooled_global"]["n"] == len(unprotected)
    # under secure aggregation per-clip predictions stay at the labs (only the summed
    # confusion matrices reach the server: README "What the server learns")
    assert len(predictions) == (0 if privacy in ("ckks", "secagg") else len(unprotected))
    eps = [r.get("privacy") for r in fed["rounds"]]
    if privacy in ("dp", "central_dp"):
        assert payloads == []  # no secure aggregation there
    if privacy == "dp":
        assert set(eps[0]["clients"]) == {"db0", "db1", "db2"}
        assert all(0 < eps[0]["clients"][c] < eps[1]["clients"][c] for c in eps[0]["clients"])
        assert fed["privacy"]["clients"] == eps[1]["clients"]
    elif privacy == "central_dp":
        assert 0 < eps[0]["central"] < eps[1]["central"] == fed["privacy"]["central"]
    else:  # the sum is exact up to 1e-6: the same predictions as without protection
        assert eps == [None, None]
        assert len(payloads) == 2 and all(
            sorted(p) == ["db0", "db1", "db2"] and all(isinstance(b, bytes) for b in p.values())
            for p in payloads)
        from mer.engine.metrics import recognition_metrics

        for kind in ("global", "personalised"):  # the pooled figures of the same predictions
            m = recognition_metrics(unprotected["label"], unprotected[f"pred_{kind}"],
                                    results["data"]["class_names"])
            assert fed["final"][f"pooled_{kind}"] == {k: m[k] for k in ("n", "uf1", "uar",
                                                                         "accuracy")}
        assert fed["final"]["per_client"] == {}


class _Killed(Exception):
    """Stands for the process dying during a round."""


def _final_global(run_dir):
    from mer.data.io import checked_load

    state = checked_load(run_dir / "checkpoints" / "seed42" / "federated_state.pt")
    return state["round"], state["global"]


@pytest.mark.parametrize("privacy,how", [
    ("dp", "in_process"), ("central_dp", "in_process"),
    pytest.param("dp", "command_line", marks=pytest.mark.slow),
    pytest.param("central_dp", "command_line", marks=pytest.mark.slow)])
def test_resume_true_ends_as_the_uninterrupted_run(privacy, how, flowcache, tmp_path,
                                                   monkeypatch):
    """A run killed in round 2 of 2, continued with ``resume=true`` (in-process, or with
    ``python -m mer.run ... resume=true``), writes the uninterrupted run's results.json
    figures, epsilons, predictions and final global model, having resumed after round 1."""
    from mer.federated.loop import FederatedRun

    args = [f"privacy={privacy}", "federated.rounds=2"]
    straight = run_in_process(composed(flowcache, *args), tmp_path / "straight")
    run_dir = tmp_path / "interrupted"
    real = FederatedRun.round
    with monkeypatch.context() as m:
        m.setattr(FederatedRun, "round", lambda self, rnd: real(self, rnd) if rnd < 2
                  else (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            run_in_process(composed(flowcache, *args), run_dir)
    assert _final_global(run_dir)[0] == 1 and not (run_dir / "results.json").exists()
    if how == "in_process":
        resumed = run_in_process(composed(flowcache, *args, "resume=true"), run_dir)
    else:
        cmd = [sys.executable, "-m", "mer.run", *FAST, f"data.root={flowcache}", *args,
               "resume=true", f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = json.loads((run_dir / "results.json").read_text())
    a, b = straight["federated"], resumed["federated"]
    assert b["resumed_after_round"] == 1 and a["resumed_after_round"] is None
    for key in ("final", "curves", "privacy"):
        assert b[key] == a[key], key
    assert [r["privacy"] for r in b["rounds"]] == [r["privacy"] for r in a["rounds"]]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"),
                                  pd.read_csv(tmp_path / "straight" / "predictions.csv"))
    (ra, wa), (rb, wb) = _final_global(tmp_path / "straight"), _final_global(run_dir)
    assert ra == rb == 2
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def test_the_fed_psyau_job_from_its_composed_config(flowcache, tmp_path):
    """Fast sibling of test_loop.py's slow main-job test: ``+experiment=fed_psyau`` as it
    ships (DPK-GAT, P-FedProx, baselines), one round on the tiny flow cache."""
    cfg = composed(flowcache, "model=dpk_gat", "federated.baselines=true", "federated.rounds=1",
                   "federated.local_epochs=1", "federated.eval_every=1")
    results = run_in_process(cfg, tmp_path)
    fed = results["federated"]
    assert results["synthetic"] is False and results["config"]["name"] == "fed_psyau"
    assert results["config"]["model"]["name"] == "dpk_gat"
    assert results["config"]["model"]["prior"] == {"schedule": "fixed", "ratio": 0.3}
    assert results["config"]["federated"]["rule"]["name"] == "fedprox"
    assert results["config"]["federated"]["personalise"]["own"] == 0.9
    assert [c["round"] for c in fed["curves"]] == [1]
    assert set(fed["final"]["per_client"]) == {"db0", "db1", "db2"}
    assert fed["final"]["pooled_global"]["n"] == sum(c["test"] for c in fed["clients"].values())
    assert all(r["clients"] == ["db0", "db1", "db2"] for r in fed["rounds"])
    base = fed["baselines"]  # pooled and local-only training on the same test splits
    assert base["epochs"] == 1  # rounds x local epochs
    assert set(base["per_client"]["db0"]) == {"pooled", "local"}
    assert base["pooled_pooled"]["n"] == fed["final"]["pooled_global"]["n"]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == fed["final"]["pooled_global"]["n"]
