"""Evaluation protocols: folds, per-fold training in parallel worker processes, pooled results.

LOSO (leave one subject out) over one database or a composite: one fold per subject (subjects
of different databases are different people), every fold trains a fresh model on the other
subjects with a fixed schedule (the last epoch), or selects its epoch on validation subjects
carved from the *training* subjects; the test subject is never looked at before prediction.
Predictions are pooled over folds and scored once (MEGC2019).

Cross-database (:func:`cross_db_folds`: train on some databases, test on others, e.g. CASME II
-> SAMM) and leave one database out (:func:`lodo_folds`: each database of a composite held out
in turn) split by database; subjects of different databases are different people, and
databases recorded from the same people (:data:`SAME_PEOPLE`) are never split apart. Model
selection, if any, uses validation subjects of the training databases only.

Folds run in a pool of worker processes sized to the machine: tiny ME networks use one core
badly, so ``workers`` processes with ``cores // workers`` threads each beat one process with all
cores. Results do not depend on the worker count (each fold seeds itself from its index).

A terminated run (SIGTERM: a SLURM time limit or preemption) stops its workers at once
(:mod:`mer.engine.workers`); every finished fold is already saved in ``done_dir`` with a
checksum (:mod:`mer.data.io`), and ``resume=true`` trains only the others. Non-finite
probabilities are refused, naming the fold and the clip, never scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback

from mer.data.io import CorruptFileError, atomic_save, checked_load
from mer.data.samples import FlowSamples
from mer.engine.workers import prepare_worker, stop_pool, terminate_on_signal

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A split that cannot be evaluated honestly (empty fold, subject on both sides...)."""


@dataclass
class Fold:
    """One split. Positions index into the FlowSamples the folds were made from."""

    index: int
    name: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    val_idx: np.ndarray


def check_split(samples: FlowSamples, fold: Fold) -> None:
    """Raise ProtocolError if a subject is on two sides of the split or a side is empty."""
    keys = samples.meta["subject_key"].to_numpy()
    sides = {"train": fold.train_idx, "validation": fold.val_idx, "test": fold.test_idx}
    for name in ("train", "test"):
        if len(sides[name]) == 0:
            raise ProtocolError(f"fold '{fold.name}': empty {name} split")
    seen: dict[str, str] = {}
    for side, idx in sides.items():
        for key in set(keys[idx]):
            if key in seen and seen[key] != side:
                raise ProtocolError(
                    f"fold '{fold.name}': subject {key} is in both {seen[key]} and {side}"
                )
            seen[key] = side


def loso_folds(samples: FlowSamples, val_subjects: float = 0.0, seed: int = 0) -> list[Fold]:
    """One fold per subject key, in sorted order.

    Args:
        val_subjects: 0 for a fixed schedule; a fraction (0, 1) or a count >= 1 of the training
            subjects held out of training for model selection, drawn per fold with ``seed``.
    """
    keys = samples.meta["subject_key"].to_numpy()
    subjects = sorted(set(keys))
    if len(subjects) < 2:
        raise ProtocolError(f"LOSO needs at least 2 subjects, found {len(subjects)}")
    folds = []
    for i, test_subject in enumerate(subjects):
        test_idx = np.flatnonzero(keys == test_subject)
        rest = [s for s in subjects if s != test_subject]
        n_val = int(round(val_subjects * len(rest))) if val_subjects < 1 else int(val_subjects)
        n_val = min(n_val, len(rest) - 1)
        val_set = set(np.random.default_rng([seed, i]).choice(rest, n_val, replace=False)) \
            if n_val > 0 else set()
        train_idx = np.flatnonzero((keys != test_subject) & ~np.isin(keys, list(val_set)))
        val_idx = np.flatnonzero(np.isin(keys, list(val_set)))
        fold = Fold(i, test_subject, train_idx, test_idx, val_idx)
        check_split(samples, fold)
        folds.append(fold)
    return folds


