"""The in-process federated loop: clean partitions, honest rounds, P-FedProx, the main job."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from fedtoys import fed_cfg as _fed_cfg_base
from fedtoys import toy_samples as samples

from mer.data.samples import FlowSamples
from mer.federated.partition import ClientData, PartitionError, check_partition, natural_clients


def test_natural_clients_are_disjoint_databases_split_by_subject():
    s = samples()
    clients = natural_clients(s, test_fraction=0.4, seed=1)
    assert [c.name for c in clients] == ["db0", "db1", "db2"]
    check_partition(s, clients)
    keys = s.meta["subject_key"].to_numpy()
    for c in clients:
        assert set(s.meta["database"].iloc[np.concatenate([c.train_idx, c.test_idx])]) == \
            {c.name}
        assert len(set(keys[c.test_idx])) == 2  # 40% of 5 subjects
    covered = np.sort(np.concatenate([np.concatenate([c.train_idx, c.test_idx])
                                      for c in clients]))
    assert covered.tolist() == list(range(len(keys)))


def test_partition_checks_refuse_leaks():
    s = samples(n_db=1)
    idx = np.arange(len(s.meta))
    with pytest.raises(PartitionError, match="both sides"):
        check_partition(s, [ClientData("a", idx[:7], idx[7:])])  # subject s2 split
    with pytest.raises(PartitionError, match="another client|in clients"):
        check_partition(s, [ClientData("a", idx[:6], idx[12:]), ClientData("b", idx[3:9],
                                                                            idx[9:12])])
    with pytest.raises(PartitionError, match="no training samples"):
        check_partition(s, [ClientData("a", idx[:0], idx)])
    with pytest.raises(PartitionError, match="at least 2"):
        natural_clients(samples(n_subjects=1))


@pytest.mark.slow
def test_fed_psyau_main_job_runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fed")
    cmd = [sys.executable, "-m", "mer.run", "+experiment=fed_psyau", "data.preset=tiny",
           "federated.rounds=2", "federated.eval_every=1", "progress=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "MER_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    fed = results["federated"]
    assert results["synthetic"] is True
    assert [c["round"] for c in fed["curves"]] == [1, 2]
    assert set(fed["final"]["per_client"]) == {"tinyA", "tinyB"}
    assert fed["final"]["pooled_global"]["n"] == sum(c["test"] for c in fed["clients"].values())
    assert all(r["clients"] == ["tinyA", "tinyB"] for r in fed["rounds"])
    assert results["config"]["model"]["prior"] == {"schedule": "fixed", "ratio": 0.3}
    base = fed["baselines"]  # pooled and local-only training on the same test splits
    assert base["epochs"] == 2 * 2
    assert set(base["per_client"]["tinyA"]) == {"pooled", "local"}
    assert base["pooled_pooled"]["n"] == fed["final"]["pooled_global"]["n"]


def test_fedavg_one_client_one_epoch_equals_centralised_training():
    import lightning as L
    from omegaconf import OmegaConf

    from mer.data.datamodule import SplitDataModule
    from mer.engine.build import build_module
    from mer.federated.loop import FederatedRun, get_weights, set_weights

    s = samples(n_db=1, n_subjects=6, per_subject=4)
    s.x[:] = np.random.default_rng(0).random(s.x.shape, dtype=np.float32)
    cfg = _fed_cfg(seed=3)
    client = natural_clients(s, test_fraction=0.3, seed=0)[0]
    run = FederatedRun(cfg, s, [client])
    start = [w.copy() for w in run.global_weights]
    run.round(1)

    # the same epoch, centralised: same start, same seed, same batches
    seed = 3 * 100_003 + 1 * 101 + 0
    L.seed_everything(seed, verbose=False)
    module = build_module(OmegaConf.to_container(cfg.model), s, client.train_idx)
    set_weights(module, start)
    dm = SplitDataModule(s, client.train_idx, client.test_idx, batch_size=8, shuffle=True,
                         seed=seed)
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, deterministic=True).fit(module, datamodule=dm)
    for fed_w, central_w in zip(run.global_weights, get_weights(module)):
        np.testing.assert_allclose(fed_w, central_w, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(start, run.global_weights))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_subject_partitions_are_clean(kind):
    from mer.federated.partition import subject_clients

    s = samples(n_db=2, n_subjects=10)
    clients = subject_clients(s, 4, kind, alpha=0.3, seed=2)
    assert len(clients) == 4
    check_partition(s, clients)
    keys = s.meta["subject_key"].to_numpy()
    for c in clients:
        assert len(set(keys[c.train_idx])) >= 1 and len(set(keys[c.test_idx])) >= 1
    held = np.concatenate([np.concatenate([c.train_idx, c.test_idx]) for c in clients])
    assert sorted(held) == list(range(len(keys)))  # nothing dropped


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    from mer.federated.partition import subject_clients

    rows = [{"database": "db", "subject": f"s{s}", "clip": f"c{c}", "label": s % 3}
            for s in range(60) for c in range(2)]
    s = FlowSamples(np.zeros((len(rows), 3, 28, 28), np.float32), pd.DataFrame(rows),
                    ["a", "b", "c"])

    def skew(clients):  # mean over clients of the largest class share
        shares = []
        for c in clients:
            counts = np.bincount(s.labels[np.concatenate([c.train_idx, c.test_idx])],
                                 minlength=3)
            shares.append(counts.max() / counts.sum())
        return np.mean(shares)

    assert skew(subject_clients(s, 4, "dirichlet", alpha=0.05, seed=0)) > \
        skew(subject_clients(s, 4, "iid", seed=0)) + 0.15


def test_more_clients_than_subjects_is_refused():
    from mer.federated.partition import subject_clients

    with pytest.raises(PartitionError, match="at most 2 clients"):
        subject_clients(samples(n_db=1, n_subjects=5), 3)


def _fed_cfg(seed=0, **faults):
    return _fed_cfg_base(seed=seed, faults=faults)


def test_a_crashing_client_does_not_stop_the_round():
    from mer.federated.loop import FederatedRun

    s = samples(n_db=3, n_subjects=4)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(_fed_cfg(crash=[{"client": "db1", "round": 1}]), s, clients)
    before = [w.copy() for w in run.global_weights]
    stats = run.round(1)
    assert stats["clients"] == ["db0", "db2"] and stats["failed"] == ["db1"]
    assert run.failures[0]["client"] == "db1" and "injected" in run.failures[0]["error"]
    assert any(not np.array_equal(a, b) for a, b in zip(before, run.global_weights))
    assert run.round(2)["failed"] == []  # only round 1 was faulty


def test_all_clients_dropping_out_leaves_the_global_model_unchanged():
    from mer.federated.loop import FederatedRun

    s = samples(n_db=2, n_subjects=4)
    run = FederatedRun(_fed_cfg(dropout=1.0), s, natural_clients(s, seed=0))
    before = [w.copy() for w in run.global_weights]
    stats = run.round(1)
    assert stats["dropped"] == ["db0", "db1"] and stats["clients"] == []
    for a, b in zip(before, run.global_weights):
        np.testing.assert_array_equal(a, b)
