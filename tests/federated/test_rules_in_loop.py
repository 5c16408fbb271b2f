"""SCAFFOLD, FedBN and the server optimisers inside the federated loop."""

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients


def test_scaffold_first_round_controls_are_the_option_ii_formula():
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(rule={"name": "scaffold"}, lr=1e-2), s, clients)
    x = [w.copy() for w in run.global_weights]
    updates, _ = run._local_updates(1, [0, 1])
    for u in updates:
        c_i = run.state[u.name].control  # c = c_i = 0 before: c_i+ = (x - y) / (K lr)
        for name, ci, xi, yi in zip(run.entry_names, c_i, x, run.state[u.name].last):
            if name in run.param_names:
                np.testing.assert_allclose(ci, (xi - yi) / (u.steps * 1e-2), rtol=1e-4,
                                           atol=1e-6)
            else:
                assert not ci.any()  # buffers carry no control variate


def test_scaffold_server_control_is_the_mean_client_delta_and_corrects_gradients():
    s = toy_samples(n_db=3, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(rule={"name": "scaffold"}), s, clients)
    run.round(1)
    controls = [run.state[c.name].control for c in clients]
    expected = [np.mean(layer, axis=0) for layer in zip(*controls)]  # S = N: c = mean c_i
    for c, e in zip(run.server_control, expected):
        np.testing.assert_allclose(c, e, rtol=1e-5, atol=1e-7)
    assert any(np.abs(c).max() > 0 for c in run.server_control)
    # round 2 trains with the correction c - c_i, so it differs from a FedAvg round 2
    fedavg = FederatedRun(fed_cfg(), s, clients)
    fedavg.round(1)
    for a, b in zip(fedavg.global_weights, run.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # round 1: same (c = 0)
    run.round(2)
    fedavg.round(2)
    assert any(not np.allclose(a, b) for a, b in zip(fedavg.global_weights,
                                                     run.global_weights))


def test_single_client_scaffold_equals_fedavg():
    """With one client c = c_i after every round, so the correction vanishes."""
    s = toy_samples(n_db=1, n_subjects=5, learnable=True)
    clients = natural_clients(s, seed=0)
    runs = [FederatedRun(fed_cfg(rule={"name": rule}), s, clients)
            for rule in ("scaffold", "fedavg")]
    for run in runs:
        for rnd in (1, 2, 3):
            run.round(rnd)
    for a, b in zip(runs[0].global_weights, runs[1].global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fedbn_clients_keep_their_own_batch_norm():
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(rule={"name": "fedbn"}), s, clients)
    run.round(1)
    assert any(run.bn_mask) and not all(run.bn_mask)
    a, b = (run._for_client(run.global_weights, c.name) for c in clients)
    for keep_local, wa, wb, g, la, lb in zip(run.bn_mask, a, b, run.global_weights,
                                             run.state["db0"].last, run.state["db1"].last):
        if keep_local:
            np.testing.assert_array_equal(wa, la)
            np.testing.assert_array_equal(wb, lb)
        else:
            np.testing.assert_array_equal(wa, g)
            np.testing.assert_array_equal(wb, g)
    bn = [i for i, m in enumerate(run.bn_mask) if m and a[i].dtype.kind == "f"]
    assert any(not np.allclose(a[i], b[i]) for i in bn)  # the two sites' BN differ


@pytest.mark.parametrize("opt", [{"name": "sgd", "lr": 1.0, "momentum": 0.9},
                                 {"name": "fedadam", "eta": 0.01, "tau": 0.001},
                                 {"name": "fedyogi", "eta": 0.01, "tau": 0.001},
                                 {"name": "fedadagrad", "eta": 0.01, "tau": 0.001}])
def test_server_optimisers_run_in_the_loop(opt):
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    run = FederatedRun(fed_cfg(server_opt=opt), s, natural_clients(s, seed=0))
    before = [w.copy() for w in run.global_weights]
    run.round(1)
    assert any(not np.allclose(a, b) for a, b in zip(before, run.global_weights))
    assert all(np.isfinite(w).all() for w in run.global_weights)


def test_unknown_rule_is_refused():
    s = toy_samples(n_db=2, n_subjects=4)
    with pytest.raises(ValueError, match="unknown federated.rule.name 'fedbogus'"):
        FederatedRun(fed_cfg(rule={"name": "fedbogus"}), s, natural_clients(s, seed=0))
