"""A SuperNode's state on its disk (mer.federated.flower.common): a node restarted between
rounds resumes with the same FedBN statistics, SCAFFOLD control, DP accountant, and the run
ends as an uninterrupted one; a damaged state file is named; the node caches (config, samples)
give back what they were given."""

from __future__ import annotations

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402
from test_flower import MemoryGrid  # noqa: E402

from mer.data.io import CorruptFileError  # noqa: E402
from mer.federated import flower_app  # noqa: E402
from mer.federated.flower import common  # noqa: E402
from mer.federated.flower.common import Node, NodeStore  # noqa: E402
from mer.federated.loop import FederatedRun, make_clients  # noqa: E402

DP = {"name": "dp", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": None,
      "delta": 1e-5, "accountant": "rdp", "sample_rate": None, "secure_mode": False}
CASES = {
    "scaffold": ({"rule": {"name": "scaffold"}}, None),
    "fedbn": ({"rule": {"name": "fedbn"}}, None),
    "dp": ({}, DP),
}


@pytest.fixture
def flower_nodes(monkeypatch):
    """``(cfg, samples, state_root, restart_after) -> finished FlowerRun``: a run over a
    MemoryGrid whose node 102 is restarted after round ``restart_after`` (a fresh process's
    view: new FederatedRun, empty ``context.state``); ``state_root`` None: no ``state-dir``."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def run(cfg, samples, state_root, restart_after=None):
        clients = make_clients(cfg, samples)

        def fresh(k: int) -> Node:
            return Node(cfg, FederatedRun(cfg, samples, clients), clients[k], k)

        nodes = {101 + k: fresh(k) for k in range(len(clients))}
        monkeypatch.setattr("mer.federated.flower.client_app.node_from_context",
                            lambda ctx: nodes[ctx.node_id])
        grid = MemoryGrid(nodes)
        if state_root is not None:
            for n, ctx in grid.contexts.items():
                ctx.node_config["state-dir"] = str(state_root / f"node{n}")
        federation = flower_app.discover(grid, timeout_s=1)
        flower = flower_app.FlowerRun(cfg, federation.samples, federation.clients, grid=grid,
                                      federation=federation, round_timeout_s=1)
        real_round = flower.round

        def round_then_restart(rnd: int) -> dict:
            out = real_round(rnd)
            if rnd == restart_after:  # kill node 102 between rounds and start it again
                old = grid.contexts[102]
                nodes[102] = fresh(1)
                grid.contexts[102] = Context(run_id=old.run_id, node_id=102, state=RecordDict(),
                                             node_config=dict(old.node_config),
                                             run_config=dict(old.run_config))
            return out

        flower.round = round_then_restart
        flower.run_rounds()
        return flower, grid

    yield run
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def _cfg(case: str):
    federated, privacy = CASES[case]
    cfg = fed_cfg(seed=3, rounds=3, **federated)
    if privacy is not None:
        with open_dict(cfg):
            cfg.privacy = OmegaConf.create(privacy)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_restarted_supernode_resumes_with_its_state(flower_nodes, tmp_path, case):
    """SCAFFOLD's control (and the pending one), FedBN's own batch-norm statistics, the DP
    accountant: node 102 restarted after round 1 of 3 reads them back from its state-dir and
    the run's model, curves and epsilons equal an uninterrupted run's. Without a state-dir the
    restarted node has lost them, and the run differs (or fails): the state is what counts."""
    samples = toy_samples(n_subjects=4, per_subject=2, learnable=True)
    cfg = _cfg(case)
    whole, _ = flower_nodes(cfg, samples, tmp_path / "whole")
    resumed, grid = flower_nodes(cfg, samples, tmp_path / "resumed", restart_after=1)
    for a, b in zip(resumed.global_weights, whole.global_weights):
        np.testing.assert_array_equal(a, b)
    assert [c["pooled_global"] for c in resumed.curves] == \
        [c["pooled_global"] for c in whole.curves]
    if case == "dp":
        assert resumed.epsilons() == whole.epsilons()
    files = sorted(p.name for p in (tmp_path / "resumed" / "node102" / "run-1").iterdir())
    assert files == ["db1.state"]
    lost, _ = flower_nodes(cfg, samples, None, restart_after=1)
    if case == "dp":
        assert lost.epsilons()["clients"]["db1"] < whole.epsilons()["clients"]["db1"]
    else:
        assert any(not np.array_equal(a, b) for a, b in zip(lost.global_weights,
                                                            whole.global_weights))


def test_a_damaged_state_file_is_named(tmp_path):
    """A state file cut short: reading it back (a restarted node's next message) fails naming
    the file and what to do, rather than training from nothing."""
    context = Context(run_id=1, node_id=102, state=RecordDict(),
                      node_config={"state-dir": str(tmp_path / "node102")}, run_config={})
    NodeStore.of(context, "db1").save(RecordDict({
        "control": ArrayRecord([np.ones((3, 2), np.float32)]),
        "control_pending_round": ConfigRecord({"round": 1})}))
    path = tmp_path / "node102" / "run-1" / "db1.state"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"node state .*db1\.state is truncated.*delete"):
        NodeStore.of(context, "db1").restore(context.state)


def test_the_node_store_keeps_every_record_kind(tmp_path):
    """Arrays (0-d and n-d, any dtype), configs with bytes and lists, metrics: as written."""
    state = RecordDict({
        "last": ArrayRecord([np.arange(6, dtype=np.float32).reshape(2, 3),
                             np.array(3, dtype=np.int64)]),
        "secagg": ConfigRecord({"round": 2, "party": b"\x00\xffkey", "ids": ["a", "b"],
                                "keys": [b"x", b"y"], "on": True, "f": 0.25}),
        "m": MetricRecord({"steps": 4, "loss": 0.5})})
    store = NodeStore(tmp_path / "a.state")
    store.save(state)
    back = RecordDict()
    store.restore(back)
    assert list(back) == list(state)
    for x, y in zip(back["last"].to_numpy_ndarrays(), state["last"].to_numpy_ndarrays()):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert dict(back["secagg"]) == dict(state["secagg"])
    assert dict(back["m"]) == dict(state["m"])
    assert isinstance(back["m"], MetricRecord)


def test_the_node_caches_give_back_the_config_and_samples(tmp_path, monkeypatch):
    """The run's config composed once then read back equal (and struct, as composed); the
    samples read back from the node cache (memory-mapped) equal the loaded ones, and a
    damaged cache entry is rebuilt, not trusted."""
    import mer.data.sources

    overrides = "federated=fedavg model=ststnet data.preset=tiny"
    first = common.node_config(overrides, {}, tmp_path / "run-1")
    assert list((tmp_path / "run-1").glob("config-*.yaml"))
    monkeypatch.setattr(common, "compose_config",
                        lambda *a, **kw: pytest.fail("composed again"))
    again = common.node_config(overrides, {}, tmp_path / "run-1")
    assert again == first
    assert OmegaConf.is_struct(again) and OmegaConf.is_struct(first)

    x = np.random.default_rng(0).random((4, 3, 28, 28)).astype(np.float32)
    meta = toy_samples().meta.iloc[:4].copy()
    from mer.data.samples import FlowSamples

    samples = FlowSamples(x, meta, ["a", "b", "c"], synthetic=True, provenance={"k": 1})
    calls = []
    monkeypatch.setattr(mer.data.sources, "load_samples",
                        lambda *a, **kw: calls.append(1) or samples)
    monkeypatch.setattr(common, "samples_key", lambda cfg: "f" * 64)
    cfg = OmegaConf.create({"data": {}, "paths": {"cache_dir": str(tmp_path / "cache")}})
    common.node_samples(cfg)
    back = common.node_samples(cfg)
    assert calls == [1]  # loaded once, then read from the node cache
    assert isinstance(back.x, np.memmap) and np.array_equal(back.x, x)
    assert back.meta.equals(samples.meta) and back.class_names == ["a", "b", "c"]
    assert back.synthetic and back.provenance == {"k": 1}
    entry = tmp_path / "cache" / "flower-node" / ("f" * 24)
    (entry / "table.pkl").write_bytes(b"garbage")
    common.node_samples(cfg)
    assert calls == [1, 1]  # a damaged entry is rebuilt


def test_a_worker_needs_a_state_dir():
    from mer.federated.flower.worker import worker_idle_s

    context = Context(run_id=1, node_id=1, state=RecordDict(),
                      node_config={"worker-idle-s": 60}, run_config={})
    with pytest.raises(ValueError, match="worker-idle-s needs a state-dir"):
        worker_idle_s(context)
    context.node_config["state-dir"] = "/tmp/x"
    assert worker_idle_s(context) == 60


@pytest.mark.slow
def _same_up_to_threads(x: np.ndarray, y: np.ndarray) -> None:
    """Equal up to float32 rounding: the worker is another process, and earlier tests in the
    same pytest process may have changed torch's thread count here, which reorders float32
    sums (the whole suite gave 1.5e-8 differences; run alone, the arrays are identical)."""
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_the_warm_worker_answers_as_the_clientapp_process_would(tmp_path):
    """query, train, evaluate of a tiny run answered by the node's warm worker (another
    process) == answered here: same reply, same node state; the worker then exits idle."""
    import os
    import signal
    import time

    import psutil
    from flwr.app import Message

    from mer.federated.flower import client_app as app

    overrides = ("federated=fedavg model=ststnet data.preset=tiny federated.num_clients=2 "
                 "federated.rounds=1 progress=false")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    try:
        contexts = {mode: Context(run_id=1, node_id=1, state=RecordDict(), run_config={
            "overrides": overrides}, node_config={"partition-id": 1,
                                                  "state-dir": str(tmp_path / mode)})
            for mode in ("here", "worker")}
        contexts["worker"].node_config["worker-idle-s"] = 20
        node = common.node_from_context(contexts["here"])
        arrays = ArrayRecord([np.ascontiguousarray(w) for w in node.run.initial_weights])
        messages = [
            ("query", RecordDict({"config": ConfigRecord({})})),
            ("train", RecordDict({"config": ConfigRecord({"client": node.client.name,
                                                          "round": 1, "k": 1}),
                                  "global": arrays})),
            ("evaluate", RecordDict({"config": ConfigRecord({"models": 1}),
                                     "model-0": arrays}))]
        for kind, content in messages:
            replies = {mode: app.client_app(Message(content, dst_node_id=1, message_type=kind),
                                            ctx) for mode, ctx in contexts.items()}
            a, b = replies["here"].content, replies["worker"].content
            assert list(a) == list(b), kind
            for key in a:
                if isinstance(a[key], ArrayRecord):
                    for x, y in zip(a[key].to_numpy_ndarrays(), b[key].to_numpy_ndarrays()):
                        _same_up_to_threads(x, y)
                elif key != "metrics":  # (seconds differ)
                    assert dict(a[key]) == dict(b[key]), (kind, key)
        for x, y in zip(contexts["here"].state["last"].to_numpy_ndarrays(),
                        contexts["worker"].state["last"].to_numpy_ndarrays()):
            _same_up_to_threads(x, y)
        assert (tmp_path / "worker" / "run-1" / f"{node.client.name}.state").exists()
        log = (tmp_path / "worker" / "worker.log").read_text()
        pid = int(log.split("worker ")[1].split()[0])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:  # (a zombie: it exited, its parent, this process, has not reaped it)
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(1)
        else:
            os.kill(pid, signal.SIGTERM)
            pytest.fail("the worker did not exit after worker-idle-s")
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
