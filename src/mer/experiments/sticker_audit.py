"""``+experiment=sticker_audit``: adversarial stickers against trained recognisers.

Post-hoc, training-free stickers (Tan et al., ICASSP 2025) pasted on a clip's frames before
mer's flow pipeline, placed by causal discovery over facial sites, against random placement
and the site of largest motion; black-box, one query per clip.

1. **Split** (subject-disjoint, per database, seeded): the recogniser's *training* subjects,
   the attacker's *reference* subjects, and the *protected* (test) subjects. No subject is in
   two roles; nothing is chosen on the test subjects (a fixed schedule, the last epoch).
2. **Recognisers** (``sticker_audit.recognisers``: STSTNet, DPK-GAT, HTNet...): each trained
   by the engine (:func:`mer.engine.build.build_module`, a Lightning ``Trainer``) on the
   training subjects' clean clips, then seen only through a :class:`BlackBox`.
3. **Attacker's measurements** (no query): the motion of each sticker site of every reference
   and protected clip (:func:`mer.privacy.stickers.features.clip_motion`).
4. **Causal discovery**: one query per reference clip for its predicted class; PC/FCI over the
   site motions and the prediction ranks the sites (:func:`causal_ranking`).
5. **Attacks**, for each style x area x placement: ``causal`` (the top-ranked site),
   ``random`` (a site drawn per clip, the same draws for every recogniser) and ``max_motion``
   (the clip's site of largest motion); the sticker is pasted on onset and apex, following the
   face, the flow recomputed by mer's pipeline, and the stickered clip queried once.

Success = the prediction changed from the clean clip's. Reported per recogniser, style, area,
placement and emotion, with UF1 before and after, and causal minus random success at each
area (paired bootstrap interval over clips). Outputs: ``sticker_audit.json``,
``sticker_audit.md``, ``attacks.csv``, ``stickered_frames.png`` (stickered frames beside the
flow they produce) and ``success.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from mer.data.io import atomic_write_text
from mer.data.preprocess.apex import frame_path
from mer.data.preprocess.cache import FlowCache
from mer.data.preprocess.pipeline import FlowParams
from mer.data.samples import FlowSamples
from mer.data.sources import load_samples
from mer.engine.metrics import recognition_metrics
from mer.engine.report import write_csv
from mer.privacy.stickers import (
    SITES,
    BlackBox,
    Sticker,
    StickerError,
    StickerStyle,
    causal_ranking,
)
from mer.privacy.stickers.features import clip_motion
from mer.privacy.stickers.pipeline import Clip, stickered_flows, stickered_pair

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[3] / "conf"
PLACEMENTS = ("causal", "random", "max_motion")
ROLES = ("train", "reference", "test")


# ------------------------------------------------------------------------------ data


def split_subjects(samples: FlowSamples, test: float, reference: float, seed: int
                   ) -> dict[str, np.ndarray]:
    """Sample positions of each role (``train``, ``reference``, ``test``): per database,
    ``round(test * n)`` subjects protected and ``round(reference * n)`` for the attacker
    (at least one each), the rest (at least one) train the recogniser."""
    keys = samples.meta["subject_key"].to_numpy()
    role = np.empty(len(keys), dtype=object)
    for i, (db, group) in enumerate(samples.meta.groupby("database", sort=True)):
        subjects = sorted(set(group["subject_key"]))
        n = len(subjects)
        if n < 3:
            raise StickerError(f"database {db}: {n} subject(s); the sticker audit needs at "
                               "least 3 per database (train, reference, test subjects)")
        n_test = min(max(1, round(test * n)), n - 2)
        n_ref = min(max(1, round(reference * n)), n - 1 - n_test)
        order = list(np.random.default_rng([seed, i]).permutation(subjects))
        for k, s in enumerate(order):
            role[keys == s] = "test" if k < n_test else "reference" if k < n_test + n_ref \
                else "train"
    return {r: np.flatnonzero(role == r) for r in ROLES}


def clip_name(row: dict) -> str:
    return f"{row['database']}/{row['subject']}/{row['clip']}"


def make_clips(samples: FlowSamples) -> list[Clip]:
    """One :class:`Clip` per sample: its onset/apex frame files and landmarks in frame pixels
    (from the samples' landmarks, given in the flow image's pixel frame)."""
    import cv2

    if samples.landmarks is None or samples.input_source is None:
        raise StickerError("the sticker audit needs the clips' frames and landmarks (SynME, or "
                           "a database whose samples carry landmarks); this data has none")
    size = samples.x.shape[-1]
    clips = []
    for row, lm in zip(samples.input_source.rows, samples.landmarks):
        name = clip_name(row)
        frame = cv2.imread(str(row["onset_path"]), cv2.IMREAD_UNCHANGED)
        if frame is None:
            raise StickerError(f"{name}: cannot read the onset frame {row['onset_path']}")
        h, w = frame.shape[:2]
        px = (np.asarray(lm, np.float64) + 0.5) / size * np.array([w, h]) - 0.5
        apex = frame_path(row["onset_path"], int(row["onset"]), int(row["apex"]))
        clips.append(Clip(name, str(row["onset_path"]), str(apex), px))
    return clips


# ------------------------------------------------------------------------------ recognisers


def recogniser_config(spec: dict) -> dict:
    """conf/model/<name>.yaml merged with the entry's overrides (``lr``, ``kwargs``...)."""
    path = CONF / "model" / f"{spec['name']}.yaml"
    if not path.exists():
        raise StickerError(f"sticker_audit.recognisers: no model config {path.name}; use one "
                           f"of {sorted(p.stem for p in (CONF / 'model').glob('*.yaml'))}")
    base = OmegaConf.load(path)
    extra = {k: v for k, v in spec.items() if k not in ("name", "epochs")}
    return OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True)


