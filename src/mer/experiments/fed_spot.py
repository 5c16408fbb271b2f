"""Federated spotting: a learned spotter trained by mer's federated loop, one lab per
long-video database.

``python -m mer.run +experiment=fed_spot`` (``run_fed_spot``). Each lab (a database of the
data config: CAS(ME)^2-like and SAMM-LV-like on SynME-LV) keeps its long videos and splits its
subjects into training and test (``fed_spot.test_fraction``, seeded by the database name, so
a lab's split does not depend on the others). The federated part is
:func:`mer.federated.loop.run_federated` with the spotting task
(:class:`mer.spotting.federated.SpotTask`): the configured rule (``federated=fedavg |
fedprox | fedbn | scaffold | fednova | ...``), privacy (``privacy=secagg | ckks``), faults,
``federated.rounds`` x ``federated.local_epochs`` and checkpoint/resume (``resume=true``)
apply as for recognition. The set-up round (initial model, interval lengths), the threshold
round (per candidate threshold and type, each lab's ``(TP, predictions, ground truths)`` on
its validation subjects) and the scoring (each lab's MEGC counts on its test subjects) are
sums over the labs: protected under secure aggregation, so the server never holds a video,
score, interval or one lab's counts.

With ``fed_spot.baselines``: the same spotter trained pooled (centralised, all labs' training
videos) and local-only (each lab alone, its own thresholds), ``rounds * local_epochs``
epochs, scored on the same test splits. Outputs: results.json (MEGC tables per model:
pooled over labs, and per lab where the labs disclose them), intervals.csv (each lab's own
annotated intervals, written here as each lab would), ``federated_state.pt`` (the loop's
checkpoint).
"""

from __future__ import annotations

import json
import math
import platform
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from mer.config_check import check_clients
from mer.config_rules import ConfigError
from mer.data.io import atomic_write_text, atomic_write_with
from mer.federated.loop import run_federated
from mer.spotting.federated import SpotTask
from mer.spotting.matching import evaluate
from mer.spotting.registry import create_spotter
from mer.spotting.runner import gt_table
from mer.spotting.videos import SpotVideo, load_videos


def lab_splits(videos: list[SpotVideo], test_fraction: float, seed: int
               ) -> dict[str, tuple[list[SpotVideo], list[SpotVideo]]]:
    """``{database: (train videos, test videos)}``: per lab ``ceil(test_fraction * subjects)``
    test subjects (at least 1, at most all but 1), drawn with a generator seeded by (seed, the
    database name)."""
    out = {}
    for db in sorted({v.database for v in videos}):
        mine = [v for v in videos if v.database == db]
        keys = sorted({v.subject_key for v in mine})
        if len(keys) < 2:
            raise ValueError(f"lab {db}: {len(keys)} subject; a lab needs 2 or more (one to "
                             "train, one to test)")
        n = min(len(keys) - 1, max(1, math.ceil(test_fraction * len(keys))))
        rng = np.random.default_rng([seed, zlib.crc32(db.encode())])
        test = set(rng.choice(keys, size=n, replace=False).tolist())
        out[db] = ([v for v in mine if v.subject_key not in test],
                   [v for v in mine if v.subject_key in test])
    return out


def baseline(spotter_cfg: dict, videos: list[SpotVideo], epochs: int, seed: int):
    """A spotter trained centrally on ``videos`` for ``epochs``, its network initialised from
    ``seed`` (not from whatever state earlier work left the global generator in)."""
    torch.manual_seed(seed)
    return create_spotter({**spotter_cfg, "epochs": epochs}, seed=seed).fit(videos)


def _score(spotter, tests: dict[str, list[SpotVideo]], gt: pd.DataFrame, model: str
           ) -> tuple[pd.DataFrame, dict]:
    videos = [v for vs in tests.values() for v in vs]
    preds = pd.concat([spotter[v.database].spot(v) if isinstance(spotter, dict) else
                       spotter.spot(v) for v in videos], ignore_index=True)
    rows = pd.DataFrame({"video": [v.video for v in videos],
                         "database": [v.database for v in videos]})
    annotated, table = evaluate(preds, gt[gt["video"].isin(set(rows["video"]))], rows)
    return annotated.assign(model=model), table


