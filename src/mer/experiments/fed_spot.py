"""Federated spotting: a learned spotter trained by FedAvg, one lab per long-video database.

``python -m mer.run +experiment=fed_spot`` (``run_fed_spot``). Each lab (a database of the
data config: CAS(ME)^2-like and SAMM-LV-like on SynME-LV) keeps its long videos and splits its
subjects into training and test (``fed_spot.test_fraction``, seeded by the database name, so
a lab's split does not depend on the others). Then:

1. **Set-up**: every lab builds the spotter's network from the same seed on its own training
   videos; what the network keeps of its data (the per-channel feature scale, MESFusion's flow
   scale: buffers) differs, and the server starts from the FedAvg of these initial states
   (identical parameters, size-weighted mean statistics). The expected interval lengths are
   the size-weighted mean of the labs' medians.
2. **Rounds** (``fed_spot.rounds``): each lab loads the global weights, trains
   ``local_epochs`` on its training videos (fresh Lightning Trainer, ``mer.spotting.module``)
   and returns its weights and window count; the server drops non-finite updates
   (``aggregators.check_updates``) and takes the FedAvg (``aggregators.fedavg``).
3. **Thresholds**: each lab scores its own validation subjects (carved from its training
   subjects) with the final global model and sends, per candidate threshold and type, only
   the counts ``(TP, predictions, ground truths)``; the server sums them and picks the best
   pooled F1 (``mer.spotting.base.best_thresholds``). Never a video, score or interval.
4. **Scoring**: each lab spots its test videos; MEGC tables per lab and pooled. With
   ``fed_spot.baselines``: the same spotter trained pooled (centralised, all labs' training
   videos) and local-only (each lab alone, its own thresholds), scored on the same test splits.

Why not ``mer.federated.loop``: its ``FederatedRun`` is built for recognition. The hooks it
lacks for a spotter are: (a) client data that is not an index set of ``FlowSamples``
(``ClientData.train_idx/test_idx`` + ``SplitDataModule`` of (x, y) tensors) -- a
``make_datamodule(client)`` hook; (b) a module factory other than ``engine.build.build_module``
from ``cfg.model`` (which needs ``FlowSamples.num_classes``) -- a ``build_module(client)``
hook; (c) an evaluation other than UF1/UAR of argmax predictions
(``recognition_metrics``) -- a ``score(client, module) -> dict`` hook with a pooling rule
(MEGC counts are summed, not averaged); (d) a post-training round of statistics (the
threshold counts). With those four hooks the loop's rules, privacy and faults would apply to
spotting unchanged; here the smallest thing that works is FedAvg over the spotter modules'
state dicts with the loop's own pure functions (``mer.federated.aggregators``).
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

from mer.data.io import atomic_write_text, atomic_write_with
from mer.federated import aggregators
from mer.spotting.base import best_thresholds, split_subjects, threshold_counts
from mer.spotting.matching import evaluate
from mer.spotting.registry import create_spotter
from mer.spotting.runner import gt_table
from mer.spotting.videos import SpotVideo, expected_lengths, load_videos


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


def _weights(spotter) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in spotter.module.net.state_dict().values()]


def _load(spotter, weights: list[np.ndarray]) -> None:
    state = spotter.module.net.state_dict()
    spotter.module.net.load_state_dict({k: torch.as_tensor(w).to(v.dtype).reshape(v.shape)
                                        for (k, v), w in zip(state.items(), weights)})


def _pooled_lengths(labs: dict[str, list[SpotVideo]]) -> dict:
    """Size-weighted mean of the labs' median durations per type (what each lab shares)."""
    per_lab = {db: expected_lengths(vids) for db, vids in labs.items()}
    out = {}
    for kind in ("micro", "macro"):
        n = sum(p[kind]["n"] for p in per_lab.values())
        if n == 0:
            out[kind] = next(iter(per_lab.values()))[kind]
            continue
        out[kind] = {k: sum(p[kind][k] * p[kind]["n"] for p in per_lab.values()) / n
                     for k in ("before_s", "after_s")} | {"n": n}
    return out


