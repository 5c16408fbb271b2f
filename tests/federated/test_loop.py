"""The in-process federated loop: clean partitions, honest rounds, P-FedProx, the main job."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mer.data.samples import FlowSamples
from mer.federated.partition import ClientData, PartitionError, check_partition, natural_clients


def samples(n_db=3, n_subjects=5, per_subject=3):
    rows = [{"database": f"db{d}", "subject": f"s{s}", "clip": f"c{c}", "label": (s + c) % 3}
            for d in range(n_db) for s in range(n_subjects) for c in range(per_subject)]
    return FlowSamples(np.zeros((len(rows), 3, 28, 28), np.float32), pd.DataFrame(rows),
                       ["a", "b", "c"])


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
