"""Server optimisers: hand-computed steps, checkpoint state, and Flower's strategies."""

from __future__ import annotations

import numpy as np
import pytest

from mer.federated.aggregators import fedavg
from mer.federated.server_opt import FedAdagrad, FedAdam, FedYogi, ServerSGD


def one(value: float) -> list[np.ndarray]:
    return [np.array([value], dtype=np.float64)]


def test_server_sgd_plain_is_fedavg():
    opt = ServerSGD()
    agg = [np.array([0.1, 0.2], np.float32), np.array(7, np.int64)]
    out = opt.step([np.zeros(2, np.float32), np.array(3, np.int64)], agg)
    np.testing.assert_array_equal(out[0], agg[0])  # exactly the aggregate
    assert out[0].dtype == np.float32 and int(out[1]) == 7
    # bit-identical to the aggregate, with no x + (a - x) round-off (Flower skips the step too)
    rng = np.random.default_rng(0)
    cur, agg = [rng.normal(size=1000)], [rng.normal(size=1000)]
    np.testing.assert_array_equal(ServerSGD().step(cur, agg)[0], agg[0])


def test_server_sgd_momentum_hand_computed():
    opt = ServerSGD(lr=0.5, momentum=0.9)
    # step 1: g = 1 - 0 = 1, m = 1, x = 1 - 0.5 * 1 = 0.5
    x = opt.step(one(1.0), one(0.0))
    np.testing.assert_allclose(x[0], [0.5])
    # step 2: g = 0.5 - 0.3 = 0.2, m = 0.9 * 1 + 0.2 = 1.1, x = 0.5 - 0.55 = -0.05
    x = opt.step(x, one(0.3))
    np.testing.assert_allclose(x[0], [-0.05])


def test_server_sgd_lr_without_momentum():
    # x = 2 - 0.5 * (2 - 1) = 1.5
    np.testing.assert_allclose(ServerSGD(lr=0.5).step(one(2.0), one(1.0))[0], [1.5])


def test_fedadam_hand_computed():
    opt = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9)
    # delta = 1: m = 0.1, v = 0.01; Flower's eta_1 = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    # = 0.1 * 0.1410674 / 0.19 = 0.0742460; x = eta_1 * 0.1 / (0.1 + 1e-9)
    x = opt.step(one(0.0), one(1.0))
    np.testing.assert_allclose(x[0], [0.0742460], atol=1e-7)
    # delta = 0.5: m = 0.09 + 0.05 = 0.14, v = 0.0099 + 0.0025 = 0.0124,
    # eta_2 = 0.1 * sqrt(1 - 0.99^3) / (1 - 0.9^3) = 0.1 * 0.1723398 / 0.271 = 0.0635940
    # x = 0.0742460 + 0.0635940 * 0.14 / 0.1113553 = 0.1541987
    x = opt.step(x, [x[0] + 0.5])
    np.testing.assert_allclose(x[0], [0.1541987], atol=1e-6)


def test_fedadam_bias_correction_options():
    # delta = 1, step 1: m = 0.1, v = 0.01, m / sqrt(v) = 1
    # "adam": eta * sqrt(1 - 0.99) / (1 - 0.9) = 0.1 * 0.1 / 0.1 = 0.1; "none": eta = 0.1 * 1
    adam = FedAdam(eta=0.1, tau=0.0, bias_correction="adam").step(one(0.0), one(1.0))
    none = FedAdam(eta=0.1, tau=0.0, bias_correction="none").step(one(0.0), one(1.0))
    np.testing.assert_allclose(adam[0], [0.1])
    np.testing.assert_allclose(none[0], [0.1])
    with pytest.raises(ValueError, match="bias_correction"):
        FedAdam(bias_correction="kingma")


def test_fedyogi_hand_computed():
    opt = FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    # delta = 2: m = 0.2, v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04; x = 0.01 * 0.2 / 0.201
    x = opt.step(one(0.0), one(2.0))
    np.testing.assert_allclose(x[0], [0.00995024876], atol=1e-10)
    # delta = 1: m = 0.18 + 0.1 = 0.28, v = 0.04 - 0.01 * 1 * sign(0.04 - 1) = 0.05
    x2 = opt.step(x, [x[0] + 1.0])
    np.testing.assert_allclose(x2[0], x[0] + 0.01 * 0.28 / (np.sqrt(0.05) + 1e-3))
    np.testing.assert_allclose(opt.v[0], [0.05])
    # delta = 0.1: v = 0.05 - 0.01 * 0.01 * sign(0.05 - 0.01) = 0.0499 (Yogi shrinks v)
    opt.step(x2, [x2[0] + 0.1])
    np.testing.assert_allclose(opt.v[0], [0.0499])


def test_fedadagrad_hand_computed():
    opt = FedAdagrad(eta=0.1, tau=0.0)
    # delta = 3: m = 3, v = 9, x = 0.1 * 3 / 3 = 0.1
    x = opt.step(one(0.0), one(3.0))
    np.testing.assert_allclose(x[0], [0.1])
    # delta = 4: m = 4, v = 25, x = 0.1 + 0.1 * 4 / 5 = 0.18
    x = opt.step(x, [x[0] + 4.0])
    np.testing.assert_allclose(x[0], [0.18])


def test_integer_buffers_take_the_aggregate():
    opt = FedAdam()
    out = opt.step([np.zeros(2), np.array(10, np.int64)], [np.ones(2), np.array(12, np.int64)])
    assert out[1].dtype == np.int64 and int(out[1]) == 12


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="#0"):
        FedYogi().step([np.zeros(2)], [np.zeros(3)])


@pytest.mark.parametrize(
    "make",
    [lambda: ServerSGD(lr=0.7, momentum=0.9), FedAdam, FedYogi, FedAdagrad],
    ids=["sgdm", "adam", "yogi", "adagrad"],
)
def test_state_dict_round_trip_through_npz(make, tmp_path):
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    aggs = [[xi + rng.normal(size=xi.shape) for xi in x] for _ in range(3)]
    a = make()
    x = a.step(x, aggs[0])
    x = a.step(x, aggs[1])
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "opt.npz", **state)
    with np.load(tmp_path / "opt.npz") as f:
        loaded = dict(f)
    b = make()
    b.load_state_dict(loaded)
    assert b.t == 2
    xa, xb = a.step(x, aggs[2]), b.step(x, aggs[2])
    for u, v in zip(xa, xb):
        np.testing.assert_array_equal(u, v)
    # a fresh optimiser (no state) would step differently
    xc = make().step(x, aggs[2])
    assert not all(np.allclose(u, v) for u, v in zip(xa, xc))
    with pytest.raises(KeyError, match="unknown"):
        b.load_state_dict({**state, "bogus.0": np.zeros(1)})


# ---------------------------------------------------------------------------------------------
# against Flower's strategies (flwr/server/strategy/fedavgm.py, fedadam.py, fedyogi.py,
# fedadagrad.py): run their aggregate_fit on constructed FitRes for several rounds
# ---------------------------------------------------------------------------------------------

flwr_common = pytest.importorskip("flwr.common")
flwr_strategy = pytest.importorskip("flwr.server.strategy")

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
