"""The federated loop: rounds of local Lightning training at each client, then aggregation.

The round loop; its parts live next door: client training (:mod:`.client`), the privacy layer
(:mod:`.private`), worker processes (:mod:`.workers`), checkpoints (:mod:`.checkpoint`),
evaluation and baselines (:mod:`.evaluation`), and each rule's own steps (:mod:`.rules`).

Each round every selected client loads the global model (or, under P-FedProx personalisation,
its own personalised model; under FedBN with its own batch-norm entries) into its module (kept
across rounds under ``federated.reuse_clients``, bit-identical to a fresh one), trains
``local_epochs`` with a fresh ``Trainer`` and optimiser on its own training split (with the
FedProx term when ``mu > 0``, with SCAFFOLD's gradient correction under
``rule.name=scaffold``) and returns its weights and example count. The server checks the
updates (non-finite ones are excluded and counted), aggregates them with the configured rule
and applies its optimiser. Every ``eval_every`` rounds each client's test split is scored with
the global and with its personalised model, and the figures pooled over clients. After every
round the whole state is checkpointed, so ``resume=true`` continues an interrupted run to the
same end state.

What a client's data is, how its module is built and trained and how it is scored is the
run's ``task`` (:mod:`.task`): recognition of clips by default, a learned spotter over long
videos with :class:`mer.spotting.federated.SpotTask`; rules, privacy, faults and checkpoints
are the same for both.

Samples never leave their client: the server only sees weights (and, for DPK-GAT's data
prior, AU co-occurrence counts). Under secure aggregation (``privacy=secagg | ckks``) it sees
neither a lab's weights, nor its example count, AU counts or test results: each goes inside a
protected sum (:meth:`FederatedRun.au_counts`, :meth:`FederatedRun.secure_results`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from mer.data.samples import FlowSamples
from mer.federated import aggregators
from mer.federated.checkpoint import Checkpointing
from mer.federated.client import (  # noqa: F401  (re-exported: tests, experiments)
    ClientSide,
    client_summary,
    get_weights,
    make_clients,
    set_weights,
)
from mer.federated.client_optim import client_optimizer
from mer.federated.evaluation import Evaluation
from mer.federated.faults import FaultPlan
from mer.federated.fidelity import from_config as fidelity_from_config
from mer.federated.partition import ClientData
from mer.federated.private import PrivacySide
from mer.federated.rules import RULES, Layout, Rule
from mer.federated.server_opt import ServerOptimizer, create_server_optimizer
from mer.federated.state import ClientState, ClientUpdate, Weights  # noqa: F401
from mer.federated.task import Task
from mer.federated.workers import WorkerPool
from mer.privacy.base import TooFewContributors, require_contributors

log = logging.getLogger(__name__)


def make_server_optimizer(cfg: DictConfig) -> ServerOptimizer:
    """The server optimiser of ``federated.server_opt`` (a key it does not take is refused)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    return create_server_optimizer(str(settings.pop("name")), "federated.server_opt", **settings)