def train_recogniser(model_cfg: dict, samples: FlowSamples, train_idx: np.ndarray,
                     trainer_cfg: dict, batch_size: int, seed: int):
    """The engine's module for ``model_cfg`` trained on ``train_idx`` for a fixed schedule
    (the last epoch is kept); in eval mode."""
    import warnings

    import lightning as L

    from mer.data.datamodule import SplitDataModule
    from mer.engine.build import build_module, uses_aus

    L.seed_everything(seed, workers=True, verbose=False)
    module = build_module(model_cfg, samples, train_idx)
    if getattr(module.net, "input_names", ()):
        raise StickerError(f"sticker_audit.recognisers: {model_cfg['name']} reads frames "
                           f"({list(module.net.input_names)}) besides the flow; the audit "
                           "re-renders the flow only: use flow-only recognisers (ststnet, "
                           "offapexnet, htnet, dpk_gat)")
    dm = SplitDataModule(samples, train_idx, train_idx, batch_size=batch_size, shuffle=True,
                         seed=seed, with_aus=uses_aus(module))
    kwargs = {k: v for k, v in trainer_cfg.items() if k not in ("logger",)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, **kwargs)
        trainer.fit(module, datamodule=dm)
    return module.eval()


def predictor(module):
    """(x, landmarks) -> predicted classes, for a trained module (batches of 256)."""
    from mer.engine.build import uses_aus

    au = uses_aus(module)

    def predict(x: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                xb = torch.from_numpy(np.ascontiguousarray(x[i:i + 256]))
                if au:
                    lm = None if landmarks is None else torch.from_numpy(
                        np.ascontiguousarray(landmarks[i:i + 256], dtype=np.float32))
                    logits = module(xb, lm).logits
                else:
                    logits = module(xb)
                out.append(logits.argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    return predict


# ------------------------------------------------------------------------------ scoring


def success_rate(clean: np.ndarray, attacked: np.ndarray) -> float:
    """Share of clips whose prediction the sticker changed."""
    return float(np.mean(np.asarray(clean) != np.asarray(attacked))) if len(clean) else 0.0


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of a - b (0/1 successes of two placements on the same clips) and a paired
    bootstrap 95% interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if not len(d):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(max(1, n_boot), len(d)))].mean(axis=1)
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, 0.025)),
            "hi": float(np.quantile(boots, 0.975)), "n": int(len(d))}


