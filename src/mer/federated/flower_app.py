"""mer on Flower: a ``ClientApp`` per lab and a ``ServerApp`` that runs mer's own rounds.

The server side is :class:`FlowerRun`, a :class:`~mer.federated.loop.FederatedRun` whose
clients are Flower SuperNodes: client selection, update checks, the aggregation rule, the
server optimiser, SCAFFOLD's server control, P-FedProx personalisation, fault accounting and
checkpoints are the loop's own code; only local training and test-split predictions travel
as Flower ``Message``s. The node side calls the same ``FederatedRun.train_client`` /
``predict`` on its own client, so a Flower run and an in-process run of one config give the
same global model.

Configuration (all from the same Hydra config as ``python -m mer.run``):

- run config (``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run -c``):
  ``overrides`` (Hydra overrides, e.g. ``"+experiment=fed_psyau data.preset=tiny"``),
  ``out-dir`` (results.json and friends), ``round-timeout-s`` (how long the server waits
  for a round's replies), ``connect-timeout-s`` (how long it waits for every lab to join);
- node config (``flower-supernode --node-config``): ``client-name="synA"`` or
  ``partition-id=0`` (position in the configured partition; Flower's simulation sets it),
  and ``overrides`` (the lab's own extra Hydra overrides, e.g. its ``data.root``).

Message types: ``query`` (which client is this node), ``train`` (local training from the
sent model; replies weights, example count, steps, seconds, SCAFFOLD's control delta) and
``evaluate`` (class probabilities of the sent models on the node's test split). What a
node keeps between rounds (its last local model for FedBN, its SCAFFOLD control) stays in
the node's ``context.state``; personalised models are made by the server, as in the loop.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, open_dict

from mer.data.samples import FlowSamples
from mer.federated.loop import ClientState, ClientUpdate, FederatedRun, Weights, make_clients
from mer.federated.partition import ClientData

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def compose_config(overrides: str | list[str]) -> DictConfig:
    """mer's Hydra config for a string (or list) of overrides, as ``mer.run`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=items)
    if not cfg.get("federated"):
        raise ValueError(f"the Flower apps need a federated config; overrides {items} have "
                         "none (add e.g. federated=fedavg or +experiment=fed_psyau)")
    return cfg


def _arrays(weights: Weights) -> ArrayRecord:
    return ArrayRecord([np.ascontiguousarray(w) for w in weights])


def _weights(record: ArrayRecord, like: Weights) -> Weights:
    """The arrays of ``record`` in the shapes of ``like`` (0-d buffers arrive as 1-d)."""
    arrays = record.to_numpy_ndarrays()
    if len(arrays) != len(like):
        raise ValueError(f"{len(arrays)} arrays received for a model of {len(like)}: same "
                         "model config on the server and every SuperNode?")
    return [a.reshape(w.shape) for a, w in zip(arrays, like)]


# -- node side ---------------------------------------------------------------------------------


@dataclass
class Node:
    """One lab's view: its config, data, partition and a FederatedRun for the shared code."""

    cfg: DictConfig
    run: FederatedRun
    client: ClientData
    index: int


_NODES: dict[str, Node] = {}


def node_from_context(context: Context) -> Node:
    """The node's config, data and client (by ``client-name`` or ``partition-id``), cached."""
    node_cfg = dict(context.node_config)
    overrides = " ".join(str(x) for x in (context.run_config.get("overrides", ""),
                                          node_cfg.get("overrides", "")))
    key = json.dumps([overrides, node_cfg.get("client-name"), node_cfg.get("partition-id")],
                     default=str)
    if key in _NODES:
        return _NODES[key]
    from mer.data.sources import load_samples

    cfg = compose_config(overrides)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    clients = make_clients(cfg, samples)
    names = [c.name for c in clients]
    if "client-name" in node_cfg:
        name = str(node_cfg["client-name"])
        if name not in names:
            raise ValueError(f"node config client-name={name!r} is not a client of this "
                             f"config; the clients are {names}")
        index = names.index(name)
    elif "partition-id" in node_cfg:
        index = int(node_cfg["partition-id"])
        if not 0 <= index < len(clients):
            raise ValueError(f"node config partition-id={index} out of range: {len(clients)} "
                             f"clients {names}")
    else:
        raise ValueError("set the SuperNode's client with --node-config 'client-name=\"NAME\"' "
                         "or 'partition-id=N'")
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    node = Node(cfg, FederatedRun(cfg, samples, clients), clients[index], index)
    _NODES[key] = node
    return node


