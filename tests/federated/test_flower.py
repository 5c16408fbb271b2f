"""mer on Flower: the apps' messages against the in-process loop (fast, an in-memory grid),
then real Flower processes on 127.0.0.1 (slow): equivalence, a killed SuperNode, simulation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fedtoys import fed_cfg, toy_samples

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from mer.federated import flower_app  # noqa: E402
from mer.federated.loop import FederatedRun, make_clients  # noqa: E402
from mer.federated.runner import log_wandb_federated  # noqa: E402


class MemoryGrid:
    """The two Grid calls FlowerRun makes, served by ``client_app`` in this process: one
    Context (and so one ``context.state``) per node, as a SuperNode keeps them."""

    def __init__(self, nodes: dict[int, flower_app.Node]):
        self.nodes, self.silent = nodes, set()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in nodes}
        self.sent: list[tuple[str, int]] = []
        self.messages: list[Message] = []  # what the server sent (and relayed)
        self.received: list[tuple[str, int, Message]] = []  # what reached the server

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            self.messages.append(msg)
            if self.nodes[node].client.name in self.silent:
                continue  # a node that never answers (killed, unplugged)
            TaskIdentity.node_id = node
            try:
                replies.append(flower_app.client_app(msg, self.contexts[node]))
            except Exception as e:  # a SuperNode answers with an error reply
                replies.append(Message(Error(code=1, reason=repr(e)), reply_to=msg))
            self.received.append((msg.metadata.message_type, node, replies[-1]))
        TaskIdentity.node_id = 0
        return replies


@pytest.fixture
def memory_flower(monkeypatch):
    """``(cfg, samples) -> (FlowerRun over a MemoryGrid, the grid)``; nodes 101, 102, ..."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    nodes: dict[int, flower_app.Node] = {}
    monkeypatch.setattr("mer.federated.flower.client_app.node_from_context",  # the node side
                        lambda ctx: nodes[ctx.node_id])

    def build(cfg, samples, node_cfg=None, node_configs=None):
        """``node_cfg``: the labs' config where it differs from the server's (key files);
        ``node_configs``: node id -> its SuperNode's ``--node-config`` (pins)."""
        node_cfg = node_cfg or cfg
        clients = make_clients(cfg, samples)
        for k, c in enumerate(clients):  # each node: its own FederatedRun of the same config
            nodes[101 + k] = flower_app.Node(node_cfg, FederatedRun(node_cfg, samples, clients),
                                             c, k)
        grid = MemoryGrid(nodes)
        for node, config in (node_configs or {}).items():
            grid.contexts[node].node_config.update(config)
        federation = flower_app.discover(grid, timeout_s=1)  # the server holds no data
        run = flower_app.FlowerRun(cfg, federation.samples, federation.clients, grid=grid,
                                   federation=federation, round_timeout_s=1)
        return run, grid

    yield build
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def _in_process(cfg, samples):
    run = FederatedRun(cfg, samples, make_clients(cfg, samples))
    run.run_rounds()
    return run


RULES = {  # plain FedAvg: the real-process test below
    "pfedprox": {"rule": {"name": "fedprox"}, "mu": 0.01, "personalise": {"own": 0.9}},
    "scaffold": {"rule": {"name": "scaffold"}},
    "fedbn": {"rule": {"name": "fedbn"}},
    "fedadam": {"server_opt": {"name": "fedadam", "eta": 0.01, "beta_1": 0.9,
                               "beta_2": 0.99, "tau": 0.001}},
}


@pytest.mark.parametrize("rule", list(RULES))
def test_flower_messages_give_the_in_process_run(memory_flower, rule):
    """Same config through the ClientApp/FlowerRun messages == the in-process loop, for the
    rules with client state (personalised models, SCAFFOLD controls, FedBN's own BN)."""
    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=1, **RULES[rule])
    flower, grid = memory_flower(cfg, samples)
    assert flower.nodes == {"db0": 101, "db1": 102, "db2": 103}
    flower.run_rounds()
    local = _in_process(cfg, samples)
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(flower.global_weights,
                                                      flower.initial_weights))  # it trained
    assert [c["pooled_global"] for c in flower.curves] == \
        [c["pooled_global"] for c in local.curves]
    assert [c["pooled_personalised"] for c in flower.curves] == \
        [c["pooled_personalised"] for c in local.curves]
    # one train and one evaluate message per client and round, nothing else after joining
    kinds = [k for k, _ in grid.sent]
    assert kinds.count("train") == kinds.count("evaluate") == 3 * 2
    if rule == "scaffold":  # the controls live on the nodes and reach the server as deltas
        for a, b in zip(flower.server_control, local.server_control):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert all("control" in ctx.state for ctx in grid.contexts.values())


