"""fidelity=official in the federated loop: per-database mu and the unsquared norm reach the
clients, the anchor is the initial model, P-FedProx leaves BN buffers local, DPK-GAT's AU
model is frozen; fidelity=mer keeps mer's choices."""

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples
from omegaconf import open_dict

from mer.federated.fedprox import ProximalTerm
from mer.federated.fidelity import FedFidelity, federated_model_cfg, from_config
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients

TABLE = {"casme2": 0.01, "samm": 0.001, "casme3": 0.01, "default": 0.02}


def _cfg(fidelity: str, **federated):
    cfg = fed_cfg(rule={"name": "fedprox"}, mu=0.01, personalise={"own": 0.9},
                  mu_per_database=TABLE, **federated)
    with open_dict(cfg):
        cfg.fidelity = fidelity
        cfg.data.families = {"db0": "casme2", "db1": "samm"}
    return cfg


def test_fidelity_settings_from_config():
    mer, official = from_config(_cfg("mer")), from_config(_cfg("official"))
    assert (mer.prox_norm, mer.prox_anchor, mer.mix_buffers) == ("squared", "global", True)
    assert (official.prox_norm, official.prox_anchor, official.mix_buffers) == \
        ("l2", "initial", False)
    assert mer.mu_for({"db1"}) == 0.01  # mer: one mu
    # official: per database family (db0 imitates casme2, db1 samm, db2 nothing known)
    assert official.mu_for({"db0"}) == 0.01 and official.mu_for({"db1"}) == 0.001
    assert official.mu_for({"db2"}) == 0.02 and official.mu_for({"db0", "db1"}) == 0.02
    assert FedFidelity("official", mu=0.0, mu_per_database=TABLE).mu_for({"db1"}) == 0.0
    # an explicit key wins over the fidelity
    both = from_config(_cfg("official", prox_anchor="global", prox_norm="squared"))
    assert (both.prox_anchor, both.prox_norm) == ("global", "squared")
    with pytest.raises(ValueError, match="fidelity=paper"):
        from_config(_cfg("paper"))


def test_official_freezes_the_au_model_of_networks_that_have_one():
    dpk = {"name": "dpk_gat", "kwargs": {"freeze_au": None}}
    assert federated_model_cfg(dpk, "official")["kwargs"]["freeze_au"] is True
    assert federated_model_cfg(dpk, "mer") is dpk
    explicit = {"name": "dpk_gat", "kwargs": {"freeze_au": False}}
    assert federated_model_cfg(explicit, "official")["kwargs"]["freeze_au"] is False
    sts = {"name": "ststnet", "kwargs": {}}
    assert federated_model_cfg(sts, "official") == sts  # no AU model to freeze


@pytest.mark.parametrize("fidelity", ["mer", "official"])
def test_the_loop_applies_the_fidelity(fidelity, monkeypatch):
    s = toy_samples(n_db=3, n_subjects=4, learnable=True)
    run = FederatedRun(_cfg(fidelity), s, natural_clients(s, seed=0))
    calls = []
    init = ProximalTerm.__init__

    def spy(self, mu, anchor, norm="squared"):
        anchor = list(anchor)
        calls.append((mu, norm, [a.detach().numpy().copy() for a in anchor]))
        return init(self, mu, anchor, norm)

    monkeypatch.setattr(ProximalTerm, "__init__", spy)
    for rnd in (1, 2):
        calls.clear()
        record = run.round(rnd)
        assert record["clients"] == ["db0", "db1", "db2"]
        if fidelity == "official":
            assert [(mu, norm) for mu, norm, _ in calls] == \
                [(0.01, "l2"), (0.001, "l2"), (0.02, "l2")]
        else:
            assert [(mu, norm) for mu, norm, _ in calls] == [(0.01, "squared")] * 3
        params = [w for n, w in zip(run.entry_names, run.initial_weights)
                  if n in run.param_names]
        anchor = calls[0][2]
        if fidelity == "official" or rnd == 1:  # round 1: the global model is the initial one
            for a, p in zip(anchor, params):
                np.testing.assert_array_equal(a, p)
        else:  # mer, round 2: the round's global model, not the initial one
            assert any(not np.array_equal(a, p) for a, p in zip(anchor, params))
    # P-FedProx: official mixes parameters only, each client keeps its own BN buffers
    buffers = [i for i, n in enumerate(run.entry_names) if n not in run.param_names]
    assert buffers
    mixed_any = False
    for name in ("db0", "db1", "db2"):
        personal, last = run.state[name].personal, run.state[name].last
        for i in buffers:
            same = np.array_equal(personal[i], last[i])
            assert same or fidelity == "mer"
            mixed_any |= not same
    assert mixed_any == (fidelity == "mer")  # mer mixes the running statistics too


def test_official_federated_dpk_gat_trains_only_its_emotion_head():
    """DPK-GAT under fidelity=official in a federated round: the AU part stays at the
    initial weights (frozen, as the authors' au_graph_mer), the emotion head moves."""
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    rng = np.random.default_rng(0)
    s.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 9, 12], 2, False))
                     for _ in range(len(s.meta))]
    s.meta["has_aus"] = True
    cfg = _cfg("official")
    with open_dict(cfg):
        cfg.model.name = "dpk_gat"
        cfg.model.kwargs = {"fidelity": "official", "freeze_au": None}
    run = FederatedRun(cfg, s, natural_clients(s, seed=0))
    assert run.model_cfg["kwargs"]["freeze_au"] is True
    run.round(1)
    moved = {n.split(".")[0] for n, a, b in zip(run.entry_names, run.initial_weights,
                                                 run.global_weights)
             if n in run.param_names and not np.array_equal(a, b)}
    assert moved == {"au_stream", "flow_stream", "classifier"}
