"""A spotting experiment end to end: long videos -> LOSO per spotter -> MEGC tables -> outputs.

``run_spotting(cfg, run_dir)``: every spotter of ``cfg.spotters`` (or the single
``cfg.spotting``) is run leave-one-subject-out on the long videos of ``cfg.data``: for each
subject, the spotter is fitted on the other subjects' videos (weights, thresholds, peak
parameters: :meth:`mer.spotting.base.Spotter.fit`) and spots that subject's videos. The
predictions of all folds are matched and scored once (:mod:`mer.spotting.matching`). With
``cfg.strs`` set, the spotted true positives are also recognised (:mod:`mer.spotting.strs`).

Outputs in ``run_dir`` (each written atomically, ``results.json`` last):

- ``intervals.csv``: one row per predicted interval: spotter, fold, database, subject, video,
  onset, apex, offset, score, type, matched ground truth (``gt_onset``/``gt_offset``, -1
  when none), IoU, ``TP``/``FP``;
- ``ground_truth.csv``: one row per annotated interval and whether each spotter found it;
- ``timelines/<video>.png``: per video, each spotter's score curves, the ground-truth and the
  predicted intervals (TP green, FP grey);
- ``results.json``: the MEGC table per spotter (overall, per database, per video; micro,
  macro, all), what each fold chose on its training subjects, timings, data provenance with
  ``"synthetic": true|false``, intervals excluded with the reason; STRS when asked;
- ``folds_done/``: each finished (spotter, fold), reused with ``resume=true``.
"""

from __future__ import annotations

import json
import logging
import pickle
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.io import atomic_write_bytes, atomic_write_text, atomic_write_with
from mer.spotting.matching import evaluate
from mer.spotting.registry import create_spotter, list_spotters
from mer.spotting.videos import SpotVideo, load_videos

log = logging.getLogger(__name__)


class SpottingConfigError(ValueError):
    """A spotting config that cannot run (no spotter, unknown spotter, bad fold index...)."""


def spotter_configs(cfg: DictConfig) -> dict[str, dict]:
    """``{label: spotter settings}`` from ``cfg.spotters`` (several) or ``cfg.spotting``."""
    node = cfg.get("spotters") or ({"spotting": cfg.spotting} if cfg.get("spotting") else None)
    if not node:
        raise SpottingConfigError("no spotter configured: use +experiment=spot_synme or "
                                  f"spotting=<one of {list_spotters()}>")
    out = {}
    for label, sc in node.items():
        sc = OmegaConf.to_container(sc, resolve=True) if isinstance(sc, DictConfig) else dict(sc)
        name = sc.get("name")
        if name not in list_spotters():
            raise SpottingConfigError(f"spotters.{label}.name={name}: unknown spotter; use one "
                                      f"of {list_spotters()} (conf/spotting/)")
        out[str(name if label == "spotting" else label)] = sc
    return out


def loso_folds(videos: list[SpotVideo], fold_index=None) -> list[tuple[str, list[int]]]:
    """``[(subject key, indices of its videos)]``, one fold per subject (sorted), optionally
    only the folds ``fold_index`` (an int or a list) names."""
    keys = sorted({v.subject_key for v in videos})
    if len(keys) < 2:
        raise SpottingConfigError(f"leave-one-subject-out needs 2 subjects or more; the data "
                                  f"has {keys}")
    folds = [(k, [i for i, v in enumerate(videos) if v.subject_key == k]) for k in keys]
    if fold_index is None:
        return folds
    chosen = [int(fold_index)] if isinstance(fold_index, int | str) else \
        [int(i) for i in fold_index]
    bad = [i for i in chosen if not 0 <= i < len(folds)]
    if bad:
        raise SpottingConfigError(f"spot.fold_index {bad} out of range: {len(folds)} folds "
                                  f"(0..{len(folds) - 1})")
    return [folds[i] for i in chosen]


def gt_table(videos: list[SpotVideo]) -> pd.DataFrame:
    """Every ground truth with ``video, database, subject`` and a unique ``gt_id``."""
    rows = [v.gt.assign(video=v.video, database=v.database, subject=v.subject)
            for v in videos if len(v.gt)]
    gt = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["video", "database", "subject", "onset", "apex", "offset", "type", "emotion"])
    gt.index.name = "gt_id"
    return gt