def test_the_server_holds_no_data_yet_starts_from_the_in_process_model(memory_flower):
    """DPK-GAT, whose data prior is counted from the training splits' AU annotations: the
    server, which has no sample, gets the labs' summed counts and so the same initial model
    (prior buffer included); its stand-in samples hold no flow image, the test clips' real
    ids and labels, and nothing of a training clip but its count."""
    from omegaconf import open_dict

    samples = toy_samples(learnable=True)
    rng = np.random.default_rng(0)
    samples.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 12, 14], 2, False))
                           for _ in range(len(samples.meta))]
    samples.meta["has_aus"] = True
    cfg = fed_cfg(seed=3)
    with open_dict(cfg):
        cfg.model.name = "dpk_gat"
    flower, _ = memory_flower(cfg, samples)
    local = FederatedRun(cfg, samples, make_clients(cfg, samples))
    prior = flower.initial_weights[flower.entry_names.index("data_prior")]
    assert prior.sum() > 0  # the labs' counts arrived
    for a, b in zip(flower.initial_weights, local.initial_weights):
        np.testing.assert_array_equal(a, b)
    stand_in = flower.samples
    assert not stand_in.x.any() and len(stand_in.x) == len(samples.x)
    for server_c, lab_c in zip(flower.clients, local.clients):
        lab_test = samples.meta.iloc[lab_c.test_idx]
        server_test = stand_in.meta.iloc[server_c.test_idx]
        assert server_test["clip"].tolist() == lab_test["clip"].tolist()
        assert server_test["label"].tolist() == lab_test["label"].tolist()
        assert set(stand_in.meta.iloc[server_c.train_idx]["clip"]) == \
            {f"train-{i}" for i in range(len(lab_c.train_idx))}


def test_labs_that_load_only_their_own_database(monkeypatch):
    """Each node holds one database alone (a lab's ``data=`` override), the server none:
    the clients, their splits and the global model are those of the in-process run over
    all three databases (splits are seeded by database name)."""
    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=4)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    nodes = {}
    for k, db in enumerate(["db0", "db1", "db2"]):
        own = samples.subset(np.flatnonzero(samples.meta["database"].to_numpy() == db))
        (client,) = make_clients(cfg, own)
        nodes[101 + k] = flower_app.Node(cfg, FederatedRun(cfg, own, [client]), client, 0)
    monkeypatch.setattr("mer.federated.flower.client_app.node_from_context",  # the node side
                        lambda ctx: nodes[ctx.node_id])
    grid = MemoryGrid(nodes)
    try:
        with pytest.raises(TimeoutError, match="only clients"):  # each knows only itself
            flower_app.discover(grid, ["db0", "db1", "db2", "db3"], timeout_s=1)
        federation = flower_app.discover(grid, ["db0", "db1", "db2"], timeout_s=1)
        flower = flower_app.FlowerRun(cfg, federation.samples, federation.clients, grid=grid,
                                      federation=federation, round_timeout_s=1)
        flower.run_rounds()
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
    local = _in_process(cfg, samples)
    for server_c, lab_c in zip(flower.clients, local.clients):
        assert server_c.name == lab_c.name
        assert federation.samples.meta.iloc[server_c.test_idx]["clip"].tolist() == \
            samples.meta.iloc[lab_c.test_idx]["clip"].tolist()
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [c["pooled_global"] for c in flower.curves] == \
        [c["pooled_global"] for c in local.curves]


def test_crashing_and_silent_nodes_are_counted_and_the_run_finishes(memory_flower):
    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=2, faults={"crash": [{"client": "db0", "round": 1}]})
    flower, grid = memory_flower(cfg, samples)
    grid.silent = {"db2"}  # joined, then went silent
    flower.run_rounds()
    r1, r2 = flower.stats
    assert r1["failed"] == ["db0", "db2"] and r1["clients"] == ["db1"]
    assert r2["failed"] == ["db2"] and r2["clients"] == ["db0", "db1"]
    assert [f["client"] for f in flower.failures] == ["db0", "db2", "db2"]
    assert "injected fault" in flower.failures[0]["error"]
    assert {lost["message"] for lost in flower.lost} == {"train", "evaluate"}
    final = flower.curves[-1]  # the silent node is left out of the evaluation
    assert set(final["per_client"]) == {"db0", "db1"}


