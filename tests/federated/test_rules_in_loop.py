"""SCAFFOLD, FedBN and the server optimisers inside the federated loop."""

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients

PLAIN_SGD = {"name": "sgd", "momentum": 0.0}  # SCAFFOLD's client optimiser


def test_scaffold_first_round_controls_are_the_option_ii_formula():
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    run = FederatedRun(fed_cfg(rule={"name": "scaffold"}, lr=1e-2), s, clients)
    x = [w.copy() for w in run.global_weights]
    updates, _ = run._local_updates(1, [0, 1])
    for u in updates:
        c_i = u.new_control  # c = c_i = 0 before: c_i+ = (x - y) / (K lr)
        assert run.state[u.name].control is None  # kept only once the server accepts it
        for name, ci, xi, yi in zip(run.entry_names, c_i, x, run.state[u.name].last):
            if name in run.param_names:
                np.testing.assert_allclose(ci, (xi - yi) / (u.steps * 1e-2), rtol=1e-4,
                                           atol=1e-6)
            else:
                assert not ci.any()  # buffers carry no control variate


def _unequal_clients():
    """Three databases of 6, 4 and 3 subjects with 5, 3 and 2 clips each: client sizes (and so
    any size-weighted mean) differ."""
    s = toy_samples(n_db=3, n_subjects=6, per_subject=5, learnable=True)
    meta = s.meta
    keep = ((meta["database"] == "db0")
            | ((meta["database"] == "db1") & meta["subject"].isin([f"s{i}" for i in range(4)])
               & meta["clip"].isin(["c0", "c1", "c2"]))
            | ((meta["database"] == "db2") & meta["subject"].isin(["s0", "s1", "s2"])
               & meta["clip"].isin(["c0", "c1"])))
    s = s.subset(np.flatnonzero(keep.to_numpy()))
    clients = natural_clients(s, seed=0)
    assert len({len(c.train_idx) for c in clients}) == 3
    return s, clients