def run_fold(spotter_cfg: dict, seed: int, train: list[SpotVideo], test: list[SpotVideo],
             strs_cfg: dict | None = None) -> dict:
    """Fit one spotter on ``train`` and spot ``test``: predictions, score curves, params;
    with ``strs_cfg`` also a recogniser trained on ``train`` (its predictions are made
    after matching, in :func:`run_spotting`)."""
    t0 = time.perf_counter()
    spotter = create_spotter(spotter_cfg, seed=seed).fit(train)
    t1 = time.perf_counter()
    preds, curves = [], {}
    for v in test:
        rv, s = spotter.scores(v)
        preds.append(spotter.intervals(rv, s, spotter.thresholds))
        curves[v.video] = {"frames": rv.frame_numbers, "scores": s.astype(np.float32)}
    t2 = time.perf_counter()
    out = {"predictions": pd.concat(preds, ignore_index=True), "curves": curves,
           "params": _jsonable(spotter.params), "fit_s": t1 - t0, "spot_s": t2 - t1,
           "test_positions": int(sum(len(c["frames"]) for c in curves.values())),
           "test_frames": int(sum(v.length for v in test))}
    if strs_cfg:
        from mer.spotting.strs import make_recogniser

        recogniser = make_recogniser(strs_cfg, spotter, seed)
        out["recogniser"] = recogniser.fit(train)
        out["_recogniser"] = recogniser
    return out


