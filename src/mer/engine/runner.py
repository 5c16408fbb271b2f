"""A recognition experiment end to end: data -> protocol folds -> pooled metrics -> outputs.

Centralised protocols only (LOSO, cross-database, LODO): the federated experiment is
:mod:`mer.federated.runner`."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.generate.augment import fold_augmenter, generated_summary
from mer.data.samples import FlowSamples
from mer.data.sources import load_samples
from mer.engine.build import prepare_inputs
from mer.engine.protocols import (
    Fold,
    ProtocolError,
    augment_folds,
    cross_db_folds,
    lodo_folds,
    loso_folds,
    refuse_non_finite,
    run_folds,
)
from mer.engine.report import score_predictions, write_outputs

log = logging.getLogger(__name__)


PROTOCOLS = ("loso", "cross_db", "lodo")


def _all_folds(samples: FlowSamples, protocol: DictConfig, seed: int) -> list[Fold]:
    """Every fold of ``protocol.name``: ``loso`` (one per subject), ``cross_db`` (one:
    ``protocol.train`` -> ``protocol.test``), ``lodo`` (one per database)."""
    val = protocol.get("val_subjects") or 0
    if protocol.name == "loso":
        return loso_folds(samples, val_subjects=val, seed=seed)
    if protocol.name == "cross_db":
        def names(key: str) -> list[str] | None:
            value = protocol.get(key)
            if value is None:
                return None
            return [str(value)] if isinstance(value, str) else [str(v) for v in value]

        return cross_db_folds(samples, names("train"), names("test"), val_subjects=val,
                              seed=seed)
    if protocol.name == "lodo":
        return lodo_folds(samples, val_subjects=val, seed=seed)
    raise ProtocolError(f"unknown protocol '{protocol.name}': use one of {list(PROTOCOLS)} "
                        "(protocol=loso|cross_db|lodo)")


def protocol_total_folds(samples: FlowSamples, protocol: DictConfig) -> int:
    """How many folds the whole protocol has (subjects for LOSO, databases for LODO, 1 for
    cross_db), whatever ``protocol.fold_index`` selects."""
    if protocol.name == "lodo":
        return int(samples.meta["database"].nunique())
    if protocol.name == "cross_db":
        return 1
    return int(samples.meta["subject_key"].nunique())


def make_folds(samples: FlowSamples, protocol: DictConfig, seed: int) -> list[Fold]:
    """The folds a protocol config asks for."""
    if protocol.select != "last" and not protocol.val_subjects:
        raise ProtocolError(
            f"protocol.select={protocol.select} needs validation subjects carved from the "
            "training subjects: set protocol.val_subjects (e.g. 0.2). Selecting on the test "
            "fold is not offered."
        )
    folds = _all_folds(samples, protocol, seed)
    chosen = protocol.get("fold_index")
    if chosen is not None:
        chosen = [int(chosen)] if isinstance(chosen, int | str) else [int(i) for i in chosen]
        bad = [i for i in chosen if not 0 <= i < len(folds)]
        if bad:
            raise ProtocolError(f"protocol.fold_index {bad} out of range: {len(folds)} folds "
                                f"(0..{len(folds) - 1})")
        folds = [folds[i] for i in chosen]
    empty = [f.name for f in folds if len(f.val_idx) == 0]
    if protocol.select != "last" and empty:  # it would silently use the last epoch
        raise ProtocolError(
            f"protocol.select={protocol.select}: fold '{empty[0]}'"
            f"{f' and {len(empty) - 1} more' if len(empty) > 1 else ''} would get no "
            f"validation subject (protocol.val_subjects={protocol.val_subjects} of its "
            "training subjects rounds to 0): raise protocol.val_subjects (a count, e.g. 2, "
            "or a larger fraction) or use protocol.select=last")
    return folds


def _database_sides(samples: FlowSamples, folds: list[Fold], name: str) -> dict:
    """For the cross-database protocols: each fold's training and test databases."""
    if name == "loso":
        return {}
    db = samples.meta["database"].to_numpy()
    return {"train_databases": {f.name: sorted(set(db[f.train_idx])) for f in folds},
            "test_databases": {f.name: sorted(set(db[f.test_idx])) for f in folds}}


