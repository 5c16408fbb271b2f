"""mer's Flower ``ClientApp``: a lab's SuperNode answering the server's messages.

Flower starts a fresh process for every message, so this module imports only Flower and
numpy at load time; the node's config, samples and state come from its disk
(:mod:`mer.federated.flower.common`) and the training code is imported when a message needs
it. The handlers:

- ``query`` (which client is this node, :func:`describe`), ``train`` (local training from the
  sent model) and ``evaluate`` (class probabilities of the sent models on the node's test
  split);
- under secure aggregation also ``query.secure_keys | secure_shares | secure_unmask``
  (secagg's threshold protocol), ``query.secure_counts`` (protected AU counts) and
  ``query.secure_finish`` (the decoded sum back to the survivors).

What a node keeps between messages (FedBN's last local model, SCAFFOLD's control and the
pending one, the DP-SGD accountant, the personalised model, secagg's parties) lives in
``context.state`` and, with a ``state-dir`` in the node config, in
``<state-dir>/run-<run id>/<client>.state`` too (:class:`~.common.NodeStore`): a restarted
SuperNode reads it back on its next message. See :mod:`mer.federated.flower_app` for the
server and the whole protocol.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mer.federated.flower import worker
from mer.federated.flower.common import (
    Node,
    NodeStore,
    Weights,
    _arrays,
    _weights,
    check_pins,
    node_from_context,
)
from mer.privacy.base import Layout, mean_from_sum, personalise_from_sum, vector_template

if TYPE_CHECKING:
    from mer.federated.loop import ClientUpdate, FederatedRun

log = logging.getLogger("mer.federated.flower_app")


def _node(context: Context) -> Node:
    """This SuperNode's :class:`Node`, after checking the run against the lab's pins; a
    node restarted mid-run (empty ``context.state``) reads its state back from disk."""
    node = node_from_context(context)
    check_pins(dict(context.node_config), node.cfg, node.client.name)
    store = NodeStore.of(context, node.client.name)
    if store is not None and len(context.state) == 0 and store.path.exists():
        store.restore(context.state)
        log.info("client %s: node state read back from %s", node.client.name, store.path)
    return node


def _durable(handler: Callable[[Message, Context], Message]
             ) -> Callable[[Message, Context], Message]:
    """Write the node's state to disk (``state-dir``) after ``handler`` answers; with
    ``worker-idle-s`` in the node config, hand the message to the node's warm worker
    (:mod:`.worker`), which answers it with this same handler."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        if not worker.IN_WORKER and worker.worker_idle_s(context) > 0:
            return worker.forward(msg, context)  # the node's warm worker answers
        reply = handler(msg, context)
        store = NodeStore.of(context, node_from_context(context).client.name)
        if store is not None:
            store.save(context.state)
        return reply

    return answer


client_app = ClientApp()


