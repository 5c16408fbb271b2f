"""mer's aggregation rules and server optimisers against Flower's own code.

Flower is a hard dependency of mer, so its modules are imported plainly: if Flower moves one,
these tests fail (rather than skip) and the hand-computed rule tests in test_aggregators.py and
test_server_opt.py run regardless.
"""

from __future__ import annotations

import flwr.common as flwr_common
import flwr.server.strategy as flwr_strategy
import flwr.server.strategy.aggregate as flwr_aggregate
import numpy as np
import pytest

from mer.federated.aggregators import fedavg, krum, median, trimmed_mean
from mer.federated.server_opt import FedAdagrad, FedAdam, FedYogi, ServerSGD


def random_results(rng, num_clients, shapes=((3, 4), (4,), (2, 2, 2)), dtype=np.float64):
    return [
        ([rng.normal(size=s).astype(dtype) for s in shapes], int(rng.integers(1, 50)))
        for _ in range(num_clients)
    ]


def assert_weights_close(a, b, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# against Flower's own functions (flwr/server/strategy/aggregate.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_fedavg_matches_flower(seed):
    rng = np.random.default_rng(seed)
    results = random_results(rng, 5)
    assert_weights_close(fedavg(results), flwr_aggregate.aggregate(results))
    results32 = random_results(rng, 4, dtype=np.float32)
    assert_weights_close(fedavg(results32), flwr_aggregate.aggregate(results32))


@pytest.mark.parametrize("num_clients", [4, 5])
def test_median_matches_flower(num_clients):
    results = random_results(np.random.default_rng(num_clients), num_clients)
    assert_weights_close(median(results), flwr_aggregate.aggregate_median(results))


@pytest.mark.parametrize("num_clients,beta", [(5, 0.2), (5, 0.3), (6, 0.45), (10, 0.25), (4, 0.0)])
def test_trimmed_mean_matches_flower(num_clients, beta):
    results = random_results(np.random.default_rng(num_clients), num_clients)
    expected = flwr_aggregate.aggregate_trimmed_avg(results, beta)
    assert_weights_close(trimmed_mean(results, beta), expected)


@pytest.mark.parametrize("num_clients,f", [(7, 2), (6, 1), (5, 0), (3, 1)])
def test_krum_matches_flower(num_clients, f):
    rng = np.random.default_rng(10 + num_clients)
    results = random_results(rng, num_clients)
    # Flower's num_clients_to_keep = 0 is plain Krum
    assert_weights_close(krum(results, f), flwr_aggregate.aggregate_krum(results, f, 0))
    for keep in range(1, num_clients + 1):
        expected = flwr_aggregate.aggregate_krum(results, f, keep)
        assert_weights_close(krum(results, f, num_to_keep=keep), expected)


def test_krum_rejects_an_outlier_like_flower():
    rng = np.random.default_rng(3)
    results = random_results(rng, 6)
    results[2] = ([w + 100.0 for w in results[2][0]], results[2][1])
    chosen = krum(results, 1)
    assert np.abs(chosen[0]).max() < 50.0  # the shifted client is never chosen
    assert_weights_close(chosen, flwr_aggregate.aggregate_krum(results, 1, 0))


# ---------------------------------------------------------------------------------------------
# against Flower's strategies (flwr/server/strategy/fedavgm.py, fedadam.py, fedyogi.py,
# fedadagrad.py): run their aggregate_fit on constructed FitRes for several rounds
# ---------------------------------------------------------------------------------------------

SHAPES = ((3, 4), (4,), (2, 2, 2))


def _fit_results(client_results):
    """Flower's (ClientProxy, FitRes) pairs; aggregate_fit never touches the proxy."""
    ok = flwr_common.Status(code=flwr_common.Code.OK, message="")
    return [
        (None, flwr_common.FitRes(ok, flwr_common.ndarrays_to_parameters(w), n, {}))
        for w, n in client_results
    ]


def _compare_with_flower(ours, make_flower, rounds=4, seed=0):
    rng = np.random.default_rng(seed)
    x0 = [rng.normal(size=s) for s in SHAPES]
    flower = make_flower(flwr_common.ndarrays_to_parameters(x0))
    x = x0
    for server_round in range(1, rounds + 1):
        clients = [
            ([xi + 0.3 * rng.normal(size=xi.shape) for xi in x], int(rng.integers(1, 40)))
            for _ in range(3)
        ]
        x = ours.step(x, fedavg(clients))
        params, _ = flower.aggregate_fit(server_round, _fit_results(clients), [])
        expected = flwr_common.parameters_to_ndarrays(params)
        for u, v in zip(x, expected):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-6)
    return x


def test_fedavgm_matches_flower():
    _compare_with_flower(
        ServerSGD(lr=0.7, momentum=0.9),
        lambda p: flwr_strategy.FedAvgM(
            initial_parameters=p, server_learning_rate=0.7, server_momentum=0.9
        ),
    )


def test_plain_sgd_matches_flower_fedavgm_defaults():
    _compare_with_flower(ServerSGD(), lambda p: flwr_strategy.FedAvgM(initial_parameters=p))


def test_fedadam_matches_flower():
    _compare_with_flower(
        FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
        lambda p: flwr_strategy.FedAdam(
            initial_parameters=p, eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3
        ),
    )
    # defaults agree too
    _compare_with_flower(FedAdam(), lambda p: flwr_strategy.FedAdam(initial_parameters=p), seed=1)


def test_fedyogi_matches_flower():
    _compare_with_flower(
        FedYogi(eta=0.03, beta_1=0.85, beta_2=0.9, tau=1e-2),
        lambda p: flwr_strategy.FedYogi(
            initial_parameters=p, eta=0.03, beta_1=0.85, beta_2=0.9, tau=1e-2
        ),
    )
    _compare_with_flower(FedYogi(), lambda p: flwr_strategy.FedYogi(initial_parameters=p), seed=1)


def test_fedadagrad_matches_flower():
    _compare_with_flower(
        FedAdagrad(eta=0.2, tau=1e-4),
        lambda p: flwr_strategy.FedAdagrad(initial_parameters=p, eta=0.2, tau=1e-4),
    )
    _compare_with_flower(
        FedAdagrad(), lambda p: flwr_strategy.FedAdagrad(initial_parameters=p), seed=1
    )
