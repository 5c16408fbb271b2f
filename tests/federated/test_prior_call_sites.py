"""DPK-GAT's data prior where federated runs build their models: each federation's prior is
the AU co-occurrence of its clients' training splits only (in-process holdout, federated LOSO
folds, Flower nodes and server), counted here independently from the sample table."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from fedtoys import fed_cfg, toy_samples
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import open_dict

from mer.data.aus import PSYAU_AUS
from mer.federated import flower_app, loop
from mer.federated.loop import FederatedRun, make_clients
from mer.federated.protocols import run_loso


def samples_with_aus(n_db: int = 2, n_subjects: int = 4, seed: int = 0):
    """Toy samples whose clips carry 1 to 3 AUs each (some outside DPK-GAT's 12 nodes, some
    clips unannotated)."""
    s = toy_samples(n_db=n_db, n_subjects=n_subjects, learnable=True)
    rng = np.random.default_rng(seed)
    pool = list(PSYAU_AUS) + [16, 43]
    s.meta["aus"] = [tuple(int(a) for a in rng.choice(pool, rng.integers(1, 4), replace=False))
                     for _ in range(len(s.meta))]
    s.meta["has_aus"] = rng.random(len(s.meta)) > 0.15
    return s


def expected_prior(samples, idx) -> np.ndarray:
    """Row-normalised co-occurrence of the annotated samples at ``idx``, by hand."""
    counts = np.zeros((len(PSYAU_AUS), len(PSYAU_AUS)))
    for i in idx:
        row = samples.meta.iloc[int(i)]
        if row["has_aus"]:
            on = [PSYAU_AUS.index(a) for a in row["aus"] if a in PSYAU_AUS]
            counts[np.ix_(on, on)] += 1
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1e-12), 0.0)


def expected_prior_from_counts(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1e-12), 0.0)


def dpk_cfg(**federated):
    cfg = fed_cfg(**federated)
    with open_dict(cfg):
        cfg.model.name = "dpk_gat"
    return cfg


def prior_of(run: FederatedRun, weights) -> np.ndarray:
    return weights[run.entry_names.index("data_prior")]


def check_training_only(samples, clients, prior) -> None:
    """``prior`` is the clients' training splits' one, and not the one with their tests."""
    train = np.concatenate([c.train_idx for c in clients])
    every = np.concatenate([train] + [c.test_idx for c in clients])
    np.testing.assert_allclose(prior, expected_prior(samples, train), rtol=0, atol=1e-6)
    assert not np.allclose(prior, expected_prior(samples, every), atol=1e-4)


def test_holdout_federation_prior_counts_training_splits_only():
    s = samples_with_aus()
    cfg = dpk_cfg(rounds=1)
    clients = make_clients(cfg, s)
    run = FederatedRun(cfg, s, clients)
    built = []
    make = run._module
    run._module = lambda w, *key: built.append(make(w, *key)) or built[-1]  # every model
    check_training_only(s, clients, prior_of(run, run.initial_weights))
    run.round(1)
    check_training_only(s, clients, prior_of(run, run.global_weights))
    assert len(built) >= len(clients)
    for module in built:
        check_training_only(s, clients, module.net.data_prior.numpy())


def test_federated_loso_folds_count_their_own_training_splits(tmp_path, monkeypatch):
    """One federation per held-out subject: its prior leaves that subject's clips out."""
    s = samples_with_aus(n_db=2, n_subjects=3)
    runs = []

    class Recorded(FederatedRun):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

        def fit(self, start, train, epochs, seed, *args, **kwargs):  # no training: fast
            return [w.copy() for w in start], 1

    monkeypatch.setattr(loop, "FederatedRun", Recorded)
    run_loso(dpk_cfg(rounds=1), s, tmp_path, show_progress=False)
    keys = s.meta["subject_key"].to_numpy()
    assert len(runs) == len(set(keys)) == 6
    for run in runs:
        (held,) = set(keys[np.concatenate([c.test_idx for c in run.clients])])
        train = np.flatnonzero(keys != held)  # everyone else, counted from the table
        prior = prior_of(run, run.initial_weights)
        np.testing.assert_allclose(prior, expected_prior(s, train), rtol=0, atol=1e-6)
        assert not np.allclose(prior, expected_prior(s, np.arange(len(keys))), atol=1e-4)


def test_flower_nodes_send_their_training_counts_and_the_server_sums_them():
    """Each SuperNode's ``describe`` counts its client's training split only; the ServerApp,
    with no sample, builds its model from the sum of what the nodes sent."""
    s = samples_with_aus(n_db=3)
    cfg = dpk_cfg(rounds=1)
    clients = make_clients(cfg, s)
    nodes = {101 + k: flower_app.Node(cfg, FederatedRun(cfg, s, clients), c, k)
             for k, c in enumerate(clients)}
    for node in nodes.values():
        counts = np.asarray(flower_app.describe(node)["au-counts"]).reshape(12, 12)
        c = node.client
        check_training_only(s, [c], expected_prior_from_counts(counts))

    class QueryGrid:  # answers the server's "query" messages as the nodes would
        def get_node_ids(self):
            return list(nodes)

        def send_and_receive(self, messages, *, timeout=None):
            return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=n),
                                    has_error=lambda: False,
                                    content={"client": flower_app.describe(nodes[n])})
                    for n in (m.metadata.dst_node_id for m in messages)]

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        federation = flower_app.discover(QueryGrid(), timeout_s=1)
        server = flower_app.FlowerRun(cfg, federation.samples, federation.clients,
                                      grid=QueryGrid(), federation=federation)
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
    assert not federation.samples.x.any()  # the server holds no flow, no AU annotation
    check_training_only(s, clients, prior_of(server, server.initial_weights))

