"""Kept client modules (``federated.reuse_clients``) give bit-identical federations.

The reference is the fresh-module path (``reuse_clients: false``: a module built per client
per round, as before the switch existed). Both paths train the same rounds from the same seed;
every global weight and every client's personalised/last model must be equal bit for bit.
"""

import numpy as np
import pytest
import torch
from fedtoys import fed_cfg, toy_samples
from omegaconf import open_dict

from mer.federated.client import RngTape
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients

RULE_SETTINGS = {
    "fedavg": {"rule": {"name": "fedavg"}},
    "fedprox": {"rule": {"name": "fedprox"}, "mu": 0.5, "personalise": {"own": 0.9}},
    "scaffold": {"rule": {"name": "scaffold"},
                 "client_optimizer": {"name": "sgd", "momentum": 0.0, "lr": None}},
    "fedbn": {"rule": {"name": "fedbn"}},
}


def _run(samples, rule: str, reuse: bool, rounds: int = 3, model: str = "ststnet"):
    cfg = fed_cfg(rounds=rounds, local_epochs=2, reuse_clients=reuse, **RULE_SETTINGS[rule])
    if model == "dpk_gat":
        with open_dict(cfg):
            cfg.model.name = "dpk_gat"
            cfg.model.kwargs = {"dropout": 0.3}
    run = FederatedRun(cfg, samples, natural_clients(samples, seed=0))
    for rnd in range(1, rounds + 1):
        run.round(rnd)
    return run


def _assert_same(a: FederatedRun, b: FederatedRun) -> None:
    assert len(a.global_weights) == len(b.global_weights)
    for name, x, y in zip(a.entry_names, a.global_weights, b.global_weights):
        assert np.array_equal(x, y), f"global {name} differs"
    for client in a.state:
        for what in ("personal", "last", "control"):
            x, y = getattr(a.state[client], what), getattr(b.state[client], what)
            assert (x is None) == (y is None), (client, what)
            if x is not None:
                assert all(np.array_equal(u, v) for u, v in zip(x, y)), (client, what)


@pytest.mark.parametrize("rule", sorted(RULE_SETTINGS))
def test_kept_modules_equal_fresh_modules_bit_for_bit(rule):
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    fresh, kept = _run(s, rule, reuse=False), _run(s, rule, reuse=True)
    assert kept._kept and all(k is not None for k in kept._kept.values())  # really reused
    assert not fresh._kept
    _assert_same(fresh, kept)
    assert not np.array_equal(kept.global_weights[0], kept.initial_weights[0])  # it trained


def test_kept_modules_equal_fresh_with_dpk_gat():
    """DPK-GAT: dropout, batch norm, AU targets and its data prior, over 2 rounds."""
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    rng = np.random.default_rng(0)
    s.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 9, 12], 2, False))
                     for _ in range(len(s.meta))]
    s.meta["has_aus"] = True
    fresh = _run(s, "fedprox", reuse=False, rounds=2, model="dpk_gat")
    kept = _run(s, "fedprox", reuse=True, rounds=2, model="dpk_gat")
    assert kept._kept and all(k is not None for k in kept._kept.values())
    _assert_same(fresh, kept)


def test_kept_module_is_one_object_per_client_and_predictions_agree():
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    kept = _run(s, "fedavg", reuse=True, rounds=2)
    modules = {name: k.module for name, k in kept._kept.items()}
    kept.round(3)
    assert {name: k.module for name, k in kept._kept.items()} == modules  # same objects
    fresh = _run(s, "fedavg", reuse=False, rounds=3)
    for c in kept.clients:
        assert np.array_equal(kept.predict(kept.global_weights, c),
                              fresh.predict(fresh.global_weights, c))


def test_rng_tape_replays_the_draws_of_a_build():
    torch.manual_seed(3)
    tape = RngTape()
    with tape:
        torch.nn.Linear(5, 4)
        torch.randn(3, 7)
        torch.empty(20).normal_()
    after = torch.get_rng_state()
    torch.manual_seed(3)
    tape.replay()
    assert torch.equal(torch.get_rng_state(), after)
    assert len(tape.ops) == 4  # weight and bias uniform_, randn, normal_


def test_a_build_drawing_from_numpy_is_not_replayed(monkeypatch):
    """A build that draws from NumPy's generator cannot be replayed: fresh modules, same
    results."""
    import mer.federated.task as client  # recognition's modules are built there

    real = client.build_module

    def drawing(*args, **kwargs):
        np.random.random()
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "build_module", drawing)
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    kept = _run(s, "fedavg", reuse=True, rounds=2)
    assert kept._kept and all(k is None for k in kept._kept.values())
    fresh = _run(s, "fedavg", reuse=False, rounds=2)
    _assert_same(fresh, kept)
