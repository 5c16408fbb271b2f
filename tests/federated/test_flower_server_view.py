"""Issue 13, finding 3: what an honest-but-curious Flower server learns of one lab.

The attacker is the server: it keeps every message it receives (``MemoryGrid.received``) and
everything it makes of them (the summed AU counts, the initial model, the evaluation). Two
federations differ only in which lab holds one training subject and one test subject, so
lab db0's example count, AU co-occurrence counts and test labels differ between them while
every sum over the labs stays the same. Under secure aggregation the server's view must be
the same in both worlds (apart from the fresh randomness of masks and ciphertexts, which the
secagg tests show to be noise on their own): it cannot tell db0's values. Under the old
protocol the ``query`` reply carried them in plaintext and this test failed.
"""

from __future__ import annotations

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

pytest.importorskip("flwr")

from flwr.app import ArrayRecord  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from test_flower import MemoryGrid, _key_configs, _with_privacy  # noqa: E402

from mer.federated import flower_app  # noqa: E402
from mer.federated.loop import FederatedRun  # noqa: E402
from mer.federated.partition import ClientData  # noqa: E402


def _samples():
    """3 databases x 4 subjects x 3 clips, with AU annotations (DPK-GAT's counts)."""
    samples = toy_samples(n_db=3, n_subjects=4, per_subject=3, learnable=True)
    rng = np.random.default_rng(7)
    samples.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 12, 14, 17], 2, False))
                           for _ in range(len(samples.meta))]
    samples.meta["has_aus"] = True
    return samples


def _world(samples, moved: bool) -> list[ClientData]:
    """Each database a lab, subjects s0, s1 (s2 when not moved) train, s3 test. ``moved``:
    db0's training subject s2 and test subject s3 belong to db1 instead (same sums)."""
    meta = samples.meta
    clients = {f"db{d}": ([], []) for d in range(3)}
    for i, (db, subject) in enumerate(zip(meta["database"], meta["subject"])):
        owner = "db1" if moved and db == "db0" and subject in ("s2", "s3") else db
        clients[owner][subject == "s3"].append(i)
    return [ClientData(n, np.array(tr, np.int64), np.array(te, np.int64))
            for n, (tr, te) in clients.items()]


def _server_view(cfg, node_cfg, samples, clients, monkeypatch) -> tuple[dict, dict]:
    """Run discovery, the run's set-up and one evaluation over a MemoryGrid; return the
    server's view (every plaintext field it received, and what it computed) and db0's own
    values (its n, AU counts and test labels)."""
    nodes = {101 + k: flower_app.Node(node_cfg, FederatedRun(node_cfg, samples, clients), c, k)
             for k, c in enumerate(clients)}
    monkeypatch.setattr("mer.federated.flower.client_app.node_from_context",  # the node side
                        lambda ctx: nodes[ctx.node_id])
    grid = MemoryGrid(nodes)
    federation = flower_app.discover(grid, timeout_s=1)
    run = flower_app.FlowerRun(cfg, federation.samples, federation.clients, grid=grid,
                               federation=federation, round_timeout_s=1)
    result = run.evaluate()
    view: dict = {}
    for kind, node, reply in grid.received:
        for rname, record in reply.content.items():
            if isinstance(record, ArrayRecord):  # decrypted sums: CKKS noise ~1e-7 away
                value = [np.round(a, 3).tolist() for a in record.to_numpy_ndarrays()]
                view[(kind, node, rname)] = value
                continue
            for key, value in dict(record).items():
                if not isinstance(value, bytes | list) or (
                        isinstance(value, list) and value and not isinstance(value[0], bytes)):
                    view[(kind, node, rname, key)] = value  # bytes: masks, keys, ciphertexts
    released = getattr(run, "au_counts_released", None)
    if released is not None:
        view["au_counts"] = released.tolist()
    view["initial"] = [np.round(w, 5).tolist() for w in run.initial_weights]
    view["pooled"] = {k: v for k, v in result.items() if k.startswith("pooled_")}
    view["per_client"] = result["per_client"]
    view["stand_in"] = run.samples.meta[["database", "subject", "clip", "label"]].to_dict()
    from mer.models.priors import cooccurrence_counts

    db0 = clients[0]
    au, mask = samples.au_targets()
    secret = {"n": len(db0.train_idx),
              "au": np.asarray(cooccurrence_counts(au[db0.train_idx], mask[db0.train_idx]))
              .tolist(), "test_labels": samples.labels[db0.test_idx].tolist()}
    return view, secret


@pytest.fixture
def flower_ids():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_the_server_cannot_tell_a_labs_counts_au_counts_or_test_labels(
        scheme, flower_ids, monkeypatch, tmp_path):
    samples = _samples()
    cfg = fed_cfg(seed=3)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.model.name = "dpk_gat"  # its data prior is built from the summed AU counts
    server_cfg, node_cfg = _key_configs(cfg, tmp_path) if scheme == "ckks" \
        else (_with_privacy(cfg, {"name": "secagg"}),) * 2
    real_counts = flower_app.FlowerRun.au_counts

    def keep(self):  # what the server made of the counts, for the view
        self.au_counts_released = np.asarray(real_counts(self))
        return self.au_counts_released

    monkeypatch.setattr(flower_app.FlowerRun, "au_counts", keep)
    views, secrets = zip(*(_server_view(server_cfg, node_cfg, samples, _world(samples, m),
                                        monkeypatch) for m in (False, True)))
    # db0's own values differ between the two worlds ...
    assert secrets[0]["n"] != secrets[1]["n"]
    assert secrets[0]["au"] != secrets[1]["au"]
    assert secrets[0]["test_labels"] != secrets[1]["test_labels"]
    # ... the server's view does not: it cannot tell which world it is in
    assert views[0].keys() == views[1].keys()
    for key in views[0]:
        assert views[0][key] == views[1][key], key
    assert views[0]["au_counts"] != [[0.0] * 12] * 12  # the sum did arrive
    assert views[0]["per_client"] == {}  # per-lab results: opt-in only
    assert views[0]["pooled"]["pooled_global"]["n"] == \
        sum(len(c.test_idx) for c in _world(samples, False))


def test_per_lab_results_are_an_explicit_opt_in(flower_ids, monkeypatch):
    """``privacy.disclose_per_lab=true`` (the labs' own config): each lab's figures reach the
    server beside the pooled ones, and equal the in-process figures of that lab."""
    samples = _samples()
    cfg = _with_privacy(fed_cfg(seed=3), {"name": "secagg", "disclose_per_lab": True})
    clients = _world(samples, False)
    view, _ = _server_view(cfg, cfg, samples, clients, monkeypatch)
    local = FederatedRun(cfg, samples, clients)
    expected = local.evaluate()
    assert set(view["per_client"]) == {"db0", "db1", "db2"}
    assert view["per_client"] == expected["per_client"]
    assert view["pooled"] == {k: v for k, v in expected.items() if k.startswith("pooled_")}
