"""The federated loop: rounds of local Lightning training at each client, then aggregation.

Each round every selected client builds a fresh Lightning ``Trainer``, loads the global model
(or, under P-FedProx personalisation, its own personalised model; under FedBN with its own
batch-norm entries), trains ``local_epochs`` on its own training split (with the FedProx term
when ``mu > 0``, with SCAFFOLD's gradient correction under ``rule.name=scaffold``) and returns
its weights and example count. The server checks the updates (non-finite ones are excluded and
counted), aggregates them with the configured rule and applies its optimiser. Every
``eval_every`` rounds each client's test split is scored with the global and with its
personalised model, and the figures pooled over clients. After every round the whole state is
checkpointed, so ``resume=true`` continues an interrupted run to the same end state.

Samples never leave their client: the server only sees weights (and, for DPK-GAT's data
prior, AU co-occurrence counts). Under secure aggregation (``privacy=secagg | ckks``) it sees
neither a lab's weights, nor its example count, AU counts or test results: each goes inside a
protected sum (:meth:`FederatedRun.au_counts`, :meth:`FederatedRun.secure_results`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mer.config_check import check_clients
from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.build import build_module, uses_aus
from mer.engine.metrics import recognition_metrics
from mer.engine.module import MERModule
from mer.federated import aggregators
from mer.federated.client_optim import client_optimizer
from mer.federated.faults import FaultPlan, flip_labels
from mer.federated.fidelity import federated_model_cfg
from mer.federated.fidelity import from_config as fidelity_from_config
from mer.federated.partition import (
    ClientData,
    check_partition,
    natural_clients,
    subject_clients,
)
from mer.federated.rules import RULES, rule_names
from mer.federated.server_opt import ServerOptimizer, create_server_optimizer
from mer.privacy import from_config as privacy_from_config
from mer.privacy.base import (
    SecureAggregation,
    TooFewContributors,
    mean_from_sum,
    personalise_from_sum,
    require_contributors,
)

log = logging.getLogger(__name__)
Weights = list[np.ndarray]
# The rules by name (mer.federated.rules.RULES). Under secure aggregation the server sees only
# the sum; central DP replaces the mean by a clipped, noised one: rules that need individual
# updates cannot run there.
MEAN_RULES = rule_names(robust=False)
ROBUST_RULES = rule_names(robust=True)
PRIVATE_RULES = rule_names(private=True)


def get_weights(module: MERModule) -> Weights:
    """The network's state (parameters and buffers) as numpy arrays, state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in module.net.state_dict().values()]


def set_weights(module: MERModule, weights: Weights) -> None:
    state = module.net.state_dict()
    if len(state) != len(weights):
        raise ValueError(f"incompatible state: {len(weights)} arrays for {len(state)} entries")
    module.net.load_state_dict({k: torch.as_tensor(w).to(v.dtype).reshape(v.shape)
                                for (k, v), w in zip(state.items(), weights)})


