"""A federated client's side: local Lightning training with its rule's hooks, prediction.

:class:`ClientSide` is a part of :class:`mer.federated.loop.FederatedRun` (the run's
config, samples, clients, rule and privacy layer are its attributes). Each local training
loads its starting weights into the client's module, installs the rule's loss terms and
gradient hooks (:class:`mer.federated.rules.ClientHooks`) through the module's neutral hooks,
trains ``local_epochs`` with a ``Trainer`` (whose ``fit`` builds a fresh optimiser, as every
rule here requires) and returns a :class:`~mer.federated.state.ClientUpdate`.

``federated.reuse_clients`` (default true): each client keeps one module across rounds and
loads the weights in place, instead of building a fresh one per round. Results are
bit-identical: a fresh build draws from the seeded random generators (weight
initialisation), so the kept path replays those draws (:class:`RngTape`), checked exactly
once per module; where the replay cannot be exact (a build that draws from Python's or
NumPy's generator) or under DP-SGD (Opacus wraps the module) a fresh module is built.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

from mer.config_check import check_clients
from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.build import uses_aus
from mer.engine.module import MERModule
from mer.federated.faults import flip_labels
from mer.federated.partition import ClientData, natural_clients, subject_clients
from mer.federated.rules import ClientHooks
from mer.federated.state import ClientUpdate, Weights


def get_weights(module: MERModule) -> Weights:
    """The network's state (parameters and buffers) as numpy arrays, state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in module.net.state_dict().values()]


def set_weights(module: MERModule, weights: Weights) -> None:
    state = module.net.state_dict()
    if len(state) != len(weights):
        raise ValueError(f"incompatible state: {len(weights)} arrays for {len(state)} entries")
    module.net.load_state_dict({k: torch.as_tensor(w).to(v.dtype).reshape(v.shape)
                                for (k, v), w in zip(state.items(), weights)})


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


# aten ops that draw from a random generator (their overload packets' names)
_RANDOM_OPS = frozenset({
    "uniform_", "normal_", "normal", "bernoulli_", "bernoulli", "random_", "exponential_",
    "cauchy_", "geometric_", "log_normal_", "multinomial", "poisson", "rand", "randn",
    "randint", "randperm", "rand_like", "randn_like", "randint_like", "native_dropout",
    "dropout", "rrelu_with_noise", "_standard_gamma", "binomial"})


class RngTape(TorchDispatchMode):
    """Records the random draws of the torch ops run under it, to replay them later.

    A fresh module's weight initialisation draws from torch's seeded default generator; a
    kept module skips the build, so :meth:`replay` makes the same draws (same ops, shapes,
    dtypes and arguments, on scratch tensors) and leaves the generator where a build would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Callable, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _RANDOM_OPS:
            # in-place fills ignore their target's values: a scratch copy serves the replay
            self.ops.append((func, tuple(a.detach().clone() if isinstance(a, torch.Tensor)
                                         else a for a in args), dict(kwargs)))
        return func(*args, **kwargs)

    def replay(self) -> None:
        """Draw again what the recorded ops drew (from the generators they drew from)."""
        with torch.no_grad():
            for func, args, kwargs in self.ops:
                func(*args, **kwargs)


def _host_rng_state() -> tuple:
    return random.getstate(), np.random.get_state(legacy=False)


class _KeptModule:
    """A client's module kept across rounds, with the random draws its build made."""

    def __init__(self, module: MERModule, tape: RngTape) -> None:
        self.module, self.tape = module, tape


def _same_host(state: tuple) -> bool:
    """Whether Python's and NumPy's generators are still at ``state``."""
    now = _host_rng_state()
    return now[0] == state[0] and _equal_nested(now[1], state[1])


