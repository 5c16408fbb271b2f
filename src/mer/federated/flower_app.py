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
  for a round's replies), ``connect-timeout-s`` (how long it waits for every lab to join),
  ``clients`` (the client names to wait for, comma-separated; default: those the labs'
  configs make);
- node config (``flower-supernode --node-config``): ``client-name="synA"`` or
  ``partition-id=0`` (position in the configured partition; Flower's simulation sets it),
  and ``overrides`` (the lab's own extra Hydra overrides: its ``data.root``, or ``data=``
  its own database alone).

The server loads no data: a lab's ``query`` reply tells it the client's sizes, the test
clips' ids and labels and the AU co-occurrence counts of its training split
(:func:`describe`), from which :func:`discover` makes a stand-in ``FlowSamples`` without a
single flow image.

Message types: ``query`` (which client is this node; see above), ``train`` (local training from the
sent model; replies weights, example count, steps, seconds, SCAFFOLD's control delta) and
``evaluate`` (class probabilities of the sent models on the node's test split). What a
node keeps between rounds (its last local model for FedBN, its SCAFFOLD control) stays in
the node's ``context.state``; personalised models are made by the server, as in the loop.

Under secure aggregation (``privacy=ckks | secagg``) a train reply carries only the protected
``[n w, n]``, and three more types take part: ``query.secure_keys`` (secagg's per-round key
exchange), ``query.secure_reveal`` (secagg's recovery of clients lost after it) and
``query.secure_finish`` (the sum back to the survivors: ckks decryption; P-FedProx models,
then made and kept by the nodes). See the notes above :func:`protected_reply`.
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
from mer.federated import aggregators
from mer.federated.loop import ClientState, ClientUpdate, FederatedRun, Weights, make_clients
from mer.federated.partition import ClientData
from mer.privacy.base import Layout, mean_from_sum, personalise_from_sum

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
    """Tell the server which client (lab) this node is, and what it needs to know of it."""
    return Message(RecordDict({"client": ConfigRecord(describe(node_from_context(context)))}),
                   reply_to=msg)


def describe(node: Node) -> dict:
    """What the server learns of a lab when it joins: its client's name and sizes, the clients
    its config makes, class names and input shape, the test clips' ids and labels (for the
    metrics and predictions.csv) and the AU co-occurrence counts of its training split
    (DPK-GAT's prior, summed over labs). Never a flow image, nor a training clip's id or
    label."""
    from mer.models.priors import cooccurrence_counts

    c, samples = node.client, node.run.samples
    test = samples.meta.iloc[c.test_idx]
    au, mask = samples.au_targets()
    counts = np.asarray(cooccurrence_counts(au[c.train_idx], mask[c.train_idx]), np.float64)
    keys = samples.meta["subject_key"].to_numpy()
    return {"name": c.name, "index": node.index, "train": len(c.train_idx),
            "test": len(c.test_idx),
            "subjects": len(set(keys[np.concatenate([c.train_idx, c.test_idx])])),
            "clients": [x.name for x in node.run.clients],
            "class-names": [str(n) for n in samples.class_names],
            "input-shape": [int(d) for d in samples.x.shape[1:]],
            "synthetic": bool(samples.synthetic),
            **{f"test-{col}": test[col].astype(str).tolist()
               for col in ("database", "subject", "clip")},
            "test-label": test["label"].astype(int).tolist(),
            "au-counts": counts.ravel().tolist()}


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
    # P-FedProx: the server sends the personalised model; under secure aggregation only the
    # node has it (made here from the decoded sum, see ``secure_finish``)
    run.state[name] = ClientState(
        personal=received(msg.content, "personal") or received(kept, "personal"),
        last=received(kept, "last"), control=received(kept, "control"))
    if name in run.client_privacy:  # DP-SGD: this client's accountant, kept on the node
        run.client_privacy[name].accountant.history = _history(kept)
    update = run.train_client(node.client, rnd, k, run.fedprox_anchor())
    state = run.state[name]
    kept["last"] = _arrays(state.last)
    if state.control is not None:
        kept["control"] = _arrays(state.control)
    if run.secure is not None:
        content = protected_reply(run, kept, conf, msg.content, update)
    else:
        content = RecordDict({
            "arrays": _arrays(update.weights),
            "metrics": MetricRecord({"num-examples": update.num_examples,
                                     "steps": update.steps, "seconds": update.seconds,
                                     "work": update.work})})
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

    def model(i: int) -> Weights:  # sent, or (secure P-FedProx) this node's personal model
        if f"model-{i}" in msg.content:
            return _weights(msg.content[f"model-{i}"], run.initial_weights)
        if "personal" not in context.state:
            raise RuntimeError(f"model {i} is the personal model kept on this node, and "
                               f"client {name!r} has none (node restarted?)")
        return _weights(context.state["personal"], run.initial_weights)

    probs = [run.predict(run._for_client(model(i), name), node.client) for i in range(n)]
    return Message(RecordDict({"probs": ArrayRecord([p.astype(np.float32) for p in probs])}),
                   reply_to=msg)


# -- node side of secure aggregation (privacy=ckks | secagg) ----------------------------------
#
# ckks: the node encrypts ``[n w, n]`` with the lab's secret context (privacy.secret_context);
# the server adds ciphertexts under the public one and sends the sum back to the survivors,
# who decrypt it (``secure_finish``): one returns the mean, each makes its P-FedProx model.
# secagg: ``secure_keys`` makes the node's X25519 key for the round (the private half stays
# in ``context.state``); the train message relays everyone's public key; the node masks;
# if clients dropped after that, ``secure_reveal`` gives the server the survivors' seeds with
# the dropped clients only. Example counts travel inside the protected vector.


def protected_reply(run: FederatedRun, kept: RecordDict, conf: ConfigRecord,
                    records: RecordDict, update: ClientUpdate) -> RecordDict:
    """The train reply under secure aggregation: the protected ``[n w, n]``, never ``w``."""
    from mer.privacy.encrypted import CKKSAggregation
    from mer.privacy.secagg import MaskedAggregation

    name, rnd = update.name, int(conf["round"])
    if isinstance(run.secure, CKKSAggregation) and not run.secure.params.secret_context:
        raise ValueError(f"client {name!r}: privacy=ckks over Flower needs this lab's copy "
                         "of the federation's secret context: add privacy.secret_context="
                         "PATH to the SuperNode's overrides (python -m mer.privacy.keys)")
    metrics = MetricRecord({"steps": update.steps, "seconds": update.seconds,
                            "work": update.work})
    _, excluded = aggregators.check_updates([(update.weights, update.num_examples)], [name],
                                            run.global_weights)
    if excluded:  # the node checks its own update: the server could not
        return RecordDict({"metrics": metrics,
                           "secure": ConfigRecord({"excluded": excluded[name]})})
    ids = [str(c) for c in conf["round-clients"]]
    if isinstance(run.secure, MaskedAggregation):
        party = _kept_party(kept, name, rnd)
        peers = {str(k): bytes(v) for k, v in records["peers"].items()}
        run.secure.begin_client_round(rnd, ids, run.global_weights, party, peers)
        kept["peers"] = ConfigRecord(peers)  # for the dropout recovery, from this node's copy
    else:
        run.secure.begin_round(rnd, ids, run.global_weights)
    payload = run.secure.client_payload(name, update.weights, update.num_examples)
    kept["sent"] = _arrays(update.weights)  # what went into the sum, for P-FedProx
    kept["sent-n"] = ConfigRecord({"round": rnd, "n": update.num_examples})
    return RecordDict({"metrics": metrics, "secure": ConfigRecord({"payload": payload})})


def _kept_party(kept: RecordDict, name: str, rnd: int):
    """secagg: this node's masking party of round ``rnd``, from the key ``secure_keys`` kept
    (and, once training has masked, the peers' public keys)."""
    from mer.privacy.secagg import MaskingParty

    secret = kept.get("secure")
    if secret is None or int(secret["round"]) != rnd:
        raise RuntimeError(f"client {name!r} holds no secagg key of round {rnd} (node "
                           "restarted since the key exchange?)")
    party = MaskingParty(name, rnd, bytes(secret["key"]))
    if "peers" in kept:
        party.peers = {str(k): bytes(v) for k, v in kept["peers"].items()}
    return party


@client_app.query("secure_keys")
def secure_keys(msg: Message, context: Context) -> Message:
    """secagg: a fresh X25519 key pair for this round; the public half goes to the server."""
    from mer.privacy.secagg import MaskingParty

    node = node_from_context(context)
    rnd = int(msg.content["config"]["round"])
    party = MaskingParty(node.client.name, rnd)
    context.state["secure"] = ConfigRecord({"round": rnd, "key": party.private_bytes()})
    return Message(RecordDict({"secure": ConfigRecord({"public-key": party.public_key()})}),
                   reply_to=msg)


@client_app.query("secure_reveal")
def secure_reveal(msg: Message, context: Context) -> Message:
    """secagg dropout recovery: this node's seeds with the clients the server says dropped
    (never with survivors), if enough survivors remain for the sum to hide each of them."""
    node = node_from_context(context)
    conf, kept, name = msg.content["config"], context.state, node.client.name
    rnd, ids = int(conf["round"]), [str(c) for c in conf["round-clients"]]
    dropped = [str(c) for c in conf["dropped"]]
    survivors = len(ids) - len(dropped)
    if survivors < node.run.secure.params.min_survivors:
        raise PermissionError(f"client {name!r} refuses to reveal: {survivors} survivor(s) < "
                              f"min_survivors={node.run.secure.params.min_survivors}")
    party = _kept_party(kept, name, rnd)
    return Message(RecordDict({"secure": ConfigRecord(party.reveal(dropped))}), reply_to=msg)


@client_app.query("secure_finish")
def secure_finish(msg: Message, context: Context) -> Message:
    """The decoded sum reaches the survivors: under ckks this node decrypts it (and returns
    the mean when asked); under P-FedProx it makes and keeps its personalised model."""
    node = node_from_context(context)
    run, kept, conf = node.run, context.state, msg.content["config"]
    rnd, survivors = int(conf["round"]), [str(c) for c in conf["survivors"]]
    if "payload" in msg.content["sum"]:  # ckks: still encrypted
        run.secure.begin_round(rnd, survivors, run.initial_weights)
        total, count = run.secure.decode_sum(bytes(msg.content["sum"]["payload"]), survivors)
    else:  # secagg: the server unmasked it already
        total, count = (a.astype(np.float64) for a in msg.content["sum"].to_numpy_ndarrays())
        count = float(count[0])
    layout = Layout.of(run.initial_weights)
    personalise = run.fed.get("personalise")
    if personalise:
        sent = kept.get("sent-n")
        if sent is None or int(sent["round"]) != rnd:
            raise RuntimeError(f"client {node.client.name!r} sent nothing in round {rnd}")
        own = _weights(kept["sent"], run.initial_weights)
        kept["personal"] = _arrays(personalise_from_sum(
            own, int(sent["n"]), total, count, layout, own=float(personalise.own)))
    content = RecordDict({})
    if bool(conf["mean"]):
        content["mean"] = _arrays(mean_from_sum(total, count, layout,
                                                f"round {rnd}: survivors {survivors}"))
    return Message(content, reply_to=msg)


class KeptOnNode:
    """Stands, on the server, for a client's personalised model that only its node holds
    (secure aggregation with P-FedProx); evaluate asks the node to use its own."""


# -- server side -------------------------------------------------------------------------------


@dataclass
class Federation:
    """The server's view of the labs, from their ``query`` replies (:func:`describe`): no
    sample of theirs, only what the rounds and the metrics need.

    ``samples`` stands in for the data on the server: one row per clip, with zero flow
    images; the test rows carry the real clip ids and labels, the training rows only their
    count. ``clients`` index into it in the usual way.
    """

    nodes: dict[str, int]            # client name -> node id
    samples: FlowSamples
    clients: list[ClientData]
    au_counts: np.ndarray            # (12, 12) summed over the labs' training splits
    summary: dict                    # client -> train / test / subjects


def discover(grid: Grid, expected: list[str] | None = None, timeout_s: float = 120.0
             ) -> Federation:
    """Ask the connected SuperNodes which client they are until every expected client has
    one. ``expected``: the client names, in order (run config ``clients``); None: the clients
    the labs' configs make (every lab that loads the whole config's data knows them all)."""
    import pandas as pd

    wanted = list(expected or [])
    found: dict[str, tuple[int, dict]] = {}
    asked: set[int] = set()
    t0 = time.monotonic()
    while not wanted or any(n not in found for n in wanted):
        fresh = [n for n in grid.get_node_ids() if n not in asked]
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type="query") for n in fresh]
        for reply in grid.send_and_receive(msgs, timeout=30.0) if msgs else []:
            node_id = reply.metadata.src_node_id
            asked.add(node_id)
            if reply.has_error():
                log.warning("node %d cannot serve this config: %s", node_id,
                            reply.error.reason)
                continue
            info = dict(reply.content["client"])
            name = str(info["name"])
            if name in found:
                raise RuntimeError(f"two SuperNodes ({found[name][0]}, {node_id}) serve client "
                                   f"{name!r}: give each its own client-name/partition-id")
            found[name] = (node_id, info)
            if expected is None:
                wanted += [str(n) for n in info["clients"] if str(n) not in wanted]
        if not wanted or any(n not in found for n in wanted):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"after {timeout_s:.0f} s only clients {sorted(found)} of "
                                   f"{wanted} have a SuperNode; start one per client")
            time.sleep(1.0)
    for name in set(found) - set(wanted):
        log.warning("SuperNode %d serves client %r, which is not in this run: ignored",
                    found[name][0], name)
    infos = [found[n][1] for n in wanted]
    first = infos[0]
    for info in infos[1:]:
        for key in ("class-names", "input-shape"):
            if list(info[key]) != list(first[key]):
                raise ValueError(f"client {info['name']!r} has {key} {list(info[key])}, client "
                                 f"{first['name']!r} {list(first[key])}: every lab needs the "
                                 "same label scheme and flow settings")
    rows, clients, start = [], [], 0
    for info in infos:
        name, n_train, n_test = str(info["name"]), int(info["train"]), int(info["test"])
        rows += [{"database": name, "subject": "(training split)", "clip": f"train-{i}",
                  "label": -1} for i in range(n_train)]
        rows += [{"database": d, "subject": s, "clip": c, "label": int(y)} for d, s, c, y in
                 zip(info["test-database"], info["test-subject"], info["test-clip"],
                     info["test-label"])]
        clients.append(ClientData(name, np.arange(start, start + n_train),
                                  np.arange(start + n_train, start + n_train + n_test)))
        start += n_train + n_test
    samples = FlowSamples(
        np.zeros((len(rows), *[int(d) for d in first["input-shape"]]), np.float32),
        pd.DataFrame(rows), [str(n) for n in first["class-names"]],
        synthetic=any(bool(i["synthetic"]) for i in infos),
        provenance={"source": "the labs' SuperNodes (the server holds no data)"})
    counts = sum(np.asarray(i["au-counts"], np.float64).reshape(12, 12) for i in infos)
    summary = {str(i["name"]): {k: int(i[k]) for k in ("train", "test", "subjects")}
               for i in infos}
    nodes = {n: found[n][0] for n in wanted}
    log.info("clients on SuperNodes: %s", nodes)
    return Federation(nodes, samples, clients, counts, summary)


class FlowerRun(FederatedRun):
    """A FederatedRun whose clients are Flower SuperNodes reached through ``grid``.

    Everything but local training and prediction is the loop's own code. A node that does
    not reply within ``round_timeout_s`` (killed, disconnected) or replies with an error is
    counted as failed for that round, like a client that raises in the in-process loop.
    """

    def __init__(self, cfg: DictConfig, samples: FlowSamples, clients: list[ClientData],
                 checkpoint_dir: Path | None = None, *, grid: Grid, federation: Federation,
                 round_timeout_s: float = 600.0) -> None:
        self.federation = federation  # before the loop's __init__: au_counts() reads it
        super().__init__(cfg, samples, clients, checkpoint_dir)
        self._check_server_keys()
        self.grid, self.round_timeout_s = grid, float(round_timeout_s)
        self.nodes = federation.nodes
        self.lost: list[dict] = []  # (round, client, reason) of missing replies
        self.client_metrics: list[dict] = []  # what each node reported, per round

    def _check_server_keys(self) -> None:
        """Under ckks the server holds the public context only, from a key file the labs'
        secret one matches (``python -m mer.privacy.keys``)."""
        from mer.privacy.encrypted import CKKSAggregation

        if not isinstance(self.secure, CKKSAggregation):
            return
        if self.secure.params.secret_context:
            raise PermissionError("the ServerApp was given the CKKS secret key "
                                  "(privacy.secret_context): give the server only "
                                  "privacy.public_context")
        if not self.secure.params.public_context:
            raise ValueError("privacy=ckks over Flower needs the federation's key files: make "
                             "them with python -m mer.privacy.keys --out DIR, then give the "
                             "server privacy.public_context=DIR/ckks-public.ctx and every lab "
                             "privacy.secret_context=DIR/ckks-secret.ctx")

    def au_counts(self) -> np.ndarray:
        return self.federation.au_counts

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
        contents = {self.clients[k].name: self._train_content(rnd, k)
                    for k in self.not_dropped(rnd, chosen, faults)}
        replies = self._exchange(rnd, "train", contents)
        updates = []
        for name, reply in replies.items():
            if isinstance(reply, Exception):
                self._failed(rnd, name, reply, faults)
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

    def _train_content(self, rnd: int, k: int) -> RecordDict:
        """The train message of client ``k``: the global model and what the loop would start
        it from (its personalised model, SCAFFOLD's server control)."""
        name = self.clients[k].name
        content = RecordDict({
            "config": ConfigRecord({"client": name, "round": rnd, "k": k,
                                    "crash": self.faults.crashes_now(name, rnd)}),
            "global": _arrays(self.global_weights)})
        personal = self.state[name].personal
        if personal is not None and not isinstance(personal, KeptOnNode):
            content["personal"] = _arrays(personal)
        if self.rule == "scaffold":
            content["server_control"] = _arrays(self.server_control)
        return content

    def round(self, rnd: int) -> dict:
        return super().round(rnd) if self.secure is None else self._secure_round(rnd)

    def _secure_round(self, rnd: int) -> dict:
        """A round under ckks / secagg: the nodes send protected payloads, the server adds
        them and gets back only the mean (module notes above ``protected_reply``)."""
        from mer.privacy.secagg import MaskedAggregation

        t0 = time.perf_counter()
        faults: dict[str, list] = {"dropped": [], "failed": [], "late": []}
        chosen = {self.clients[k].name: k
                  for k in self.not_dropped(rnd, self.select_clients(rnd), faults)}
        masked = isinstance(self.secure, MaskedAggregation)
        keys: dict[str, bytes] = {}
        if masked and chosen:
            asked = {n: RecordDict({"config": ConfigRecord({"round": rnd})}) for n in chosen}
            for name, reply in self._exchange(rnd, "query.secure_keys", asked).items():
                if isinstance(reply, Exception):
                    self._failed(rnd, name, reply, faults)
                else:
                    keys[name] = bytes(reply["secure"]["public-key"])
            chosen = {n: k for n, k in chosen.items() if n in keys}
        ids = list(chosen)
        contents = {}
        for name, k in chosen.items():
            contents[name] = self._train_content(rnd, k)
            contents[name]["config"]["round-clients"] = ids
            if masked:
                contents[name]["peers"] = ConfigRecord(keys)
        payloads, updates, excluded = {}, [], {}
        for name, reply in self._exchange(rnd, "train", contents).items():
            if isinstance(reply, Exception):
                self._failed(rnd, name, reply, faults)
                continue
            m = reply["metrics"]
            self.client_metrics.append({"round": rnd, "client": name, **dict(m)})
            update = ClientUpdate(name, [], 0, int(m["steps"]), float(m["seconds"]),
                                  float(m["work"]))  # weights and count: inside the payload
            if self.is_late(rnd, update, faults):
                continue
            updates.append(update)
            if "excluded" in reply["secure"]:
                excluded[name] = str(reply["secure"]["excluded"])
                log.warning("round %d: client %s excluded: %s", rnd, name, excluded[name])
                self.excluded.append({"round": rnd, "client": name, "reason": excluded[name]})
            else:
                payloads[name] = bytes(reply["secure"]["payload"])
        t_clients = time.perf_counter() - t0
        mean = self._secure_mean(rnd, ids, payloads) if payloads else None
        if mean is not None:
            self.global_weights = self.server_opt.step(self.global_weights, mean)
        else:
            log.warning("round %d: no aggregate; global model unchanged", rnd)
        return self._round_record(rnd, updates, excluded, faults, t0, t_clients)

    def _failed(self, rnd: int, name: str, error: Exception, faults: dict) -> None:
        faults["failed"].append(name)
        self.failures.append({"round": rnd, "client": name, "error": repr(error)})

    def _secure_mean(self, rnd: int, ids: list[str], payloads: dict[str, bytes]
                     ) -> Weights | None:
        """The server's part after the payloads: add them, then (secagg) unmask with the
        survivors' revealed seeds, or (ckks) have the survivors decrypt; the survivors make
        their P-FedProx models from the sum. None if the sum cannot be opened."""
        from mer.privacy.secagg import MaskedAggregation

        survivors = [n for n in ids if n in payloads]
        total = self.server_sum(payloads)
        personalise = bool(self.fed.get("personalise"))
        config = {"round": rnd, "survivors": survivors}
        if isinstance(self.secure, MaskedAggregation):
            self.secure.begin_server_round(rnd, ids, self.global_weights)
            dropped = [n for n in ids if n not in payloads]
            revealed: dict[str, dict] = {}
            if dropped:
                asked = {s: RecordDict({"config": ConfigRecord(
                    {"round": rnd, "round-clients": ids, "dropped": dropped})})
                    for s in survivors}
                for name, reply in self._exchange(rnd, "query.secure_reveal", asked).items():
                    if isinstance(reply, Exception):
                        log.warning("round %d: survivor %s revealed no seeds (%s): the masked "
                                    "sum cannot be opened", rnd, name, reply)
                        return None
                    revealed[name] = dict(reply["secure"])
            flat, count = self.secure.decode_sum(total, survivors, revealed=revealed)
            mean = mean_from_sum(flat, count, self.secure.layout, f"round {rnd}")
            if personalise:
                sums = RecordDict({"config": ConfigRecord({**config, "mean": False}),
                                   "sum": ArrayRecord([flat, np.array([count])])})
                self._keep_personal(rnd, self._exchange(rnd, "query.secure_finish",
                                                        {s: sums for s in survivors}))
            return mean
        # ckks: only key holders decrypt; every survivor under P-FedProx, else the first
        holders = survivors if personalise else survivors[:1]
        asked = {s: RecordDict({"config": ConfigRecord({**config, "mean": True}),
                                "sum": ConfigRecord({"payload": total})}) for s in holders}
        replies = self._exchange(rnd, "query.secure_finish", asked)
        if personalise:
            self._keep_personal(rnd, replies)
        for reply in replies.values():
            if not isinstance(reply, Exception):
                return _weights(reply["mean"], self.initial_weights)
        return None

    def _keep_personal(self, rnd: int, replies: dict) -> None:
        for name, reply in replies.items():
            if not isinstance(reply, Exception):
                self.state[name].personal = KeptOnNode()

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
                if not isinstance(w, KeptOnNode):  # else: the node's own personal model
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
            "connect_timeout_s": float(rc.get("connect-timeout-s", 120.0)),
            "clients": [c.strip() for c in str(rc.get("clients", "")).split(",") if c.strip()]
            or None}


