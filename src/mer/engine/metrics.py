"""Recognition metrics on pooled predictions (MEGC2019): UF1, UAR, accuracy, per class.

Classes are those present in ``y_true`` or ``y_pred`` (sklearn's default), so UF1 and UAR
equal ``f1_score(average="macro")`` and ``recall_score(average="macro")``; a class with no
support scores 0 (sklearn's ``zero_division=0``). Classes absent from ``y_true`` are listed in
``absent_classes``: the report warns, as UAR then averages over fewer (or spurious) classes.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (F1, recall) from a confusion matrix; 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1, recall


def recognition_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> dict:
    """UF1, UAR, accuracy, per-class F1/recall/support, the confusion matrix and
    ``absent_classes`` (names of the classes with no sample in ``y_true``).

    Args:
        y_true, y_pred: (N,) int class indices.
        class_names: index -> name (K entries).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    f1, recall = per_class_scores(cm)
    present = np.union1d(y_true, y_pred)
    return {
        "n": int(len(y_true)),
        "uf1": float(f1[present].mean()) if len(present) else 0.0,
        "uar": float(recall[present].mean()) if len(present) else 0.0,
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "per_class": {
            name: {"f1": float(f1[i]), "recall": float(recall[i]), "support": int(cm[i].sum())}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "absent_classes": [name for i, name in enumerate(class_names) if cm[i].sum() == 0],
    }