def run_spotting(cfg: DictConfig, run_dir: Path) -> dict:
    """Run every configured spotter LOSO and write the outputs (module docstring)."""
    from rich.progress import Progress

    run_dir = Path(run_dir)
    spot = cfg.get("spot") or {}
    if spot.get("threads"):
        import torch

        torch.set_num_threads(int(spot.get("threads")))
    t0 = time.perf_counter()
    videos, provenance = load_videos(cfg.data, cfg.paths.cache_dir)
    t_data = time.perf_counter() - t0
    spotters = spotter_configs(cfg)
    folds = loso_folds(videos, spot.get("fold_index"))
    strs_cfg = OmegaConf.to_container(cfg.strs, resolve=True) if cfg.get("strs") else None
    if strs_cfg and strs_cfg.get("spotter") not in spotters:
        raise SpottingConfigError(f"strs.spotter={strs_cfg.get('spotter')}: not among the "
                                  f"configured spotters {sorted(spotters)}")
    done_dir = run_dir / "folds_done"
    gt = gt_table(videos)
    tested = sorted({i for _, idx in folds for i in idx})
    video_rows = pd.DataFrame({"video": [videos[i].video for i in tested],
                               "database": [videos[i].database for i in tested]})
    eval_gt = gt[gt["video"].isin(set(video_rows["video"]))]
    results: dict = {"name": cfg.name, "synthetic": bool(provenance.get("synthetic")),
                     "spotters": {}}
    all_intervals, curves, found = [], {}, {}
    with Progress(disable=not bool(cfg.get("progress", True))) as progress:
        task = progress.add_task("spotting", total=len(spotters) * len(folds))
        for label, scfg in spotters.items():
            fold_out, timings = [], {}
            for fold, idx in folds:
                progress.update(task, description=f"{label}: fold {fold}")
                path = done_dir / label / f"{fold.replace('/', '__')}.pkl"
                want_strs = strs_cfg if (strs_cfg and strs_cfg["spotter"] == label) else None
                if cfg.get("resume") and path.exists() and not want_strs:
                    res = pickle.loads(path.read_bytes())
                    res["resumed"] = True
                else:
                    train = [v for v in videos if v.subject_key != fold]
                    res = run_fold(scfg, int(cfg.seed), train, [videos[i] for i in idx],
                                   want_strs)
                    keep = {k: v for k, v in res.items() if k != "_recogniser"}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(path, pickle.dumps(keep))
                res["fold"] = fold
                fold_out.append(res)
                timings[fold] = {"fit_s": res["fit_s"], "spot_s": res["spot_s"]}
                progress.advance(task)
            preds = pd.concat([r["predictions"].assign(fold=r["fold"]) for r in fold_out],
                              ignore_index=True)
            annotated, table = evaluate(preds, eval_gt, video_rows)
            annotated.insert(0, "spotter", label)
            all_intervals.append(annotated)
            found[label] = set(annotated.loc[annotated["tp"], "matched_gt"].astype(int))
            for r in fold_out:
                for vid, c in r["curves"].items():
                    curves.setdefault(vid, {})[label] = c
            spot_s = sum(t["spot_s"] for t in timings.values())
            frames = sum(r["test_frames"] for r in fold_out)
            entry = {"megc": table, "folds": {r["fold"]: r["params"] for r in fold_out},
                     "timings": {"folds": timings,
                                 "fit_s": sum(t["fit_s"] for t in timings.values()),
                                 "spot_s": spot_s,
                                 "frames_per_s": frames / spot_s if spot_s else None},
                     "resumed_folds": [r["fold"] for r in fold_out if r.get("resumed")]}
            if strs_cfg and strs_cfg["spotter"] == label:
                entry["strs"] = _strs(strs_cfg, fold_out, annotated, videos, eval_gt, table)
            results["spotters"][label] = entry
    intervals = pd.concat(all_intervals, ignore_index=True)
    results.update({
        "data": {**{k: v for k, v in provenance.items() if k not in ("excluded", "problems")},
                 "n_videos": len(videos), "n_subjects": len({v.subject_key for v in videos}),
                 "intervals": {db: g["type"].value_counts().to_dict()
                               for db, g in gt.groupby("database")},
                 "excluded": provenance.get("excluded", []),
                 "problems": provenance.get("problems", [])},
        "protocol": {"name": "loso", "folds": len(folds),
                     "total_folds": len({v.subject_key for v in videos}),
                     "partial": len(folds) < len({v.subject_key for v in videos}),
                     "evaluation": "MEGC: IoU >= 0.5 on inclusive frame intervals, one-to-one "
                                   "maximum matching, micro/macro apart, F1 = 2TP/(2TP+FP+FN) "
                                   "pooled", "thresholds": "chosen on training subjects only"},
        "timings": {"data_s": t_data, "total_s": time.perf_counter() - t0},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    write_outputs(run_dir, results, intervals, gt, found, curves, videos, spot)
    _log_wandb(cfg, run_dir, results)
    print_summary(results, run_dir)
    return results


def _strs(strs_cfg: dict, fold_out: list[dict], annotated: pd.DataFrame,
          videos: list[SpotVideo], gt: pd.DataFrame, table: dict) -> dict:
    """Recognise each fold's true positives with that fold's recogniser; STRS."""
    from mer.spotting.strs import recognise_matches, strs_score

    by_id = {v.video: v for v in videos}
    rows = []
    for r in fold_out:
        rec = r.get("_recogniser")
        if rec is None:
            continue
        mine = annotated[(annotated["fold"] == r["fold"]) & annotated["tp"]]
        for vid, group in mine.groupby("video"):
            emotions = gt.loc[group["matched_gt"].astype(int), "emotion"].to_numpy()
            rows.append(recognise_matches(rec, by_id[vid], group, emotions, rec.classes)
                        .assign(fold=r["fold"]))
    recognised = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["video", "onset", "offset", "gt_emotion", "label", "prediction", "fold"])
    classes = list(strs_cfg.get("classes") or fold_out[0]["_recogniser"].classes)
    out = strs_score(table["overall"]["all"]["f1"], recognised, classes)
    out.update({"recogniser": strs_cfg.get("recogniser"), "classes": classes,
                "recognised": recognised.to_dict("records"),
                "training": {r["fold"]: r.get("recogniser") for r in fold_out}})
    return out


def write_outputs(run_dir: Path, results: dict, intervals: pd.DataFrame, gt: pd.DataFrame,
                  found: dict, curves: dict, videos: list[SpotVideo], spot: dict) -> None:
    """intervals.csv, ground_truth.csv, timelines/*.png, then results.json."""
    text = json.dumps(results, indent=2, default=_json_default)  # fails before any write
    out = intervals.copy()
    matched = out["matched_gt"].astype(int)
    out["gt_onset"] = [int(gt.loc[m, "onset"]) if m >= 0 else -1 for m in matched]
    out["gt_offset"] = [int(gt.loc[m, "offset"]) if m >= 0 else -1 for m in matched]
    out["result"] = np.where(out["tp"], "TP", "FP")
    cols = ["spotter", "fold", "database", "subject", "video", "onset", "apex", "offset",
            "score", "type", "matched_gt", "gt_onset", "gt_offset", "iou", "result"]
    _write_csv(out[cols], run_dir / "intervals.csv")
    g = gt.reset_index()[["gt_id", "database", "subject", "video", "onset", "apex", "offset",
                          "type", "emotion"]].copy()
    for label, ids in found.items():
        g[f"found_{label}"] = g["gt_id"].isin(ids)
    _write_csv(g, run_dir / "ground_truth.csv")
    if spot.get("timelines", True):
        limit = spot.get("max_timelines")
        for n, v in enumerate(v for v in videos if v.video in curves):
            if limit is not None and n >= int(limit):
                break
            plot_timeline(v, curves[v.video], out[out["video"] == v.video],
                          run_dir / "timelines" / f"{v.video.replace('/', '__')}.png",
                          results["synthetic"])
    atomic_write_text(run_dir / "results.json", text)


def plot_timeline(video: SpotVideo, curves: dict, predicted: pd.DataFrame, path: Path,
                  synthetic: bool) -> None:
    """One PNG: per spotter a panel with its micro/macro score curves, the ground truths
    (shaded: micro red, macro blue) and its intervals (bars: TP green, FP grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(curves)
    fig, axes = plt.subplots(len(labels), 1, figsize=(12, 1.8 * len(labels) + 0.6),
                             sharex=True, squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        c = curves[label]
        s = np.asarray(c["scores"], dtype=np.float64)
        top = max(1e-9, float(np.nanmax(s))) if s.size else 1.0
        ax.plot(c["frames"], s[:, 0] / top, color="tab:red", lw=0.8, label="micro score")
        ax.plot(c["frames"], s[:, 1] / top, color="tab:blue", lw=0.8, label="macro score")
        for r in video.gt.itertuples():
            ax.axvspan(r.onset, r.offset, color="tab:red" if r.type == "micro" else "tab:blue",
                       alpha=0.15)
        mine = predicted[predicted["spotter"] == label]
        for r in mine.itertuples():
            y = 1.08 if r.type == "micro" else 1.18
            ax.plot([r.onset, r.offset], [y, y], lw=4,
                    color="tab:green" if r.result == "TP" else "0.6")
        ax.set_ylim(-0.05, 1.3)
        ax.set_ylabel(label, fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=2)
    axes[0, 0].set_title(f"{video.video} ({'SYNTHETIC' if synthetic else 'real'} data): shaded "
                         "ground truth (micro red, macro blue); bars predicted (TP green, FP "
                         "grey); curves scaled to their maximum", fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    try:
        atomic_write_with(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    finally:
        plt.close(fig)


def print_summary(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    tag = " [bold yellow](SYNTHETIC data)[/]" if results["synthetic"] else ""
    t = Table(title=f"{results['name']}: MEGC spotting, LOSO "
                    f"({results['protocol']['folds']} folds){tag}")
    for col in ("spotter", "scope", "micro F1", "macro F1", "all F1", "TP", "FP", "FN"):
        t.add_column(col)
    for label, s in results["spotters"].items():
        scopes = [("overall", s["megc"]["overall"])] + list(s["megc"]["per_database"].items())
        for scope, c in scopes:
            t.add_row(label, scope, _f(c["micro"]["f1"]), _f(c["macro"]["f1"]),
                      _f(c["all"]["f1"]), str(c["all"]["tp"]), str(c["all"]["fp"]),
                      str(c["all"]["fn"]))
    console = Console()
    console.print(t)
    for label, s in results["spotters"].items():
        if "strs" in s:
            st = s["strs"]
            console.print(f"STRS ({label} + {st['recogniser']}): spotting F1 "
                          f"{_f(st['spotting_f1'])} x analysis F1 {_f(st['analysis']['uf1'])} "
                          f"= {st['strs']:.4f} ({st['analysis']['n']} recognised)")
    console.print(f"outputs: {run_dir}")


def _log_wandb(cfg: DictConfig, run_dir: Path, results: dict) -> None:
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb:
        return
    import wandb

    run = wandb.init(project=wb.project, group=wb.group, name=f"{cfg.name}-{run_dir.name}",
                     mode=wb.mode, dir=str(run_dir), job_type="spotting",
                     config=results["config"], tags=list(wb.get("tags", [])) +
                     (["synthetic"] if results["synthetic"] else []))
    for label, s in results["spotters"].items():
        for scope, c in [("overall", s["megc"]["overall"])] + list(
                s["megc"]["per_database"].items()):
            run.summary.update({f"{label}/{scope}/{kind}_f1": c[kind]["f1"]
                                for kind in ("micro", "macro", "all")})
        if "strs" in s:
            run.summary.update({f"{label}/strs": s["strs"]["strs"]})
    run.summary.update({"synthetic": results["synthetic"]})
    pngs = sorted((run_dir / "timelines").glob("*.png"))[:8]
    if pngs:
        run.log({"timelines": [wandb.Image(str(p), caption=p.stem) for p in pngs]})
    run.finish()


def headline(results: dict) -> float:
    """The best overall F1 (all) over the spotters, or STRS when computed (for sweepers)."""
    strs = [s["strs"]["strs"] for s in results["spotters"].values() if "strs" in s]
    if strs:
        return float(max(strs))
    return float(max((s["megc"]["overall"]["all"]["f1"] or 0.0)
                     for s in results["spotters"].values()))


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write_with(path, lambda f: f.write(table.to_csv(index=False).encode("utf-8")))


def _jsonable(o):
    return json.loads(json.dumps(o, default=_json_default))


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    return str(o)