def run_fed_spot(cfg: DictConfig, run_dir: Path) -> dict:
    """Federated spotting with its baselines; writes results.json and intervals.csv."""
    run_dir = Path(run_dir)
    fs = cfg.fed_spot
    spotter_cfg = OmegaConf.to_container(fs.spotter, resolve=True)
    seed = int(cfg.seed)
    t0 = time.perf_counter()
    videos, provenance = load_videos(cfg.data, cfg.paths.cache_dir)
    splits = lab_splits(videos, float(fs.get("test_fraction", 0.3)), seed)
    gt = gt_table(videos)
    tests = {db: test for db, (_, test) in splits.items()}
    task = SpotTask(spotter_cfg, splits, seed)
    problems = task.problems(cfg)
    if problems:
        raise ConfigError(problems)
    check_clients(cfg, list(task.labs), "one lab per long-video database (fed_spot)")
    fed = run_federated(cfg, None, task.clients, checkpoint_dir=run_dir,
                        show_progress=bool(cfg.get("progress", True)), task=task)
    final = fed["final"]
    table = {"overall": final["pooled_global"],
             "per_database": {db: r["global"] for db, r in final["per_client"].items()}}
    models = {"federated": {
        "megc": table, "params": fed["statistics"], "rounds": fed["rounds"],
        "personalised": final["pooled_personalised"], "clients": fed["clients"],
        "counts": fed["counts"], "privacy": fed["privacy"],
        "resumed_after_round": fed["resumed_after_round"]}}
    frames = [pd.concat(task.lab_intervals.get("global", {}).values(), ignore_index=True)
              .assign(model="federated")] if task.lab_intervals.get("global") else []
    if fs.get("baselines", True):
        epochs = int(cfg.federated.rounds) * int(cfg.federated.local_epochs)
        pooled_sp = baseline(spotter_cfg, [v for tr, _ in splits.values() for v in tr], epochs,
                             seed)
        a, t = _score(pooled_sp, tests, gt, "pooled")
        models["pooled"] = {"megc": t, "params": pooled_sp.params}
        frames.append(a)
        local = {db: baseline(spotter_cfg, train, epochs, seed)
                 for db, (train, _) in splits.items()}
        a, t = _score(local, tests, gt, "local")
        models["local"] = {"megc": t, "params": {db: s.params for db, s in local.items()}}
        frames.append(a)
    results = {
        "name": cfg.name, "synthetic": bool(provenance.get("synthetic")),
        "spotter": spotter_cfg["name"], "rule": str(cfg.federated.rule.name),
        "privacy": fed["privacy"]["name"], "models": models,
        "labs": {db: {"train_subjects": sorted({v.subject_key for v in tr}),
                      "test_subjects": sorted({v.subject_key for v in te})}
                 for db, (tr, te) in splits.items()},
        "data": {k: v for k, v in provenance.items()},
        "timings": {"total_s": time.perf_counter() - t0},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results["headline"] = float((table["overall"].get("all") or {}).get("f1") or 0.0)
    text = json.dumps(results, indent=2, default=str)
    intervals = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    atomic_write_with(run_dir / "intervals.csv",
                      lambda f: f.write(intervals.to_csv(index=False).encode("utf-8")))
    atomic_write_text(run_dir / "results.json", text)
    _print(results, run_dir)
    return results


def _print(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    tag = " [bold yellow](SYNTHETIC data)[/]" if results["synthetic"] else ""
    t = Table(title=f"{results['name']}: federated spotting ({results['spotter']}, "
                    f"{results['rule']}, privacy {results['privacy']}), MEGC F1 on the labs' "
                    f"test subjects{tag}")
    for col in ("model", "scope", "micro F1", "macro F1", "all F1"):
        t.add_column(col)
    for model, m in results["models"].items():
        for scope, c in [("pooled", m["megc"]["overall"])] + list(
                m["megc"]["per_database"].items()):
            t.add_row(model, scope, *(("-" if (c.get(k) or {}).get("f1") is None else
                                       f"{c[k]['f1']:.4f}") for k in ("micro", "macro", "all")))
    Console().print(t)
    Console().print(f"outputs: {run_dir}")