def _equal_nested(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


class ClientSide:
    """Local training and prediction of the run's clients (a part of ``FederatedRun``)."""

    _kept: dict[str, _KeptModule | None] | None = None
    _scratch: dict[str, MERModule] | None = None

    def _module(self, weights: Weights, client: str | None = None) -> MERModule:
        """A module of the run's task (``client``'s own, where the task builds one per
        client) holding ``weights``."""
        module = self.task.build_module(self, client)
        set_weights(module, weights)
        return module

    def reuses_clients(self, private: bool = False) -> bool:
        """Whether local training keeps one module per client (``federated.reuse_clients``;
        never under DP-SGD, whose Opacus wrapper is made per training)."""
        return bool(self.fed.get("reuse_clients", True)) and not (private and self.dp)

    def _training_module(self, key: str, weights: Weights, private: bool) -> MERModule:
        """The module client ``key`` trains, holding ``weights``; the torch generator is left
        as a fresh build from the current state would leave it (bit-identical results)."""
        if not self.reuses_clients(private):
            return self._module(weights, key)
        if self._kept is None:
            self._kept = {}
        kept = self._kept.get(key, False)
        if kept is None:  # its build could not be replayed exactly: build fresh each time
            return self._module(weights, key)
        if kept is not False:
            kept.tape.replay()
            set_weights(kept.module, weights)
            return kept.module
        before, host = torch.get_rng_state(), _host_rng_state()
        tape = RngTape()
        with tape:
            module = self._module(weights, key)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        tape.replay()
        exact = torch.equal(torch.get_rng_state(), after) and _same_host(host)
        torch.set_rng_state(after)
        self._kept[key] = _KeptModule(module, tape) if exact else None
        return module

    def _scratch_module(self, role: str, weights: Weights) -> MERModule:
        """A module holding ``weights`` for ``role`` (prediction, the proximal anchor): kept
        and loaded in place under ``federated.reuse_clients`` (no random draw matters here:
        every local training seeds its own)."""
        if not self.reuses_clients():
            return self._module(weights)
        if self._scratch is None:
            self._scratch = {}
        if role not in self._scratch:
            self._scratch[role] = self._module(weights)
        else:
            set_weights(self._scratch[role], weights)
        return self._scratch[role]

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
            hooks: ClientHooks | None = None, work: float = 1.0,
            flip: bool = False, private: bool = False) -> tuple[Weights, int]:
        """Train from ``start`` on ``train``'s training data for ``epochs`` (a fresh Trainer
        and optimiser; the module is ``train.name``'s kept one under
        ``federated.reuse_clients``; data and Trainer settings are the task's).

        ``hooks``: the rule's loss terms and gradient hooks, installed on the module (FedProx's
        term, SCAFFOLD's correction); a straggler stops after ``work`` of its optimiser steps;
        ``private``: DP-SGD with the client's accountant (``privacy=dp``).
        Returns (weights, optimiser steps taken).
        """
        L.seed_everything(seed, verbose=False)
        module = self._training_module(train.name, start, private)
        module.loss_terms = list(hooks.loss_terms) if hooks is not None else []
        module.grad_hooks = list(hooks.grad_hooks) if hooks is not None else []
        if self.client_opt is not None:  # the baselines train with it too: same optimiser
            module.set_optimizer(**self.client_opt)
        trainer_kwargs = self.task.trainer_kwargs(self, train, epochs, work)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer = L.Trainer(logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                limit_val_batches=0, **trainer_kwargs)
            dm = self.task.make_datamodule(self, train, module, seed, flip)
            if private and self.dp:
                from mer.privacy.dp import make_private

                module, dm = make_private(module, dm, self.dp, self.client_privacy[train.name],
                                          seed)
            trainer.fit(module, datamodule=dm)
        return get_weights(module), int(trainer.global_step)

    def _for_client(self, base: Weights, name: str) -> Weights:
        """The model a client works with: ``base`` as its rule starts it (FedBN: with the
        client's own BN entries)."""
        return self.strategy.start_weights(base, self.state[name])

    def train_client(self, client: ClientData, rnd: int, k: int,
                     anchor: list[torch.Tensor] | None = None) -> ClientUpdate:
        """Local training of one client from its starting model, with its rule's hooks."""
        state = self.state[client.name]
        start = self._for_client(state.personal or self.global_weights, client.name)
        seed = self.seed * 100_003 + rnd * 101 + k
        hooks = self.strategy.client_hooks(state, start, anchor, self.task.databases(client))
        work = self.faults.work(rnd, k)
        t0 = time.perf_counter()
        weights, steps = self.fit(start, client, int(self.fed.local_epochs), seed, hooks,
                                  work, self.faults.flips_labels(client.name), private=True)
        seconds = time.perf_counter() - t0
        state.last = weights
        update = ClientUpdate(client.name, weights, self.task.num_examples(client), steps,
                              seconds, work)
        if hooks.finish is not None:
            hooks.finish(update, start)
        update.weights = self.faults.tamper(client.name, rnd, k, weights, self.global_weights)
        return update

    def predict(self, weights: Weights, client: ClientData) -> np.ndarray:
        """(n_test, K) class probabilities of ``weights`` on a client's test split."""
        module = self._scratch_module("predict", weights).eval()
        loader = self._datamodule(client, client.test_idx, 0, module).predict_dataloader()
        with torch.no_grad():
            return torch.cat([module.predict_step(b, i) for i, b in enumerate(loader)]).numpy()

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
        """The rule's proximal anchor as the net's parameter tensors (None without one)."""
        anchor = self.strategy.anchor_weights(self.global_weights, self.initial_weights)
        if anchor is None:
            return None
        return [p.detach().clone() for p in self._scratch_module("anchor", anchor).net.parameters()]