client_app = ClientApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client (lab) this node is."""
    node = node_from_context(context)
    c = node.client
    return Message(RecordDict({"client": ConfigRecord({
        "name": c.name, "index": node.index, "train": len(c.train_idx),
        "test": len(c.test_idx)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of this node's client with mer's own code (``train_client``)."""
    node = node_from_context(context)
    run = node.run
    conf = msg.content["config"]
    name, rnd, k = str(conf["client"]), int(conf["round"]), int(conf["k"])
    if name != node.client.name:
        raise ValueError(f"the server sent client {name!r}'s work to the node of "
                         f"{node.client.name!r}: check the SuperNodes' node config")
    if conf.get("crash", False):
        raise RuntimeError("injected fault (federated.faults.crash)")
    kept = context.state  # what this node keeps between rounds

    def received(records: RecordDict, key: str) -> Weights | None:
        return _weights(records[key], run.initial_weights) if key in records else None

    run.global_weights = received(msg.content, "global")
    if "server_control" in msg.content:
        run.server_control = received(msg.content, "server_control")
    run.state[name] = ClientState(personal=received(msg.content, "personal"),
                                  last=received(kept, "last"), control=received(kept, "control"))
    if name in run.client_privacy:  # DP-SGD: this client's accountant, kept on the node
        run.client_privacy[name].accountant.history = _history(kept)
    anchor = list(run._module(run.global_weights).net.parameters()) if run.fed.mu else None
    update = run.train_client(node.client, rnd, k, anchor)
    state = run.state[name]
    kept["last"] = _arrays(state.last)
    if state.control is not None:
        kept["control"] = _arrays(state.control)
    content = RecordDict({
        "arrays": _arrays(update.weights),
        "metrics": MetricRecord({"num-examples": update.num_examples, "steps": update.steps,
                                 "seconds": update.seconds, "work": update.work})})
    if update.control_delta is not None:
        content["control_delta"] = _arrays(update.control_delta)
    if name in run.client_privacy:
        kept["privacy"] = ConfigRecord(
            {"history": json.dumps(run.client_privacy[name].accountant.history)})
        content["privacy"] = kept["privacy"]
    return Message(content, reply_to=msg)


def _history(records: RecordDict) -> list[tuple]:
    """A DP-SGD accountant history ((sigma, q, steps), ...) kept in a ConfigRecord."""
    if "privacy" not in records:
        return []
    return [tuple(h) for h in json.loads(str(records["privacy"]["history"]))]


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Class probabilities of each sent model (``model-0``, ...) on this node's test split;
    under FedBN with this client's own batch-norm entries (kept here, as in the loop)."""
    node = node_from_context(context)
    run, name = node.run, node.client.name
    n = int(msg.content["config"]["models"])
    last = context.state.get("last")
    run.state[name].last = _weights(last, run.initial_weights) if last is not None else None
    probs = [run.predict(run._for_client(_weights(msg.content[f"model-{i}"],
                                                  run.initial_weights), name), node.client)
             for i in range(n)]
    return Message(RecordDict({"probs": ArrayRecord([p.astype(np.float32) for p in probs])}),
                   reply_to=msg)


# -- server side -------------------------------------------------------------------------------