def test_scaffold_server_control_is_the_mean_client_delta_and_corrects_gradients():
    """SCAFFOLD (Karimireddy et al. 2020, Alg. 1) over S of N clients of unequal sizes:
    ``x <- x + (1/|S|) sum dy_i`` and ``c <- c + (|S|/N) (1/|S|) sum dc_i``, unweighted;
    a size-weighted mean, or the mean without the |S|/N factor, would not match."""
    s, clients = _unequal_clients()
    n = {c.name: len(c.train_idx) for c in clients}
    run = FederatedRun(fed_cfg(rule={"name": "scaffold"}, fraction=0.5), s, clients)
    for rnd in (1, 2):
        c_before = [c.copy() for c in run.server_control]
        ci_before = {name: [x.copy() for x in (st.control or [np.zeros_like(g) for g in
                                                              run.server_control])]
                     for name, st in run.state.items()}
        record = run.round(rnd)
        chosen = record["clients"]
        assert len(chosen) == 2 and len({n[c] for c in chosen}) == 2  # |S| = 2 of N = 3
        deltas = [[a - b for a, b in zip(run.state[c].control, ci_before[c])] for c in chosen]
        mean_dc = [np.mean(layer, axis=0) for layer in zip(*deltas)]
        expected = [c + len(chosen) / len(clients) * d for c, d in zip(c_before, mean_dc)]
        for got, e in zip(run.server_control, expected):
            np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-7)
        weights = np.array([n[c] for c in chosen], np.float64) / sum(n[c] for c in chosen)
        weighted = [c + len(chosen) / len(clients) * np.tensordot(weights, np.stack(layer), 1)
                    for c, layer in zip(c_before, zip(*deltas))]
        unscaled = [c + d for c, d in zip(c_before, mean_dc)]
        for wrong in (weighted, unscaled):  # the check tells those formulas apart
            assert any(not np.allclose(w, e, rtol=1e-3, atol=1e-6)
                       for w, e in zip(wrong, expected))
        # the global model: the unweighted mean of the participants' local models
        for i, g in enumerate(run.global_weights):
            if g.dtype.kind == "f":
                local = np.mean([run.state[c].last[i] for c in chosen], axis=0)
                np.testing.assert_allclose(g, local, rtol=1e-5, atol=1e-6)
    assert any(np.abs(c).max() > 0 for c in run.server_control)
    # round 2 trains with the correction c - c_i, so it differs from a FedAvg round 2
    s = toy_samples(n_db=3, n_subjects=4, learnable=True)
    clients = natural_clients(s, seed=0)
    scaffold, fedavg = (FederatedRun(fed_cfg(rule={"name": rule}, client_optimizer=PLAIN_SGD),
                                     s, clients) for rule in ("scaffold", "fedavg"))
    scaffold.round(1)
    fedavg.round(1)
    for a, b in zip(fedavg.global_weights, scaffold.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # round 1: same (c = 0)
    scaffold.round(2)
    fedavg.round(2)
    assert any(not np.allclose(a, b) for a, b in zip(fedavg.global_weights,
                                                     scaffold.global_weights))


def test_single_client_scaffold_equals_fedavg():
    """With one client c = c_i after every round, so the correction vanishes."""
    s = toy_samples(n_db=1, n_subjects=5, learnable=True)
    clients = natural_clients(s, seed=0)
    runs = [FederatedRun(fed_cfg(rule={"name": rule}, client_optimizer=PLAIN_SGD), s, clients)
            for rule in ("scaffold", "fedavg")]  # SCAFFOLD's clients use plain SGD: so does FedAvg
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


def _reference_optimiser(opt: dict):
    """The server update of ``opt`` written out (Reddi et al. 2021, Flower's arithmetic) as a
    ``step(current, aggregate)`` closure over its own state: float entries only."""
    state = {"t": 0, "m": None, "v": None}
    b1, b2 = opt.get("beta_1", 0.9), opt.get("beta_2", 0.99)

    def step(x, a):
        x, a = np.asarray(x, np.float64), np.asarray(a, np.float64)
        delta = a - x
        state["t"] += 1
        t, m, v = state["t"], state["m"], state["v"]
        if opt["name"] == "sgd":  # m = g at t = 1, then momentum * m + g; x - lr * m
            g = -delta
            state["m"] = g if m is None else opt["momentum"] * m + g
            return x - opt["lr"] * state["m"]
        m = np.zeros_like(x) if m is None else m
        v = np.zeros_like(x) if v is None else v
        if opt["name"] == "fedadagrad":
            state["m"], state["v"] = delta, v + delta**2
            eta = opt["eta"]
        elif opt["name"] == "fedadam":
            state["m"], state["v"] = b1 * m + (1 - b1) * delta, b2 * v + (1 - b2) * delta**2
            eta = opt["eta"] * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        else:  # fedyogi
            state["m"] = b1 * m + (1 - b1) * delta
            state["v"] = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            eta = opt["eta"]
        return x + eta * state["m"] / (np.sqrt(state["v"]) + opt["tau"])

    return step


OPTIMISERS = {"sgd": {"name": "sgd", "lr": 0.7, "momentum": 0.9},
              "fedadam": {"name": "fedadam", "eta": 0.01, "tau": 0.001},
              "fedyogi": {"name": "fedyogi", "eta": 0.01, "tau": 0.001},
              "fedadagrad": {"name": "fedadagrad", "eta": 0.01, "tau": 0.001}}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_server_optimisers_run_in_the_loop(name):
    """Over two rounds the loop's new global model is the named optimiser's update of the
    round's FedAvg aggregate, computed by hand here; the other optimisers' updates of the same
    inputs differ, so an optimiser wired to another name fails."""
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    run = FederatedRun(fed_cfg(server_opt=OPTIMISERS[name]), s, natural_clients(s, seed=0))
    seen = []
    step = run.server_opt.step
    run.server_opt.step = lambda cur, agg: seen.append(([c.copy() for c in cur],
                                                        [a.copy() for a in agg])) or step(cur, agg)
    refs = {n: [_reference_optimiser(o) for _ in run.global_weights]
            for n, o in OPTIMISERS.items()}
    for rnd in (1, 2):
        before = [w.copy() for w in run.global_weights]
        run.round(rnd)
        current, agg = seen[-1]
        for b, c in zip(before, current):
            np.testing.assert_array_equal(b, c)  # the step starts from the round's global
        floats = [i for i, w in enumerate(before) if w.dtype.kind == "f"]
        expected = {n: {i: ref[i](current[i], agg[i]) for i in floats}
                    for n, ref in refs.items()}
        for i in floats:
            np.testing.assert_allclose(run.global_weights[i], expected[name][i], rtol=1e-5,
                                       atol=1e-7, err_msg=f"round {rnd}, entry {i}")
        for i, w in enumerate(run.global_weights):
            if w.dtype.kind != "f":
                np.testing.assert_array_equal(w, agg[i])  # counters take the aggregate
        for other in OPTIMISERS:  # the check can tell the optimisers apart
            if other != name:
                assert any(not np.allclose(expected[other][i], expected[name][i], rtol=1e-3,
                                           atol=1e-6) for i in floats), (rnd, other)
    assert len(seen) == 2


def test_unknown_rule_is_refused():
    s = toy_samples(n_db=2, n_subjects=4)
    with pytest.raises(ValueError, match="unknown federated.rule.name 'fedbogus'"):
        FederatedRun(fed_cfg(rule={"name": "fedbogus"}), s, natural_clients(s, seed=0))


ROBUST = {"median": {"name": "median"},
          "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
          "krum": {"name": "krum", "num_malicious": 1, "num_to_keep": 3}}


@pytest.mark.parametrize("rule", list(ROBUST))
def test_a_robust_rule_in_the_loop_keeps_a_sign_flipper_out(rule):
    """Fast sibling of test_faults.py's slow robust-rule test: one round of 5 clients, db3
    sending -10x its update. The loop's new global model is the configured rule over what the
    clients sent and stays inside the honest clients' range; FedAvg of the same updates is
    dragged outside it."""
    from mer.federated import aggregators

    s = toy_samples(n_db=5, n_subjects=3, per_subject=2, learnable=True)
    attack = {"byzantine": {"clients": ["db3"], "attack": "sign_flip", "scale": 10.0}}
    run = FederatedRun(fed_cfg(rule=ROBUST[rule], faults=attack), s, natural_clients(s, seed=0))
    sent = []
    local_updates = run._local_updates

    def spy(*args, **kwargs):  # what reaches the server: the updates as sent
        out = local_updates(*args, **kwargs)
        sent.extend(out[0])
        return out

    run._local_updates = spy
    run.round(1)
    assert [u.name for u in sent] == ["db0", "db1", "db2", "db3", "db4"]
    results = [(u.weights, u.num_examples) for u in sent]
    by_rule = {"median": lambda: aggregators.median(results),
               "trimmed_mean": lambda: aggregators.trimmed_mean(results, 0.2),
               "krum": lambda: aggregators.krum(results, 1, 3)}[rule]()
    honest = [u.weights for u in sent if u.name != "db3"]
    outside = []
    for i, g in enumerate(run.global_weights):
        if g.dtype.kind != "f":
            continue
        np.testing.assert_allclose(g, by_rule[i], rtol=1e-6, atol=1e-7)
        low = np.min([h[i] for h in honest], axis=0)
        high = np.max([h[i] for h in honest], axis=0)
        assert np.all((g >= low - 1e-6) & (g <= high + 1e-6)), f"entry {i}"
        mean = aggregators.fedavg(results)[i]
        outside.append(np.mean((mean < low - 1e-6) | (mean > high + 1e-6)))
    assert np.mean(outside) > 0.5  # the attack is real: the plain mean leaves the range
