"""Rules as units (issue 14): the name -> class table, privacy compatibility as an attribute,
and FedNova-lite (the example of a new rule) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

from mer.federated.aggregators import fednova
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients
from mer.federated.rules import RULES, Rule, rule_names
from mer.federated.state import ClientUpdate


def test_every_rule_is_a_rule_class_and_privacy_is_an_attribute():
    for name, cls in RULES.items():
        assert issubclass(cls, Rule) and cls.name == name
    assert rule_names(private=True) == ("fedavg", "fedbn", "fedprox")
    assert RULES.get("fednova").needs_individual_updates  # the server needs each step count


def test_fednova_hand_computed():
    """x = 0; y1 = -2 after 2 steps, y2 = -3 after 6 steps, equal n: d = (1, 0.5), p = 1/2,
    tau_eff = 4 -> x+ = -4 * 0.75 = -3 (FedAvg: -2.5). Integer buffers take FedAvg's mean."""
    current = [np.zeros(2, np.float32), np.array([10], np.int64)]
    results = [([np.full(2, -2.0, np.float32), np.array([12], np.int64)], 1),
               ([np.full(2, -3.0, np.float32), np.array([14], np.int64)], 1)]
    out = fednova(current, results, [2, 6])
    np.testing.assert_allclose(out[0], [-3.0, -3.0])
    assert out[0].dtype == np.float32 and out[1].tolist() == [13]
    # unequal sizes: p = (1/4, 3/4), tau_eff = 0.5 + 4.5 = 5, sum p d = 0.25 + 0.375 -> -3.125
    out = fednova(current, [(results[0][0], 1), (results[1][0], 3)], [2, 6])
    np.testing.assert_allclose(out[0], [-3.125, -3.125])
    # equal steps: FedNova is FedAvg
    same = fednova(current, results, [3, 3])
    np.testing.assert_allclose(same[0], [-2.5, -2.5])
    with pytest.raises(ValueError, match="step counts"):
        fednova(current, results, [0, 0])


def test_fednova_rule_uses_the_step_counts():
    s = toy_samples(n_db=2, n_subjects=4)
    run = FederatedRun(fed_cfg(rule={"name": "fednova"}), s, natural_clients(s, seed=0))
    x = [np.zeros_like(w) for w in run.global_weights]
    ups = [ClientUpdate("a", [w - 2 for w in x], 1, 2, 0.0),
           ClientUpdate("b", [w - 3 for w in x], 1, 6, 0.0)]
    got = run.strategy.aggregate_updates(ups, x)
    want = fednova(x, [(u.weights, u.num_examples) for u in ups], [2, 6])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    record = run.round(1)  # a whole round runs
    assert record["skipped"] is None and len(record["clients"]) == 2


def test_fednova_is_refused_under_secure_aggregation():
    s = toy_samples(n_db=2, n_subjects=4)
    cfg = fed_cfg(rule={"name": "fednova"})
    cfg.privacy = {"name": "secagg"}
    with pytest.raises(ValueError, match="cannot run under privacy=secagg"):
        FederatedRun(cfg, s, natural_clients(s, seed=0))


def test_mu_outside_fedprox_is_refused():
    s = toy_samples(n_db=2, n_subjects=4)
    with pytest.raises(ValueError, match="proximal term is FedProx's"):
        FederatedRun(fed_cfg(mu=0.01), s, natural_clients(s, seed=0))