class FlowerRun(FederatedRun):
    """A FederatedRun whose clients are Flower SuperNodes reached through ``grid``.

    Everything but local training and prediction is the loop's own code. A node that does
    not reply within ``round_timeout_s`` (killed, disconnected) or replies with an error is
    counted as failed for that round, like a client that raises in the in-process loop.
    """

    def __init__(self, cfg: DictConfig, samples: FlowSamples, clients: list[ClientData],
                 checkpoint_dir: Path | None = None, *, grid: Grid,
                 round_timeout_s: float = 600.0, connect_timeout_s: float = 120.0) -> None:
        super().__init__(cfg, samples, clients, checkpoint_dir)
        if self.secure is not None:
            raise ValueError(
                f"privacy={self.privacy_name} is not wired into the Flower apps: the "
                "protected payloads would be made at the server. Run it in-process "
                "(python -m mer.run), or use privacy=dp / central_dp over Flower.")
        self.grid, self.round_timeout_s = grid, float(round_timeout_s)
        self.nodes = self.connect(float(connect_timeout_s))
        self.lost: list[dict] = []  # (round, client, reason) of missing replies
        self.client_metrics: list[dict] = []  # what each node reported, per round

    def connect(self, timeout_s: float) -> dict[str, int]:
        """Ask connected nodes which client they are until every client has one."""
        names = [c.name for c in self.clients]
        nodes: dict[str, int] = {}
        asked: set[int] = set()
        t0 = time.monotonic()
        while len(nodes) < len(names):
            fresh = [n for n in self.grid.get_node_ids() if n not in asked]
            msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                            message_type="query") for n in fresh]
            for reply in self.grid.send_and_receive(msgs, timeout=30.0) if msgs else []:
                node_id = reply.metadata.src_node_id
                asked.add(node_id)
                if reply.has_error():
                    log.warning("node %d cannot serve this config: %s", node_id,
                                reply.error.reason)
                    continue
                name = str(reply.content["client"]["name"])
                if name in nodes:
                    raise RuntimeError(f"two SuperNodes ({nodes[name]}, {node_id}) serve client "
                                       f"{name!r}: give each its own client-name/partition-id")
                nodes[name] = node_id
            if len(nodes) < len(names):
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"after {timeout_s:.0f} s only clients {sorted(nodes)} "
                                       f"of {names} have a SuperNode; start one per client")
                time.sleep(1.0)
        log.info("clients on SuperNodes: %s", nodes)
        return nodes

    def _exchange(self, rnd: int, kind: str,
                  contents: dict[str, RecordDict]) -> dict[str, RecordDict | Exception]:
        """Send one message per client and wait (``round_timeout_s``) for the replies."""
        msgs = {name: Message(content, dst_node_id=self.nodes[name], message_type=kind,
                              group_id=str(rnd)) for name, content in contents.items()}
        out: dict[str, RecordDict | Exception] = {
            name: TimeoutError(f"no {kind} reply within {self.round_timeout_s:.0f} s")
            for name in msgs}
        replies = list(self.grid.send_and_receive(list(msgs.values()),
                                                  timeout=self.round_timeout_s))
        # message ids are set when pushed; the SuperLink itself answers for a node that
        # stopped sending heartbeats (an error reply "Node Unavailable" from node 1)
        by_id = {m.metadata.message_id: name for name, m in msgs.items() if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: name for name, m in msgs.items()}
        for reply in replies:
            name = by_id.get(reply.metadata.reply_to_message_id or "-") or \
                by_node.get(reply.metadata.src_node_id)
            if name is None:
                log.warning("round %d: a %s reply for no message sent: %s", rnd, kind,
                            reply.metadata)
                continue
            out[name] = RuntimeError(reply.error.reason) if reply.has_error() \
                else reply.content
        for name, res in out.items():
            if isinstance(res, Exception):
                log.warning("round %d: %s from client %s failed: %s", rnd, kind, name, res)
                self.lost.append({"round": rnd, "client": name, "message": kind,
                                  "error": repr(res)})
        return out

    def _local_updates(self, rnd: int, chosen: list[int]) -> tuple[list[ClientUpdate], dict]:
        """The loop's ``_local_updates``, with the chosen clients training on their nodes
        (all at once); dropouts, failures and late updates are counted as in the loop."""
        faults: dict[str, list] = {"dropped": [], "failed": [], "late": []}
        contents = {}
        for k in chosen:
            name = self.clients[k].name
            if self.faults.drops_out(rnd, k):
                faults["dropped"].append(name)
                continue
            content = RecordDict({
                "config": ConfigRecord({"client": name, "round": rnd, "k": k,
                                        "crash": self.faults.crashes_now(name, rnd)}),
                "global": _arrays(self.global_weights)})
            if self.state[name].personal is not None:
                content["personal"] = _arrays(self.state[name].personal)
            if self.rule == "scaffold":
                content["server_control"] = _arrays(self.server_control)
            contents[name] = content
        replies = self._exchange(rnd, "train", contents)
        updates = []
        for name, reply in replies.items():
            if isinstance(reply, Exception):
                faults["failed"].append(name)
                self.failures.append({"round": rnd, "client": name, "error": repr(reply)})
                continue
            m = reply["metrics"]
            self.client_metrics.append({"round": rnd, "client": name, **dict(m)})
            update = ClientUpdate(name, _weights(reply["arrays"], self.initial_weights),
                                  int(m["num-examples"]), int(m["steps"]), float(m["seconds"]),
                                  float(m["work"]))
            if "control_delta" in reply:
                update.control_delta = _weights(reply["control_delta"], self.initial_weights)
            if name in self.client_privacy:  # the node's accountant, for epsilons() here
                self.client_privacy[name].accountant.history = _history(reply)
            if self.is_late(rnd, update, faults):
                continue
            updates.append(update)
        order = [self.clients[k].name for k in chosen]  # the loop's order, for equal sums
        updates.sort(key=lambda u: order.index(u.name))
        return updates, faults

    def evaluate(self, models: dict | None = None, with_predictions: bool = False) -> dict:
        """The loop's ``evaluate``, with each node predicting its own test split (one message
        per node carrying every model to score). Nodes that do not answer are left out."""
        asked: dict[str, list] = {}
        real_predict, self.predict = self.predict, self._record_request
        self._asked = asked
        try:  # dry pass: learn which models each client is asked to score
            super().evaluate(models, with_predictions)
        finally:
            self.predict = real_predict
        contents = {}
        for name, ws in asked.items():
            content = RecordDict({"config": ConfigRecord({"models": len(ws)})})
            for i, w in enumerate(ws):
                content[f"model-{i}"] = _arrays(w)
            contents[name] = content
        replies = self._exchange(self.round_done + 1, "evaluate", contents)
        self._probs = {name: iter(r["probs"].to_numpy_ndarrays())
                       for name, r in replies.items() if not isinstance(r, Exception)}
        everyone = self.clients
        self.clients = [c for c in everyone if c.name in self._probs or len(c.test_idx) == 0]
        self.predict = lambda weights, client: next(self._probs[client.name])
        try:
            return super().evaluate(models, with_predictions)
        finally:
            self.predict, self.clients = real_predict, everyone

    def _record_request(self, weights: Weights, client: ClientData) -> np.ndarray:
        self._asked.setdefault(client.name, []).append(weights)
        return np.zeros((len(client.test_idx), self.samples.num_classes), np.float32)


