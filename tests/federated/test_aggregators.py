"""Aggregation rules: hand-computed values on tiny arrays (against Flower's own functions:
test_against_flower.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mer.federated.aggregators import (
    apply_fedbn,
    check_updates,
    fedavg,
    fedbn_mask,
    fedprox,
    krum,
    krum_scores,
    median,
    pfedprox_personalise,
    scaffold_client_control,
    scaffold_correction,
    scaffold_server_update,
    trimmed_mean,
    weighted_mean,
)
from mer.federated.fedprox import proximal_term


def arr(*values) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def scalar_results(values, counts):
    """One-layer models holding a single number each."""
    return [([arr(v)], n) for v, n in zip(values, counts)]


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
# hand-computed values
# ---------------------------------------------------------------------------------------------


def test_fedavg_hand_computed():
    results = [
        ([arr(1.0, 2.0), np.array([[0.0]])], 1),
        ([arr(3.0, 6.0), np.array([[4.0]])], 3),
    ]
    out = fedavg(results)
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (1*0 + 3*4)/4 = 3
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [[3.0]])
    assert out[1].shape == (1, 1)
    # FedProx aggregates exactly as FedAvg
    np.testing.assert_array_equal(fedprox(results)[0], out[0])


def test_weighted_mean_keeps_dtypes_and_rounds_integer_buffers():
    a = [np.array([1.0], np.float32), np.array(3, np.int64)]
    b = [np.array([2.0], np.float32), np.array(6, np.int64)]
    out = weighted_mean([a, b], [1.0, 1.0])
    assert out[0].dtype == np.float32 and out[1].dtype == np.int64
    np.testing.assert_allclose(out[0], [1.5])
    assert int(out[1]) == 4  # mean 4.5 -> rint rounds half to even
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_mean([a, b], [0.0, 0.0])


def test_median_hand_computed():
    np.testing.assert_allclose(median(scalar_results([1.0, 5.0, 2.0], [9, 1, 1]))[0], 2.0)
    # even count: mean of the two middle values; example counts are ignored
    np.testing.assert_allclose(median(scalar_results([1, 2, 3, 10], [100, 1, 1, 1]))[0], 2.5)


def test_trimmed_mean_hand_computed():
    results = scalar_results([10.0, 1.0, 2.0, 3.0, 100.0], [1] * 5)
    # beta 0.2, K 5: cut int(1.0) = 1 per end -> mean(2, 3, 10) = 5
    np.testing.assert_allclose(trimmed_mean(results, 0.2)[0], 5.0)
    # beta 0.1: cut int(0.5) = 0 -> plain mean 116 / 5 = 23.2
    np.testing.assert_allclose(trimmed_mean(results, 0.1)[0], 23.2)
    # beta 0.3: cut int(1.5) = 1 (floor, not round) -> still 5
    np.testing.assert_allclose(trimmed_mean(results, 0.3)[0], 5.0)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(results, 0.5)


def test_krum_and_multikrum_hand_computed():
    # 1-d points 0, 1, 3, 7, 20 and a constant second layer; f = 1 -> m = 5 - 1 - 2 = 2.
    # squared distances, two nearest: 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 7: 16+36=52,
    # 20: 169+289=458
    points = [0.0, 1.0, 3.0, 7.0, 20.0]
    counts = [1, 3, 1, 1, 1]
    results = [([arr(p), np.zeros((2, 2))], n) for p, n in zip(points, counts)]
    np.testing.assert_allclose(
        krum_scores([w for w, _ in results], 1), [10.0, 5.0, 13.0, 52.0, 458.0]
    )
    chosen = krum(results, num_malicious=1)
    np.testing.assert_array_equal(chosen[0], [1.0])
    assert chosen[1].shape == (2, 2)
    # Multi-Krum keeps clients 1 (score 5) and 0 (score 10), example-weighted: (1*0+3*1)/4
    np.testing.assert_allclose(krum(results, num_malicious=1, num_to_keep=2)[0], [0.75])
    with pytest.raises(ValueError, match="num_to_keep"):
        krum(results, num_malicious=1, num_to_keep=6)


def test_pfedprox_three_clients_hand_computed():
    models = [[arr(10.0)], [arr(20.0)], [arr(40.0)]]
    out = pfedprox_personalise(models, [1, 2, 1], own=0.9)
    # client 0: others (2*20 + 1*40)/3 = 80/3 -> 9 + 8/3 = 11.6667
    # client 1: others (10 + 40)/2 = 25 -> 18 + 2.5 = 20.5
    # client 2: others (10 + 2*20)/3 = 50/3 -> 36 + 5/3 = 37.6667
    np.testing.assert_allclose([o[0] for o in out], [[9 + 8 / 3], [20.5], [36 + 5 / 3]])
    # a single client keeps its own model
    single = pfedprox_personalise([[arr(3.0)]], [5])
    np.testing.assert_array_equal(single[0][0], [3.0])


def test_pfedprox_does_not_touch_inputs():
    models = [[arr(1.0)], [arr(2.0)]]
    pfedprox_personalise(models, [1, 1])
    np.testing.assert_array_equal(models[0][0], [1.0])


class ConvBNLinear(nn.Module):
    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2, track_running_stats=track_running_stats)
        self.head = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.bn(self.conv(x)), 1))


def test_fedbn_mask_finds_bn_entries():
    model = ConvBNLinear()
    names = list(model.state_dict())
    expected = {
        "conv.weight": False,
        "conv.bias": False,
        "bn.weight": True,
        "bn.bias": True,
        "bn.running_mean": True,
        "bn.running_var": True,
        "bn.num_batches_tracked": True,
        "head.weight": False,
        "head.bias": False,
    }
    assert set(names) == set(expected)
    assert fedbn_mask(names, model) == [expected[n] for n in names]
    # without the model: BN modules recognised by their running_mean entry
    assert fedbn_mask(names) == [expected[n] for n in names]


def test_fedbn_mask_by_module_type_without_running_stats():
    model = ConvBNLinear(track_running_stats=False)
    names = list(model.state_dict())
    assert "bn.running_mean" not in names
    mask = dict(zip(names, fedbn_mask(names, model)))
    assert mask["bn.weight"] and mask["bn.bias"]
    assert not mask["conv.weight"] and not mask["head.bias"]


def test_apply_fedbn():
    glob = [arr(1.0), arr(2.0), arr(3.0)]
    loc = [arr(10.0), arr(20.0), arr(30.0)]
    out = apply_fedbn(glob, loc, [False, True, False])
    np.testing.assert_array_equal(np.concatenate(out), [1.0, 20.0, 3.0])
    with pytest.raises(ValueError, match="lengths"):
        apply_fedbn(glob, loc, [True])


def test_check_updates_excludes_nan_and_inf_and_reports():
    good = ([arr(1.0, 2.0), np.array(3, np.int64)], 4)
    nan = ([arr(np.nan, 2.0), np.array(3, np.int64)], 5)
    inf = ([arr(1.0, np.inf), np.array(3, np.int64)], 6)
    empty = ([arr(1.0, 2.0), np.array(3, np.int64)], 0)
    kept, excluded = check_updates([good, nan, inf, empty], ["casme2", "samm", "cas3", "smic"])
    assert len(kept) == 1 and kept[0][1] == 4
    assert set(excluded) == {"samm", "cas3", "smic"}
    assert "non-finite" in excluded["samm"] and "[0]" in excluded["samm"]
    assert "non-finite" in excluded["cas3"]
    assert "no training examples" in excluded["smic"]
    # the kept results aggregate to finite values
    assert np.isfinite(fedavg(kept)[0]).all()


def test_check_updates_shape_mismatch_names_the_client():
    a = ([arr(1.0, 2.0)], 1)
    b = ([np.zeros((3,))], 1)
    with pytest.raises(ValueError, match="'samm'.*shape"):
        check_updates([a, b], ["casme2", "samm"])
    c = ([arr(1.0, 2.0), arr(0.0)], 1)
    with pytest.raises(ValueError, match="'cas3'.*2 arrays"):
        check_updates([a, c], ["casme2", "cas3"])
    # against the global model: even the first client is checked
    with pytest.raises(ValueError, match="'casme2'.*global model"):
        check_updates([b], ["casme2"], reference=[arr(0.0, 0.0)])


def test_scaffold_hand_computed():
    x = [arr(1.0, 2.0)]
    dy = [[arr(0.2, -0.4)], [arr(0.4, 0.0)]]
    dc = [[arr(1.0, 2.0)], [arr(3.0, 0.0)]]
    c = [arr(0.5, 0.5)]
    new_x, new_c = scaffold_server_update(x, dy, dc, c, num_clients_total=4, lr_global=1.0)
    # dx = (0.3, -0.2) -> x = (1.3, 1.8); dc = (2, 1), S/N = 1/2 -> c = (1.5, 1.0)
    np.testing.assert_allclose(new_x[0], [1.3, 1.8])
    np.testing.assert_allclose(new_c[0], [1.5, 1.0])
    new_x, _ = scaffold_server_update(x, dy, dc, c, num_clients_total=4, lr_global=0.5)
    np.testing.assert_allclose(new_x[0], [1.15, 1.9])
    # client control, option II: 0.1 - 0.3 + (1.0 - 0.8) / (4 * 0.1) = 0.3
    ci = scaffold_client_control([arr(0.1)], [arr(0.3)], [arr(1.0)], [arr(0.8)], steps=4, lr=0.1)
    np.testing.assert_allclose(ci[0], [0.3])
    # corrected gradient: 1.0 - 0.1 + 0.3 = 1.2, numpy or torch
    np.testing.assert_allclose(scaffold_correction(arr(1.0), arr(0.3), arr(0.1)), [1.2])
    t = scaffold_correction(torch.tensor([1.0]), torch.tensor([0.3]), torch.tensor([0.1]))
    assert torch.allclose(t, torch.tensor([1.2]))


def _local_sgd(w, a, b, steps, lr, c_global=None, c_local=None):
    """Local SGD on f(w) = 0.5 * a * (w - b)^2, optionally SCAFFOLD-corrected."""
    for _ in range(steps):
        g = a * (w - b)
        if c_global is not None:
            g = scaffold_correction(g, c_global, c_local)
        w = w - lr * g
    return w


def test_scaffold_removes_client_drift_on_quadratics():
    """Two clients with different curvatures: the optimum of their mean loss is
    (a1*b1 + a2*b2)/(a1 + a2) = (1*0 + 4*1)/5 = 0.8. FedAvg with many local steps drifts to
    the mean of the local optima (0.5); SCAFFOLD reaches 0.8."""
    a, b = [1.0, 4.0], [0.0, 1.0]
    steps, lr = 20, 0.05
    x_avg = x_sc = np.array([5.0])
    c = np.zeros(1)
    ci = [np.zeros(1), np.zeros(1)]
    for _ in range(200):
        ys = [_local_sgd(x_avg, a[i], b[i], steps, lr) for i in range(2)]
        x_avg = fedavg([([y], 1) for y in ys])[0]
        dys, dcs = [], []
        for i in range(2):
            y = _local_sgd(x_sc, a[i], b[i], steps, lr, c, ci[i])
            new_ci = scaffold_client_control([ci[i]], [c], [x_sc], [y], steps, lr)[0]
            dys.append([y - x_sc])
            dcs.append([new_ci - ci[i]])
            ci[i] = new_ci
        (x_sc,), (c,) = scaffold_server_update([x_sc], dys, dcs, [c], num_clients_total=2)
    np.testing.assert_allclose(x_sc, [0.8], atol=1e-6)
    assert abs(float(x_avg[0]) - 0.8) > 0.05  # FedAvg is biased here; SCAFFOLD is not


def test_proximal_term_value_and_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    m = torch.tensor([[3.0]], requires_grad=True)
    glob = [torch.zeros(2), np.array([[1.0]], dtype=np.float32)]
    term = proximal_term([w, m], glob, mu=0.5)
    # 0.5/2 * (1 + 4 + 4) = 2.25
    assert term.shape == () and abs(term.item() - 2.25) < 1e-6
    term.backward()
    # gradient mu * (w - w_g)
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.0]))
    assert torch.allclose(m.grad, torch.tensor([[1.0]]))
    assert proximal_term([w], [torch.zeros(2)], mu=0.0).item() == 0.0
    # the global weights are constants: no gradient flows into them
    g = torch.zeros(2, requires_grad=True)
    proximal_term([w], [g], mu=1.0).backward()
    assert g.grad is None
    with pytest.raises(ValueError, match="shape"):
        proximal_term([w], [torch.zeros(3)], mu=1.0)
