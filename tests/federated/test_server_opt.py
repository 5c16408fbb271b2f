"""Server optimisers: hand-computed steps and checkpoint state (against Flower's strategies:
test_against_flower.py)."""

from __future__ import annotations

import numpy as np
import pytest

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
    # Adam's first step is eta * sign(delta) under Kingma's correction and under none: the
    # options only part from step 2 (and "flower" from step 1). eta = 0.1, b1 = 0.9,
    # b2 = 0.99, tau = 0. Step 1, delta = 1: m = 0.1, v = 0.01, m / sqrt(v) = 1.
    # Step 2, delta = 0.5: m = 0.14, v = 0.0124, m / sqrt(v) = 1.2572371.
    #   "flower": eta_t = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) = 0.0742460, 0.0635940
    #             x1 = 0.0742460, x2 = x1 + 0.0635940 * 1.2572371 = 0.1541987
    #   "adam":   eta_t = eta * sqrt(1 - b2^t) / (1 - b1^t) = 0.1, 0.0742460
    #             x1 = 0.1,       x2 = 0.1 + 0.0742460 * 1.2572371 = 0.1933448
    #   "none":   eta_t = eta = 0.1
    #             x1 = 0.1,       x2 = 0.1 + 0.1 * 1.2572371 = 0.2257237
    expected = {"flower": (0.0742460, 0.1541987), "adam": (0.1, 0.1933448),
                "none": (0.1, 0.2257237)}
    for option, (x1, x2) in expected.items():
        opt = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=0.0, bias_correction=option)
        x = opt.step(one(0.0), one(1.0))
        np.testing.assert_allclose(x[0], [x1], atol=1e-7, err_msg=option)
        x = opt.step(x, [x[0] + 0.5])
        np.testing.assert_allclose(x[0], [x2], atol=1e-7, err_msg=option)
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


# -- the server optimisers the rule configs compose (conf/federated/*.yaml) -----------------


def _composed_server_opt(rule: str):
    from hydra import compose, initialize_config_dir

    from mer.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"federated={rule}"]).federated.server_opt


@pytest.mark.parametrize("rule, cls, settings", [
    ("fedadam", FedAdam, {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}),
    ("fedyogi", FedYogi, {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}),
    ("fedadagrad", FedAdagrad, {"eta": 0.01, "tau": 0.001}),
    ("fedavgm", ServerSGD, {"lr": 1.0, "momentum": 0.9}),
    ("fedavg", ServerSGD, {"lr": 1.0, "momentum": 0.0}),
    ("scaffold", ServerSGD, {"lr": 1.0, "momentum": 0.0}),
    ("pfedprox", ServerSGD, {"lr": 1.0, "momentum": 0.0}),
])
def test_each_rule_config_builds_its_own_server_optimiser(rule, cls, settings):
    """Composed as a user runs it: no rule inherits another optimiser's keys (fedadam used to
    get pfedprox's lr/momentum and crash with TypeError at start)."""
    from omegaconf import OmegaConf

    from mer.federated.loop import make_server_optimizer

    conf = _composed_server_opt(rule)
    assert {k: v for k, v in OmegaConf.to_container(conf).items() if k != "name"} == settings
    opt = make_server_optimizer(conf)
    assert type(opt) is cls
    assert {k: getattr(opt, k) for k in settings} == settings


def test_a_key_of_another_optimiser_is_refused_naming_it_and_the_allowed_keys():
    from omegaconf import OmegaConf

    from mer.federated.loop import make_server_optimizer

    conf = OmegaConf.create({"name": "fedadam", "eta": 0.1, "lr": 1.0, "momentum": 0.0})
    with pytest.raises(ValueError) as err:
        make_server_optimizer(conf)
    msg = str(err.value)
    assert "federated.server_opt.lr" in msg and "federated.server_opt.momentum" in msg
    assert all(k in msg for k in ("eta", "beta_1", "beta_2", "tau"))  # what it does take
    assert "federated/server_opt=fedadam" in msg  # and how to fix it
    with pytest.raises(ValueError, match=r"federated\.server_opt\.name=adam.*fedadam"):
        make_server_optimizer(OmegaConf.create({"name": "adam"}))