class FederatedRun(ClientSide, PrivacySide, WorkerPool, Evaluation, Checkpointing):
    """State and steps of one federated experiment over in-process clients; ``strategy`` is
    the rule (:mod:`mer.federated.rules`), which does everything rule-specific; ``task``
    (:class:`~mer.federated.task.Task`, default recognition of ``samples``) everything that
    knows what the clients' data is."""

    def __init__(self, cfg: DictConfig, samples: FlowSamples | None, clients: list[ClientData],
                 checkpoint_dir: Path | None = None, task: Task | None = None) -> None:
        self.cfg, self.fed, self.samples, self.clients = cfg, cfg.federated, samples, clients
        self.task = task or Task(samples)
        self.task.check(self)
        self.rule = str(self.fed.rule.name)
        if self.rule not in RULES:
            raise ValueError(f"unknown federated.rule.name '{self.rule}': {RULES.names()}")
        rule_class = RULES.get(self.rule)
        # fidelity=official: FED-PsyAU as its authors' code runs it (federated/fidelity.py)
        self.fidelity = fidelity_from_config(cfg)
        self.model_cfg = self.task.model_config(cfg, self.fidelity)
        self.client_opt = client_optimizer(self.fed, self.model_cfg)  # SCAFFOLD: plain SGD
        self.seed = int(cfg.seed)
        self.faults = FaultPlan(self.fed.get("faults"), self.seed, [c.name for c in clients])
        self.strategy: Rule = rule_class(self.fed, Layout([], frozenset(), []), self.fidelity,
                                         self.client_opt, len(clients))
        self._setup_privacy(cfg.get("privacy"))
        L.seed_everything(self.seed, verbose=False)
        template = self.task.build_module(self, "template")
        self.global_weights = get_weights(template)
        self.initial_weights = [w.copy() for w in self.global_weights]
        names = list(template.net.state_dict())
        self.bn_mask = aggregators.fedbn_mask(names, template.net)
        self.param_names = {n for n, _ in template.net.named_parameters()}
        self.entry_names = names
        self.strategy.layout = Layout(names, frozenset(self.param_names), self.bn_mask)
        if hasattr(self.strategy, "init_state"):
            self.strategy.init_state(self.global_weights)
        self.server_opt = make_server_optimizer(self.fed.server_opt)
        self.state = {c.name: ClientState() for c in clients}
        self.round_done = 0
        self.excluded: list[dict] = []
        self.failures: list[dict] = []
        self.curves: list[dict] = []
        self.stats: list[dict] = []
        self.checkpoint = Path(checkpoint_dir) / "federated_state.pt" if checkpoint_dir else None
        self._recipe: str | None = None
        self.workers = int(self.fed.get("workers") or 1)
        self._pool = None  # worker processes, made on first use

    @property
    def server_control(self) -> Weights | None:
        """SCAFFOLD's server control variate ``c`` (None for other rules)."""
        return getattr(self.strategy, "server_control", None)

    @server_control.setter
    def server_control(self, value: Weights | None) -> None:
        self.strategy.load_state_dict({"server_control": value})

    def select_clients(self, rnd: int) -> list[int]:
        n = len(self.clients)
        m = max(int(self.fed.min_clients), int(np.ceil(float(self.fed.fraction) * n)))
        m = min(n, m)
        rng = np.random.default_rng([self.seed, rnd])
        return sorted(rng.choice(n, m, replace=False).tolist())

    def _local_updates(self, rnd: int, chosen: list[int]) -> tuple[list[ClientUpdate], dict]:
        """Train the chosen clients, minus dropouts, failures and late ones (logged, counted);
        ``federated.workers`` > 1: several clients at once, in worker processes."""
        updates, faults = [], {"dropped": [], "failed": [], "late": []}
        training = self.not_dropped(rnd, chosen, faults)
        outcomes = self._train_parallel(rnd, training) if self.workers > 1 and \
            len(training) > 1 else self._train_in_turn(rnd, training)
        for k in training:
            name, update = self.clients[k].name, outcomes[k]
            if isinstance(update, Exception):  # a lab's failure must not stop the federation
                log.warning("round %d: client %s failed: %s", rnd, name, update)
                faults["failed"].append(name)
                self.failures.append({"round": rnd, "client": name, "error": repr(update)})
                continue
            if self.is_late(rnd, update, faults):
                continue
            updates.append(update)
        return updates, faults

    def not_dropped(self, rnd: int, chosen: list[int], faults: dict) -> list[int]:
        """The chosen clients minus this round's dropouts (recorded in ``faults``)."""
        present = []
        for k in chosen:
            if self.faults.drops_out(rnd, k):
                faults["dropped"].append(self.clients[k].name)
            else:
                present.append(k)
        return present

    def is_late(self, rnd: int, update: ClientUpdate, faults: dict) -> bool:
        """Past ``faults.deadline_s``: the update is discarded, logged and counted late."""
        deadline = self.faults.deadline_s
        if deadline is None or update.seconds <= deadline:
            return False
        log.warning("round %d: client %s missed the %.3g s deadline (%.3g s)", rnd,
                    update.name, deadline, update.seconds)
        faults["late"].append(update.name)
        return True

    def round(self, rnd: int) -> dict:
        """One round: local training at the selected clients, checks, aggregation, server step.

        Dropped-out, failing and late clients are left out of the round (logged and counted);
        with no update left, or under a protected aggregate (secure aggregation, central DP)
        with fewer than ``privacy.min_clients``, the round is skipped: the global model stays
        as it was and the record says why (``skipped``).
        """
        t0 = time.perf_counter()
        chosen = self.select_clients(rnd)
        updates, faults = self._local_updates(rnd, chosen)
        t_clients = time.perf_counter() - t0
        kept, excluded = aggregators.check_updates(
            [(u.weights, u.num_examples) for u in updates], [u.name for u in updates],
            self.global_weights)
        for name, reason in excluded.items():
            log.warning("round %d: client %s excluded: %s", rnd, name, reason)
            self.excluded.append({"round": rnd, "client": name, "reason": reason})
        kept_updates = [u for u in updates if u.name not in excluded]
        personal: dict[str, Weights] = {}
        agg, skipped = None, None
        try:
            if kept and self.min_clients:
                require_contributors(len(kept), self.min_clients, f"round {rnd}")
            if not kept:
                skipped = "no client update to aggregate"
            elif self.secure:
                agg, personal = self._secure_aggregate(rnd, kept_updates)
            elif self.central_dp:
                agg = self.central_dp.aggregate(self.global_weights, kept)
            else:
                agg = self.strategy.aggregate_updates(kept_updates, self.global_weights)
        except TooFewContributors as e:  # never opened, never an aborted run
            skipped = str(e)
        if agg is not None:
            self.global_weights = self.server_opt.step(self.global_weights, agg)
            self.strategy.server_update(rnd, kept_updates, self.state)
            if not self.secure:  # under secure aggregation each client mixed its own
                personal = self.strategy.personalise(kept_updates)
        else:
            log.warning("round %d skipped, global model unchanged: %s", rnd, skipped)
        for name, w in personal.items():
            self.state[name].personal = w
        return self._round_record(rnd, updates, excluded, faults, t0, t_clients, skipped)

    def _round_record(self, rnd: int, updates: list[ClientUpdate], excluded: Iterable[str],
                      faults: dict, t0: float, t_clients: float,
                      skipped: str | None = None) -> dict:
        """The round's line in ``rounds.csv`` / ``stats``; ``skipped``: why no aggregate was
        released (None when one was)."""
        return {"round": rnd, "clients": [u.name for u in updates], "excluded": sorted(excluded),
                "skipped": skipped,
                **faults, "stragglers": [u.name for u in updates if u.work < 1.0],
                "client_s": t_clients, "server_s": time.perf_counter() - t0 - t_clients,
                "bytes_per_client": int(sum(a.nbytes for a in self.global_weights)),
                **({"privacy": self.epsilons()} if self.dp or self.central_dp else {})}

    def run_rounds(self, progress=None) -> None:
        """Rounds ``round_done + 1 .. federated.rounds``, evaluating and checkpointing."""
        rounds, every = int(self.fed.rounds), int(self.fed.eval_every)
        task = progress.add_task("federated rounds", total=rounds, completed=self.round_done) \
            if progress else None
        for rnd in range(self.round_done + 1, rounds + 1):
            self.stats.append(self.round(rnd))
            if rnd % every == 0 or rnd == rounds:
                self.curves.append({"round": rnd, **self.evaluate(with_predictions=rnd == rounds)})
            self.round_done = rnd
            self.save()
            if progress:
                progress.advance(task)