def augment_folds(samples: FlowSamples, folds: list, augmenter=None) -> tuple[FlowSamples, list]:
    """The neutral hook for training-set augmentation: ``augmenter(samples, folds)`` returns
    samples with rows appended and folds whose training positions include some of them (e.g.
    ``mer.data.generate.augment``); None leaves both as they are.

    A fold is a :class:`Fold` or any split with ``name``, ``train_idx`` and ``test_idx`` (and
    maybe ``val_idx``): a federated lab's own train/test split is one, so each lab's added
    samples come from that lab's training subjects only.

    Checked here, whatever the augmenter: the original rows are kept in place; test and
    validation positions are unchanged (nothing added is ever evaluated or used to select);
    every added row is marked ``generated`` in the meta, and every subject in its
    ``from_subjects`` (``;``-joined subject keys whose faces or motion it was made from) is a
    training subject of each fold that trains on it: never a test or validation subject, nor
    one outside the fold (another lab's).

    Raises:
        ProtocolError: naming the fold and the row that break one of these.
    """
    if augmenter is None:
        return samples, folds
    n = len(samples.meta)
    out, new_folds = augmenter(samples, folds)
    keys = out.meta["subject_key"].to_numpy()
    if len(out.meta) < n or not (out.meta["subject_key"].iloc[:n].to_numpy() ==
                                 samples.meta["subject_key"].to_numpy()).all():
        raise ProtocolError("augmentation changed the original samples; it may only append")
    flags = out.meta["generated"].to_numpy(bool) if "generated" in out.meta else \
        np.zeros(len(out.meta), bool)
    if not flags[n:].all() or flags[:n].any():
        raise ProtocolError("augmentation: every added sample must be marked generated=True "
                            "and no original one")
    used = out.meta["from_subjects"].to_numpy() if "from_subjects" in out.meta else None
    none = np.zeros(0, np.int64)
    for old, new in zip(folds, new_folds, strict=True):
        for side in ("test_idx", "val_idx"):
            if not np.array_equal(getattr(old, side, none), getattr(new, side, none)):
                raise ProtocolError(f"fold '{old.name}': augmentation changed its {side[:-4]} "
                                    "split; generated samples may join training only")
        added = np.setdiff1d(new.train_idx, old.train_idx)
        if (added < n).any():
            raise ProtocolError(f"fold '{old.name}': augmentation added original samples")
        held_out = set(keys[np.concatenate([old.test_idx, getattr(old, "val_idx", none)])])
        training = set(keys[old.train_idx])
        for i in added:
            made_from = {keys[i]} | (set(str(used[i]).split(";")) - {""}
                                     if used is not None else set())
            if made_from - training:
                leaked = made_from & held_out
                what = f"held-out subject(s) {sorted(leaked)}" if leaked else \
                    f"subject(s) {sorted(made_from - training)} outside its training subjects"
                raise ProtocolError(f"fold '{old.name}': generated sample "
                                    f"{out.meta['clip'].iloc[i]} was made from {what}")
        if isinstance(new, Fold):
            check_split(out, new)
    return out, new_folds


# Databases recorded from the same people: never one on each side of a cross-database split.
SAME_PEOPLE: tuple[frozenset[str], ...] = (frozenset({"samm", "samm_lv"}),)