def federated_spotter(spotter_cfg: dict, splits: dict, rounds: int, local_epochs: int,
                      seed: int) -> tuple[object, list[dict]]:
    """Train one spotter by FedAvg over the labs (module docstring, steps 1-3)."""
    labs = {}
    for db, (train, _) in splits.items():
        sp = create_spotter(spotter_cfg, seed=seed)
        if not getattr(sp, "learned", False):
            raise ValueError(f"fed_spot.spotter.name={sp.name}: federated spotting trains a "
                             "learned spotter (apex_score, mesfusion, me_tst)")
        prepared = [sp.prepare(v) for v in train]
        fit, val = split_subjects(prepared, sp.val_subjects, seed)
        torch.manual_seed(seed)
        sp.setup(fit)
        labs[db] = {"spotter": sp, "fit": fit, "val": val or fit}
    names = list(labs)
    lengths = _pooled_lengths({db: lab["fit"] for db, lab in labs.items()})
    sizes = [sum(v.length for v in labs[db]["fit"]) for db in names]
    global_w = aggregators.fedavg([(_weights(labs[db]["spotter"]), n)
                                   for db, n in zip(names, sizes)])
    history = []
    for r in range(1, rounds + 1):
        results, losses = [], {}
        for db in names:
            sp = labs[db]["spotter"]
            _load(sp, global_w)
            summary = sp.train_epochs(labs[db]["fit"], local_epochs, seed=seed * 1000 + r)
            results.append((_weights(sp), int(summary["windows"])))
            losses[db] = summary["final_loss"]
        kept, excluded = aggregators.check_updates(results, names, reference=global_w)
        global_w = aggregators.fedavg(kept)
        history.append({"round": r, "train_loss": losses, "excluded": excluded})
    server = labs[names[0]]["spotter"]
    _load(server, global_w)
    server.lengths = lengths
    totals = {}
    for db in names:  # each lab's counts on its own validation subjects, summed
        counts = threshold_counts(server, labs[db]["val"])
        totals = {k: totals.get(k, 0) + c for k, c in counts.items()}
    server.thresholds, selection = best_thresholds(server.candidates, totals)
    server.params = {"lengths": lengths, "thresholds": server.thresholds,
                     "selection": selection, "rounds": rounds, "local_epochs": local_epochs}
    server.fitted = True
    return server, history


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
    fed, history = federated_spotter(spotter_cfg, splits, int(fs.rounds),
                                     int(fs.local_epochs), seed)
    annotated, table = _score(fed, tests, gt, "federated")
    models = {"federated": {"megc": table, "params": fed.params, "rounds": history}}
    frames = [annotated]
    if fs.get("baselines", True):
        epochs = int(fs.rounds) * int(fs.local_epochs)
        pooled_sp = create_spotter({**spotter_cfg, "epochs": epochs}, seed=seed)
        pooled_sp.fit([v for train, _ in splits.values() for v in train])
        a, t = _score(pooled_sp, tests, gt, "pooled")
        models["pooled"] = {"megc": t, "params": pooled_sp.params}
        frames.append(a)
        local = {db: create_spotter({**spotter_cfg, "epochs": epochs}, seed=seed).fit(train)
                 for db, (train, _) in splits.items()}
        a, t = _score(local, tests, gt, "local")
        models["local"] = {"megc": t, "params": {db: s.params for db, s in local.items()}}
        frames.append(a)
    results = {
        "name": cfg.name, "synthetic": bool(provenance.get("synthetic")),
        "spotter": spotter_cfg["name"], "models": models,
        "labs": {db: {"train_subjects": sorted({v.subject_key for v in tr}),
                      "test_subjects": sorted({v.subject_key for v in te})}
                 for db, (tr, te) in splits.items()},
        "data": {k: v for k, v in provenance.items()},
        "timings": {"total_s": time.perf_counter() - t0},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results["headline"] = float(table["overall"]["all"]["f1"] or 0.0)
    text = json.dumps(results, indent=2, default=str)
    intervals = pd.concat(frames, ignore_index=True)
    atomic_write_with(run_dir / "intervals.csv",
                      lambda f: f.write(intervals.to_csv(index=False).encode("utf-8")))
    atomic_write_text(run_dir / "results.json", text)
    _print(results, run_dir)
    return results


def _print(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    tag = " [bold yellow](SYNTHETIC data)[/]" if results["synthetic"] else ""
    t = Table(title=f"{results['name']}: federated spotting ({results['spotter']}), "
                    f"MEGC F1 on the labs' test subjects{tag}")
    for col in ("model", "scope", "micro F1", "macro F1", "all F1"):
        t.add_column(col)
    for model, m in results["models"].items():
        for scope, c in [("pooled", m["megc"]["overall"])] + list(
                m["megc"]["per_database"].items()):
            t.add_row(model, scope, *(("-" if c[k]["f1"] is None else f"{c[k]['f1']:.4f}")
                                      for k in ("micro", "macro", "all")))
    Console().print(t)
    Console().print(f"outputs: {run_dir}")

