"""Scoring a federated run: per-client and pooled test figures of each model kind (in the
clear, or from securely summed confusion matrices), and the pooled / local-only baselines.

What is scored is the run's task's (:meth:`mer.federated.task.Task.evaluate`); recognition's
scoring (UF1/UAR of argmax predictions) is :meth:`Evaluation.score_recognition`.

:class:`Evaluation` is a part of :class:`mer.federated.loop.FederatedRun`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from mer.engine.metrics import recognition_metrics
from mer.federated.partition import ClientData
from mer.privacy.base import TooFewContributors

log = logging.getLogger(__name__)


class Evaluation:
    """Evaluation and baselines of a federated run (a part of ``FederatedRun``)."""

    def evaluate(self, models: dict | None = None, with_predictions: bool = False) -> dict:
        """Per-client and pooled test figures of each model kind, as the run's task scores
        them. ``models`` maps a kind to ``client -> weights``; by default the global model
        (with the client's own BN entries under FedBN) and each client's personalised
        model."""
        return self.task.evaluate(self, models or self.default_models(), with_predictions)

    def score_recognition(self, models: dict, with_predictions: bool = False) -> dict:
        """Recognition's per-client and pooled test metrics (UF1, UAR, accuracy) of each
        model kind. Clients without test samples are left out. ``with_predictions`` adds
        ``predictions``: ``{"index": sample positions, "pred": {kind: predicted classes}}``.
        """
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