@client_app.query()
@_durable
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client (lab) this node is, and what it needs to know of it."""
    return Message(RecordDict({"client": ConfigRecord(describe(_node(context)))}),
                   reply_to=msg)


def describe(node: Node) -> dict:
    """What the server learns of a lab when it joins: its client's name, the clients its
    config makes, class names and input shape; without secure aggregation also its sizes, the
    test clips' ids and labels (for the metrics and predictions.csv) and the AU co-occurrence
    counts of its training split (DPK-GAT's prior, summed over labs). Under ``secagg`` /
    ``ckks`` (``protected``) none of those: they reach the server only inside protected sums.
    Never a flow image, nor a training clip's id or label."""
    c, samples = node.client, node.run.samples
    public = {"name": c.name, "index": node.index,
              "clients": [x.name for x in node.run.clients],
              "class-names": [str(n) for n in samples.class_names],
              "input-shape": [int(d) for d in samples.x.shape[1:]],
              "synthetic": bool(samples.synthetic)}
    if node.run.secure is not None:
        return {**public, "protected": True}
    test = samples.meta.iloc[c.test_idx]
    counts = node.run.client_au_counts(c)
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
@_durable
def train(msg: Message, context: Context) -> Message:
    """Local training of this node's client with mer's own code (``train_client``)."""
    node = _node(context)
    run = node.run
    conf = msg.content["config"]
    name, rnd, k = str(conf["client"]), int(conf["round"]), int(conf["k"])
    if name != node.client.name:
        raise ValueError(f"the server sent client {name!r}'s work to the node of "
                         f"{node.client.name!r}: check the SuperNodes' node config")
    if conf.get("crash", False):
        raise RuntimeError("injected fault (federated.faults.crash)")
    from mer.federated.loop import ClientState

    kept = context.state  # what this node keeps between rounds

    def received(records: RecordDict, key: str) -> Weights | None:
        return _weights(records[key], run.initial_weights) if key in records else None

    run.global_weights = received(msg.content, "global")
    if "server_control" in msg.content:
        run.server_control = received(msg.content, "server_control")
        _accept_control(kept, int(conf.get("control-round", 0)))
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
    if update.new_control is not None:  # SCAFFOLD: kept once the server accepts the update
        kept["control_pending"] = _arrays(update.new_control)
        kept["control_pending_round"] = ConfigRecord({"round": rnd})
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


def _accept_control(kept: RecordDict, accepted_round: int) -> None:
    """SCAFFOLD on a node: the control variate computed in a round becomes the node's
    control only if the server accepted that round's update (it sends the last round it
    accepted from this client, ``control-round``); a late or excluded one is dropped."""
    if "control_pending" not in kept:
        return
    if int(kept["control_pending_round"]["round"]) == accepted_round:
        kept["control"] = kept["control_pending"]
    del kept["control_pending"]
    del kept["control_pending_round"]


def _history(records: RecordDict) -> list[tuple]:
    """A DP-SGD accountant history ((sigma, q, steps), ...) kept in a ConfigRecord."""
    if "privacy" not in records:
        return []
    return [tuple(h) for h in json.loads(str(records["privacy"]["history"]))]


@client_app.evaluate()
@_durable
def evaluate(msg: Message, context: Context) -> Message:
    """Class probabilities of each sent model (``model-0``, ...) on this node's test split;
    under FedBN with this client's own batch-norm entries (kept here, as in the loop)."""
    node = _node(context)
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

    if run.secure is not None:  # confusion matrices, protected: no label leaves the lab
        models = {f"model-{i}": (lambda c, i=i: run._for_client(model(i), name))
                  for i in range(n)}
        mats = run.lab_confusions(node.client, models)
        payload = _protected_vector(run, context.state, msg.content, name, mats.ravel())
        content = RecordDict({"secure": ConfigRecord({"payload": payload})})
        if run.secure.disclose_per_lab:  # the lab's own opt-in (privacy.disclose_per_lab)
            content["confusion"] = ArrayRecord([mats])
        return Message(content, reply_to=msg)
    probs = [run.predict(run._for_client(model(i), name), node.client) for i in range(n)]
    return Message(RecordDict({"probs": ArrayRecord([p.astype(np.float32) for p in probs])}),
                   reply_to=msg)


# -- node side of secure aggregation (privacy=ckks | secagg) ----------------------------------
#
# ckks: the node encrypts ``[n w, n]`` with the lab's secret context (privacy.secret_context);
# the server adds ciphertexts under the public one and sends the sum back to the survivors,
# who decrypt it (``secure_finish``, refused below privacy.min_clients survivors): one
# returns the mean, each makes its P-FedProx model.
# secagg (mer.privacy.secagg, the threshold protocol): ``secure_keys`` makes the lab's
# SecAggParty of the round and publishes its two public keys; ``secure_shares`` relays the
# roster, the lab answers with its Shamir shares encrypted for each other lab; the train
# message relays the shares meant for this lab and the labs that shared (U2); the node masks;
# ``secure_unmask`` asks each lab whose masked input arrived for its shares of the survivors'
# self-mask seeds and of the dropped labs' keys (never both for one lab). The party lives in
# ``context.state`` between messages (this node's only). A lab whose training missed
# ``faults.deadline_s`` holds its input back itself: it never leaves the node, so nothing of
# it can be unmasked. Example counts travel inside the protected vector.


def protected_reply(run: FederatedRun, kept: RecordDict, conf: ConfigRecord,
                    records: RecordDict, update: ClientUpdate) -> RecordDict:
    """The train reply under secure aggregation: the protected ``[n w, n]``, never ``w``."""
    from mer.federated import aggregators
    from mer.privacy.secagg import MaskedAggregation

    name, rnd = update.name, int(conf["round"])
    _needs_key(run, name)
    metrics = MetricRecord({"work": update.work})  # steps and seconds would reveal n
    deadline = run.faults.deadline_s
    if deadline is not None and update.seconds > deadline:  # late: the input stays here
        log.warning("round %d: client %s missed the %.3g s deadline (%.3g s): its update is "
                    "not sent", rnd, name, deadline, update.seconds)
        return RecordDict({"metrics": metrics,
                           "secure": ConfigRecord({"late": float(update.seconds)})})
    _, excluded = aggregators.check_updates([(update.weights, update.num_examples)], [name],
                                            run.global_weights)
    if excluded:  # the node checks its own update: the server could not
        return RecordDict({"metrics": metrics,
                           "secure": ConfigRecord({"excluded": excluded[name]})})
    _needs_key(run, name)
    ids = [str(c) for c in conf["round-clients"]]
    if isinstance(run.secure, MaskedAggregation):
        party = _kept_party(kept, name, rnd, run)
        party.receive_shares({str(k): bytes(v) for k, v in records["shares"].items()}, ids)
        run.secure.begin_lab_round(rnd, ids, run.global_weights, party)
        payload = run.secure.client_payload(name, update.weights, update.num_examples)
        _keep_party(kept, party)
    else:
        run.secure.begin_round(rnd, ids, run.global_weights)
        payload = run.secure.client_payload(name, update.weights, update.num_examples)
    kept["sent"] = _arrays(update.weights)  # what went into the sum, for P-FedProx
    kept["sent-n"] = ConfigRecord({"round": rnd, "n": update.num_examples})
    return RecordDict({"metrics": metrics, "secure": ConfigRecord({"payload": payload})})


def _needs_key(run: FederatedRun, name: str) -> None:
    """ckks over Flower: a lab encrypts only with its own copy of the secret context."""
    from mer.privacy.encrypted import CKKSAggregation

    if isinstance(run.secure, CKKSAggregation) and not run.secure.params.secret_context:
        raise ValueError(f"client {name!r}: privacy=ckks over Flower needs this lab's copy "
                         "of the federation's secret context: add privacy.secret_context="
                         "PATH to the SuperNode's overrides (python -m mer.privacy.keys)")


def _protected_vector(run: FederatedRun, kept: RecordDict, records: RecordDict, name: str,
                      vector: np.ndarray) -> bytes:
    """A lab's side of a protected vector sum (AU counts, confusion matrices): ``[v, 1]``
    masked with this purpose's secagg party, or encrypted under ckks, for the round's labs
    (``config``: round, purpose, round-clients; secagg: the relayed ``shares``)."""
    from mer.privacy.secagg import MaskedAggregation

    conf = records["config"]
    rnd, purpose = int(conf["round"]), str(conf["purpose"])
    ids = [str(c) for c in conf["round-clients"]]
    template = vector_template(len(vector))
    _needs_key(run, name)
    if isinstance(run.secure, MaskedAggregation):
        party = _kept_party(kept, name, rnd, run, purpose)
        party.receive_shares({str(k): bytes(v) for k, v in records["shares"].items()}, ids)
        run.secure.begin_lab_round(rnd, ids, template, party)
        payload = run.secure.client_payload(name, [np.asarray(vector, np.float64)], 1)
        _keep_party(kept, party, purpose)
        return payload
    run.secure.begin_round(rnd, ids, template)
    return run.secure.client_payload(name, [np.asarray(vector, np.float64)], 1)


@client_app.query("secure_counts")
@_durable
def secure_counts(msg: Message, context: Context) -> Message:
    """The AU co-occurrence counts of this lab's training split, protected (only their sum
    over the labs is opened: DPK-GAT's data prior)."""
    node = _node(context)
    vector = node.run.client_au_counts(node.client)
    payload = _protected_vector(node.run, context.state, msg.content, node.client.name, vector)
    return Message(RecordDict({"secure": ConfigRecord({"payload": payload})}), reply_to=msg)


def _secagg_params(run: FederatedRun, name: str):
    from mer.privacy.secagg import MaskedAggregation

    if not isinstance(run.secure, MaskedAggregation):
        raise PermissionError(f"lab {name!r} runs privacy={run.privacy_name}, but the server "
                              "asks for secagg's key exchange: same privacy config on both?")
    return run.secure.params


def _party_key(purpose: str) -> str:
    """Where a node keeps its secagg party: one per purpose (train, counts, eval), each with
    fresh keys, so that a vector sum never reuses a training round's masks."""
    return "secagg" if purpose == "train" else f"secagg-{purpose}"


def _kept_party(kept: RecordDict, name: str, rnd: int, run: FederatedRun,
                purpose: str = "train"):
    """secagg: this node's :class:`~mer.privacy.secagg.SecAggParty` of round ``rnd``."""
    from mer.privacy.secagg import SecAggParty

    record = kept.get(_party_key(purpose))
    if record is None or int(record["round"]) != rnd:
        raise RuntimeError(f"client {name!r} holds no secagg party of round {rnd} ({purpose}; "
                           "node restarted since the key exchange?)")
    return SecAggParty.from_state(bytes(record["party"]), _secagg_params(run, name))


def _keep_party(kept: RecordDict, party, purpose: str = "train") -> None:
    kept[_party_key(purpose)] = ConfigRecord({"round": party.rnd, "party": party.to_state()})


def _purpose(conf: ConfigRecord) -> str:
    return str(conf["purpose"]) if "purpose" in conf else "train"


@client_app.query("secure_keys")
@_durable
def secure_keys(msg: Message, context: Context) -> Message:
    """secagg step 0: this lab's party of the round; its two public keys go to the server."""
    from mer.privacy.secagg import SecAggParty

    node = _node(context)
    name, rnd = node.client.name, int(msg.content["config"]["round"])
    party = SecAggParty(name, rnd, _secagg_params(node.run, name))
    _keep_party(context.state, party, _purpose(msg.content["config"]))
    c_pk, s_pk = party.advertise()
    return Message(RecordDict({"secure": ConfigRecord({"c-pk": c_pk, "s-pk": s_pk})}),
                   reply_to=msg)


@client_app.query("secure_shares")
@_durable
def secure_shares(msg: Message, context: Context) -> Message:
    """secagg step 1: Shamir shares of this lab's self-mask seed and key, encrypted for each
    lab of the relayed roster (the server cannot read them)."""
    node = _node(context)
    name, rnd = node.client.name, int(msg.content["config"]["round"])
    purpose = _purpose(msg.content["config"])
    roster = msg.content["roster"]
    party = _kept_party(context.state, name, rnd, node.run, purpose)
    out = party.share_keys({str(c): (bytes(a), bytes(b)) for c, a, b in
                            zip(roster["clients"], roster["c-pk"], roster["s-pk"])})
    _keep_party(context.state, party, purpose)
    return Message(RecordDict({"secure": ConfigRecord(out)}), reply_to=msg)


@client_app.query("secure_unmask")
@_durable
def secure_unmask(msg: Message, context: Context) -> Message:
    """secagg step 3: this lab's shares of the survivors' self-mask seeds and of the dropped
    labs' keys, after the honest lab's checks (:meth:`SecAggParty.unmask`)."""
    node = _node(context)
    conf, name = msg.content["config"], node.client.name
    purpose = _purpose(conf)
    party = _kept_party(context.state, name, int(conf["round"]), node.run, purpose)
    shares = party.unmask([str(c) for c in conf["survivors"]],
                          [str(c) for c in conf["dropped"]])
    _keep_party(context.state, party, purpose)  # what it revealed, against a second request
    return Message(RecordDict({"b": ConfigRecord(shares["b"]), "s": ConfigRecord(shares["s"]),
                               "config": ConfigRecord({"purpose": purpose})}), reply_to=msg)


@client_app.query("secure_finish")
@_durable
def secure_finish(msg: Message, context: Context) -> Message:
    """The decoded sum reaches the survivors: under ckks this node decrypts it (and returns
    the mean when asked); under P-FedProx it makes and keeps its personalised model."""
    node = _node(context)
    run, kept, conf = node.run, context.state, msg.content["config"]
    rnd, survivors = int(conf["round"]), [str(c) for c in conf["survivors"]]
    if "length" in conf:  # ckks: a protected vector sum (AU counts, confusion matrices)
        run.secure.begin_round(rnd, survivors, vector_template(int(conf["length"])))
        total, count = run.secure.decode_sum(bytes(msg.content["sum"]["payload"]), survivors)
        return Message(RecordDict({"sum": ArrayRecord([total, np.array([count])])}),
                       reply_to=msg)
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