def training_spec(cfg: DictConfig, log_dir: Path | None) -> dict:
    """The plain-dict training recipe sent to fold workers."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "batch_size": int(cfg.data.batch_size),
        "shuffle": bool(cfg.data.shuffle),
        "seed": int(cfg.seed),
        "select": cfg.protocol.select,
        "log_dir": str(log_dir) if log_dir else None,
    }


def pooled_predictions(
    samples: FlowSamples, folds: list[Fold], results: list[dict]
) -> pd.DataFrame:
    """One row per test sample over all folds: ids, fold, label, prediction, probabilities.

    Raises ValueError naming the fold and clips if a fold's probabilities (trained now or
    resumed from ``folds_done/``) are not finite: a NaN is never scored."""
    rows = []
    for fold, res in zip(folds, results):
        meta = samples.meta.iloc[fold.test_idx]
        probs = res["probs"]
        refuse_non_finite(probs, samples, fold.test_idx, f"fold {fold.name}", fix=(
            "The model diverged: lower model.lr, check the training loss in the fold's log; "
            "a fold resumed from folds_done/ is retrained after deleting its file there. "
            "Nothing was scored.") if res.get("resumed") else None)
        df = pd.DataFrame({
            "subject": meta["subject"].to_numpy(), "clip": meta["clip"].to_numpy(),
            "database": meta["database"].to_numpy(), "fold": fold.name,
            "label": meta["label"].to_numpy(), "prediction": probs.argmax(1),
            "generated": meta["generated"].to_numpy(bool) if "generated" in meta else False,
        })
        for k, name in enumerate(samples.class_names):
            df[f"p_{name}"] = probs[:, k]
        rows.append(df)
    return pd.concat(rows, ignore_index=True)


def run_recognition(cfg: DictConfig, run_dir: Path) -> dict:
    """Run a recognition protocol and write results.json, predictions.csv, the confusion PNG."""
    t0 = time.perf_counter()
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    folds = make_folds(samples, cfg.protocol, int(cfg.seed))
    # data.augment.generate=K: generated training sequences per fold (none by default)
    samples, folds = augment_folds(samples, folds, fold_augmenter(
        cfg.data, cfg.paths.cache_dir, int(cfg.seed), progress=bool(cfg.progress)))
    # the model's named inputs and pretraining data, made once here, not in every fold worker
    prepare_inputs(OmegaConf.to_container(cfg.model, resolve=True), samples)
    t_data = time.perf_counter() - t0
    total_folds = protocol_total_folds(samples, cfg.protocol)
    spec = training_spec(cfg, run_dir / "logs")
    t1 = time.perf_counter()
    fold_results = run_folds(samples, folds, spec, workers=cfg.protocol.workers,
                             show_progress=bool(cfg.progress), done_dir=run_dir / "folds_done",
                             resume=bool(cfg.resume))
    t_train = time.perf_counter() - t1
    predictions = pooled_predictions(samples, folds, fold_results)
    metrics = score_predictions(predictions, samples.class_names)
    results = {
        "name": cfg.name,
        "synthetic": samples.synthetic,
        "metrics": metrics,
        "data": {
            **samples.provenance, "synthetic": samples.synthetic,
            "n_samples": int((~samples.meta["generated"].to_numpy(bool)).sum())
            if "generated" in samples.meta else len(samples.meta),
            "n_subjects": int(samples.meta["subject_key"].nunique()),
            "class_names": samples.class_names,
            "class_counts": {
                db: {samples.class_names[k]: int(v) for k, v in
                     g["label"].value_counts().sort_index().items()}
                for db, g in samples.meta[~samples.meta.get(
                    "generated", pd.Series(False, index=samples.meta.index)).astype(bool)
                ].groupby("database")
            },
            "excluded": samples.excluded,
        },
        "protocol": {"name": cfg.protocol.name, "folds": len(folds), "total_folds": total_folds,
                     "partial": len(folds) < total_folds,
                     "selection": cfg.protocol.select, "val_subjects": cfg.protocol.val_subjects,
                     "resumed_folds": [r["fold"] for r in fold_results if r.get("resumed")],
                     **_database_sides(samples, folds, cfg.protocol.name)},
        "timings": {"data_s": t_data, "train_s": t_train,
                    "folds_s": {r["fold"]: r["seconds"] for r in fold_results}},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if samples.pretrain is not None:  # model.pretrain: what each fold pretrained on
        results["pretrain"] = {**samples.pretrain.provenance,
                               "n_samples": len(samples.pretrain.meta),
                               "class_names": samples.pretrain.class_names,
                               "per_fold": "without the fold's test and validation subjects"}
    if "generated" in samples.meta:  # generated.csv: each one, its source, drivers, folds
        results["generated"] = generated_summary(samples, folds, run_dir / "generated.csv")
    write_outputs(run_dir, results, predictions, samples.class_names)
    _log_wandb(cfg, run_dir, results)
    _print_summary(results, run_dir)
    return results


def _print_summary(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["metrics"]
    tag = " [bold yellow](SYNTHETIC data)[/]" if results["synthetic"] else ""
    table = Table(title=f"{results['name']}: {results['protocol']['name']} "
                        f"({results['protocol']['folds']} folds){tag}")
    for col in ("scope", "n", "UF1", "UAR", "accuracy"):
        table.add_column(col)
    rows = [("overall", m["overall"])] + list(m["per_database"].items())
    for scope, s in rows:
        table.add_row(scope, str(s["n"]), f"{s['uf1']:.4f}", f"{s['uar']:.4f}",
                      f"{s['accuracy']:.4f}")
    console = Console()
    console.print(table)
    for scope, s in rows:
        if s.get("absent_classes"):
            console.print(f"[bold yellow]warning[/]: {scope}: no test sample of class "
                          f"{', '.join(s['absent_classes'])} (absent from the ground truth): "
                          "UF1/UAR average over the classes present in labels or predictions")
    console.print(f"outputs: {run_dir}")


def _log_wandb(cfg: DictConfig, run_dir: Path, results: dict) -> None:
    wb = cfg.logger.get("wandb")
    if not wb:
        return
    import wandb

    run = wandb.init(project=wb.project, group=wb.group, name=f"{cfg.name}-{run_dir.name}",
                     mode=wb.mode, dir=str(run_dir), job_type=wb.get("job_type", "loso"),
                     config=results["config"], tags=list(wb.get("tags", [])) +
                     (["synthetic"] if results["synthetic"] else []))
    overall = results["metrics"]["overall"]
    run.summary.update({"uf1": overall["uf1"], "uar": overall["uar"],
                        "accuracy": overall["accuracy"], "synthetic": results["synthetic"]})
    for db, s in results["metrics"]["per_database"].items():
        run.summary.update({f"{db}/uf1": s["uf1"], f"{db}/uar": s["uar"]})
    folds = results["metrics"]["per_fold"]
    run.log({"folds": wandb.Table(columns=["fold", "n", "uf1", "uar", "accuracy"], data=[
        [f, s["n"], s["uf1"], s["uar"], s["accuracy"]] for f, s in folds.items()])})
    run.log({"confusion_matrix": wandb.Image(str(run_dir / "confusion_matrix.png"))})
    run.finish()