def run_server(grid: Grid, overrides: str, out_dir: Path, round_timeout_s: float = 600.0,
               connect_timeout_s: float = 120.0, clients: list[str] | None = None) -> dict:
    """All rounds of the configured federated run over ``grid``; writes results.json,
    predictions.csv, curves.csv, rounds.csv and global_model.pt to ``out_dir``. The server
    loads no data: what it needs comes from the labs (:func:`discover`); ``clients``: the
    client names to wait for (default: those the labs' configs make)."""
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
    federation = discover(grid, clients, connect_timeout_s)
    t_data = time.perf_counter() - t0
    runs: list[FlowerRun] = []

    def make_run(*args, **kwargs) -> FlowerRun:
        runs.append(FlowerRun(*args, grid=grid, federation=federation,
                              round_timeout_s=round_timeout_s, **kwargs))
        return runs[-1]

    fed = run_federated(cfg, federation.samples, federation.clients, out_dir / "checkpoints",
                        show_progress=False, make_run=make_run)
    run = runs[0]
    fed["clients"] = federation.summary
    fed["protocol"] = {"kind": "holdout", "repeats": 1}
    fed["transport"] = {"engine": "flower", "nodes": run.nodes, "lost_replies": run.lost,
                        "client_metrics": run.client_metrics}
    timings = {"data_s": t_data, "federated_s": time.perf_counter() - t0 - t_data}
    results = write_federated_results(cfg, federation.samples, fed, timings, out_dir,
                                      transport="flower")
    torch.save({"global": run.global_weights, "entries": run.entry_names},
               out_dir / "global_model.pt")
    return results


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run mer's federated rounds over the connected SuperNodes (see the module doc)."""
    rc = _run_config(context)
    results = run_server(grid, rc["overrides"], rc["out_dir"], rc["round_timeout_s"],
                         rc["connect_timeout_s"], rc["clients"])
    final = results["federated"]["final"]
    log.warning("mer: %d rounds done; pooled global UF1 %.4f; outputs in %s",
                final["round"], final["pooled_global"]["uf1"], rc["out_dir"])

