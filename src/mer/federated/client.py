"""A federated client's side: local Lightning training with its rule's hooks, prediction.

:class:`ClientSide` is a part of :class:`mer.federated.loop.FederatedRun` (the run's
config, samples, clients, rule and privacy layer are its attributes). Each local training
builds a fresh module and ``Trainer``, installs the rule's loss terms and gradient hooks
(:class:`mer.federated.rules.ClientHooks`) through the module's neutral hooks, trains
``local_epochs`` and returns a :class:`~mer.federated.state.ClientUpdate`.
"""

from __future__ import annotations

import math
import time
import warnings

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mer.config_check import check_clients
from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.build import build_module, uses_aus
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


class ClientSide:
    """Local training and prediction of the run's clients (a part of ``FederatedRun``)."""

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
            hooks: ClientHooks | None = None, work: float = 1.0,
            flip: bool = False, private: bool = False) -> tuple[Weights, int]:
        """Train from ``start`` on ``train.train_idx`` for ``epochs`` with a fresh Trainer.

        ``hooks``: the rule's loss terms and gradient hooks, installed on the module (FedProx's
        term, SCAFFOLD's correction); a straggler stops after ``work`` of its optimiser steps;
        ``private``: DP-SGD with the client's accountant (``privacy=dp``).
        Returns (weights, optimiser steps taken).
        """
        L.seed_everything(seed, verbose=False)
        module = self._module(start)
        if hooks is not None:
            module.loss_terms = list(hooks.loss_terms)
            module.grad_hooks = list(hooks.grad_hooks)
        if self.client_opt is not None:  # the baselines train with it too: same optimiser
            module.set_optimizer(**self.client_opt)
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
        """The model a client works with: ``base`` as its rule starts it (FedBN: with the
        client's own BN entries)."""
        return self.strategy.start_weights(base, self.state[name])

    def train_client(self, client: ClientData, rnd: int, k: int,
                     anchor: list[torch.Tensor] | None = None) -> ClientUpdate:
        """Local training of one client from its starting model, with its rule's hooks."""
        state = self.state[client.name]
        start = self._for_client(state.personal or self.global_weights, client.name)
        seed = self.seed * 100_003 + rnd * 101 + k
        databases = set(self.samples.meta["database"].to_numpy()[client.train_idx])
        hooks = self.strategy.client_hooks(state, start, anchor, databases)
        work = self.faults.work(rnd, k)
        t0 = time.perf_counter()
        weights, steps = self.fit(start, client, int(self.fed.local_epochs), seed, hooks,
                                  work, self.faults.flips_labels(client.name), private=True)
        seconds = time.perf_counter() - t0
        state.last = weights
        update = ClientUpdate(client.name, weights, len(client.train_idx), steps, seconds, work)
        if hooks.finish is not None:
            hooks.finish(update, start)
        update.weights = self.faults.tamper(client.name, rnd, k, weights, self.global_weights)
        return update

    def predict(self, weights: Weights, client: ClientData) -> np.ndarray:
        """(n_test, K) class probabilities of ``weights`` on a client's test split."""
        module = self._module(weights).eval()
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
        return None if anchor is None else list(self._module(anchor).net.parameters())
