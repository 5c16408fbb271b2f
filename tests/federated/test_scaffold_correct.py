"""SCAFFOLD done right (issue #14, build 4): clients train with plain SGD, so the option-II
control update is the mean gradient they saw; a control variate moves only when the server
accepts its client's update."""

import numpy as np
import pytest
import torch
from fedtoys import fed_cfg, toy_samples

from mer.config_check import ConfigError
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients

LR = 0.05


def _spy_gradients(run: FederatedRun) -> list[dict[str, list[torch.Tensor]]]:
    """Record, for each local training, the raw gradient of every parameter at every
    backward pass (before SCAFFOLD's correction is added to ``p.grad``). (A client's module
    may be kept across rounds: each training's hooks are removed after it.)"""
    records: list[dict[str, list[torch.Tensor]]] = []
    fit = run.fit
    hooked = run._training_module

    def spy(key, weights, private):
        module = hooked(key, weights, private)
        seen: dict[str, list[torch.Tensor]] = {}
        spy.handles = [p.register_hook(lambda g, name=name: seen.setdefault(name, []).append(
            g.detach().clone())) for name, p in module.net.named_parameters()]
        records.append(seen)
        return module

    def fit_then_unhook(*args, **kwargs):
        try:
            return fit(*args, **kwargs)
        finally:
            for handle in getattr(spy, "handles", []):
                handle.remove()
            spy.handles = []

    run._training_module = spy
    run.fit = fit_then_unhook
    return records


def _run(**federated):
    s = toy_samples(n_db=2, n_subjects=4, learnable=True)
    run = FederatedRun(fed_cfg(rule={"name": "scaffold"}, lr=LR, **federated), s,
                       natural_clients(s, seed=0))
    return run


def test_scaffold_control_is_the_mean_gradient_under_plain_sgd():
    """With K plain SGD steps y = x - lr sum_k (g_k + c - c_i), option II gives
    c_i+ = c_i - c + (x - y)/(K lr) = mean_k g_k: the new control variate equals the mean of the
    raw minibatch gradients the client computed (recorded here by hooks, independently of the
    loop's arithmetic). Round 2 (c, c_i != 0) also checks the correction's sign and size. The
    model config asks for Adam (fed_cfg): SCAFFOLD's clients must still use plain SGD, else
    the identity fails (Adam and momentum make (x - y)/(K lr) another quantity)."""
    run = _run()
    assert run.cfg.model.optimizer == "adam"
    records = _spy_gradients(run)
    for rnd in (1, 2):
        records.clear()
        record = run.round(rnd)
        assert record["clients"] == ["db0", "db1"] and not record["excluded"]
        trained = [r for r in records if r]  # the clients' fits, in order (not evaluation)
        assert len(trained) == 2
        for name, grads in zip(record["clients"], trained):
            control = dict(zip(run.entry_names, run.state[name].control))
            steps = {len(g) for g in grads.values()}
            assert len(steps) == 1 and steps.pop() > 1
            for pname, g in grads.items():
                np.testing.assert_allclose(control[pname], torch.stack(g).mean(0).numpy(),
                                           rtol=1e-3, atol=2e-5, err_msg=f"{name} {pname}")
        assert any(np.abs(c).max() > 0 for c in run.server_control)


def test_scaffold_clients_train_with_plain_sgd():
    """The optimiser Lightning builds for a SCAFFOLD client: SGD, momentum 0, the model lr."""
    run = _run()
    module = run._module(run.global_weights)
    module.set_optimizer(**run.client_opt)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["lr"] == LR
    assert run.client_opt == {"name": "sgd", "lr": LR, "momentum": 0.0}


@pytest.mark.parametrize("spec,words", [
    ({"name": "adam"}, "federated.client_optimizer.name=adam"),
    ({"name": "sgd", "momentum": 0.9}, "federated.client_optimizer.momentum=0.9"),
])
def test_scaffold_refuses_other_client_optimisers(spec, words):
    with pytest.raises(ConfigError, match=words) as err:
        _run(client_optimizer=spec)
    assert "federated.rule.name=scaffold" in str(err.value)
    assert "momentum: 0.0" in str(err.value)  # the fix


def test_a_late_update_leaves_its_control_variate_unchanged():
    """Every update misses the deadline: the round is skipped, and neither the clients'
    control variates nor the server's move (they were computed, then discarded)."""
    run = _run(faults={"deadline_s": 1e-9})
    record = run.round(1)
    assert record["skipped"] and sorted(record["late"]) == ["db0", "db1"]
    for state in run.state.values():
        assert state.control is None
    assert not any(np.abs(c).any() for c in run.server_control)


def test_an_excluded_update_leaves_its_control_variate_unchanged():
    """db1 sends a non-finite model (excluded by the server's check); db0's update is
    accepted: only db0's control moves, and the server control is (1/N) dc_db0."""
    run = _run()
    tamper = run.faults.tamper

    def poison(name, rnd, k, weights, global_weights):
        out = tamper(name, rnd, k, weights, global_weights)
        return [np.full_like(w, np.nan) if name == "db1" and w.dtype.kind == "f" else w
                for w in out]

    run.faults.tamper = poison
    record = run.round(1)
    assert record["excluded"] == ["db1"]
    assert run.state["db1"].control is None
    c0 = run.state["db0"].control
    assert c0 is not None and any(np.abs(c).max() > 0 for c in c0)
    for c, ci in zip(run.server_control, c0):
        np.testing.assert_allclose(c, ci / 2, rtol=1e-6, atol=1e-9)  # |S|/N * mean dc, S={db0}
    # round 2: db1 starts again from c_i = 0, db0 from its accepted control
    run.faults.tamper = tamper
    run.round(2)
    assert run.state["db1"].control is not None


from test_flower import memory_flower  # noqa: E402, F401  (the fixture)

NAN_DB1 = {"byzantine": {"clients": ["db1"], "attack": "scaling", "scale": float("inf")}}


def test_flower_nodes_keep_a_control_only_when_the_server_accepts_it(memory_flower):  # noqa: F811
    """Over Flower the control variates live on the nodes: db1 sends a non-finite model every
    round (excluded), so its node never adopts the control it computed, while db0's and
    db2's do; server control and global model equal the in-process run's."""
    from mer.federated.loop import make_clients

    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=1, rule={"name": "scaffold"}, lr=LR, faults=NAN_DB1)
    flower, grid = memory_flower(cfg, samples)
    flower.run_rounds()
    local = FederatedRun(cfg, samples, make_clients(cfg, samples))
    local.run_rounds()
    assert [r["excluded"] for r in flower.stats] == [["db1"], ["db1"]]
    for a, b in zip(flower.server_control, local.server_control):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert local.state["db1"].control is None and local.state["db0"].control is not None
    states = {flower_node: ctx.state for flower_node, ctx in grid.contexts.items()}
    assert "control" not in states[102]  # db1's node: nothing accepted, ever
    assert "control" in states[101] and "control" in states[103]
