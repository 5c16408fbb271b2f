"""Run outputs: results.json, predictions.csv and a confusion-matrix PNG in the run directory.

Each file is written atomically (:mod:`mer.data.io`): a reader sees the old file or the new
one, never half of one; a full disk or a read-only folder is an error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mer.data.io import atomic_write_text, atomic_write_with
from mer.engine.metrics import recognition_metrics


def score_predictions(predictions: pd.DataFrame, class_names: list[str]) -> dict:
    """Metrics overall (pooled over folds), per database and per fold.

    ``predictions`` has one row per sample with ``label``, ``prediction``, ``database``, ``fold``.
    """
    def score(df: pd.DataFrame) -> dict:
        return recognition_metrics(df["label"].to_numpy(), df["prediction"].to_numpy(),
                                   class_names)

    return {
        "overall": score(predictions),
        "per_database": {db: score(g) for db, g in predictions.groupby("database", sort=True)},
        "per_fold": {
            str(f): {k: v for k, v in score(g).items() if k in ("n", "uf1", "uar", "accuracy")}
            for f, g in predictions.groupby("fold", sort=False)
        },
    }


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Save a confusion matrix (rows true, columns predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    try:
        atomic_write_with(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def write_outputs(run_dir: Path, results: dict, predictions: pd.DataFrame,
                  class_names: list[str]) -> None:
    """Write results.json, predictions.csv and confusion_matrix.png into ``run_dir``, each
    atomically; results.json last, so that its presence means the run's outputs are whole."""
    run_dir = Path(run_dir)
    text = json.dumps(results, indent=2, default=_jsonable)  # fails before anything is written
    write_csv(predictions, run_dir / "predictions.csv")
    overall = results["metrics"]["overall"]
    tag = "SYNTHETIC data" if results["data"].get("synthetic") else "real data"
    plot_confusion(
        np.array(overall["confusion_matrix"]), class_names, run_dir / "confusion_matrix.png",
        f"{results.get('name', '')} ({tag}) UF1 {overall['uf1']:.3f} UAR {overall['uar']:.3f}",
    )
    atomic_write_text(run_dir / "results.json", text)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """``table`` as CSV (no index) at ``path``, atomically."""
    atomic_write_with(path, lambda f: f.write(table.to_csv(index=False).encode("utf-8")))


def _jsonable(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
