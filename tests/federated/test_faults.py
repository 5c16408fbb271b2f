"""Faults and attacks: known values of each attack, and the loop's handling of stragglers,
late, NaN-sending, label-flipping and Byzantine clients."""

import math

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

from mer.federated.faults import FaultPlan, flip_labels, gaussian, scaling, sign_flip
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients

X = [np.array([1.0, 2.0], np.float32), np.array(3, np.int64)]
Y = [np.array([2.0, 0.0], np.float32), np.array(5, np.int64)]


def test_attacks_hand_computed():
    rng = np.random.default_rng(0)
    flipped = sign_flip(Y, X, 2.0, rng)  # x - 2 (y - x) = [1 - 2, 2 + 4]
    np.testing.assert_array_equal(flipped[0], [-1.0, 6.0])
    assert flipped[0].dtype == np.float32 and flipped[1] == 5  # integer buffers untouched
    np.testing.assert_array_equal(scaling(Y, X, 3.0, rng)[0], [4.0, -4.0])
    noisy = gaussian(Y, X, 0.0, rng)[0]
    np.testing.assert_array_equal(noisy, X[0])  # sigma 0: the global model itself
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 2]), 3), [2, 1, 0])


def test_fault_plan_is_reproducible_and_checks_names():
    plan = FaultPlan({"dropout": 0.5, "stragglers": {"probability": 0.5, "work": 0.25}}, 7,
                     ["a", "b"])
    again = FaultPlan({"dropout": 0.5, "stragglers": {"probability": 0.5, "work": 0.25}}, 7,
                      ["a", "b"])
    draws = [(plan.drops_out(r, k), plan.work(r, k)) for r in range(20) for k in range(2)]
    assert draws == [(again.drops_out(r, k), again.work(r, k)) for r in range(20)
                     for k in range(2)]
    assert 5 < sum(d for d, _ in draws) < 35 and {w for _, w in draws} == {0.25, 1.0}
    with pytest.raises(ValueError, match="unknown client.*'c'"):
        FaultPlan({"byzantine": {"clients": ["c"]}}, 0, ["a", "b"])
    with pytest.raises(ValueError, match="attack 'bogus' unknown"):
        FaultPlan({"byzantine": {"clients": ["a"], "attack": "bogus"}}, 0, ["a", "b"])


def test_a_straggler_does_only_part_of_its_local_steps():
    s = toy_samples(n_db=2, n_subjects=4, per_subject=6)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(local_epochs=2, faults={"stragglers": {"probability": 1.0,
                                                                       "work": 0.5}}),
                       s, clients)
    updates, faults = run._local_updates(1, [0, 1])
    for u, c in zip(updates, clients):
        full = 2 * math.ceil(len(c.train_idx) / 8)
        assert u.work == 0.5 and u.steps == int(0.5 * full) < full
    assert run.round(2)["stragglers"] == ["db0", "db1"]


def test_late_updates_are_discarded_and_counted():
    s = toy_samples(n_db=2, n_subjects=4)
    run = FederatedRun(fed_cfg(faults={"deadline_s": 0.0}), s, natural_clients(s, seed=0))
    before = [w.copy() for w in run.global_weights]
    stats = run.round(1)
    assert stats["late"] == ["db0", "db1"] and stats["clients"] == []
    for a, b in zip(before, run.global_weights):
        np.testing.assert_array_equal(a, b)


def test_a_nan_update_is_excluded_logged_and_counted(monkeypatch, caplog):
    s = toy_samples(n_db=3, n_subjects=4)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(), s, clients)
    honest = FederatedRun.train_client

    def poisoned(self, client, rnd, k, anchor=None):
        update = honest(self, client, rnd, k, anchor)
        if client.name == "db1":
            update.weights = [np.full_like(w, np.nan) if w.dtype.kind == "f" else w
                              for w in update.weights]
        return update

    monkeypatch.setattr(FederatedRun, "train_client", poisoned)
    stats = run.round(1)
    assert stats["excluded"] == ["db1"] and "non-finite" in run.excluded[0]["reason"]
    assert "client db1 excluded" in caplog.text
    assert all(np.isfinite(w).all() for w in run.global_weights)


def test_label_flip_client_trains_on_flipped_labels():
    s = toy_samples(n_db=2, n_subjects=4)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(faults={"byzantine": {"clients": ["db1"],
                                                     "attack": "label_flip"}}), s, clients)
    module = run._module(run.global_weights)
    honest = run._datamodule(clients[0], clients[0].test_idx, 0, module, flip=False)
    flipped = run._datamodule(clients[1], clients[1].test_idx, 0, module,
                              flip=run.faults.flips_labels("db1"))
    np.testing.assert_array_equal(honest.tensors[1].numpy(), s.labels)
    np.testing.assert_array_equal(flipped.tensors[1].numpy(), 2 - s.labels)
    assert not run.faults.flips_labels("db0")


def test_a_sign_flipping_client_sends_the_reversed_update():
    s = toy_samples(n_db=2, n_subjects=4)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(faults={"byzantine": {"clients": ["db1"], "scale": 3.0}}),
                       s, clients)
    x = run.global_weights
    update = run.train_client(clients[1], 1, 1)
    honest = run.state["db1"].last  # what it really trained
    for sent, y, xi in zip(update.weights, honest, x):
        if sent.dtype.kind == "f":
            np.testing.assert_allclose(sent, xi - 3.0 * (y - xi), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_robust_rule_survives_a_sign_flipper_that_wrecks_fedavg():
    """5 clients, one sends -10x its update: FedAvg collapses, the robust rules keep learning."""
    s = toy_samples(n_db=5, n_subjects=4, per_subject=6, learnable=True)
    clients = natural_clients(s, seed=0)
    attack = {"byzantine": {"clients": ["db3"], "attack": "sign_flip", "scale": 10.0}}

    def accuracy(rule: dict, faults: dict) -> float:
        run = FederatedRun(fed_cfg(rule=rule, faults=faults, lr=3e-3), s, clients)
        for rnd in range(1, 7):
            run.round(rnd)
        return run.evaluate()["pooled_global"]["accuracy"]

    clean = accuracy({"name": "fedavg"}, {})
    fedavg = accuracy({"name": "fedavg"}, attack)
    median = accuracy({"name": "median"}, attack)
    krum = accuracy({"name": "krum", "num_malicious": 1, "num_to_keep": 3}, attack)
    trimmed = accuracy({"name": "trimmed_mean", "beta": 0.2}, attack)
    assert clean > 0.8
    assert fedavg < 0.55  # chance is 1/3
    assert median > 0.8 and krum > 0.8 and trimmed > 0.8