def make_server_optimizer(cfg: DictConfig) -> ServerOptimizer:
    """The server optimiser of ``federated.server_opt`` (a key it does not take is refused)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    return create_server_optimizer(str(settings.pop("name")), "federated.server_opt", **settings)


def aggregate(rule: DictConfig, results: list[tuple[Weights, int]]) -> Weights:
    """Apply the configured aggregation rule (:data:`mer.federated.rules.RULES`) to the kept
    client results."""
    return RULES.get(rule.name).aggregate(rule, results)


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    name: str
    weights: Weights
    num_examples: int
    steps: int
    seconds: float
    work: float = 1.0
    control_delta: Weights | None = None  # SCAFFOLD's dc_i
    new_control: Weights | None = None    # SCAFFOLD's c_i+, kept only if the update is accepted


@dataclass
class ClientState:
    """What a client keeps between rounds (never sent as such)."""

    personal: Weights | None = None     # P-FedProx personalised model
    last: Weights | None = None         # its last local model (FedBN keeps its BN entries)
    control: Weights | None = None      # SCAFFOLD's c_i
    flags: dict = field(default_factory=dict)


class FederatedRun:
    """State and steps of one federated experiment over in-process clients."""

    def __init__(self, cfg: DictConfig, samples: FlowSamples, clients: list[ClientData],
                 checkpoint_dir: Path | None = None) -> None:
        check_partition(samples, clients)
        self.cfg, self.fed, self.samples, self.clients = cfg, cfg.federated, samples, clients
        self.rule = self.fed.rule.name
        if self.rule not in MEAN_RULES + ROBUST_RULES:
            raise ValueError(f"unknown federated.rule.name '{self.rule}': "
                             f"{list(MEAN_RULES + ROBUST_RULES)}")
        # fidelity=official: FED-PsyAU as its authors' code runs it (federated/fidelity.py)
        self.fidelity = fidelity_from_config(cfg)
        self.model_cfg = federated_model_cfg(OmegaConf.to_container(cfg.model, resolve=True),
                                             self.fidelity.fidelity)
        self.client_opt = client_optimizer(self.fed, self.model_cfg)  # SCAFFOLD: plain SGD
        self.seed = int(cfg.seed)
        self.faults = FaultPlan(self.fed.get("faults"), self.seed, [c.name for c in clients])
        self._setup_privacy(cfg.get("privacy"))
        # The server sums the clients' AU co-occurrence counts: the prior of all training splits.
        train_all = np.concatenate([c.train_idx for c in clients])
        L.seed_everything(self.seed, verbose=False)
        template = self._fixed(build_module(self.model_cfg, samples, train_all,
                                            self.au_counts()))
        self.global_weights = get_weights(template)
        self.initial_weights = [w.copy() for w in self.global_weights]
        names = list(template.net.state_dict())
        self.bn_mask = aggregators.fedbn_mask(names, template.net)
        self.param_names = {n for n, _ in template.net.named_parameters()}
        self.entry_names = names
        self.server_opt = make_server_optimizer(self.fed.server_opt)
        self.server_control = [np.zeros_like(w, dtype=np.float32) for w in self.global_weights]
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

    def _setup_privacy(self, privacy_cfg: DictConfig | None) -> None:
        """``privacy``: none | ckks | secagg (secure aggregation), dp (DP-SGD at each client,
        one accountant per client) or central_dp (clip + noise at the server)."""
        from mer.privacy.dp import (
            CentralDP,
            CentralDPConfig,
            ClientPrivacy,
            DPConfig,
            noise_for_budget,
            sample_rate_for,
        )

        self.privacy_name = privacy_cfg.name if privacy_cfg else "none"
        layer = privacy_from_config(privacy_cfg) if privacy_cfg else None
        self.secure = layer if isinstance(layer, SecureAggregation) else None
        self.dp = layer if isinstance(layer, DPConfig) else None
        self.central_dp = CentralDP(layer, len(self.clients), self.seed) \
            if isinstance(layer, CentralDPConfig) else None
        # protected aggregates (secure sums, central DP's clipped mean) of fewer contributors
        # than privacy.min_clients are never released: the round is skipped
        self.min_clients = self.secure.min_clients if self.secure else \
            int(layer.min_clients) if self.central_dp else 0
        if (self.secure or self.central_dp) and self.rule not in PRIVATE_RULES:
            raise ValueError(
                f"federated.rule.name={self.rule} cannot run under privacy={self.privacy_name}: "
                "the server never sees individual updates there (robust rules and SCAFFOLD "
                f"need them). Use one of {list(PRIVATE_RULES)} (P-FedProx is fedprox).")
        if self.dp and self.rule == "scaffold":
            raise ValueError("federated.rule.name=scaffold cannot run under privacy=dp: its "
                             "gradient correction would bypass DP-SGD's clipping and noise")
        self.client_privacy = {}
        if self.dp:
            batch = int(self.cfg.data.batch_size)
            for c in self.clients:
                q = sample_rate_for(self.dp, len(c.train_idx), batch)
                steps = int(self.fed.rounds) * int(self.fed.local_epochs) * round(1 / q)
                self.client_privacy[c.name] = ClientPrivacy(c.name, self.dp,
                                                            noise_for_budget(self.dp, q, steps))

    def _fixed(self, module: MERModule) -> MERModule:
        """Under DP every copy of the model has batch norm replaced by group norm (Opacus'
        fix): DP-SGD needs per-sample gradients, and central DP's noise on running
        variances could make them negative."""
        if self.dp or self.central_dp:
            from mer.privacy.dp import fix_module

            fix_module(module)
        return module

    def epsilons(self) -> dict:
        """Privacy spent so far: per client (DP-SGD) or for every client (central DP)."""
        if self.dp:
            return {"delta": self.dp.delta,
                    "clients": {n: p.epsilon() for n, p in self.client_privacy.items()}}
        if self.central_dp:
            return {"delta": self.central_dp.cfg.delta, "central": self.central_dp.epsilon()}
        return {}

    def au_counts(self) -> np.ndarray | None:
        """The clients' AU co-occurrence counts summed (DPK-GAT's data prior); None: count
        them from ``samples`` (in-process, where the server's process holds them). Under
        secure aggregation each lab protects its own counts and only the sum is opened, as
        over Flower (``query.secure_counts``)."""
        if self.secure is None:
            return None
        try:
            total, _ = self.secure.sum_vectors(0, {c.name: self.client_au_counts(c)
                                                   for c in self.clients})
        except TooFewContributors as e:
            log.warning("AU co-occurrence counts not released (%s): the data prior is empty", e)
            return np.zeros((12, 12))
        return np.rint(total).reshape(12, 12)

    def client_au_counts(self, client: ClientData) -> np.ndarray:
        """A lab's side: the (144,) AU co-occurrence counts of its training split."""
        from mer.models.priors import cooccurrence_counts

        au, mask = self.samples.au_targets()
        return np.asarray(cooccurrence_counts(au[client.train_idx], mask[client.train_idx]),
                          np.float64).ravel()

    # -- client side ---------------------------------------------------------------------------

    def _module(self, weights: Weights) -> MERModule:
        module = self._fixed(build_module(self.model_cfg, self.samples,
                                          np.array([], dtype=np.int64)))
        set_weights(module, weights)
        return module

    def _datamodule(self, client: ClientData, eval_idx: np.ndarray, seed: int,
                    module: MERModule, flip: bool = False) -> SplitDataModule:
        dm = SplitDataModule(self.samples, client.train_idx, eval_idx,
                             batch_size=int(self.cfg.data.batch_size),
                             shuffle=bool(self.cfg.data.shuffle), seed=seed,
                             with_aus=uses_aus(module))
        if flip:  # label-flip poisoning by a Byzantine client (its own labels only)
            dm.tensors[1] = torch.as_tensor(flip_labels(self.samples.labels,
                                                        self.samples.num_classes))
        return dm

    def fit(self, start: Weights, train: ClientData, epochs: int, seed: int,
            anchor: list[torch.Tensor] | None = None, work: float = 1.0,
            correction: dict[str, torch.Tensor] | None = None,
            flip: bool = False, private: bool = False) -> tuple[Weights, int]:
        """Train from ``start`` on ``train.train_idx`` for ``epochs`` with a fresh Trainer.

        FedProx term towards ``anchor`` when ``federated.mu`` > 0; SCAFFOLD gradient
        ``correction`` (c - c_i per parameter name); a straggler stops after ``work`` of its
        optimiser steps; ``private``: DP-SGD with the client's accountant (``privacy=dp``).
        Returns (weights, optimiser steps taken).
        """
        L.seed_everything(seed, verbose=False)
        module = self._module(start)
        mu = self.fidelity.mu_for(set(self.samples.meta["database"].to_numpy()[train.train_idx]))
        if anchor is not None and mu:
            module.set_proximal(mu, anchor, self.fidelity.prox_norm)
        if self.client_opt is not None:  # the baselines train with it too: same optimiser
            module.set_optimizer(**self.client_opt)
        module.set_grad_correction(correction)
        trainer_kwargs = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        trainer_kwargs["max_epochs"] = int(epochs)
        if work < 1.0:
            batches = math.ceil(len(train.train_idx) / int(self.cfg.data.batch_size))
            trainer_kwargs["max_steps"] = max(1, int(work * epochs * batches))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer = L.Trainer(logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                limit_val_batches=0, **trainer_kwargs)
            dm = self._datamodule(train, train.test_idx, seed, module, flip)
            if private and self.dp:
                from mer.privacy.dp import make_private

                module, dm = make_private(module, dm, self.dp, self.client_privacy[train.name],
                                          seed)
            trainer.fit(module, datamodule=dm)
        return get_weights(module), int(trainer.global_step)

    def _for_client(self, base: Weights, name: str) -> Weights:
        """The model a client works with: ``base`` with, under FedBN, its own BN entries."""
        last = self.state[name].last
        if self.rule == "fedbn" and last is not None:
            return aggregators.apply_fedbn(base, last, self.bn_mask)
        return base

    def train_client(self, client: ClientData, rnd: int, k: int,
                     anchor: list[torch.Tensor] | None = None) -> ClientUpdate:
        """Local training of one client from its starting model."""
        state = self.state[client.name]
        start = self._for_client(state.personal or self.global_weights, client.name)
        seed = self.seed * 100_003 + rnd * 101 + k
        correction, control = None, None
        if self.rule == "scaffold":
            control = state.control or [np.zeros_like(w) for w in self.server_control]
            correction = {n: torch.as_tensor(c - ci) for n, c, ci in
                          zip(self.entry_names, self.server_control, control)
                          if n in self.param_names}
        work = self.faults.work(rnd, k)
        t0 = time.perf_counter()
        weights, steps = self.fit(start, client, int(self.fed.local_epochs), seed, anchor,
                                  work, correction, self.faults.flips_labels(client.name),
                                  private=True)
        seconds = time.perf_counter() - t0
        state.last = weights
        update = ClientUpdate(client.name, weights, len(client.train_idx), steps, seconds, work)
        if self.rule == "scaffold" and steps > 0:  # K plain SGD steps of client_opt's lr
            new_control = aggregators.scaffold_client_control(
                control, self.server_control, start, weights, steps, self.client_opt["lr"])
            new_control = [c if n in self.param_names else np.zeros_like(c)
                           for n, c in zip(self.entry_names, new_control)]
            update.control_delta = [a - b for a, b in zip(new_control, control)]
            update.new_control = new_control  # state.control moves once the server accepts
        update.weights = self.faults.tamper(client.name, rnd, k, weights, self.global_weights)
        return update

    def baselines(self, epochs: int) -> dict:
        """Pooled (centralised on all clients' training splits) and local-only training, from
        the same initial model, each scored on every client's own test split."""
        pooled_train = ClientData("pooled", np.concatenate([c.train_idx for c in self.clients]),
                                  np.array([], dtype=np.int64))
        pooled, _ = self.fit(self.initial_weights, pooled_train, epochs, self.seed + 1)
        local = {c.name: self.fit(self.initial_weights, c, epochs, self.seed + 2 + k)[0]
                 for k, c in enumerate(self.clients)}
        return {"epochs": epochs,
                **self.evaluate({"pooled": lambda c: pooled, "local": lambda c: local[c.name]},
                                with_predictions=True)}

    def predict(self, weights: Weights, client: ClientData) -> np.ndarray:
        """(n_test, K) class probabilities of ``weights`` on a client's test split."""
        module = self._module(weights).eval()
        loader = self._datamodule(client, client.test_idx, 0, module).predict_dataloader()
        with torch.no_grad():
            return torch.cat([module.predict_step(b, i) for i, b in enumerate(loader)]).numpy()

    # -- server side ---------------------------------------------------------------------------

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

    def _train_one(self, rnd: int, k: int, anchor: list[torch.Tensor] | None
                   ) -> ClientUpdate | Exception:
        try:
            if self.faults.crashes_now(self.clients[k].name, rnd):
                raise RuntimeError("injected fault (federated.faults.crash)")
            return self.train_client(self.clients[k], rnd, k, anchor)
        except Exception as e:
            return e

    def _train_in_turn(self, rnd: int, training: list[int]) -> dict[int, ClientUpdate | Exception]:
        anchor = self.fedprox_anchor()  # built once for every client of the round
        return {k: self._train_one(rnd, k, anchor) for k in training}

    def fedprox_anchor(self) -> list[torch.Tensor] | None:
        """The round's global parameters, the FedProx term's anchor (None without one)."""
        if not self.fidelity.any_mu:
            return None
        anchor = self.initial_weights if self.fidelity.prox_anchor == "initial" else \
            self.global_weights  # initial: the authors' server never updates its model
        return list(self._module(anchor).net.parameters())

    def _train_parallel(self, rnd: int, training: list[int]) -> dict[int, ClientUpdate | Exception]:
        """The clients' local training in ``federated.workers`` forked processes. Each job
        carries what the client starts from (global model, its state, SCAFFOLD's server
        control, its DP accountant); what it changes comes back with its update."""
        global _WORKER_RUN
        from mer.engine.workers import prepare_worker, stop_pool, terminate_on_signal

        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _WORKER_RUN = self  # inherited by the forked workers
            # workers die with this process and end at once on SIGTERM (mer.engine.workers)
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("fork"),
                                             initializer=prepare_worker,
                                             initargs=(os.getpid(),))
        threads = max(1, torch.get_num_threads() // self.workers)
        futures = {}
        results = {}
        try:
            with terminate_on_signal():
                for k in training:
                    name = self.clients[k].name
                    privacy = self.client_privacy.get(name)
                    futures[k] = self._pool.submit(_train_in_worker, {
                        "rnd": rnd, "k": k, "threads": threads, "global": self.global_weights,
                        "server_control": self.server_control, "state": self.state[name],
                        "history": privacy.accountant.history if privacy else None})
                results = {k: future.result() for k, future in futures.items()}
        except BaseException:  # SIGTERM, Ctrl-C, a broken pool: never wait for the others
            stop_pool(self._pool)
            self._pool = None
            raise
        out: dict[int, ClientUpdate | Exception] = {}
        for k, (update, state, history) in results.items():
            out[k] = update
            name = self.clients[k].name
            self.state[name] = state
            if history is not None:
                self.client_privacy[name].accountant.history = history
        return out

    def close(self) -> None:
        """Stop the worker processes (``federated.workers`` > 1), if any: at once when an
        exception (SIGTERM's included) is on its way, else after their (finished) jobs."""
        if self._pool is not None:
            import sys

            from mer.engine.workers import stop_pool

            if sys.exc_info()[0] is not None:
                stop_pool(self._pool)
            else:
                self._pool.shutdown()
            self._pool = None

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
                agg = aggregate(self.fed.rule, kept)
        except TooFewContributors as e:  # never opened, never an aborted run
            skipped = str(e)
        if agg is not None:
            self.global_weights = self.server_opt.step(self.global_weights, agg)
            if self.rule == "scaffold":
                deltas = [u.control_delta for u in kept_updates if u.control_delta is not None]
                if deltas:
                    mean_dc = aggregators.weighted_mean(deltas, [1.0] * len(deltas))
                    frac = len(deltas) / len(self.clients)
                    self.server_control = [c + frac * d
                                           for c, d in zip(self.server_control, mean_dc)]
                self.accept_controls(rnd, kept_updates)
        else:
            log.warning("round %d skipped, global model unchanged: %s", rnd, skipped)
        personalise = self.fed.get("personalise")
        if personalise and agg is not None and not self.secure:
            personal = dict(zip([u.name for u in kept_updates],
                                aggregators.pfedprox_personalise(
                                    [w for w, _ in kept], [n for _, n in kept],
                                    own=float(personalise.own),
                                    mix=None if self.fidelity.mix_buffers else
                                    [n in self.param_names for n in self.entry_names])))
        for name, w in personal.items():
            self.state[name].personal = w
        return self._round_record(rnd, updates, excluded, faults, t0, t_clients, skipped)

    def accept_controls(self, rnd: int, accepted: list[ClientUpdate]) -> None:
        """SCAFFOLD: the clients whose updates the server aggregated keep their new control
        variate (``flags["control_round"]`` = the round; over Flower the node keeps it and
        reads that flag). A late, excluded or dropped client's control stays as it was."""
        for u in accepted:
            if u.control_delta is None:
                continue
            state = self.state[u.name]
            if u.new_control is not None:
                state.control = u.new_control
            state.flags["control_round"] = rnd

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

    def _secure_aggregate(self, rnd: int, updates: list[ClientUpdate]) -> tuple[Weights, dict]:
        """FedAvg under secure aggregation: clients protect ``[n_k w_k, n_k]``, the server
        only adds payloads (:meth:`server_sum`), the sum is opened (key holders decrypt, or
        the survivors' shares unmask it) only for ``privacy.min_clients`` contributors or
        more (else :class:`TooFewContributors`: the round is skipped); under P-FedProx each
        client computes its own personalised model from the decoded sum. (Each client
        checked its own update for NaN/inf before sending: ``check_updates``.)"""
        ids = [u.name for u in updates]
        require_contributors(len(ids), self.secure.min_clients, f"round {rnd}")
        self.secure.begin_round(rnd, ids, self.global_weights)
        payloads = {u.name: self.secure.client_payload(u.name, u.weights, u.num_examples)
                    for u in updates}  # client side
        total = self.server_sum(payloads)
        flat_sum, count = self.secure.decode_sum(total, ids)
        mean = mean_from_sum(flat_sum, count, self.secure.layout, f"round {rnd}: {ids}")
        personal = {}
        personalise = self.fed.get("personalise")
        if personalise:
            personal = {u.name: personalise_from_sum(u.weights, u.num_examples, flat_sum, count,
                                                     self.secure.layout,
                                                     own=float(personalise.own))
                        for u in updates}
        return mean, personal

    def server_sum(self, payloads: dict[str, bytes]) -> bytes:
        """The server's whole part under secure aggregation: add the protected payloads."""
        return self.secure.server_sum(payloads)

    def evaluate(self, models: dict | None = None, with_predictions: bool = False) -> dict:
        """Per-client and pooled test metrics of each model kind.

        ``models`` maps a kind to ``client -> weights``; by default the global model (with the
        client's own BN entries under FedBN) and each client's personalised model. Clients
        without test samples are left out. ``with_predictions`` adds ``predictions``:
        ``{"index": sample positions, "pred": {kind: predicted classes}}``.
        """
        models = models or self.default_models()
        if self.secure is not None:  # labs send confusion matrices, summed securely
            mats = {c.name: self.lab_confusions(c, models) for c in self.clients}
            return self.secure_results(list(models), lambda: self.secure.sum_vectors(
                self.round_done + 1, {n: m.ravel() for n, m in mats.items()}),
                mats if self.secure.disclose_per_lab else None, with_predictions)
        names = self.samples.class_names
        out: dict = {"per_client": {}}
        preds: dict[str, list] = {kind: [] for kind in models}
        labels = []
        from mer.engine.protocols import refuse_non_finite

        for c in self.clients:
            if len(c.test_idx) == 0:
                continue
            y = self.samples.labels[c.test_idx]
            labels.append(y)
            row = {}
            for kind, weights_of in models.items():
                probs = self.predict(weights_of(c), c)
                refuse_non_finite(probs, self.samples, c.test_idx,
                                  f"client {c.name} with the {kind} model", fix=(
                                      "The federated model diverged: lower model.lr or "
                                      "federated.server_opt.lr; nothing was scored."))
                pred = probs.argmax(1)
                preds[kind].append(pred)
                m = recognition_metrics(y, pred, names)
                row[kind] = {k: m[k] for k in ("n", "uf1", "uar", "accuracy")}
            out["per_client"][c.name] = row
        y = np.concatenate(labels)
        for kind in models:
            m = recognition_metrics(y, np.concatenate(preds[kind]), names)
            out[f"pooled_{kind}"] = {k: m[k] for k in ("n", "uf1", "uar", "accuracy")}
        if with_predictions:
            out["predictions"] = {
                "index": np.concatenate([c.test_idx for c in self.clients]).tolist(),
                "pred": {kind: np.concatenate(p).tolist() for kind, p in preds.items()}}
        return out

    def default_models(self) -> dict:
        """The kinds scored by default: the global model (with the client's own BN entries
        under FedBN) and each client's personalised model (``kind -> client -> weights``)."""
        return {"global": lambda c: self._for_client(self.global_weights, c.name),
                "personalised": lambda c: self._for_client(
                    self.state[c.name].personal or self.global_weights, c.name)}

    def lab_confusions(self, client: ClientData, models: dict) -> np.ndarray:
        """A lab's side of a protected evaluation: (kinds, K, K) confusion matrices of each
        model kind on its own test split (zeros without test clips)."""
        from mer.engine.protocols import refuse_non_finite
        from mer.privacy.pooled import lab_confusions

        preds = []
        for kind, weights_of in models.items() if len(client.test_idx) else ():
            probs = self.predict(weights_of(client), client)
            refuse_non_finite(probs, self.samples, client.test_idx,
                              f"client {client.name} with the {kind} model", fix=(
                                  "The federated model diverged: lower model.lr or "
                                  "federated.server_opt.lr; nothing was scored."))
            preds.append(probs.argmax(1))
        return lab_confusions(self.samples.labels[client.test_idx],
                              preds or [np.zeros(0)] * len(models), self.samples.num_classes)

    def secure_results(self, kinds: list[str], open_sum: Callable[[], tuple[np.ndarray, int]],
                       per_lab: dict[str, np.ndarray] | None, with_predictions: bool) -> dict:
        """The server's side of a protected evaluation: pooled figures of each kind from the
        summed confusion matrices (``open_sum() -> (sum (kinds * K * K,), labs)``; withheld,
        NaN, when fewer than ``privacy.min_clients`` labs answered); per-client figures only
        from ``per_lab`` matrices (``privacy.disclose_per_lab``). No test label, clip id or
        prediction reaches the server: ``predictions`` holds none, only the summed matrices."""
        from mer.privacy.pooled import confusion_metrics, withheld

        k = self.samples.num_classes
        try:
            total, labs = open_sum()
            cms = np.rint(np.asarray(total)).reshape(len(kinds), k, k).astype(np.int64)
            pooled = {kind: confusion_metrics(cm) for kind, cm in zip(kinds, cms)}
        except TooFewContributors as e:
            log.warning("pooled test figures withheld: %s", e)
            cms, labs = np.zeros((len(kinds), k, k), np.int64), 0
            pooled = {kind: withheld(str(e)) for kind in kinds}
        out: dict = {"per_client": {
            name: {kind: confusion_metrics(cm) for kind, cm in zip(kinds, m)}
            for name, m in (per_lab or {}).items() if m.sum() > 0}}
        out.update({f"pooled_{kind}": m for kind, m in pooled.items()})
        out["secure_evaluation"] = {"labs": labs, "per_lab_disclosed": per_lab is not None,
                                    "confusion": {kind: cm.tolist()
                                                  for kind, cm in zip(kinds, cms)}}
        if with_predictions:  # per-clip predictions stay at the labs
            out["predictions"] = {"index": [], "pred": {kind: [] for kind in kinds},
                                  "confusion": out["secure_evaluation"]["confusion"]}
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def recipe_key(self) -> str:
        """Hash of everything that shapes the run (not resume/progress/logging/paths);
        computed once, as neither config nor partition changes during a run."""
        if self._recipe is None:
            self._recipe = self._hash_recipe()
        return self._recipe

    def _hash_recipe(self) -> str:
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        for key in ("resume", "progress", "logger", "paths", "hydra"):
            cfg.pop(key, None)
        cfg.get("federated", {}).pop("rounds", None)  # a run may be extended
        cfg.get("federated", {}).pop("workers", None)  # how, not what
        split = [(c.name, c.train_idx.tolist(), c.test_idx.tolist()) for c in self.clients]
        blob = json.dumps([cfg, split], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def state_dict(self) -> dict:
        return {"round": self.round_done, "recipe": self.recipe_key(),
                "global": self.global_weights, "server_opt": self.server_opt.state_dict(),
                "server_control": self.server_control,
                "clients": {n: vars(s) for n, s in self.state.items()},
                "curves": self.curves, "stats": self.stats, "excluded": self.excluded,
                "failures": self.failures,
                "privacy": {"clients": {n: p.accountant.history
                                        for n, p in self.client_privacy.items()},
                            "central": (self.central_dp.accountant.history,
                                        self.central_dp.rng.bit_generator.state)
                            if self.central_dp else None}}

    def load_state_dict(self, state: dict) -> None:
        self.round_done = int(state["round"])
        self.global_weights = state["global"]
        self.server_opt.load_state_dict(state["server_opt"])
        self.server_control = state["server_control"]
        self.state = {n: ClientState(**s) for n, s in state["clients"].items()}
        self.curves, self.stats = state["curves"], state["stats"]
        self.excluded, self.failures = state["excluded"], state["failures"]
        for name, history in state["privacy"]["clients"].items():
            self.client_privacy[name].accountant.history = history
        if self.central_dp:
            history, rng_state = state["privacy"]["central"]
            self.central_dp.accountant.history = history
            self.central_dp.rng.bit_generator.state = rng_state

    def save(self) -> None:
        """Write the state after a round, atomically and with a checksum (an interruption
        leaves the last one; a full disk is a WriteError naming the file)."""
        if self.checkpoint is None:
            return
        from mer.data.io import atomic_save

        atomic_save(self.state_dict(), self.checkpoint, kind="torch")

    def try_resume(self) -> bool:
        """Load the checkpoint of an interrupted run of the same recipe, if there is one.

        Raises CorruptFileError (naming the file and what to delete) if it cannot be read."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        from mer.data.io import CorruptFileError, checked_load

        fix = ("delete it to start the federated run from round 0, or restore it from a "
               "backup")
        state = checked_load(self.checkpoint, kind="torch", what="federated checkpoint",
                             fix=fix)
        if not isinstance(state, dict) or "recipe" not in state:
            raise CorruptFileError(f"federated checkpoint {self.checkpoint} is not a mer "
                                   f"federated state; {fix}")
        if state["recipe"] != self.recipe_key():
            log.warning("not resuming from %s: it was written by a different recipe "
                        "(config or partition changed)", self.checkpoint)
            return False
        self.load_state_dict(state)
        log.info("resuming after round %d from %s", self.round_done, self.checkpoint)
        return True

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


_WORKER_RUN: FederatedRun | None = None  # a forked worker's copy of the run


def _train_in_worker(job: dict) -> tuple[ClientUpdate | Exception, ClientState, list | None]:
    """In a worker process: one client's local training from the state in ``job``."""
    run = _WORKER_RUN
    torch.set_num_threads(job["threads"])
    k = job["k"]
    name = run.clients[k].name
    run.global_weights, run.server_control = job["global"], job["server_control"]
    run.state[name] = job["state"]
    if job["history"] is not None:
        run.client_privacy[name].accountant.history = job["history"]
    update = run._train_one(job["rnd"], k, run.fedprox_anchor())
    privacy = run.client_privacy.get(name)
    return update, run.state[name], privacy.accountant.history if privacy else None


def make_clients(cfg: DictConfig, samples: FlowSamples,
                 whole_federation: bool = True) -> list[ClientData]:
    """The configured partition (``federated.partition``, ``federated.num_clients``).

    Raises ConfigError when the clients made cannot serve the config (``federated.min_clients``
    or ``privacy.min_clients`` above their number, faults naming no client...); not checked
    with ``whole_federation=False`` (a lab holding only its own data, a Flower SuperNode).
    """
    fed, seed = cfg.federated, int(cfg.seed)
    part, num_clients = fed.partition, fed.get("num_clients")
    if part.kind == "natural":
        clients = natural_clients(samples, float(part.test_fraction), seed, num_clients)
    else:
        clients = subject_clients(samples, int(num_clients or 3), part.kind,
                                  float(part.get("alpha", 0.5)), float(part.test_fraction), seed)
    if whole_federation:
        check_clients(cfg, [c.name for c in clients],
                      f"made by the {part.kind} partition of the data")
    return clients


def client_summary(samples: FlowSamples, clients: list[ClientData]) -> dict:
    keys = samples.meta["subject_key"].to_numpy()
    return {c.name: {"train": len(c.train_idx), "test": len(c.test_idx),
                     "subjects": len(set(keys[np.concatenate([c.train_idx, c.test_idx])]))}
            for c in clients}


def run_federated(cfg: DictConfig, samples: FlowSamples, clients: list[ClientData],
                  checkpoint_dir: Path | None = None, show_progress: bool = True,
                  make_run: Callable[..., FederatedRun] | None = None) -> dict:
    """All rounds (resumed from ``checkpoint_dir`` with ``resume=true``), then the baselines.

    Returns curves, final per-client/pooled metrics, round statistics and fault counts.
    ``make_run`` builds the run in place of ``FederatedRun`` (same arguments), e.g. the
    Flower ServerApp's ``FlowerRun``.
    """
    from rich.progress import Progress

    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    run = (make_run or FederatedRun)(cfg, samples, clients, checkpoint_dir)
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
    predictions = final.pop("predictions")
    if baselines:
        predictions["pred"].update(baselines.pop("predictions")["pred"])
    return {"predictions": predictions,
        "baselines": baselines, "clients": client_summary(samples, clients),
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
