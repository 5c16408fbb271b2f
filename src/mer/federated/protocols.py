"""Evaluation protocols for federated runs (``federated.protocol``).

- ``holdout`` (default): every client splits its own subjects into train/test
  (``partition.test_fraction``, 70/30 by default); with ``repeats: R`` the whole run is
  repeated with seeds ``seed .. seed + R - 1`` (new splits, new initialisation) and the
  report gives the mean and standard deviation of the pooled figures.
- ``loso``: federated leave-one-subject-out over the clients' union (a composite): for each
  subject, that subject is held out of its client, the federation trains on everyone else,
  and the held-out clips are predicted. Predictions are pooled over all folds and scored
  once, as in the centralised LOSO protocol.

Both keep subjects on one side of every split; nothing is selected on test data (the model
of the last round is the one scored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mer.data.samples import FlowSamples
from mer.engine.metrics import recognition_metrics
from mer.engine.protocols import loso_folds
from mer.federated.loop import client_summary, make_clients, run_federated
from mer.federated.partition import ClientData

SCORES = ("uf1", "uar", "accuracy")


def _with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        cfg.seed = seed
    return cfg


def _pooled_kinds(result: dict) -> dict[str, dict]:
    """``kind -> pooled metrics`` of one run: global, personalised, and the baselines."""
    kinds = {k[len("pooled_"):]: v for k, v in result["final"].items() if k.startswith("pooled_")}
    base = result.get("baselines") or {}
    kinds.update({f"baseline_{k[len('pooled_'):]}": v for k, v in base.items()
                  if k.startswith("pooled_")})
    return kinds


def run_holdout(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
                show_progress: bool = True) -> dict:
    """Per-client subject-disjoint train/test, repeated over ``protocol.repeats`` seeds."""
    repeats = int((cfg.federated.get("protocol") or {}).get("repeats", 1))
    runs = []
    for r in range(repeats):
        seed = int(cfg.seed) + r
        cfg_r = _with_seed(cfg, seed) if r else cfg
        clients = make_clients(cfg_r, samples)
        runs.append(run_federated(cfg_r, samples, clients, run_dir / "checkpoints" / f"seed{seed}",
                                  show_progress))
    result = runs[0]
    result["protocol"] = {"kind": "holdout", "repeats": repeats}
    if repeats > 1:
        per_seed = [_pooled_kinds(run) for run in runs]
        summary = {}
        for kind in per_seed[0]:
            summary[kind] = {}
            for score in SCORES:
                values = np.array([p[kind][score] for p in per_seed])
                summary[kind][score] = {"mean": float(values.mean()),
                                        "std": float(values.std(ddof=1)),
                                        "values": values.tolist()}
        result["repeats"] = {"seeds": [int(cfg.seed) + r for r in range(repeats)],
                             "summary": summary}
    return result


def client_loso_folds(samples: FlowSamples, clients: list[ClientData]
                      ) -> list[tuple[str, list[ClientData]]]:
    """The centralised LOSO folds (:func:`mer.engine.protocols.loso_folds`, one per subject key,
    sorted) seen by the clients: ``(subject_key, clients)`` where the subject's clips are the
    only test samples (at their own client) and every other clip trains at its client."""
    owned = [(c.name, np.sort(np.concatenate([c.train_idx, c.test_idx]))) for c in clients]
    folds = []
    for fold in loso_folds(samples):
        fold_clients = []
        for name, positions in owned:
            held = np.isin(positions, fold.test_idx)
            fold_clients.append(ClientData(name, positions[~held], positions[held]))
        folds.append((fold.name, fold_clients))
    return folds


def run_loso(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
             show_progress: bool = True) -> dict:
    """Federated LOSO: one full federated run per held-out subject, predictions pooled."""
    from rich.progress import Progress

    clients = make_clients(cfg, samples)
    folds = client_loso_folds(samples, clients)
    names = samples.class_names
    per_fold, preds, idx, summed = {}, {}, [], {}
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("federated LOSO folds", total=len(folds))
        for subject, fold_clients in folds:
            result = run_federated(cfg, samples, fold_clients,
                                   run_dir / "checkpoints" / subject.replace("/", "_"),
                                   show_progress=False)
            fold_preds = result["predictions"]
            idx.extend(fold_preds["index"])
            for kind, p in fold_preds["pred"].items():
                preds.setdefault(kind, []).extend(p)
            for kind, cm in fold_preds.get("confusion", {}).items():  # secagg / ckks
                summed[kind] = summed.get(kind, 0) + np.asarray(cm, np.int64)
            per_fold[subject] = {k: v for k, v in _pooled_kinds(result).items()}
            progress.advance(task)
    if summed:  # under secure aggregation only the folds' summed confusion matrices exist
        from mer.privacy.pooled import confusion_metrics

        pooled = {kind: confusion_metrics(cm) for kind, cm in summed.items()}
    else:
        y = samples.labels[np.asarray(idx, np.int64)]
        pooled = {kind: {k: v for k, v in recognition_metrics(y, np.asarray(p), names).items()
                         if k in ("n",) + SCORES} for kind, p in preds.items()}
    return {"protocol": {"kind": "loso", "folds": len(folds)},
            "clients": client_summary(samples, clients),
            "final": {f"pooled_{k}": v for k, v in pooled.items()},
            "per_fold": per_fold,
            "predictions": {"index": idx, "pred": preds}}


def run_federated_protocol(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
                           show_progress: bool = True) -> dict:
    kind = (cfg.federated.get("protocol") or {}).get("kind", "holdout")
    if kind == "holdout":
        return run_holdout(cfg, samples, run_dir, show_progress)
    if kind == "loso":
        return run_loso(cfg, samples, run_dir, show_progress)
    raise ValueError(f"unknown federated.protocol.kind '{kind}': holdout or loso")