def test_a_client_without_a_supernode_stops_the_start(memory_flower, monkeypatch):
    original = MemoryGrid.get_node_ids
    monkeypatch.setattr(MemoryGrid, "get_node_ids", lambda self: original(self)[:2])
    with pytest.raises(TimeoutError, match=r"only clients \['db0', 'db1'\]"):
        memory_flower(fed_cfg(), toy_samples())


CKKS = {"name": "ckks", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60],
        "scale_bits": 40, "chunk_size": 4096, "symmetric": True, "n_threads": 0}
SECAGG = {"name": "secagg", "mask_bits": 64, "frac_bits": 24}


def _with_privacy(cfg, privacy: dict):
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.privacy = OmegaConf.create(privacy)
    return cfg


def _key_configs(cfg, tmp_path):
    """(server config, labs' config) under ckks, with one key pair written to tmp_path."""
    from mer.privacy.encrypted import CKKSParams, write_key_files

    secret, public = write_key_files(CKKSParams(), tmp_path)
    return (_with_privacy(cfg, {**CKKS, "public_context": str(public)}),
            _with_privacy(cfg, {**CKKS, "secret_context": str(secret)}))


@pytest.mark.parametrize("scheme", ["ckks", "secagg"])
def test_secure_aggregation_over_flower_gives_the_in_process_run(memory_flower, tmp_path,
                                                                   scheme):
    """P-FedProx under ckks / secagg through the messages == the in-process secure loop;
    no train reply carries a model, and the personalised models stay on their nodes."""
    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=1, **RULES["pfedprox"])
    server_cfg, node_cfg = _key_configs(cfg, tmp_path) if scheme == "ckks" \
        else (_with_privacy(cfg, SECAGG),) * 2
    flower, grid = memory_flower(server_cfg, samples, node_cfg)
    flower.run_rounds()
    local = _in_process(node_cfg, samples)
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert any(not np.allclose(a, b) for a, b in zip(flower.global_weights,
                                                      flower.initial_weights))
    for kind in ("pooled_global", "pooled_personalised"):
        assert [c[kind]["uf1"] for c in flower.curves] == \
            pytest.approx([c[kind]["uf1"] for c in local.curves], abs=0.05)
    kinds = [k for k, _ in grid.sent]
    # 2 rounds of 3 labs; besides, one protected sum of the AU counts and one of the
    # confusion matrices per evaluation (ckks: one key holder decrypts each; secagg: a key
    # exchange for each)
    assert kinds.count("train") == kinds.count("evaluate") == 3 * 2
    assert kinds.count("query.secure_counts") == 3
    assert kinds.count("query.secure_finish") == 3 * 2 + (1 + 2 if scheme == "ckks" else 0)
    assert kinds.count("query.secure_keys") == (3 * (2 + 1 + 2) if scheme == "secagg" else 0)
    # what reached the server from training: protected bytes, never a model or its count
    trained = [(node, reply.content) for kind, node, reply in grid.received if kind == "train"]
    assert len(trained) == 6
    for node, content in trained:
        assert "arrays" not in content and "num-examples" not in content["metrics"]
        payload = bytes(content["secure"]["payload"])
        sent = np.concatenate([a.ravel() for a in
                               grid.contexts[node].state["sent"].to_numpy_ndarrays()])
        for dtype in (np.float32, np.float64):
            assert sent[:8].astype(dtype).tobytes() not in payload
    for name, node in flower.nodes.items():  # P-FedProx models: made and kept by each node
        assert isinstance(flower.state[name].personal, flower_app.KeptOnNode)
        mine = grid.contexts[node].state["personal"].to_numpy_ndarrays()
        for a, b in zip(mine, local.state[name].personal):
            np.testing.assert_allclose(a.reshape(b.shape), b, rtol=0, atol=1e-5)


