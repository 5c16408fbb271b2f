"""Evaluation protocols for federated runs (``federated.protocol``).

- ``holdout`` (default): every client splits its own subjects into train/test
  (``partition.test_fraction``, 70/30 by default); with ``repeats: R`` the whole run is
  repeated with seeds ``seed .. seed + R - 1`` (new splits, new initialisation) and the
  report gives the mean and standard deviation of the pooled figures.
- ``loso``: federated leave-one-subject-out over the clients' union (a composite): for each
  subject, that subject is held out of its client, the federation trains on everyone else,
  and the held-out clips are predicted. Predictions are pooled over all folds and scored
  once, as in the centralised LOSO protocol. ``protocol.workers`` (1 by default; ``auto``:
  one per core) runs folds at once in forked worker processes (each fold's federation then
  trains its clients in turn, with ``cores // workers`` torch threads); the results equal
  running them in turn at that thread count. Each finished fold is saved in
  ``<run dir>/folds_done/`` and ``resume=true`` loads it instead of training it again;
  SIGTERM or Ctrl-C stops the workers at once (finished folds stay saved).

Both keep subjects on one side of every split; nothing is selected on test data (the model
of the last round is the one scored). With ``data.augment.generate=K`` each lab's training
split (of every repeat or fold) is augmented inside the lab (:func:`augment_labs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mer.data.generate.augment import fold_augmenter, generated_summary
from mer.data.io import CorruptFileError, atomic_save, checked_load
from mer.data.samples import FlowSamples
from mer.engine.metrics import recognition_metrics
from mer.engine.protocols import augment_folds, loso_folds, resolve_workers
from mer.federated.loop import client_summary, make_clients, run_federated
from mer.federated.partition import ClientData

log = logging.getLogger(__name__)

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


def augment_labs(cfg: DictConfig, samples: FlowSamples, groups: list[list[ClientData]],
                 names: list[str], run_dir: Path | None = None
                 ) -> tuple[FlowSamples, list[list[ClientData]], dict | None]:
    """``data.augment.generate=K`` inside each lab: K driven sequences per training clip of a
    lab's own split, its sources and drivers drawn from that lab's training subjects only (no
    clip of another lab, no test subject), added to that lab's training split only; through
    the engine's neutral hook, which checks exactly that (:func:`augment_folds`).

    ``groups``: the clients of each federation the protocol runs (``names``: one per group, a
    seed or a LOSO fold), augmented in one call: a sequence two of them share is made once.
    Returns the samples with the generated rows, the groups with them in their training
    splits, and the report's summary (``generated.csv`` written in ``run_dir``), or the inputs
    and None when ``data.augment.generate`` is 0.
    """
    augmenter = fold_augmenter(cfg.data, OmegaConf.select(cfg, "paths.cache_dir"),
                               int(cfg.seed), progress=bool(cfg.get("progress", True)))
    if augmenter is None:
        return samples, groups, None
    flat = [c for g in groups for c in g]
    samples, new_flat = augment_folds(samples, flat, augmenter)
    out, i = [], 0
    for g in groups:
        out.append(new_flat[i:i + len(g)])
        i += len(g)
    tagged = [replace(c, name=f"{name}:{c.name}" if len(groups) > 1 else c.name)
              for name, g in zip(names, out, strict=True) for c in g]
    csv = None if run_dir is None else Path(run_dir) / "generated.csv"
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
    return samples, out, {**generated_summary(samples, tagged, csv), "within": "each lab"}


def run_holdout(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
                show_progress: bool = True) -> dict:
    """Per-client subject-disjoint train/test, repeated over ``protocol.repeats`` seeds."""
    repeats = int((cfg.federated.get("protocol") or {}).get("repeats", 1))
    seeds = [int(cfg.seed) + r for r in range(repeats)]
    cfgs = [_with_seed(cfg, seed) if r else cfg for r, seed in enumerate(seeds)]
    groups = [make_clients(cfg_r, samples) for cfg_r in cfgs]
    # data.augment.generate=K: each lab's training split augmented inside the lab
    samples, groups, generated = augment_labs(cfg, samples, groups,
                                              [f"seed{seed}" for seed in seeds], run_dir)
    runs = []
    for seed, cfg_r, clients in zip(seeds, cfgs, groups, strict=True):
        runs.append(run_federated(cfg_r, samples, clients, run_dir / "checkpoints" / f"seed{seed}",
                                  show_progress))
    result = runs[0]
    result["protocol"] = {"kind": "holdout", "repeats": repeats}
    if generated is not None:
        result["generated"] = generated
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


def _fold_recipe(cfg: DictConfig, subject: str, clients: list[ClientData]) -> str:
    """Hash of what shapes a fold's result (not resume, progress, logging, paths, workers)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "progress", "logger", "paths", "hydra"):
        tree.pop(key, None)
    fed = tree.get("federated", {})
    for key in ("workers", "reuse_clients"):  # how, not what
        fed.pop(key, None)
    (fed.get("protocol") or {}).pop("workers", None)
    split = [(c.name, c.train_idx.tolist(), c.test_idx.tolist()) for c in clients]
    blob = json.dumps([tree, subject, split], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fold_outcome(result: dict) -> dict:
    """What LOSO keeps of a fold's federated run: its predictions and pooled figures."""
    return {"predictions": result["predictions"], "pooled": _pooled_kinds(result)}


def _fold_path(done_dir: Path, subject: str) -> Path:
    return done_dir / f"{subject.replace('/', '_')}.pt"


def _load_done_fold(done_dir: Path, subject: str, recipe: str) -> dict | None:
    path = _fold_path(done_dir, subject)
    if not path.exists():
        return None
    fix = "delete it and rerun with resume=true: that fold is trained again"
    saved = checked_load(path, what=f"saved federated LOSO fold {subject}", fix=fix)
    if not isinstance(saved, dict) or not {"recipe", "outcome"} <= set(saved):
        raise CorruptFileError(f"saved federated LOSO fold {subject} {path} lacks its recipe "
                               f"or outcome; {fix}")
    if saved["recipe"] != recipe:
        log.warning("not resuming fold %s: %s was saved by a different recipe (config "
                    "changed); training it again", subject, path)
        return None
    return saved["outcome"]


_FOLD_JOB: dict = {}  # a forked fold worker's (cfg, samples, run_dir)


def _init_fold_worker(threads: int, parent_pid: int) -> None:
    import torch

    from mer.engine.workers import prepare_worker

    prepare_worker(parent_pid)
    torch.set_num_threads(threads)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _fold_in_worker(subject: str, fold_clients: list[ClientData]) -> dict:
    cfg, samples, run_dir = _FOLD_JOB["cfg"], _FOLD_JOB["samples"], _FOLD_JOB["run_dir"]
    return _fold_outcome(run_federated(cfg, samples, fold_clients,
                                       run_dir / "checkpoints" / subject.replace("/", "_"),
                                       show_progress=False))


def _run_folds(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
               folds: list[tuple[str, list[ClientData]]], show_progress: bool
               ) -> dict[str, dict]:
    """Every fold's outcome: loaded from ``folds_done/`` (``resume=true``, same recipe),
    else trained, in turn or in ``protocol.workers`` forked processes; each saved when done."""
    from rich.progress import Progress

    from mer.engine.workers import stop_pool, terminate_on_signal

    done_dir = run_dir / "folds_done"
    recipes = {subject: _fold_recipe(cfg, subject, fc) for subject, fc in folds}
    done: dict[str, dict] = {}
    if cfg.get("resume"):
        for subject, _ in folds:
            outcome = _load_done_fold(done_dir, subject, recipes[subject])
            if outcome is not None:
                done[subject] = outcome
    todo = [(subject, fc) for subject, fc in folds if subject not in done]
    protocol = cfg.federated.get("protocol") or {}
    n_workers = resolve_workers(protocol.get("workers", 1), max(1, len(todo)))

    def finished(subject: str, outcome: dict) -> None:
        done[subject] = outcome
        atomic_save({"recipe": recipes[subject], "outcome": outcome},
                    _fold_path(done_dir, subject))

    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("federated LOSO folds", total=len(folds), completed=len(done))
        if n_workers == 1 or not todo:
            for subject, fold_clients in todo:
                finished(subject, _fold_outcome(run_federated(
                    cfg, samples, fold_clients, run_dir / "checkpoints" /
                    subject.replace("/", "_"), show_progress=False)))
                progress.advance(task)
            return done
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        if int(cfg.federated.get("workers") or 1) > 1:  # folds at once: clients in turn
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            with open_dict(cfg):
                cfg.federated.workers = 1
        _FOLD_JOB.update(cfg=cfg, samples=samples, run_dir=run_dir)  # inherited by the fork
        threads = max(1, torch.get_num_threads() // n_workers)
        with terminate_on_signal():
            pool = ProcessPoolExecutor(n_workers,
                                       mp_context=multiprocessing.get_context("fork"),
                                       initializer=_init_fold_worker,
                                       initargs=(threads, os.getpid()))
            try:
                futures = {subject: pool.submit(_fold_in_worker, subject, fc)
                           for subject, fc in todo}
                for subject, future in futures.items():
                    finished(subject, future.result())
                    progress.advance(task)
            except BaseException:  # SIGTERM, Ctrl-C, a failed fold: never wait for the others
                stop_pool(pool)
                log.warning("stopped after %d of %d folds; those finished are saved in %s "
                            "(resume=true continues)", len(done), len(folds), done_dir)
                raise
            finally:
                _FOLD_JOB.clear()
            pool.shutdown()
    return done


def run_loso(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
             show_progress: bool = True) -> dict:
    """Federated LOSO: one full federated run per held-out subject, predictions pooled."""
    clients = make_clients(cfg, samples)
    folds = client_loso_folds(samples, clients)
    # data.augment.generate=K: each lab's training split of each fold augmented inside the lab
    samples, groups, generated = augment_labs(cfg, samples, [fc for _, fc in folds],
                                              [subject for subject, _ in folds], run_dir)
    folds = [(subject, fc) for (subject, _), fc in zip(folds, groups, strict=True)]
    names = samples.class_names
    outcomes = _run_folds(cfg, samples, Path(run_dir), folds, show_progress)
    per_fold, preds, idx, summed = {}, {}, [], {}
    for subject, _ in folds:  # pooled in fold order, however they were run
        fold_preds, pooled_kinds = outcomes[subject]["predictions"], outcomes[subject]["pooled"]
        idx.extend(fold_preds["index"])
        for kind, p in fold_preds["pred"].items():
            preds.setdefault(kind, []).extend(p)
        for kind, cm in fold_preds.get("confusion", {}).items():  # secagg / ckks
            summed[kind] = summed.get(kind, 0) + np.asarray(cm, np.int64)
        per_fold[subject] = dict(pooled_kinds)
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
            "predictions": {"index": idx, "pred": preds},
            **({"generated": generated} if generated is not None else {})}


def run_federated_protocol(cfg: DictConfig, samples: FlowSamples, run_dir: Path,
                           show_progress: bool = True) -> dict:
    kind = (cfg.federated.get("protocol") or {}).get("kind", "holdout")
    if kind == "holdout":
        return run_holdout(cfg, samples, run_dir, show_progress)
    if kind == "loso":
        return run_loso(cfg, samples, run_dir, show_progress)
    raise ValueError(f"unknown federated.protocol.kind '{kind}': holdout or loso")
