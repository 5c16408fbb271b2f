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
  ``overrides`` (the lab's own extra Hydra overrides: its ``data.root``, or ``data=``
  its own database alone), and the lab's pins (:func:`check_pins`): ``privacy="secagg"``
  (it refuses runs of any other privacy mode) and ``privacy-secret-context="PATH"`` (its
  own CKKS key file, which replaces any the run names).

The server loads no data: a lab's ``query`` reply tells it the client's sizes, the test
clips' ids and labels and the AU co-occurrence counts of its training split
(:func:`describe`), from which :func:`discover` makes a stand-in ``FlowSamples`` without a
single flow image. Under secure aggregation (``privacy=secagg | ckks``) the reply carries
none of these: the counts go inside the protected train sum, the AU counts through
``query.secure_counts`` (one protected vector per lab, only the sum opened) and the test
results as protected confusion matrices in the ``evaluate`` reply (only their sum opened:
the pooled figures; per-lab figures only with ``privacy.disclose_per_lab=true``). README's
table (:mod:`mer.privacy.exposure`) lists every field and who sees it.

Message types: ``query`` (which client is this node; see above), ``train`` (local training from the
sent model; replies weights, example count, steps, seconds, SCAFFOLD's control delta) and
``evaluate`` (class probabilities of the sent models on the node's test split). What a
node keeps between rounds (its last local model for FedBN, its SCAFFOLD control) stays in
the node's ``context.state`` and its ``state-dir`` (:mod:`mer.federated.flower.common`);
personalised models are made by the server, as in the loop. The node side lives in
:mod:`mer.federated.flower.client_app` (re-exported here), the server side in this module.

Under secure aggregation (``privacy=ckks | secagg``) a train reply carries only the protected
``[n w, n]`` (no example count, steps or seconds), and more types take part:
``query.secure_keys``, ``query.secure_shares`` and ``query.secure_unmask`` (the steps of
secagg's threshold protocol, :mod:`mer.privacy.secagg`; with a ``purpose``: train, counts or
eval, each with its own keys), ``query.secure_counts`` (the protected AU counts) and
``query.secure_finish`` (the sum back to the survivors: ckks decryption; P-FedProx models,
then made and kept by the nodes). See the notes above :func:`protected_reply`. A protected
sum of fewer than ``privacy.min_clients`` labs is never opened: the round is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, open_dict

from mer.data.io import atomic_write_with
from mer.data.samples import FlowSamples

# the node side and the shared parts live in mer.federated.flower (client_app, common); their
# names stay importable from here (pyproject's app components, older scripts)
from mer.federated.flower.client_app import (  # noqa: F401
    _accept_control,
    _history,
    _node,
    client_app,
    describe,
    evaluate,
    protected_reply,
    query,
    secure_counts,
    secure_finish,
    secure_keys,
    secure_shares,
    secure_unmask,
    train,
)
from mer.federated.flower.common import (  # noqa: F401
    CONFIG_DIR,
    KeptOnNode,
    Node,
    NodeStore,
    _arrays,
    _weights,
    check_pins,
    compose_config,
    node_from_context,
)
from mer.federated.loop import ClientUpdate, FederatedRun, Weights
from mer.federated.partition import ClientData
from mer.privacy.base import (
    TooFewContributors,
    mean_from_sum,
    require_contributors,
    vector_template,
)

log = logging.getLogger(__name__)

# -- server side -------------------------------------------------------------------------------


@dataclass
class Federation:
    """The server's view of the labs, from their ``query`` replies (:func:`describe`): no
    sample of theirs, only what the rounds and the metrics need.

    ``samples`` stands in for the data on the server: one row per clip, with zero flow
    images; the test rows carry the real clip ids and labels, the training rows only their
    count. ``clients`` index into it in the usual way. ``protected`` (secagg / ckks labs):
    the server knows no count, id or label of a lab; each client stands as one placeholder
    training row, no test row, and the AU counts are summed securely (``FlowerRun``).
    """

    nodes: dict[str, int]            # client name -> node id
    samples: FlowSamples
    clients: list[ClientData]
    au_counts: np.ndarray            # (12, 12) summed over the labs' training splits
    summary: dict                    # client -> train / test / subjects (None: protected)
    protected: bool = False


def discover(grid: Grid, expected: list[str] | None = None, timeout_s: float = 120.0
             ) -> Federation:
    """Ask the connected SuperNodes which client they are until every expected client has
    one. ``expected``: the client names, in order (run config ``clients``); None: the clients
    the labs' configs make (every lab that loads the whole config's data knows them all)."""
    import pandas as pd

    wanted = list(expected or [])
    found: dict[str, tuple[int, dict]] = {}
    asked: set[int] = set()
    refused: dict[int, str] = {}  # node -> why it cannot serve this run (e.g. a lab's pin)
    t0 = time.monotonic()
    while not wanted or any(n not in found for n in wanted):
        fresh = [n for n in grid.get_node_ids() if n not in asked]
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type="query") for n in fresh]
        # wait as long as the connect timeout allows: a lab's first reply starts a ClientApp
        # process that loads its data (minutes on a busy machine); a reply missed here would
        # be asked for again, and missed again, until the timeout
        wait = max(30.0, timeout_s - (time.monotonic() - t0))
        for reply in grid.send_and_receive(msgs, timeout=wait) if msgs else []:
            node_id = reply.metadata.src_node_id
            asked.add(node_id)
            if reply.has_error():
                log.warning("node %d cannot serve this config: %s", node_id,
                            reply.error.reason)
                refused[node_id] = str(reply.error.reason)
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
                why = "".join(f"; SuperNode {n} refused: {r}" for n, r in refused.items())
                raise TimeoutError(f"after {timeout_s:.0f} s only clients {sorted(found)} of "
                                   f"{wanted} have a SuperNode; start one per client{why}")
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
    protected = [bool(i.get("protected", False)) for i in infos]
    if any(protected) and not all(protected):
        raise ValueError("some labs run under secure aggregation and some do not ("
                         f"{dict(zip(wanted, protected))}): same privacy config everywhere")
    if all(protected):  # nothing per lab: one placeholder row each, no test row
        rows = [{"database": str(i["name"]), "subject": "(protected)", "clip": "lab",
                 "label": -1} for i in infos]
        clients = [ClientData(str(i["name"]), np.array([k]), np.array([], np.int64))
                   for k, i in enumerate(infos)]
        counts = np.zeros((12, 12))
        summary = {str(i["name"]): dict.fromkeys(("train", "test", "subjects")) for i in infos}
    else:
        rows, clients, counts, summary = _plain_view(infos)
    samples = FlowSamples(
        np.zeros((len(rows), *[int(d) for d in first["input-shape"]]), np.float32),
        pd.DataFrame(rows), [str(n) for n in first["class-names"]],
        synthetic=any(bool(i["synthetic"]) for i in infos),
        provenance={"source": "the labs' SuperNodes (the server holds no data)"})
    nodes = {n: found[n][0] for n in wanted}
    log.info("clients on SuperNodes: %s", nodes)
    return Federation(nodes, samples, clients, counts, summary, all(protected))