def test_secagg_over_flower_recovers_a_client_lost_after_the_key_exchange(memory_flower):
    """db0 shares its keys, then fails in training: the survivors' pairwise masks with it do
    not cancel; each survivor hands out its share of db0's key (and of the survivors' self
    masks, never db0's), and the round still gives the survivors' FedAvg, as in-process.
    (Two survivors: privacy.min_clients=2 here, so threshold t = 2.)"""
    from mer.privacy.secagg import curious_estimate

    samples = toy_samples(learnable=True)
    cfg = _with_privacy(fed_cfg(seed=2, faults={"crash": [{"client": "db0", "round": 1}]}),
                        {**SECAGG, "min_clients": 2})
    flower, grid = memory_flower(cfg, samples)
    r1 = flower.round(1)
    server = flower.secure.server  # round 1's SecAggServer: everything the server holds
    assert server.u2 == ["db0", "db1", "db2"] and server.u3 == ["db1", "db2"]
    assert curious_estimate(server, "db0") is None  # its input never left the node
    r2 = flower.round(2)
    assert r1["failed"] == ["db0"] and r1["clients"] == ["db1", "db2"]
    assert r2["failed"] == [] and r2["clients"] == ["db0", "db1", "db2"]
    unmasks = [(node, reply.content) for kind, node, reply in grid.received
               if kind == "query.secure_unmask"
               and reply.content["config"]["purpose"] == "train"]
    assert [node for node, _ in unmasks] == [102, 103, 101, 102, 103]
    for _, content in unmasks[:2]:  # round 1: db0's key, the survivors' self masks
        assert set(content["s"]) == {"db0"} and set(content["b"]) == {"db1", "db2"}
    for _, content in unmasks[2:]:  # round 2: nobody dropped
        assert set(content["s"]) == set() and set(content["b"]) == {"db0", "db1", "db2"}
    local = _in_process(cfg, samples)
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_flower_server_must_hold_only_the_public_ckks_context(memory_flower, tmp_path):
    cfg = fed_cfg()
    _, node_cfg = _key_configs(cfg, tmp_path)
    with pytest.raises(PermissionError, match="only privacy.public_context"):
        memory_flower(node_cfg, toy_samples())
    with pytest.raises(ValueError, match="python -m mer.privacy.keys"):
        memory_flower(_with_privacy(cfg, CKKS), toy_samples())


def _late(run, name: str, seconds: float = 1000.0) -> None:
    """``name``'s local training on ``run`` reports ``seconds`` (past any deadline)."""
    train_client = run.train_client

    def slow(client, *args, **kwargs):
        update = train_client(client, *args, **kwargs)
        if client.name == name:
            update.seconds = seconds
        return update

    run.train_client = slow


def _arrived_and_dropped(flower, grid) -> tuple[set, list]:
    """Labs whose masked input reached the server; the labs each unmasking request named
    dropped."""
    names = {node: name for name, node in flower.nodes.items()}
    arrived = {names[node] for kind, node, reply in grid.received
               if kind == "train" and not reply.has_error() and "secure" in reply.content
               and "payload" in reply.content["secure"]}
    dropped = [list(msg.content["config"]["dropped"]) for msg in grid.messages
               if "config" in msg.content and "dropped" in msg.content["config"]]
    return arrived, dropped