def summarise(table: pd.DataFrame, class_names: list[str], n_boot: int, seed: int) -> dict:
    """Rows per (recogniser, style, area, placement), per-emotion rates, and causal - random
    (and causal - max_motion) at each area, pooled over recognisers and styles."""
    rows = []
    for (rec, style, area, place), g in table.groupby(
            ["recogniser", "style", "area", "placement"], sort=False):
        before = recognition_metrics(g["label"], g["clean"], class_names)
        after = recognition_metrics(g["label"], g["attacked"], class_names)
        changed = g["clean"] != g["attacked"]
        rows.append({
            "recogniser": rec, "style": style, "area": float(area), "placement": place,
            "n": int(len(g)), "success": float(changed.mean()),
            "uf1_before": before["uf1"], "uf1_after": after["uf1"],
            "area_px": float(g["area_px"].mean()),
            "per_emotion": {class_names[k]: float(changed[g["label"] == k].mean())
                            for k in sorted(set(g["label"]))},
            "sites": {str(s): int(c) for s, c in g["site"].value_counts().items()},
        })
    comparisons = []
    for area, g in table.groupby("area", sort=True):
        wide = g.assign(ok=(g["clean"] != g["attacked"]).astype(float)).pivot_table(
            index=["recogniser", "style", "clip"], columns="placement", values="ok")
        entry = {"area": float(area), "n": int(len(wide))}
        for p in PLACEMENTS:
            if p in wide:
                entry[p] = float(wide[p].mean())
        for other in ("random", "max_motion"):
            if "causal" in wide and other in wide:
                entry[f"causal_minus_{other}"] = paired_difference(
                    wide["causal"].to_numpy(), wide[other].to_numpy(), n_boot, seed)
        comparisons.append(entry)
    by = {}
    for key in ("recogniser", "style", "placement"):
        by[key] = {str(k): float((g["clean"] != g["attacked"]).mean())
                   for k, g in table.groupby(key, sort=False)}
    by["emotion"] = {class_names[k]: float((g["clean"] != g["attacked"]).mean())
                     for k, g in table.groupby("label", sort=True)}
    return {"rows": rows, "comparisons": comparisons, "success_by": by}


def verdict(comparisons: list[dict]) -> str:
    """One sentence per area: does causal placement beat random placement, and by how much."""
    out = []
    for c in comparisons:
        d = c.get("causal_minus_random")
        if d is None:
            continue
        pts = 100 * d["diff"]
        ci = f"95% CI {100 * d['lo']:+.1f} to {100 * d['hi']:+.1f} points, {d['n']} paired attacks"
        if d["lo"] > 0:
            word = f"beats random placement by {pts:+.1f} points"
        elif pts > 0:
            word = f"is ahead of random placement by {pts:+.1f} points, not significantly"
        else:
            word = f"does not beat random placement: {pts:+.1f} points"
        out.append(f"area {c['area']:g} of the face: causal placement {word} ({ci})")
    return "; ".join(out) if out else "no causal/random comparison was run"


# ------------------------------------------------------------------------------ the audit