def run_federated(cfg: DictConfig, samples: FlowSamples | None, clients: list[ClientData],
                  checkpoint_dir: Path | None = None, show_progress: bool = True,
                  make_run: Callable[..., FederatedRun] | None = None,
                  task: Task | None = None) -> dict:
    """All rounds (resumed from ``checkpoint_dir`` with ``resume=true``), then the baselines
    and the task's post-training statistics (``statistics``).

    Returns curves, final per-client/pooled metrics, round statistics and fault counts.
    ``make_run`` builds the run in place of ``FederatedRun`` (same arguments), e.g. the
    Flower ServerApp's ``FlowerRun``; ``task``: what is trained (default recognition).
    """
    from rich.progress import Progress

    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    run = (make_run or FederatedRun)(cfg, samples, clients, checkpoint_dir,
                                     **({"task": task} if task is not None else {}))
    resumed_from = run.round_done if cfg.get("resume") and run.try_resume() else 0
    try:
        with Progress(disable=not show_progress) as progress:
            run.run_rounds(progress)
    finally:
        run.close()
    baselines = None
    if cfg.federated.get("baselines", False):
        epochs = cfg.federated.get("baseline_epochs") or \
            int(cfg.federated.rounds) * int(cfg.federated.local_epochs)
        baselines = run.baselines(int(epochs))
    stats = run.stats
    final = run.curves[-1]
    predictions = final.pop("predictions", None)
    if baselines:
        predictions["pred"].update(baselines.pop("predictions")["pred"])
    return {"predictions": predictions,
        "baselines": baselines, "clients": run.task.summary(clients),
        **({"statistics": post} if (post := run.task.statistics(run)) else {}),
        "final": final, "curves": run.curves, "rounds": stats,
        "resumed_after_round": resumed_from or None,
        "excluded_updates": run.excluded, "client_failures": run.failures,
        "counts": {**{kind: sum(len(r[kind]) for r in stats)
                      for kind in ("dropped", "failed", "late", "excluded", "stragglers")},
                   "skipped_rounds": sum(1 for r in stats if r.get("skipped"))},
        "server_s_per_round": float(np.mean([r["server_s"] for r in stats])),
        "privacy": {"name": run.privacy_name, **run.epsilons()},
        "bytes_per_client_per_round": stats[-1]["bytes_per_client"],
    }