def _plain_view(infos: list[dict]) -> tuple[list[dict], list[ClientData], np.ndarray, dict]:
    """Without secure aggregation: stand-in rows (training rows by count, test rows with
    their real ids and labels), the clients, the summed AU counts and the sizes."""
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
    counts = sum(np.asarray(i["au-counts"], np.float64).reshape(12, 12) for i in infos)
    summary = {str(i["name"]): {k: int(i[k]) for k in ("train", "test", "subjects")}
               for i in infos}
    return rows, clients, counts, summary


def check_server_keys(privacy: Mapping | None) -> None:
    """Under ckks the ServerApp holds the public context only, from a key file the labs'
    secret one matches (``python -m mer.privacy.keys``). Checked on the config and on the
    file's framing (:func:`~mer.privacy.encrypted.holds_secret_key`) before any key file is
    loaded: a secret key handed to the server by mistake is never deserialised here."""
    from mer.privacy.encrypted import holds_secret_key

    if not privacy or privacy.get("name") != "ckks":
        return
    if privacy.get("secret_context"):
        raise PermissionError("the ServerApp was given the CKKS secret key "
                              "(privacy.secret_context): give the server only "
                              "privacy.public_context; the key was not loaded")
    public = privacy.get("public_context")
    if not public:
        raise ValueError("privacy=ckks over Flower needs the federation's key files: make "
                         "them with python -m mer.privacy.keys --out DIR, then give the "
                         "server privacy.public_context=DIR/ckks-public.ctx and every lab "
                         "privacy.secret_context=DIR/ckks-secret.ctx")
    if Path(str(public)).expanduser().is_file() and holds_secret_key(public):
        raise PermissionError(f"privacy.public_context={public} holds the secret key: the "
                              "server must get only ckks-public.ctx; the key was not loaded")


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
        self.grid, self.round_timeout_s = grid, float(round_timeout_s)  # au_counts asks nodes
        self.nodes = federation.nodes
        self.lost: list[dict] = []  # (round, client, reason) of missing replies
        self.client_metrics: list[dict] = []  # what each node reported, per round
        check_server_keys(cfg.get("privacy"))  # before any key file is loaded
        super().__init__(cfg, samples, clients, checkpoint_dir)

    def au_counts(self) -> np.ndarray:
        """The labs' summed AU co-occurrence counts: from their ``query`` replies, or under
        secure aggregation from one protected vector per lab (only the sum is opened)."""
        if self.secure is None:
            return self.federation.au_counts
        asked = {c.name: RecordDict({"config": ConfigRecord({})}) for c in self.clients}
        try:
            (total, _), _ = self.secure_vector_sum(0, "counts", "query.secure_counts", asked,
                                                   144)
        except TooFewContributors as e:
            log.warning("AU co-occurrence counts not released (%s): the data prior is empty", e)
            return np.zeros((12, 12))
        return np.rint(total).reshape(12, 12)

    def secure_vector_sum(self, rnd: int, purpose: str, kind: str,
                          contents: dict[str, RecordDict], length: int
                          ) -> tuple[tuple[np.ndarray, int], dict[str, RecordDict]]:
        """A protected sum of one ``length``-vector per lab over the nodes: the ``kind``
        message (with the round, ``purpose`` and, under secagg, the relayed shares after
        the key exchange) is answered with a protected payload; the server adds them and has
        the sum opened (secagg: unmasked with the survivors' shares; ckks: decrypted by a key
        holder) for ``privacy.min_clients`` labs or more, else :class:`TooFewContributors`.
        Returns ``((sum (length,), labs in it), the replies that arrived)``."""
        from mer.privacy.secagg import MaskedAggregation

        faults: dict[str, list] = {"dropped": [], "failed": [], "late": []}
        ids = list(contents)
        require_contributors(len(ids), self.min_clients, f"{purpose} (round {rnd})")
        secagg = self.secure.begin_server_round(rnd, ids, vector_template(length)) \
            if isinstance(self.secure, MaskedAggregation) else None
        relayed = self._secagg_setup(rnd, secagg, faults, purpose) if secagg else {}
        ids = secagg.u2 if secagg else ids
        for name in ids:
            contents[name]["config"] = ConfigRecord({
                **dict(contents[name]["config"]), "round": rnd, "purpose": purpose,
                "round-clients": ids})
            if secagg:
                contents[name]["shares"] = ConfigRecord(relayed[name])
        replies = {n: r for n, r in self._exchange(rnd, kind, {n: contents[n] for n in ids})
                   .items() if not isinstance(r, Exception)}
        payloads = {n: bytes(r["secure"]["payload"]) for n, r in replies.items()}
        survivors = [n for n in ids if n in payloads]
        require_contributors(len(survivors), self.min_clients, f"{purpose} (round {rnd})")
        total = self.server_sum(payloads)
        if secagg:
            flat, count = self._secagg_unmask(rnd, secagg, total, purpose)
            return (flat, int(round(count))), replies
        for holder in survivors:  # ckks: the first key holder that answers decrypts
            asked = {holder: RecordDict({
                "config": ConfigRecord({"round": rnd, "survivors": survivors, "mean": False,
                                        "purpose": purpose, "length": length}),
                "sum": ConfigRecord({"payload": total})})}
            reply = self._exchange(rnd, "query.secure_finish", asked)[holder]
            if not isinstance(reply, Exception):
                flat, count = reply["sum"].to_numpy_ndarrays()
                return (flat.astype(np.float64), int(round(float(count[0])))), replies
        raise TooFewContributors(f"{purpose} (round {rnd}): no key holder decrypted the sum")

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
        extra = self.strategy.round_content()  # the rule's server state (Rule.round_content)
        for key, weights in extra.items():
            content[key] = _arrays(weights)
        if "server_control" in extra:  # SCAFFOLD: the last round whose control was accepted
            content["config"]["control-round"] = int(
                self.state[name].flags.get("control_round", 0))
        return content

    def round(self, rnd: int) -> dict:
        return super().round(rnd) if self.secure is None else self._secure_round(rnd)

    def _secure_round(self, rnd: int) -> dict:
        """A round under ckks / secagg: the nodes send protected payloads, the server adds
        them and gets back only the mean (module notes above ``protected_reply``). Fewer
        than ``privacy.min_clients`` labs (or, under secagg, than its threshold) at any
        step: the round is skipped, nothing is opened."""
        from mer.privacy.secagg import MaskedAggregation

        t0 = time.perf_counter()
        faults: dict[str, list] = {"dropped": [], "failed": [], "late": []}
        ids = [self.clients[k].name
               for k in self.not_dropped(rnd, self.select_clients(rnd), faults)]
        index = {c.name: k for k, c in enumerate(self.clients)}
        updates: list[ClientUpdate] = []
        excluded: dict[str, str] = {}
        skipped, t_clients = None, None
        try:
            require_contributors(len(ids), self.min_clients, f"round {rnd}")
            secagg = self.secure.begin_server_round(rnd, ids, self.global_weights) \
                if isinstance(self.secure, MaskedAggregation) else None
            relayed = self._secagg_setup(rnd, secagg, faults) if secagg else {}
            ids = secagg.u2 if secagg else ids
            contents = {}
            for name in ids:
                contents[name] = self._train_content(rnd, index[name])
                contents[name]["config"]["round-clients"] = ids
                if secagg:
                    contents[name]["shares"] = ConfigRecord(relayed[name])
            payloads = self._secure_payloads(rnd, contents, updates, excluded, faults)
            t_clients = time.perf_counter() - t0
            mean = self._secure_mean(rnd, ids, payloads)
            if mean is None:
                skipped = f"round {rnd}: the protected sum could not be opened (lost replies)"
            else:
                self.global_weights = self.server_opt.step(self.global_weights, mean)
        except TooFewContributors as e:  # never opened, never an aborted run
            skipped = str(e)
        if skipped:
            log.warning("round %d skipped, global model unchanged: %s", rnd, skipped)
        t_clients = time.perf_counter() - t0 if t_clients is None else t_clients
        return self._round_record(rnd, updates, excluded, faults, t0, t_clients, skipped)

    def _secagg_setup(self, rnd: int, secagg, faults: dict, purpose: str = "train"
                      ) -> dict[str, dict[str, bytes]]:
        """secagg steps 0 and 1 through the nodes: public keys in, roster out; encrypted
        shares in, relayed per receiver (returned). Labs that fail a step are counted failed.
        ``purpose``: which of a node's parties (train, counts, eval) the keys are for."""
        asked = {n: RecordDict({"config": ConfigRecord({"round": rnd, "purpose": purpose})})
                 for n in secagg.selected}
        adverts = {}
        for name, reply in self._exchange(rnd, "query.secure_keys", asked).items():
            if isinstance(reply, Exception):
                self._failed(rnd, name, reply, faults)
            else:
                adverts[name] = (bytes(reply["secure"]["c-pk"]), bytes(reply["secure"]["s-pk"]))
        roster = secagg.receive_keys(adverts)
        asked = {n: RecordDict({
            "config": ConfigRecord({"round": rnd, "purpose": purpose}),
            "roster": ConfigRecord({"clients": list(roster),
                                    "c-pk": [c for c, _ in roster.values()],
                                    "s-pk": [s for _, s in roster.values()]})}) for n in roster}
        shares = {}
        for name, reply in self._exchange(rnd, "query.secure_shares", asked).items():
            if isinstance(reply, Exception):
                self._failed(rnd, name, reply, faults)
            else:
                shares[name] = {str(k): bytes(v) for k, v in reply["secure"].items()}
        return secagg.receive_shares(shares)

    def _secure_payloads(self, rnd: int, contents: dict, updates: list, excluded: dict,
                         faults: dict) -> dict[str, bytes]:
        """The train exchange under secure aggregation: every protected payload that arrives
        is in the sum, whatever its reported time (a late lab holds its input back itself)."""
        payloads = {}
        for name, reply in self._exchange(rnd, "train", contents).items():
            if isinstance(reply, Exception):
                self._failed(rnd, name, reply, faults)
                continue
            m, secure = reply["metrics"], reply["secure"]
            self.client_metrics.append({"round": rnd, "client": name, **dict(m)})
            # weights and count inside the payload; steps and seconds are not sent (they
            # would reveal n): the server knows only when the reply arrived
            update = ClientUpdate(name, [], 0, 0, 0.0, float(m["work"]))
            if "late" in secure:
                log.warning("round %d: client %s missed the deadline (%.3g s) and kept its "
                            "update", rnd, name, float(secure["late"]))
                faults["late"].append(name)
                continue
            updates.append(update)
            if "excluded" in secure:
                excluded[name] = str(secure["excluded"])
                log.warning("round %d: client %s excluded: %s", rnd, name, excluded[name])
                self.excluded.append({"round": rnd, "client": name, "reason": excluded[name]})
                continue
            payloads[name] = bytes(secure["payload"])  # counted in the sum, however late
        return payloads

    def _failed(self, rnd: int, name: str, error: Exception, faults: dict) -> None:
        faults["failed"].append(name)
        self.failures.append({"round": rnd, "client": name, "error": repr(error)})

    def _secure_mean(self, rnd: int, ids: list[str], payloads: dict[str, bytes]
                     ) -> Weights | None:
        """The server's part after the payloads: add them, then (secagg) unmask with the
        survivors' shares, or (ckks) have the survivors decrypt; the survivors make their
        P-FedProx models from the sum. Raises :class:`TooFewContributors` (nothing opened)
        below ``privacy.min_clients``; None if the sum cannot be opened for lost replies."""
        from mer.privacy.secagg import MaskedAggregation

        survivors = [n for n in ids if n in payloads]
        require_contributors(len(survivors), self.min_clients, f"round {rnd}")
        total = self.server_sum(payloads)
        personalise = bool(self.fed.get("personalise"))
        config = {"round": rnd, "survivors": survivors}
        if isinstance(self.secure, MaskedAggregation):
            secagg = self.secure.server
            flat, count = self._secagg_unmask(rnd, secagg, total)
            survivors = list(secagg.u3)
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

    def _secagg_unmask(self, rnd: int, secagg, total: bytes, purpose: str = "train"
                       ) -> tuple[np.ndarray, float]:
        """secagg step 3 through the nodes: each survivor's shares of the survivors'
        self-mask seeds and the dropped labs' keys; the unmasked ``(sum, count)``. Below the
        floor nobody is asked; fewer than t answers: :class:`TooFewContributors`."""
        survivors, dropped = secagg.unmask_request()
        asked = {s: RecordDict({"config": ConfigRecord(
            {"round": rnd, "purpose": purpose, "survivors": survivors, "dropped": dropped})})
            for s in survivors}
        answers = {}
        for name, reply in self._exchange(rnd, "query.secure_unmask", asked).items():
            if isinstance(reply, Exception):
                log.warning("round %d: survivor %s gave no shares (%s)", rnd, name, reply)
            else:
                answers[name] = {kind: {str(k): bytes(v) for k, v in reply[kind].items()}
                                 for kind in ("b", "s")}
        return secagg.unmask(answers, total)

    def _keep_personal(self, rnd: int, replies: dict) -> None:
        for name, reply in replies.items():
            if not isinstance(reply, Exception):
                self.state[name].personal = KeptOnNode()

    def evaluate(self, models: dict | None = None, with_predictions: bool = False) -> dict:
        """The loop's ``evaluate``, with each node predicting its own test split (one message
        per node carrying every model to score). Nodes that do not answer are left out.
        Under secure aggregation the nodes answer with protected confusion matrices, summed
        (:meth:`secure_vector_sum`) into the pooled figures (``FederatedRun.secure_results``)."""
        if self.secure is not None:
            return self._secure_evaluate(models or self.default_models(), with_predictions)
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

    def _secure_evaluate(self, models: dict, with_predictions: bool) -> dict:
        kinds, k = list(models), self.samples.num_classes
        contents = {}
        for c in self.clients:  # every lab: the server does not know who has test clips
            content = RecordDict({"config": ConfigRecord({"models": len(kinds)})})
            for i, kind in enumerate(kinds):
                w = models[kind](c)
                if not isinstance(w, KeptOnNode):  # else: the node's own personal model
                    content[f"model-{i}"] = _arrays(w)
            contents[c.name] = content
        per_lab: dict | None = {} if self.secure.disclose_per_lab else None

        def open_sum() -> tuple[np.ndarray, int]:
            (total, labs), replies = self.secure_vector_sum(
                self.round_done + 1, "eval", "evaluate", contents, len(kinds) * k * k)
            if per_lab is not None:  # the labs' own opt-in
                per_lab.update({n: r["confusion"].to_numpy_ndarrays()[0]
                                for n, r in replies.items() if "confusion" in r})
            return total, labs

        return self.secure_results(kinds, open_sum, per_lab, with_predictions)

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
    from mer.federated.loop import run_federated
    from mer.federated.runner import write_federated_results

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
    final = {"global": run.global_weights, "entries": run.entry_names}
    # a plain torch file (torch.load reads it), written whole or not at all
    atomic_write_with(out_dir / "global_model.pt", lambda f: torch.save(final, f))
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