def test_secagg_over_flower_never_unmasks_a_late_lab(memory_flower):
    """Finding 1: db0 misses faults.deadline_s. Its masked input must never be treated as
    dropped once it has arrived (the seeds that would then be revealed unmask it): the lab
    holds it back itself, the round sums the other three, as in-process."""
    samples = toy_samples(n_db=4, n_subjects=3, per_subject=3, learnable=True)
    cfg = _with_privacy(fed_cfg(seed=2, faults={"deadline_s": 100.0}), SECAGG)
    flower, grid = memory_flower(cfg, samples)
    _late(grid.nodes[101].run, "db0")
    flower.run_rounds()
    arrived, dropped = _arrived_and_dropped(flower, grid)
    assert all(not set(d) & arrived for d in dropped), (arrived, dropped)
    assert [r["late"] for r in flower.stats] == [["db0"], ["db0"]]
    assert [r["clients"] for r in flower.stats] == [["db1", "db2", "db3"]] * 2
    local = FederatedRun(cfg, samples, make_clients(cfg, samples))
    _late(local, "db0")
    local.run_rounds()
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_masked_input_that_arrived_late_is_counted_in_the_sum(memory_flower):
    """Finding 1, the server's deadline alone: db0's masked input arrives, its reply says it
    took longer than the server's faults.deadline_s. It is counted in the sum (never
    unmasked alone): the global model is the FedAvg of all four labs."""
    from omegaconf import open_dict

    samples = toy_samples(n_db=4, n_subjects=3, per_subject=3, learnable=True)
    node_cfg = _with_privacy(fed_cfg(seed=2), SECAGG)
    server_cfg = node_cfg.copy()
    with open_dict(server_cfg):
        server_cfg.federated.faults = {"deadline_s": 100.0}
    flower, grid = memory_flower(server_cfg, samples, node_cfg)
    _late(grid.nodes[101].run, "db0")
    flower.run_rounds()
    arrived, dropped = _arrived_and_dropped(flower, grid)
    assert "db0" in arrived and all(not set(d) & arrived for d in dropped)
    local = _in_process(node_cfg, samples)
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["ckks", "secagg"])
def test_a_protected_round_with_one_contributor_is_skipped_over_flower(memory_flower,
                                                                        tmp_path, scheme):
    """Finding 2 over Flower: db0 and db1 crash in round 1; db2's protected update alone is
    never opened (no decryption asked, global model unchanged), the round is recorded as
    skipped, the run goes on and round 2 aggregates all three."""
    samples = toy_samples(learnable=True)
    cfg = fed_cfg(seed=2, faults={"crash": [{"client": "db0", "round": 1},
                                            {"client": "db1", "round": 1}]})
    server_cfg, node_cfg = _key_configs(cfg, tmp_path) if scheme == "ckks" \
        else (_with_privacy(cfg, SECAGG),) * 2
    flower, grid = memory_flower(server_cfg, samples, node_cfg)
    before = len(grid.sent)  # the AU counts' sum, opened at the start
    r1 = flower.round(1)
    for a, b in zip(flower.global_weights, flower.initial_weights):
        np.testing.assert_array_equal(a, b)
    opened = {"query.secure_finish", "query.secure_reveal", "query.secure_unmask"}
    assert not [k for k, _ in grid.sent[before:] if k in opened]
    assert "min_clients" in str(r1["skipped"]) and r1["clients"] == ["db2"]
    r2 = flower.round(2)
    assert not r2["skipped"] and r2["clients"] == ["db0", "db1", "db2"]
    assert any(not np.array_equal(a, b) for a, b in zip(flower.global_weights,
                                                        flower.initial_weights))


def test_the_flower_server_refuses_a_secret_key_file_before_loading_it(tmp_path, monkeypatch):
    """Finding 6: the ServerApp given the secret context (as secret_context, or as its
    public_context) refuses it without ever deserialising the secret key."""
    from types import SimpleNamespace

    import tenseal

    from mer.privacy.encrypted import CKKSParams, write_key_files

    secret, _ = write_key_files(CKKSParams(), tmp_path)
    loaded = []
    real = tenseal.context_from
    monkeypatch.setattr(tenseal, "context_from",
                        lambda data, *a, **kw: loaded.append(bytes(data)) or real(data, *a, **kw))
    samples, cfg = toy_samples(), fed_cfg()
    clients = make_clients(cfg, samples)
    for privacy, match in (({**CKKS, "secret_context": str(secret)}, "only privacy.public_context"),
                           ({**CKKS, "public_context": str(secret)}, "holds the secret key")):
        with pytest.raises(PermissionError, match=match):
            flower_app.FlowerRun(_with_privacy(cfg, privacy), samples, clients, grid=None,
                                 federation=SimpleNamespace(au_counts=None, nodes={}))
    assert loaded == []  # the secret context was never handed to TenSEAL in this process


def test_a_lab_that_pins_its_privacy_refuses_a_downgrade(memory_flower):
    """Finding 6: a lab pins ``privacy`` in its node config; a run whose privacy mode differs
    (the server submits plaintext) is refused, with an error naming the lab."""
    samples = toy_samples()
    with pytest.raises(TimeoutError, match=r"db0.*pins privacy=secagg.*privacy=none"):
        memory_flower(fed_cfg(), samples, node_configs={101: {"privacy": "secagg"}})
    flower, grid = memory_flower(_with_privacy(fed_cfg(rounds=1), SECAGG), samples,
                                 node_configs={n: {"privacy": "secagg"} for n in (101, 102, 103)})
    flower.run_rounds()  # the pinned mode itself runs
    assert flower.stats[0]["clients"] == ["db0", "db1", "db2"]


