"""What a federated run trains: the task hooks of :class:`mer.federated.loop.FederatedRun`.

The loop owns the rounds, the rules, the privacy layer, faults, workers and checkpoints; a
task owns everything that knows what a client's data *is*. :class:`Task` is emotion
recognition of clips (the default: every federated run of ``mer.run`` and Flower). Another
task (the learned spotters' :class:`mer.spotting.federated.SpotTask`) subclasses it and
overrides the hooks; the loop never imports one. The hooks:

- :meth:`Task.check`: refuse, before anything is built, what the task cannot run (a privacy
  scheme, a fault, a partition), naming the key and why.
- :meth:`Task.model_config`: the model config the clients train (``run.model_cfg``).
- :meth:`Task.build_module` (hook b): the server's template (``client="template"``; the
  global weights start from it) or a client's module (weights are loaded into it).
- :meth:`Task.make_datamodule` (hook a) and :meth:`Task.trainer_kwargs`: a client's local
  training data and ``Trainer`` settings; :meth:`Task.num_examples` weighs its update.
- :meth:`Task.evaluate` (hook c): per-client and pooled figures of each model kind; a task
  sums what it pools (recognition: confusion matrices; spotting: MEGC TP/FP/FN counts).
  Under secure aggregation only protected sums reach the server (:func:`lab_sum`).
- :meth:`Task.statistics` (hook d): a post-training round of summed statistics (spotting:
  the threshold counts); recognition has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from mer.engine.build import build_module
from mer.federated.partition import ClientData

if TYPE_CHECKING:
    from mer.data.samples import FlowSamples
    from mer.federated.fidelity import FedFidelity


def lab_sum(run: Any, rnd: int, vectors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """``(sum_k v_k, labs)`` of the labs' vectors ``{lab: (D,)}``: under secure aggregation
    (``privacy=secagg | ckks``) each lab protects its own vector and only the sum is opened
    (:meth:`mer.privacy.base.SecureAggregation.sum_vectors`; fewer than
    ``privacy.min_clients`` labs raise TooFewContributors), else added in the clear."""
    if run.secure is not None:
        return run.secure.sum_vectors(rnd, dict(vectors))
    arrays = [np.asarray(v, np.float64) for v in vectors.values()]
    return np.sum(arrays, axis=0), len(arrays)


class Task:
    """Emotion recognition of flow clips (``FlowSamples``): clients are index sets
    (:class:`~mer.federated.partition.ClientData`), modules come from
    :func:`mer.engine.build.build_module`, figures are UF1/UAR (``Evaluation``)."""

    name = "recognition"

    def __init__(self, samples: FlowSamples | None) -> None:
        self.samples = samples

    def check(self, run: Any) -> None:
        from mer.federated.partition import check_partition

        check_partition(self.samples, run.clients)

    def model_config(self, cfg: DictConfig, fidelity: FedFidelity) -> dict:
        from mer.federated.fidelity import federated_model_cfg

        return federated_model_cfg(OmegaConf.to_container(cfg.model, resolve=True),
                                   fidelity.fidelity)

    def build_module(self, run: Any, client: str | None = None) -> L.LightningModule:
        """``client="template"``: the server's initial module (data prior from the summed AU
        counts, pretraining on the training splits); else a module for weights to be loaded
        into (no data seen)."""
        if client == "template":
            train_all = np.concatenate([c.train_idx for c in run.clients])
            return run._fixed(build_module(run.model_cfg, self.samples, train_all,
                                           run.au_counts()))
        return run._fixed(build_module(run.model_cfg, self.samples,
                                       np.array([], dtype=np.int64)))

    def make_datamodule(self, run: Any, client: ClientData, module: L.LightningModule,
                        seed: int, flip: bool = False) -> L.LightningDataModule:
        return run._datamodule(client, client.test_idx, seed, module, flip)

    def trainer_kwargs(self, run: Any, client: ClientData, epochs: int,
                       work: float = 1.0) -> dict:
        kwargs = OmegaConf.to_container(run.cfg.trainer, resolve=True)
        kwargs["max_epochs"] = int(epochs)
        if work < 1.0:  # a straggler stops after `work` of its optimiser steps
            batches = math.ceil(len(client.train_idx) / int(run.cfg.data.batch_size))
            kwargs["max_steps"] = max(1, int(work * epochs * batches))
        return kwargs

    def num_examples(self, client: ClientData) -> int:
        return len(client.train_idx)

    def databases(self, client: ClientData) -> set[str]:
        """The databases of a client's training data (per-database FedProx mu)."""
        return set(self.samples.meta["database"].to_numpy()[client.train_idx])

    def evaluate(self, run: Any, models: dict, with_predictions: bool = False) -> dict:
        return run.score_recognition(models, with_predictions)

    def statistics(self, run: Any) -> dict:
        """A post-training round of summed statistics (none for recognition)."""
        return {}

    def summary(self, clients: list[ClientData]) -> dict:
        from mer.federated.client import client_summary

        return client_summary(self.samples, clients)