def _carve_validation(keys: np.ndarray, train_idx: np.ndarray, val_subjects: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``val_subjects`` (a fraction or a count) of the subjects of
    ``train_idx`` moved to validation, at least one subject kept for training."""
    subjects = sorted(set(keys[train_idx]))
    n_val = int(round(val_subjects * len(subjects))) if val_subjects < 1 else int(val_subjects)
    n_val = min(n_val, len(subjects) - 1)
    if n_val <= 0:
        return train_idx, np.array([], dtype=np.int64)
    val_set = list(rng.choice(subjects, n_val, replace=False))
    in_val = np.isin(keys[train_idx], val_set)
    return train_idx[~in_val], train_idx[in_val]


def _database_fold(samples: FlowSamples, index: int, name: str, train: list[str],
                   test: list[str], val_subjects: float, seed: int) -> Fold:
    """A fold training on the databases ``train`` and testing on ``test``, checked."""
    db = samples.meta["database"].to_numpy()
    keys = samples.meta["subject_key"].to_numpy()
    for group in SAME_PEOPLE:
        if group & set(train) and group & set(test):
            raise ProtocolError(
                f"fold '{name}': {sorted(group & set(train))} (train) and "
                f"{sorted(group & set(test))} (test) are recordings of the same people; a "
                "cross-database split would put subjects on both sides. Keep them on one side")
    train_idx = np.flatnonzero(np.isin(db, train))
    test_idx = np.flatnonzero(np.isin(db, test))
    train_idx, val_idx = _carve_validation(keys, train_idx, val_subjects,
                                           np.random.default_rng([seed, index]))
    fold = Fold(index, name, train_idx, test_idx, val_idx)
    check_split(samples, fold)
    _warn_unseen_classes(samples, fold)
    return fold


def _warn_unseen_classes(samples: FlowSamples, fold: Fold) -> list[str]:
    """Warn (and return) the classes the fold tests on but never trains on: across databases a
    class can be absent from the training side, and its test clips can only be misclassified."""
    labels = samples.meta["label"].to_numpy()
    unseen = sorted(set(labels[fold.test_idx]) - set(labels[fold.train_idx]))
    names = [samples.class_names[int(c)] for c in unseen]
    if names:
        n = int(np.isin(labels[fold.test_idx], unseen).sum())
        warnings.warn(f"fold '{fold.name}': class(es) {names} ({n} test clips) never appear in "
                      "training; they count in UF1/UAR and can only be misclassified",
                      stacklevel=3)
    return names


def _databases(samples: FlowSamples) -> list[str]:
    return sorted(samples.meta["database"].unique())


def cross_db_folds(samples: FlowSamples, train: list[str] | None, test: list[str] | None,
                   val_subjects: float = 0.0, seed: int = 0) -> list[Fold]:
    """One fold: train on the databases ``train``, test on every sample of ``test``.

    Either side may be None: it is then every database of the samples not on the other side.
    Validation subjects (``val_subjects``: a fraction or a count) are carved from the training
    databases only; the test databases are not looked at before prediction.

    Raises:
        ProtocolError: a database on both sides or absent from the samples, nothing given, an
            empty side, or two databases of the same people (SAMM and SAMM-LV) on both sides.
    """
    present = _databases(samples)
    if not train and not test:
        raise ProtocolError(
            f"protocol=cross_db needs protocol.train and/or protocol.test (lists of "
            f"databases; the data holds {present}), e.g. protocol.train=[{present[0]}] "
            f"protocol.test=[{present[-1]}]")
    train, test = [str(d) for d in train or []], [str(d) for d in test or []]
    for side, names in (("train", train), ("test", test)):
        unknown = [d for d in names if d not in present]
        if unknown:
            raise ProtocolError(f"protocol.{side}: {unknown} not in the data (its databases: "
                                f"{present}); fix protocol.{side} or the data config")
    both = sorted(set(train) & set(test))
    if both:
        raise ProtocolError(f"protocol.train and protocol.test both hold {both}: a database is "
                            "trained on or tested on, never both (use protocol=loso within one)")
    train = train or [d for d in present if d not in test]
    test = test or [d for d in present if d not in train]
    if not test:
        raise ProtocolError(f"protocol.train={train} holds every database of the data: no "
                            "database left to test; set protocol.test")
    if not train:
        raise ProtocolError(f"protocol.test={test} holds every database of the data: no "
                            "database left to train on; set protocol.train")
    name = f"{'+'.join(train)}->{'+'.join(test)}"
    return [_database_fold(samples, 0, name, train, test, val_subjects, seed)]


def lodo_folds(samples: FlowSamples, val_subjects: float = 0.0, seed: int = 0) -> list[Fold]:
    """Leave one database out: one fold per database (sorted), named after it; each trains on
    all other databases (validation subjects carved from those) and tests on every sample of
    the one held out, so every sample is tested exactly once."""
    present = _databases(samples)
    if len(present) < 2:
        raise ProtocolError(f"protocol=lodo needs at least 2 databases, the data holds "
                            f"{present}; use a composite (data=composite, or SynME) or "
                            "protocol=loso")
    return [_database_fold(samples, i, held, [d for d in present if d != held], [held],
                           val_subjects, seed) for i, held in enumerate(present)]


# ---------------------------------------------------------------------------------------------
# Training one fold (runs in a worker process or in-process)


def train_fold(samples: FlowSamples, fold: Fold, spec: dict, events=None) -> dict:
    """Train a fresh model on ``fold.train_idx`` and predict ``fold.test_idx``.

    Args:
        spec: plain dict with keys ``model`` ({name, lr, weight_decay, optimizer, kwargs}),
            ``trainer`` (kwargs for lightning.Trainer, incl. max_epochs), ``batch_size``,
            ``shuffle``, ``seed``, ``select`` ("last" or "val_uf1"), ``log_dir``.
        events: optional queue receiving ("epoch", fold name, epoch, max_epochs) tuples.

    Returns:
        {"fold", "probs" (n_test, K) float32, "seconds", "epochs"}.
    """
    import lightning as L
    import torch

    from mer.data.datamodule import SplitDataModule
    from mer.engine.build import build_module, uses_aus

    start = time.perf_counter()
    seed = int(spec["seed"]) + fold.index
    L.seed_everything(seed, workers=True, verbose=False)
    module = build_module(spec["model"], samples, fold.train_idx)
    dm = SplitDataModule(samples, fold.train_idx, fold.test_idx, fold.val_idx,
                         batch_size=spec["batch_size"], shuffle=spec["shuffle"], seed=seed,
                         with_aus=uses_aus(module))
    callbacks: list = []
    if events is not None:
        callbacks.append(_EpochEvents(events, fold.name))
    select_best = spec.get("select", "last") != "last" and len(fold.val_idx) > 0
    if select_best:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(
            dirpath=Path(spec["log_dir"]) / "checkpoints" / _safe(fold.name),
            monitor=spec["select"], mode="min" if spec["select"].endswith("loss") else "max",
        ))
    loggers = []
    if spec.get("log_dir"):
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(spec["log_dir"], name="folds", version=_safe(fold.name)))
    trainer_kwargs = dict(spec["trainer"])
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer = L.Trainer(
            logger=loggers or False, callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=select_best,
            limit_val_batches=1.0 if len(fold.val_idx) else 0, **trainer_kwargs,
        )
        trainer.fit(module, datamodule=dm)
        probs = trainer.predict(module, datamodule=dm, ckpt_path="best" if select_best else None)
    probs = torch.cat(probs).float().numpy()
    refuse_non_finite(probs, samples, fold.test_idx, f"fold {fold.name}")
    return {"fold": fold.name, "probs": probs, "seconds": time.perf_counter() - start,
            "epochs": trainer.current_epoch}


def _safe(name: str) -> str:
    return name.replace("/", "_")


class NonFiniteError(ValueError):
    """A model produced NaN or infinite outputs; nothing was scored."""


def refuse_non_finite(probs: np.ndarray, samples: FlowSamples, index: np.ndarray,
                      who: str, fix: str | None = None) -> None:
    """Raise :class:`NonFiniteError` (mer's own) if ``probs`` (n, K), predicted for
    ``samples`` at ``index`` (n,), holds NaN or inf, naming ``who`` (``fold synA/sub03``) and
    the first clips affected."""
    probs = np.asarray(probs)
    bad = ~np.isfinite(probs).all(axis=1) if probs.ndim == 2 else ~np.isfinite(probs)
    if not bad.any():
        return
    kind = "NaN" if np.isnan(probs).any() else "infinite"
    rows = np.asarray(index)[np.flatnonzero(bad)]
    meta = samples.meta.iloc[rows[:5]]
    clips = ", ".join(f"{d}/{s}/{c}" for d, s, c in
                      zip(meta["database"], meta["subject"], meta["clip"]))
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise NonFiniteError(
        f"{who} produced {kind} probabilities for clip {clips}{more} ({len(rows)} of "
        f"{len(probs)} test clips). "
        + (fix or "The model diverged: lower model.lr, check the training loss in the "
           "fold's log (logger=csv) and the input flow; nothing was scored."))


class _EpochEvents(Callback):
    """Sends ("epoch", fold, epoch, max_epochs) to a queue at the end of each training epoch."""

    def __init__(self, events, fold_name: str) -> None:
        self.events, self.fold_name = events, fold_name

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.events.put(("epoch", self.fold_name, trainer.current_epoch + 1, trainer.max_epochs))


# ---------------------------------------------------------------------------------------------
# Running all folds

_WORKER: dict = {}


def _init_worker(samples: FlowSamples, spec: dict, events, threads: int,
                 parent_pid: int | None = None) -> None:
    import torch

    prepare_worker(parent_pid)
    torch.set_num_threads(threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    _WORKER.update(samples=samples, spec=spec, events=events)


def _run_in_worker(fold: Fold) -> dict:
    return train_fold(_WORKER["samples"], fold, _WORKER["spec"], _WORKER["events"])


def resolve_workers(requested: int | str | None, n_folds: int) -> int:
    """``auto``/None/0 -> one worker per core (at most one per fold); otherwise the number asked."""
    if requested in (None, "auto", 0):
        requested = os.cpu_count() or 1
    return max(1, min(int(requested), n_folds))


def run_folds(
    samples: FlowSamples, folds: list[Fold], spec: dict, workers: int | str | None = "auto",
    show_progress: bool = True, done_dir: Path | None = None, resume: bool = False,
) -> list[dict]:
    """Train and predict every fold; results in fold order.

    ``workers == 1`` runs in this process; more runs a process pool, each worker with
    ``cores // workers`` torch threads. With ``done_dir`` each finished fold is saved there;
    with ``resume`` folds already saved for the same recipe are loaded instead of trained.
    SIGTERM (or any error) stops the workers at once; finished folds stay saved.

    Raises:
        CorruptFileError: a saved fold cannot be read back (named, with what to delete).
    """
    done = _load_done(done_dir, spec, folds) if resume and done_dir else {}
    todo = [f for f in folds if f.name not in done]
    n_workers = resolve_workers(workers, max(1, len(todo)))
    max_epochs = int(spec["trainer"].get("max_epochs", 1))

    def finished(result: dict, progress: _FoldProgress) -> None:
        done[result["fold"]] = result
        if done_dir:
            _save_done(done_dir, spec, result)
        progress.fold_done(result["fold"])

    if n_workers == 1 or not todo:
        with terminate_on_signal(), _FoldProgress(folds, max_epochs, enabled=show_progress,
                                                  done=len(done)) as progress:
            for fold in todo:
                finished(train_fold(samples, fold, spec, progress.events), progress)
        return [done[f.name] for f in folds]
    # fork shares the already imported torch/Lightning and the samples with the workers at no
    # cost; the pool is started before this process runs any thread of its own (progress).
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    with terminate_on_signal():
        pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(samples, spec, events, threads, os.getpid()))
        try:
            list(pool.map(_ready, range(n_workers)))
            with _FoldProgress(folds, max_epochs, enabled=show_progress,
                               done=len(done)) as progress:
                progress.listen(events)
                futures = [pool.submit(_run_in_worker, f) for f in todo]
                for fut in futures:
                    finished(fut.result(), progress)
        except BaseException:
            stop_pool(pool)  # never wait for the other folds: a SIGTERM or error ends them
            if done_dir:
                log.warning("stopped after %d of %d folds; those finished are saved in %s "
                            "(resume=true continues)", len(done), len(folds), done_dir)
            raise
        pool.shutdown()
    return [done[f.name] for f in folds]


def _recipe_key(spec: dict) -> str:
    recipe = {k: v for k, v in spec.items() if k != "log_dir"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _save_done(done_dir: Path, spec: dict, result: dict) -> None:
    """``<done_dir>/<fold>.npz``: the fold's probabilities and recipe, atomically, with a
    checksum (a SIGTERM or full disk mid-write leaves no file, never half of one)."""
    path = Path(done_dir) / f"{_safe(result['fold'])}.npz"
    atomic_save({"probs": result["probs"], "seconds": result["seconds"],
                 "epochs": result["epochs"], "fold": result["fold"],
                 "recipe": _recipe_key(spec)}, path, kind="npz")


def _load_done(done_dir: Path, spec: dict, folds: list[Fold]) -> dict[str, dict]:
    """Folds saved by an earlier, interrupted run of the same recipe."""
    key, done = _recipe_key(spec), {}
    for fold in folds:
        path = Path(done_dir) / f"{_safe(fold.name)}.npz"
        if not path.exists():
            continue
        fix = ("delete it and rerun with resume=true: that fold is trained again, the other "
               "saved folds are kept")
        f = checked_load(path, kind="npz", what=f"saved fold {fold.name}", fix=fix)
        missing = {"probs", "seconds", "epochs", "recipe"} - set(f)
        if missing:
            raise CorruptFileError(f"saved fold {fold.name} {path} lacks {sorted(missing)}; "
                                   f"{fix}")
        if "fold" in f and str(f["fold"]) != fold.name:
            raise CorruptFileError(f"{path} holds fold {str(f['fold'])!r}, not {fold.name!r} "
                                   f"(a file copied or renamed by hand); {fix}")
        if str(f["recipe"]) != key or len(f["probs"]) != len(fold.test_idx):
            log.warning("not resuming fold %s: %s was saved by a different recipe (config "
                        "changed); training it again", fold.name, path)
            continue
        done[fold.name] = {"fold": fold.name, "probs": f["probs"],
                           "seconds": float(f["seconds"]), "epochs": int(f["epochs"]),
                           "resumed": True}
    return done


def _ready(_: int) -> bool:
    return True


class _FoldProgress:
    """A rich display: overall folds, plus one epoch bar per running fold."""

    def __init__(self, folds: list[Fold], max_epochs: int, enabled: bool = True,
                 done: int = 0) -> None:
        self.enabled, self.max_epochs = enabled, max_epochs
        self.n_folds, self.done = len(folds), done
        self.events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: dict[str, int] = {}

    def __enter__(self) -> _FoldProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
            self.progress.start()
            self.total = self.progress.add_task("folds", total=self.n_folds,
                                                completed=self.done)
        self.listen(self.events)
        return self

    def listen(self, events) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(events, self._stop),
                                        daemon=True)
        self._thread.start()

    def _drain(self, events, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                _, name, epoch, total = events.get(timeout=0.1)
            except (queue.Empty, EOFError, OSError):
                continue
            if self.enabled:
                if name not in self._bars:
                    self._bars[name] = self.progress.add_task(f"  {name} epochs", total=total)
                self.progress.update(self._bars[name], completed=epoch)

    def fold_done(self, name: str) -> None:
        if self.enabled:
            self.progress.advance(self.total)
            if name in self._bars:
                self.progress.remove_task(self._bars.pop(name))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.enabled:
            self.progress.stop()