def test_a_supernode_checks_its_pins_before_loading_any_data(monkeypatch):
    """The SuperNode's own path (node_from_context): the pin is checked on the composed
    config, before the lab's data is loaded."""
    import mer.data.sources

    monkeypatch.setattr(mer.data.sources, "load_samples",
                        lambda *a, **kw: pytest.fail("data loaded before the pin check"))
    context = Context(run_id=1, node_id=7, state=RecordDict(),
                      node_config={"client-name": "synA", "privacy": "secagg"},
                      run_config={"overrides": "federated=fedavg data.preset=tiny"})
    with pytest.raises(PermissionError, match="'synA' pins privacy=secagg.*privacy=none"):
        flower_app.node_from_context(context)


def test_a_lab_that_pins_its_ckks_key_refuses_another_key(memory_flower, tmp_path):
    """A lab pins its own key file; a run that would have it encrypt under another key (one
    the server made, say) is refused, naming the lab."""
    from mer.privacy.encrypted import CKKSParams, write_key_files

    mine, _ = write_key_files(CKKSParams(), tmp_path / "lab")
    server_cfg, node_cfg = _key_configs(fed_cfg(), tmp_path / "server")
    with pytest.raises(TimeoutError, match=r"db1.*pins its CKKS key file"):
        memory_flower(server_cfg, toy_samples(), node_cfg, node_configs={
            102: {"privacy": "ckks", "privacy-secret-context": str(mine)}})


def test_compose_config_refuses_a_config_without_federated():
    with pytest.raises(ValueError, match="need a federated config"):
        flower_app.compose_config("data.preset=tiny")


# -- real Flower processes on 127.0.0.1 ---------------------------------------------------------

OVERRIDES = ("federated=fedavg model=ststnet data.preset=tiny federated.num_clients=3 "
             "federated.rounds=2 federated.local_epochs=1 federated.eval_every=2 "
             "federated.baselines=false progress=false")
# Each SuperNode's messages answered by a warm worker (a node's model and data built once, not
# once per message): the protocol is the same, and real deployments run it this way.
WARM = 300.0
ONE_ROUND = OVERRIDES.replace("federated.rounds=2", "federated.rounds=1").replace(
    "federated.eval_every=2", "federated.eval_every=1")


def _in_process_weights(overrides: str) -> list[np.ndarray]:
    from mer.data.sources import load_samples

    cfg = flower_app.compose_config(overrides)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    return _in_process(cfg, samples).global_weights


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """MER_CACHE_DIR as set (CI sets one), else one shared by these tests."""
    import os

    path = os.environ.get("MER_CACHE_DIR") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("MER_CACHE_DIR", path)
    return path