def _run_config(context: Context) -> dict:
    rc = dict(context.run_config)
    return {"overrides": str(rc.get("overrides", "")),
            "out_dir": Path(str(rc.get("out-dir", "outputs/flower"))).expanduser(),
            "round_timeout_s": float(rc.get("round-timeout-s", 600.0)),
            "connect_timeout_s": float(rc.get("connect-timeout-s", 120.0))}


def run_server(grid: Grid, overrides: str, out_dir: Path, round_timeout_s: float = 600.0,
               connect_timeout_s: float = 120.0) -> dict:
    """All rounds of the configured federated run over ``grid``; writes results.json,
    predictions.csv, curves.csv, rounds.csv and global_model.pt to ``out_dir``."""
    from mer.data.sources import load_samples
    from mer.engine.runner import write_federated_results
    from mer.federated.loop import run_federated

    t0 = time.perf_counter()
    cfg = compose_config(overrides)
    protocol = (cfg.federated.get("protocol") or {})
    if protocol.get("kind", "holdout") != "holdout" or int(protocol.get("repeats", 1)) != 1:
        raise ValueError("the Flower ServerApp runs federated.protocol.kind=holdout with "
                         "repeats=1; run LOSO folds / repeats as separate runs (a sweep)")
    if cfg.federated.get("baselines"):
        log.info("federated.baselines set to false: pooled/local baselines need all data "
                 "in one place (run them in-process with python -m mer.run)")
        with open_dict(cfg):
            cfg.federated.baselines = False
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    t_data = time.perf_counter() - t0
    clients = make_clients(cfg, samples)
    runs: list[FlowerRun] = []

    def make_run(*args, **kwargs) -> FlowerRun:
        runs.append(FlowerRun(*args, grid=grid, round_timeout_s=round_timeout_s,
                              connect_timeout_s=connect_timeout_s, **kwargs))
        return runs[-1]

    fed = run_federated(cfg, samples, clients, out_dir / "checkpoints", show_progress=False,
                        make_run=make_run)
    run = runs[0]
    fed["protocol"] = {"kind": "holdout", "repeats": 1}
    fed["transport"] = {"engine": "flower", "nodes": run.nodes, "lost_replies": run.lost,
                        "client_metrics": run.client_metrics}
    timings = {"data_s": t_data, "federated_s": time.perf_counter() - t0 - t_data}
    results = write_federated_results(cfg, samples, fed, timings, out_dir, transport="flower")
    torch.save({"global": run.global_weights, "entries": run.entry_names},
               out_dir / "global_model.pt")
    return results


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run mer's federated rounds over the connected SuperNodes (see the module doc)."""
    rc = _run_config(context)
    results = run_server(grid, rc["overrides"], rc["out_dir"], rc["round_timeout_s"],
                         rc["connect_timeout_s"])
    final = results["federated"]["final"]
    log.warning("mer: %d rounds done; pooled global UF1 %.4f; outputs in %s",
                final["round"], final["pooled_global"]["uf1"], rc["out_dir"])

