"""Pooled test figures from a securely summed confusion matrix (no test label leaves a lab).

Each lab scores the models on its own test split and sends only its confusion matrix, inside
the secure aggregate; the server gets the sum, which is the confusion matrix of the pooled
predictions, so UF1 / UAR / accuracy equal :func:`mer.engine.metrics.recognition_metrics` of
the pooled labels and predictions exactly.
"""

from __future__ import annotations

import numpy as np

from mer.engine.metrics import confusion_matrix, per_class_scores


def lab_confusions(y_true: np.ndarray, preds: list[np.ndarray], num_classes: int) -> np.ndarray:
    """A lab's side: (kinds, K, K) confusion matrices (rows: true class) of its (n,) test
    labels against each kind's (n,) predictions; zeros for a lab without test clips."""
    if len(y_true) == 0:
        return np.zeros((len(preds), num_classes, num_classes), np.float64)
    return np.stack([confusion_matrix(np.asarray(y_true, np.int64), np.asarray(p, np.int64),
                                      num_classes) for p in preds]).astype(np.float64)


def confusion_metrics(cm: np.ndarray) -> dict:
    """``n``, ``uf1``, ``uar``, ``accuracy`` of a (K, K) confusion matrix (rows: true class;
    integer counts, e.g. a decoded secure sum, rounded here). Classes absent from both the
    labels and the predictions are left out of UF1 / UAR, as in ``recognition_metrics``."""
    cm = np.rint(np.asarray(cm, np.float64)).astype(np.int64)
    f1, recall = per_class_scores(cm)
    present = np.flatnonzero((cm.sum(0) + cm.sum(1)) > 0)
    n = int(cm.sum())
    return {"n": n,
            "uf1": float(f1[present].mean()) if len(present) else 0.0,
            "uar": float(recall[present].mean()) if len(present) else 0.0,
            "accuracy": float(np.trace(cm) / n) if n else 0.0}


def withheld(reason: str) -> dict:
    """The pooled figures of an evaluation whose sum could not be opened (too few labs)."""
    return {"n": 0, "uf1": float("nan"), "uar": float("nan"), "accuracy": float("nan"),
            "withheld": reason}
