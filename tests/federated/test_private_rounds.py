"""The privacy layer inside federated rounds: what the server receives, equality with
plaintext FedAvg, P-FedProx from the decoded sum, DP accounting, refusals."""

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples
from omegaconf import OmegaConf, open_dict

from mer.federated.loop import FederatedRun, run_federated
from mer.federated.partition import natural_clients
from mer.privacy.base import flatten

CKKS = {"name": "ckks", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60],
        "scale_bits": 40, "chunk_size": 4096, "symmetric": True, "n_threads": 0}
SECAGG = {"name": "secagg", "mask_bits": 64, "frac_bits": 24, "min_clients": 3}


def _cfg(privacy, **federated):
    cfg = fed_cfg(**federated)
    with open_dict(cfg):
        cfg.privacy = OmegaConf.create(privacy)
    return cfg


@pytest.mark.parametrize("privacy", [CKKS, SECAGG], ids=["ckks", "secagg"])
def test_secure_rounds_equal_plaintext_and_the_server_sees_only_payloads(privacy, monkeypatch):
    s = toy_samples(n_db=3, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    federated = {"rule": {"name": "fedprox"}, "mu": 0.01, "personalise": {"own": 0.9}}
    plain = FederatedRun(fed_cfg(**federated), s, clients)
    secure = FederatedRun(_cfg(privacy, **federated), s, clients)
    seen = []
    server_sum = FederatedRun.server_sum

    def spy(self, payloads):
        seen.append(payloads)
        return server_sum(self, payloads)

    monkeypatch.setattr(FederatedRun, "server_sum", spy)
    plain.round(1)
    secure.round(1)
    for a, b in zip(plain.global_weights, secure.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for c in clients:  # P-FedProx models each client made from the decoded sum
        for a, b in zip(plain.state[c.name].personal, secure.state[c.name].personal):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # what crossed to the server: bytes only, none of them holding a client's update
    (payloads,) = seen
    assert set(payloads) == {c.name for c in clients}
    for c in clients:
        update = flatten(secure.state[c.name].last)
        for payload in payloads.values():
            assert isinstance(payload, bytes)
            for dtype in (np.float32, np.float64):
                assert update[:8].astype(dtype).tobytes() not in payload
                weighted = (update[:8] * len(c.train_idx)).astype(dtype).tobytes()
                assert weighted not in payload


@pytest.mark.parametrize("privacy", [CKKS, {"name": "central_dp", "noise_multiplier": 1.0,
                                            "clip_norm": 1.0, "delta": 1e-3,
                                            "accountant": "rdp"}], ids=["ckks", "central_dp"])
def test_rules_that_need_individual_updates_are_refused(privacy):
    s = toy_samples(n_db=3, n_subjects=4)
    with pytest.raises(ValueError, match="cannot run under privacy"):
        FederatedRun(_cfg(privacy, rule={"name": "median"}), s, natural_clients(s, seed=0))


def test_dp_sgd_epsilon_grows_per_client_and_matches_its_accountant():
    from opacus.accountants import RDPAccountant

    s = toy_samples(n_db=2, n_subjects=4, per_subject=6, learnable=True)
    clients = natural_clients(s, seed=0)
    dp = {"name": "dp", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": None,
          "delta": 1e-5, "accountant": "rdp", "sample_rate": None, "secure_mode": False}
    run = FederatedRun(_cfg(dp), s, clients)
    assert not any(k.endswith("running_mean") for k in run._module(run.global_weights)
                   .net.state_dict())  # batch norm converted for Opacus
    eps = [run.round(r)["privacy"]["clients"] for r in (1, 2)]
    for c in clients:
        assert 0 < eps[0][c.name] < eps[1][c.name]
        q = 1 / round(len(c.train_idx) / 8)
        reference = RDPAccountant()
        reference.history = [(1.0, q, 2 * round(1 / q))]  # 2 rounds x 1 epoch x 1/q steps
        assert eps[1][c.name] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_central_dp_clips_noises_and_accounts_per_round():
    s = toy_samples(n_db=3, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    central = {"name": "central_dp", "noise_multiplier": 0.0, "clip_norm": 1e-3,
               "delta": 1e-3, "accountant": "rdp"}
    run = FederatedRun(_cfg(central), s, clients)
    before = flatten(run.global_weights)
    run.round(1)
    step = np.linalg.norm(flatten(run.global_weights) - before)
    assert 0 < step <= 1e-3 + 1e-9  # the mean of updates clipped to 1e-3
    noisy = FederatedRun(_cfg({**central, "noise_multiplier": 1.0}), s, clients)
    e1 = noisy.round(1)["privacy"]["central"]
    e2 = noisy.round(2)["privacy"]["central"]
    assert 0 < e1 < e2


# -- a protected aggregate needs privacy.min_clients contributors (issue 13, finding 2) ------

PRIVATE = {"ckks": {"name": "ckks", "chunk_size": 4096},
           "secagg": {"name": "secagg"},
           "central_dp": {"name": "central_dp", "noise_multiplier": 0.0, "clip_norm": 10.0,
                          "delta": 1e-3, "accountant": "rdp"}}


@pytest.mark.parametrize("privacy", list(PRIVATE))
def test_a_round_with_one_contributor_is_skipped_not_opened_nor_aborted(privacy):
    """Two of three labs fail in round 1: the protected aggregate of the one left is neither
    released (global model unchanged) nor an abort of the run; the round is logged, counted
    (``skipped`` in its record, ``counts.skipped_rounds``) and round 2 aggregates again."""
    s = toy_samples(n_db=3, n_subjects=3, per_subject=2, learnable=True)
    clients = natural_clients(s, seed=0)
    crash = [{"client": "db0", "round": 1}, {"client": "db1", "round": 1}]
    cfg = _cfg(PRIVATE[privacy], faults={"crash": crash})
    run = FederatedRun(cfg, s, clients)
    record = run.round(1)
    for a, b in zip(run.global_weights, run.initial_weights):
        np.testing.assert_array_equal(a, b)
    assert record["clients"] == ["db2"] and "min_clients" in str(record["skipped"])
    record = run.round(2)
    assert not record["skipped"]
    assert any(not np.array_equal(a, b) for a, b in zip(run.global_weights,
                                                        run.initial_weights))


def test_skipped_rounds_are_counted_in_the_results():
    s = toy_samples(n_db=3, n_subjects=3, per_subject=2, learnable=True)
    crash = [{"client": "db0", "round": 2}]
    cfg = _cfg(PRIVATE["secagg"], faults={"crash": crash})
    results = run_federated(cfg, s, natural_clients(s, seed=0), show_progress=False)
    assert results["counts"]["skipped_rounds"] == 1
    assert [bool(r["skipped"]) for r in results["rounds"]] == [False, True]