def _command() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return "python -m mer.run " + " ".join(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 (not under Hydra: a test or a script)
        return "python -m mer.run +experiment=sticker_audit (in-process: " + \
            " ".join(sys.argv[:1]) + ")"


def run_sticker_audit(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the audit ``cfg.sticker_audit`` describes; writes the report into ``run_dir``."""
    t0 = time.perf_counter()
    sa = OmegaConf.to_container(cfg.sticker_audit, resolve=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    samples = load_samples(cfg.data, cfg.paths.cache_dir, prepared=False)
    params = FlowParams(**OmegaConf.to_container(cfg.data.flow, resolve=True))
    cache = FlowCache(Path(cfg.paths.cache_dir) / "flow")
    workers = int(sa.get("workers", 0) or 0)
    clips = make_clips(samples)
    roles = split_subjects(samples, float(sa["split"]["test"]), float(sa["split"]["reference"]),
                           seed)
    styles = [StickerStyle.from_dict(d) for d in sa["styles"]]
    areas = [float(a) for a in sa["areas"]]
    placements = list(sa["placements"])
    bad = sorted(set(placements) - set(PLACEMENTS))
    if bad:
        raise StickerError(f"sticker_audit.placements: unknown {bad}; use {list(PLACEMENTS)}")
    sites = list(SITES)
    track = bool(sa.get("track", True))
    feat_cfg = sa.get("features") or {}
    ref, test = roles["reference"], roles["test"]
    # 3. the attacker's measurements (no query)
    motion = {i: clip_motion(clips[i].onset_path, clips[i].apex_path, clips[i].landmarks,
                             params.work_size, feat_cfg.get("flow", "dis"),
                             float(feat_cfg.get("disc_fraction", 0.04)), clips[i].name)
              for i in np.concatenate([ref, test])}
    # the sites of the placements that do not depend on the recogniser
    random_site = {(si, ai, i): sites[int(np.random.default_rng([seed, si, ai, int(i)])
                                          .integers(len(sites)))]
                   for si in range(len(styles)) for ai in range(len(areas)) for i in test}
    max_site = {int(i): sites[int(np.argmax(motion[i]))] for i in test}
    workdir = Path(tempfile.mkdtemp(prefix="stickers-", dir=run_dir))
    try:
        return _audit(cfg, sa, run_dir, t0, samples, params, cache, workers, clips, roles,
                      styles, areas, placements, sites, track, motion, random_site, max_site,
                      workdir)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _audit(cfg, sa, run_dir, t0, samples, params, cache, workers, clips, roles, styles, areas,
           placements, sites, track, motion, random_site, max_site, workdir) -> dict:
    """The body of :func:`run_sticker_audit`: recognisers, discovery, attacks, outputs."""
    seed = int(cfg.seed)
    ref, test = roles["reference"], roles["test"]
    names = [c.name for c in clips]
    labels = samples.labels
    flows: dict[tuple, np.ndarray] = {}
    area_px: dict[tuple, float] = {}

    def need(jobs: list[tuple[int, int, int, str]]) -> None:
        """Compute the flow of every (clip, style, area, site) not computed yet."""
        from mer.privacy.stickers.placement import face_area

        todo = sorted({j for j in jobs if j not in flows})
        if not todo:
            return
        stickers = [(i, Sticker(styles[si], site, areas[ai])) for i, si, ai, site in todo]
        x = stickered_flows(clips, stickers, params, workdir, cache, workers=workers,
                            track=track, progress=bool(cfg.get("progress", False)))
        for j, xi, (i, st) in zip(todo, x, stickers):
            flows[j] = xi
            area_px[j] = st.area_fraction * face_area(clips[i].landmarks)

    lm = samples.landmarks
    records, rec_reports = [], []
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for r_i, spec in enumerate(sa["recognisers"]):
        model_cfg = recogniser_config(spec)
        t = dict(trainer_cfg)
        if spec.get("epochs"):
            t["max_epochs"] = int(spec["epochs"])
        t1 = time.perf_counter()
        module = train_recogniser(model_cfg, samples, roles["train"], t,
                                  int(cfg.data.batch_size), seed + r_i)
        t_train = time.perf_counter() - t1
        predict = predictor(module)
        box = BlackBox(predict, budget=1)
        # 4. causal discovery: one query per reference clip
        pred_ref = box.query("discovery", [names[i] for i in ref], samples.x[ref], lm[ref])
        ranking = causal_ranking(np.stack([motion[i] for i in ref]), pred_ref, sites,
                                 samples.class_names, float(sa["causal"].get("alpha", 0.05)),
                                 sa["causal"].get("method", "pc"), sa["causal"].get("depth"))
        clean = predict(samples.x[test], lm[test])  # the evaluator's reference, not a query
        n_attacks = 0
        for si, style in enumerate(styles):
            for ai, area in enumerate(areas):
                chosen = {p: [ranking.best if p == "causal" else
                              random_site[(si, ai, i)] if p == "random" else max_site[int(i)]
                              for i in test] for p in placements}
                need([(int(i), si, ai, s) for p in placements for i, s in zip(test, chosen[p])])
                for p in placements:
                    jobs = [(int(i), si, ai, s) for i, s in zip(test, chosen[p])]
                    attack = f"{spec['name']}/{style.name}/{area:g}/{p}"
                    pred = box.query(attack, [names[i] for i in test],
                                     np.stack([flows[j] for j in jobs]), lm[test])
                    n_attacks += 1
                    for k, (i, j) in enumerate(zip(test, jobs)):
                        records.append({
                            "recogniser": spec["name"], "style": style.name, "area": area,
                            "placement": p, "clip": names[i], "label": int(labels[i]),
                            "site": j[3], "clean": int(clean[k]), "attacked": int(pred[k]),
                            "area_px": area_px[j]})
        rec_reports.append({
            "name": spec["name"], "train_s": t_train,
            "uf1_clean": recognition_metrics(labels[test], clean, samples.class_names)["uf1"],
            "causal": ranking.to_dict(),
            "queries": {"total": box.total, "discovery": len(ref),
                        "per_attack": len(test), "attacks": n_attacks,
                        "max_per_clip_and_attack": box.per_clip_max()}})
        log.info("%s: causal site %s", spec["name"], ranking.best)
    table = pd.DataFrame(records)
    summary = summarise(table, samples.class_names, int(sa.get("bootstrap", 1000)), seed)
    report = {
        "name": cfg.name, "synthetic": bool(samples.synthetic), "command": _command(),
        "data": {**{k: v for k, v in samples.provenance.items() if k != "prepare"},
                 "n_samples": len(samples.meta), "class_names": samples.class_names,
                 "roles": {r: {"clips": int(len(v)),
                               "subjects": sorted(set(samples.meta["subject_key"].iloc[v]))}
                           for r, v in roles.items()}},
        "styles": [vars(s) | {"colour": list(s.colour)} for s in styles], "areas": areas,
        "sites": {s: list(ids) for s, ids in SITES.items()}, "track": track,
        "recognisers": rec_reports, **summary, "verdict": verdict(summary["comparisons"]),
        "flows_computed": len(flows), "seconds": time.perf_counter() - t0,
    }
    write_csv(table.assign(label=[samples.class_names[k] for k in table["label"]],
                           clean=[samples.class_names[k] for k in table["clean"]],
                           attacked=[samples.class_names[k] for k in table["attacked"]]),
              run_dir / "attacks.csv")
    atomic_write_text(run_dir / "sticker_audit.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(run_dir / "sticker_audit.md", markdown(report))
    plot_success(report, run_dir / "success.png")
    picture(report, clips, samples, test, rec_reports, styles, areas, max_site, params,
            run_dir / "stickered_frames.png", workdir, cache, track,
            int(sa.get("figure_clips", 3)))
    _print(report, run_dir)
    return report


# ------------------------------------------------------------------------------ outputs


def _tag(report: dict) -> str:
    return "synthetic (SynME)" if report["synthetic"] else "real data"


def markdown(report: dict) -> str:
    """The audit as a Markdown report."""
    lines = [f"# Sticker audit: {_tag(report)}", "",
             f"Command: `{report['command']}`", "",
             "Adversarial stickers pasted on onset and apex frames before mer's flow pipeline; "
             "success = the recogniser's prediction changed. Black-box: one query per "
             "reference clip (causal discovery) and one per protected clip and attack.", ""]
    roles = report["data"]["roles"]
    lines += ["Subject-disjoint roles: " + ", ".join(
        f"{r} {v['clips']} clips / {len(v['subjects'])} subjects" for r, v in roles.items()), ""]
    lines += ["## Verdict", "", report["verdict"] + ".", ""]
    lines += ["## Causal vs random vs max-motion placement (pooled over recognisers and styles)",
              "", "| area (of face) | causal | random | max_motion | causal - random (95% CI) "
              "| causal - max_motion (95% CI) |", "|---|---|---|---|---|---|"]

    def diff(c: dict, k: str) -> str:
        d = c.get(k)
        return "" if d is None else \
            f"{100 * d['diff']:+.1f} ({100 * d['lo']:+.1f}, {100 * d['hi']:+.1f})"

    for c in report["comparisons"]:
        lines.append(f"| {c['area']:g} | " + " | ".join(
            f"{100 * c[p]:.1f}%" if p in c else "" for p in PLACEMENTS)
            + f" | {diff(c, 'causal_minus_random')} | {diff(c, 'causal_minus_max_motion')} |")
    lines += ["", "## Recognisers", "", "| recogniser | clean UF1 (protected clips) | causal "
              "site ranking (top 3) | direct causes found | queries (total; max per clip and "
              "attack) | train s |", "|---|---|---|---|---|---|"]
    for r in report["recognisers"]:
        c = r["causal"]
        found = f"none ({c['note']})" if c["fallback"] else ", ".join(
            f"{k}: {', '.join(v) or '-'}" for k, v in c["causes"].items())
        q = r["queries"]
        lines.append(f"| {r['name']} | {r['uf1_clean']:.3f} | {', '.join(c['order'][:3])} | "
                     f"{found} | {q['total']}; {q['max_per_clip_and_attack']} | "
                     f"{r['train_s']:.0f} |")
    lines += ["", "## Every attack", "", "| recogniser | style | area | area px | placement | "
              "success | UF1 before | UF1 after | success per emotion |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        emo = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["per_emotion"].items())
        lines.append(f"| {r['recogniser']} | {r['style']} | {r['area']:g} | {r['area_px']:.0f} "
                     f"| {r['placement']} | {100 * r['success']:.1f}% | {r['uf1_before']:.3f} | "
                     f"{r['uf1_after']:.3f} | {emo} |")
    lines += ["", "## Success by", ""]
    for key, d in report["success_by"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in d.items()))
    lines += ["", f"{report['flows_computed']} stickered flow images; "
              f"{report['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)


def plot_success(report: dict, path: Path) -> None:
    """Success rate per recogniser and area, one bar per placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pd.DataFrame(report["rows"])
    recs = list(dict.fromkeys(rows["recogniser"]))
    fig, axes = plt.subplots(1, len(recs), figsize=(4 * len(recs), 3.4), squeeze=False,
                             sharey=True)
    for ax, rec in zip(axes[0], recs):
        g = rows[rows["recogniser"] == rec].groupby(["area", "placement"])["success"].mean()
        areas = sorted(set(g.index.get_level_values(0)))
        places = [p for p in PLACEMENTS if p in set(g.index.get_level_values(1))]
        width = 0.8 / max(1, len(places))
        for k, p in enumerate(places):
            ax.bar(np.arange(len(areas)) + k * width, [100 * g.get((a, p), np.nan) for a in areas],
                   width, label=p)
        ax.set_xticks(np.arange(len(areas)) + width * (len(places) - 1) / 2,
                      [f"{a:g}" for a in areas])
        ax.set_xlabel("sticker area (fraction of the face)")
        ax.set_title(rec)
    axes[0][0].set_ylabel("attack success (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Sticker attack success, {_tag(report)}\n{report['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def picture(report: dict, clips: list[Clip], samples: FlowSamples, test: np.ndarray,
            rec_reports: list[dict], styles: list[StickerStyle], areas: list[float],
            max_site: dict, params: FlowParams, path: Path, workdir: Path, cache: FlowCache,
            track: bool, n_clips: int) -> None:
    """Stickered frames beside the flow they produce: per clip, the clean apex and its flow,
    then the apex with the first recogniser's causal sticker (first style, largest area) and
    its flow, and the same with the max-motion site."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(test) or not rec_reports:
        return
    picks = []  # one clip per class where possible
    for k in range(samples.num_classes):
        picks += [int(i) for i in test if samples.labels[i] == k][:1]
    picks = (picks + [int(i) for i in test if int(i) not in picks])[:max(1, n_clips)]
    style, area = styles[0], max(areas)
    causal = rec_reports[0]["causal"]["order"][0]
    columns = [("clean", None), (f"causal: {causal}", causal), ("max motion", "max")]
    fig, axes = plt.subplots(len(picks), 2 * len(columns), squeeze=False,
                             figsize=(2.0 * 2 * len(columns), 2.1 * len(picks)))
    for row, i in enumerate(picks):
        for col, (title, site) in enumerate(columns):
            site = max_site[i] if site == "max" else site
            sticker = None if site is None else Sticker(style, site, area)
            frames, _ = stickered_pair(clips[i], sticker, grey=False, track=track)
            flow = stickered_flows(clips, [(i, sticker)], params, workdir, cache,
                                   track=track)[0]
            ax1, ax2 = axes[row][2 * col], axes[row][2 * col + 1]
            ax1.imshow(cv2.cvtColor(frames[1], cv2.COLOR_BGR2RGB) if frames[1].ndim == 3
                       else frames[1], cmap="gray")
            ax2.imshow(flow.transpose(1, 2, 0), interpolation="nearest")
            ax1.set_title(f"{title}\napex frame", fontsize=7)
            ax2.set_title("flow (u, v, strain)", fontsize=7)
            for ax in (ax1, ax2):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[row][0].set_ylabel(f"{clips[i].name}\n{samples.class_names[samples.labels[i]]}",
                                fontsize=6)
    fig.suptitle(f"Stickered frames and their flow ({style.name}, {area:g} of the face), "
                 f"{_tag(report)}\n{report['command']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(report: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sticker audit ({_tag(report)}): success rate by area and placement")
    for col in ("area", *PLACEMENTS, "causal - random"):
        t.add_column(col)
    for c in report["comparisons"]:
        d = c.get("causal_minus_random")
        t.add_row(f"{c['area']:g}", *[f"{100 * c[p]:.1f}%" if p in c else "-" for p in
                                      PLACEMENTS],
                  "-" if d is None else f"{100 * d['diff']:+.1f} ({100 * d['lo']:+.1f}, "
                                        f"{100 * d['hi']:+.1f})")
    console = Console()
    console.print(t)
    console.print(report["verdict"])
    console.print(f"outputs: {run_dir}")