@pytest.mark.slow
def test_real_flower_processes_give_the_in_process_model(tmp_path, cache):
    """FedAvg, 3 clients, 2 rounds: flower-superlink + 3 flower-supernode + flwr run on
    127.0.0.1 give the in-process loop's global model. Over TLS with authenticated
    SuperNodes and warm workers (README's worked example); a SuperNode with an unregistered
    key is refused. (A ClientApp process per message: the killed-SuperNode test.)"""
    from mer.federated.flower_local import LocalFederation

    expected = _in_process_weights(OVERRIDES)  # (also fills the data cache for the nodes)
    with LocalFederation(tmp_path / "flower", clients=3, secure=True, worker_idle_s=WARM) as fed:
        rogue = fed.start_unregistered_supernode(partition_id=0)
        run_id = fed.submit({"overrides": OVERRIDES, "out-dir": str(tmp_path / "out")})
        status = fed.wait(run_id, timeout_s=900)
        assert status == "finished:completed", fed.server_log(run_id)[-4000:]
        assert rogue.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in fed.log("supernode3")
    saved = torch.load(tmp_path / "out" / "global_model.pt", weights_only=False)["global"]
    assert len(saved) == len(expected)
    for a, b in zip(saved, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    import json

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    fed_res = results["federated"]
    assert fed_res["transport"]["engine"] == "flower"
    assert sorted(fed_res["transport"]["nodes"]) == sorted(fed_res["clients"])
    assert [r["clients"] for r in fed_res["rounds"]] == [sorted(fed_res["clients"])] * 2
    assert (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.slow
def test_ckks_over_real_flower_processes_gives_the_in_process_model(tmp_path, cache):
    """P-FedProx under privacy=ckks, 3 SuperNodes on 127.0.0.1 with warm workers, one round
    (the in-memory Flower tests cover several): the key pair handed out as ``flower_local``
    does (secret context to each node, public one to the server); the global model equals
    the in-process ckks run's within CKKS precision."""
    from mer.federated.flower_local import LocalFederation, with_ckks_keys

    overrides = ONE_ROUND.replace("federated=fedavg", "federated=pfedprox") + " privacy=ckks"
    expected = _in_process_weights(overrides)
    work = tmp_path / "flower"
    work.mkdir()
    run_overrides, node_overrides = with_ckks_keys(overrides, 3, work / "keys")
    assert "privacy.public_context=" in run_overrides and "secret" not in run_overrides
    with LocalFederation(work, clients=3, node_overrides=node_overrides,
                         worker_idle_s=WARM) as fed:
        run_id = fed.submit({"overrides": run_overrides, "out-dir": str(tmp_path / "out")})
        status = fed.wait(run_id, timeout_s=900)
        assert status == "finished:completed", fed.server_log(run_id)[-4000:]
        assert "query.secure_finish" in fed.log("supernode0")
    saved = torch.load(tmp_path / "out" / "global_model.pt", weights_only=False)["global"]
    for a, b in zip(saved, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_late_lab_under_secagg_over_real_flower_processes(tmp_path, cache):
    """privacy=secagg, 3 SuperNodes on 127.0.0.1 with warm workers, one round; the first
    lab's own config has a deadline its training always misses: it keeps its update (never
    sent, so never unmasked), the others' round completes with the threshold protocol, and
    the global model is the in-process secagg run's with that lab late."""
    import json

    from omegaconf import open_dict

    from mer.data.sources import load_samples
    from mer.federated.flower_local import LocalFederation

    overrides = ONE_ROUND + " privacy=secagg privacy.min_clients=2"
    cfg = flower_app.compose_config(overrides)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)  # (fills the nodes' data cache)
    names = [c.name for c in make_clients(cfg, samples)]
    with open_dict(cfg):
        cfg.federated.faults = {**(cfg.federated.get("faults") or {}), "deadline_s": 1e6}
    local = FederatedRun(cfg, samples, make_clients(cfg, samples))
    _late(local, names[0], seconds=1e7)  # only the first lab is late, as on the nodes below
    local.run_rounds()
    out = tmp_path / "out"
    late_node = ["federated.faults.deadline_s=0.000001", "", ""]
    with LocalFederation(tmp_path / "flower", clients=3, node_overrides=late_node,
                         worker_idle_s=WARM) as fed:
        run_id = fed.submit({"overrides": overrides, "out-dir": str(out),
                             "connect-timeout-s": 600.0})  # (slow starts on a busy machine)
        status = fed.wait(run_id, timeout_s=1500)
        assert status == "finished:completed", fed.server_log(run_id)[-4000:]
        assert "query.secure_keys" in fed.log("supernode0")
        # it sent no training input, so it is never asked to unmask a training sum (the
        # counts and evaluation sums, with all three labs, ask every lab alike)
        unmasks = [fed.log(f"supernode{i}").count("query.secure_unmask message")
                   for i in range(3)]
        assert unmasks[0] < unmasks[1] == unmasks[2], unmasks
    results = json.loads((out / "results.json").read_text())["federated"]
    assert [r["late"] for r in results["rounds"]] == [[names[0]]]
    assert [r["clients"] for r in results["rounds"]] == [names[1:]]
    assert not any(r["skipped"] for r in results["rounds"])
    saved = torch.load(out / "global_model.pt", weights_only=False)["global"]
    for a, b in zip(saved, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_supernode_does_not_hang_the_run(tmp_path, cache):
    """A SuperNode SIGKILLed during round 2 (the last): the SuperLink reports it unavailable once
    it misses its heartbeats (or the round times out), the round completes with the others,
    the loss is logged and counted, and the run finishes."""
    import json

    from mer.data.sources import load_samples
    from mer.federated.flower_local import LocalFederation

    out = tmp_path / "out"
    cfg = flower_app.compose_config(OVERRIDES)
    load_samples(cfg.data, cfg.paths.cache_dir)  # the data cache, before the nodes read it
    with LocalFederation(tmp_path / "flower", clients=3) as fed:
        run_id = fed.submit({"overrides": OVERRIDES, "out-dir": str(out),
                             "round-timeout-s": 180.0})
        checkpoint = out / "checkpoints" / "federated_state.pt"
        t0 = time.monotonic()
        while not checkpoint.exists():  # round 1 done: round 2's messages are on their way
            assert time.monotonic() - t0 < 600, fed.server_log(run_id)[-4000:]
            time.sleep(0.2)
        fed.kill_supernode(2)
        t_kill = time.monotonic()
        status = fed.wait(run_id, timeout_s=600)
        assert status == "finished:completed", fed.server_log(run_id)[-4000:]
        assert time.monotonic() - t_kill < 500  # no hang: heartbeats, else round timeouts
    results = json.loads((out / "results.json").read_text())["federated"]
    rounds, names = results["rounds"], list(results["clients"])  # partition order
    assert len(rounds) == 2 and results["final"]["round"] == 2
    assert rounds[0]["failed"] == [] and rounds[0]["clients"] == names
    assert rounds[1]["failed"] == [names[2]] and rounds[1]["clients"] == names[:2]
    assert results["counts"]["failed"] == 1
    assert {f["client"] for f in results["client_failures"]} == {names[2]}
    # Flower's SuperLink answers for a node that missed its heartbeats (2 x 30 s)
    assert all("Node Unavailable" in f["error"] or "no train reply" in f["error"]
               for f in results["client_failures"])
    assert set(results["final"]["per_client"]) == set(names[:2])  # not evaluated either


@pytest.mark.slow
def test_flower_simulation_engine_runs_the_app(tmp_path, cache):
    """The same app in Flower's simulation runtime (Ray; partition-id set by Flower)."""
    pytest.importorskip("ray")
    from mer.federated.flower_local import LocalFederation

    expected = _in_process_weights(OVERRIDES)
    with LocalFederation(tmp_path / "flower", clients=3, simulation=True) as fed:
        run_id = fed.submit({"overrides": OVERRIDES, "out-dir": str(tmp_path / "out")})
        status = fed.wait(run_id, timeout_s=900)
        assert status == "finished:completed", fed.server_log(run_id)[-4000:]
    saved = torch.load(tmp_path / "out" / "global_model.pt", weights_only=False)["global"]
    for a, b in zip(saved, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)



def test_wandb_run_keys_clients_metrics_by_client(memory_flower, monkeypatch, tmp_path):
    """One (offline) W&B run per federated run, in the experiment's group; every client's
    figures under ``client/<name>/``."""
    import wandb
    from omegaconf import OmegaConf

    logged: dict = {"rows": {}}

    class FakeRun:
        summary: dict = {}

        def log(self, row, step):
            logged["rows"][step] = row

        def finish(self):
            logged["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: logged.update(init=kw) or FakeRun())
    samples = toy_samples(n_subjects=4, per_subject=2)
    cfg = fed_cfg(rounds=1)
    flower, _ = memory_flower(cfg, samples)
    flower.run_rounds()
    cfg = OmegaConf.merge(cfg, {"name": "toy", "logger": {"wandb": {
        "project": "mer", "mode": "offline", "group": "toy", "tags": []}}})
    results = {"synthetic": True, "config": {}, "federated": {
        "transport": {"client_metrics": flower.client_metrics}, "curves": flower.curves,
        "rounds": flower.stats, "final": flower.curves[-1], "counts": {"failed": 0}}}
    log_wandb_federated(cfg, tmp_path, results, transport="flower")
    assert logged["init"]["group"] == "toy" and logged["init"]["mode"] == "offline"
    row = logged["rows"][1]
    for name in ("db0", "db1", "db2"):
        assert row[f"client/{name}/num-examples"] > 0 and f"client/{name}/seconds" in row
        assert f"client/{name}/global_uf1" in row
    assert "pooled_global/uf1" in row and logged["finished"]


def test_dp_sgd_over_flower_keeps_each_accountant_on_its_node(memory_flower):
    """privacy=dp: DP-SGD runs on the nodes; each node keeps its accountant across rounds and
    the server reports the same epsilons as the in-process run."""
    from omegaconf import OmegaConf, open_dict

    cfg = fed_cfg(seed=4)
    with open_dict(cfg):
        cfg.privacy = OmegaConf.create({
            "name": "dp", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": None,
            "delta": 1e-5, "accountant": "rdp", "sample_rate": None, "secure_mode": False})
    samples = toy_samples(n_subjects=4, per_subject=2, learnable=True)
    flower, grid = memory_flower(cfg, samples)
    flower.run_rounds()
    local = _in_process(cfg, samples)
    assert flower.epsilons() == local.epsilons()
    assert all(e > 0 for e in flower.epsilons()["clients"].values())
    for a, b in zip(flower.global_weights, local.global_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all("privacy" in ctx.state for ctx in grid.contexts.values())
