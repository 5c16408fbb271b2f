"""``+experiment=deidentify``: a lab's clips re-rendered onto other faces, the motion kept
(:mod:`mer.data.generate.deidentify`); what is kept and what is removed.

- **Kept (recognition)**: LOSO on the *original* clips (the lab's recogniser, trained as
  usual); each fold predicts its test subject's original clips and the same clips
  de-identified. UF1 / UAR of both, pooled over folds, and the drop.
- **Control arm** (``deidentify.controls: [own_face]``): the same clips re-rendered on their
  *own* faces by the same control points and TPS (identity kept). original -> own_face is what
  the motion transfer loses; own_face -> deidentified is what the new face changes. The
  recogniser is trained once, so an arm costs rendering and inference only.
- **Motion model** (``deidentify.motion``): ``tps`` carries each clip's flow at sparse control
  points (``deidentify.density`` per landmark triangle, 1: the centroids) densified by a TPS;
  ``dense`` carries the whole flow field pixel by pixel (:mod:`mer.data.generate.dense`).
  ``deidentify.compare_motion: M`` / ``compare_density: L`` add the own-face and de-identified
  arms made the other way too (``arm`` ``own_face@M``, ``deidentified@densityL``; same trained
  recogniser).
- **Recipient** (``deidentify.recipient``, default true): what a lab given only the
  de-identified clips can learn: the same recogniser, folds and schedule trained *and* tested on
  the de-identified clips (``arm="recipient"``); its UF1 against the originals' is the cost of
  sharing without faces, with ``recipient_within_margin``.
- **Removed (identity)**: an LBPH face recogniser (:mod:`mer.data.generate.identity`) trained
  on the onset and apex frames of part of each subject's original clips
  (``deidentify.identity.train_fraction``), asked who is on the apex frames of the other clips,
  original and de-identified. Chance is 1 / subjects.

Outputs: ``deidentify.json``, ``deidentify.md``, ``predictions.csv`` (one row per tested clip,
``generated``/``deidentified``/``arm`` columns saying which version it is).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.io import atomic_write_text
from mer.data.samples import FlowSamples
from mer.experiments.generate_augment import command_line

CONTROLS = ("own_face",)


def concat(a: FlowSamples, *others: FlowSamples) -> FlowSamples:
    """Rows of ``a`` (the originals, ``arm="original"``) then each of ``others`` (same
    classes, re-rendered: their own ``arm``), their frames' sources joined."""
    from mer.data.inputs import InputSource

    parts = [a, *others]
    meta = pd.concat([a.meta.assign(generated=False, deidentified=False, arm="original"),
                      *[b.meta for b in others]], ignore_index=True)
    lm = None if any(b.landmarks is None for b in parts) else \
        np.concatenate([b.landmarks for b in parts])
    src = InputSource(**{**a.input_source.__dict__,
                         "rows": [r for b in parts for r in b.input_source.rows]})
    return FlowSamples(np.concatenate([b.x for b in parts]), meta, a.class_names, a.excluded,
                       a.synthetic, a.provenance, lm, {}, src)


def identity_split(meta: pd.DataFrame, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions: per subject, the first ceil(fraction * n) clips (sorted by
    clip) train the identity classifier, the rest test it (subjects with one clip: train)."""
    train, test = [], []
    for _, g in meta.groupby("subject_key", sort=True):
        pos = g.sort_values("clip").index.to_numpy()
        k = min(len(pos), max(1, math.ceil(fraction * len(pos))))
        train += list(pos[:k])
        test += list(pos[k:])
    return np.array(train, np.int64), np.array(test, np.int64)


def run_deidentify(cfg: DictConfig, run_dir: Path) -> dict:
    """De-identify, measure recognition and identity, write the report; return it."""
    from mer.data.generate.deidentify import deidentify, image_face, own_face, synme_faces
    from mer.data.generate.errors import GenerationError
    from mer.data.generate.generator import GenerateParams
    from mer.data.generate.identity import IdentityClassifier, face_image
    from mer.data.sources import data_workers, load_samples
    from mer.engine.build import prepare_inputs
    from mer.engine.protocols import Fold, run_folds
    from mer.engine.report import score_predictions, write_csv
    from mer.engine.runner import make_folds, pooled_predictions, training_spec

    d = cfg.deidentify
    cache = cfg.paths.cache_dir
    samples = load_samples(cfg.data, cache)
    ids = d.identities
    if d.get("face"):
        faces = [image_face(d.face)]
    else:
        if cfg.data.get("kind") == "synme" and ids.preset == cfg.data.preset and \
                int(ids.seed) == int(cfg.data.seed):
            raise GenerationError(
                f"deidentify.identities (preset {ids.preset}, seed {ids.seed}) are the lab's "
                "own subjects (data.preset, data.seed): de-identifying onto them changes "
                "nothing. Set deidentify.identities.seed to another seed")
        faces = synme_faces(str(ids.preset), int(ids.seed), cache)
    controls = list(dict.fromkeys(d.get("controls") or []))
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise GenerationError(f"deidentify.controls={controls}: unknown arm(s) {unknown}; use "
                              f"any of {list(CONTROLS)} (or [] for none)")
    flow = OmegaConf.to_container(cfg.data.flow, resolve=True)
    density = int(d.get("density", 1))
    motion = str(d.get("motion", "tps"))
    params = GenerateParams(drivers=1, phases=int(d.phases), frames=int(d.frames), flow=flow,
                            density=density, motion=motion)
    store: dict = {}  # each clip's driving flows, computed once for every arm
    show = bool(cfg.progress)
    workers = data_workers(cfg.data)  # the clips' driving flows and renders, in parallel
    deid = deidentify(samples, faces, params, cache, seed=int(cfg.seed), progress=show,
                      flow_store=store, workers=workers)
    arms = [own_face(samples, params, cache, progress=show, flow_store=store, workers=workers)
            for _ in controls] + [deid]
    variants = []  # the same arms made another way, tested by the same trained recogniser
    if d.get("compare_density") is not None and int(d.compare_density) != density:
        variants.append((f"density{int(d.compare_density)}",
                         replace(params, density=int(d.compare_density))))
    if d.get("compare_motion") is not None and str(d.compare_motion) != motion:
        variants.append((str(d.compare_motion), replace(params, motion=str(d.compare_motion))))
    for tag, other in variants:
        for arm in [own_face(samples, other, cache, progress=show, flow_store=store,
                             workers=workers)
                    for _ in controls] + [deidentify(samples, faces, other, cache,
                                                     seed=int(cfg.seed), progress=show,
                                                     flow_store=store, workers=workers)]:
            arm.meta["arm"] = f"{arm.meta['arm'].iloc[0]}@{tag}"
            arms.append(arm)
    n = len(samples.meta)
    both = concat(samples, *arms)
    prepare_inputs(OmegaConf.to_container(cfg.model, resolve=True), both)
    folds = [Fold(f.index, f.name, f.train_idx,
                  np.concatenate([f.test_idx + k * n for k in range(len(arms) + 1)]), f.val_idx)
             for f in make_folds(samples, cfg.protocol, int(cfg.seed))]
    results = run_folds(both, folds, training_spec(cfg, run_dir / "logs"),
                        workers=cfg.protocol.workers, show_progress=bool(cfg.progress))
    pred = pooled_predictions(both, folds, results)
    pred["deidentified"] = np.concatenate(
        [both.meta["deidentified"].to_numpy(bool)[f.test_idx] for f in folds])
    pred["arm"] = np.concatenate([both.meta["arm"].to_numpy()[f.test_idx] for f in folds])
    names = ["original", *[a.meta["arm"].iloc[0] for a in arms]]
    if d.get("recipient", True):  # what a lab receiving only de-identified clips can learn
        prepare_inputs(OmegaConf.to_container(cfg.model, resolve=True), deid)
        plain = make_folds(samples, cfg.protocol, int(cfg.seed))  # row i <-> row i
        got = run_folds(deid, plain, training_spec(cfg, run_dir / "logs_recipient"),
                        workers=cfg.protocol.workers, show_progress=bool(cfg.progress))
        rec = pooled_predictions(deid, plain, got)
        rec["deidentified"], rec["arm"] = True, "recipient"
        pred = pd.concat([pred, rec], ignore_index=True)
        names.append("recipient")
    write_csv(pred, run_dir / "predictions.csv")
    scores = {name: score_predictions(pred[pred["arm"] == name], samples.class_names)
              for name in names}
    # identity leakage
    size, frac = int(d.identity.size), float(d.identity.train_fraction)
    tr, te = identity_split(samples.meta, frac)
    rows = samples.input_source.rows
    drows = deid.input_source.rows

    def apex_path(row: dict) -> str:
        from mer.data.preprocess.apex import frame_path

        return str(frame_path(row["onset_path"], int(row["onset"]), int(row["apex"])))

    clf = IdentityClassifier(radius=int(d.identity.get("radius", 1)))
    keys = samples.meta["subject_key"].tolist()
    images, labels = [], []
    for i in tr:
        images += [face_image(rows[i]["onset_path"], size), face_image(apex_path(rows[i]), size)]
        labels += [keys[i], keys[i]]
    clf.fit(images, labels)
    test_keys = [keys[i] for i in te]
    acc_orig = clf.accuracy([face_image(apex_path(rows[i]), size) for i in te], test_keys)
    acc_deid = clf.accuracy([face_image(apex_path(drows[i]), size) for i in te], test_keys)
    acc_arms = {a.meta["arm"].iloc[0]: clf.accuracy(
        [face_image(apex_path(a.input_source.rows[i]), size) for i in te], test_keys)
        for a in arms}
    n_subjects = len(set(keys))
    o, dd = scores["original"]["overall"], scores["deidentified"]["overall"]
    margin = float(d.get("margin", 0.1))
    own = scores.get("own_face", {}).get("overall")
    rc = scores.get("recipient", {}).get("overall")
    split = None if own is None else {  # the drop, in two parts
        "motion_transfer": o["uf1"] - own["uf1"], "identity_change": own["uf1"] - dd["uf1"]}
    report = {
        "name": cfg.name, "synthetic": samples.synthetic,
        "label": "synthetic (SynME)" if samples.synthetic else "real",
        "command": command_line(), "seed": int(cfg.seed), "model": cfg.model.name,
        "protocol": {"name": cfg.protocol.name, "selection": cfg.protocol.select,
                     "epochs": int(cfg.trainer.max_epochs), "folds": len(folds)},
        "new_faces": sorted({f for f in deid.meta["source"]}),
        "density": density, "motion": motion, "controls": controls,
        "recognition": {k: v["overall"] for k, v in scores.items()},
        "uf1_drop": o["uf1"] - dd["uf1"], "margin": margin,
        "within_margin": bool(o["uf1"] - dd["uf1"] <= margin),
        "recipient_drop": None if rc is None else o["uf1"] - rc["uf1"],
        "recipient_within_margin": None if rc is None else bool(o["uf1"] - rc["uf1"] <= margin),
        "drop_split": split,
        "identity": {"classifier": "LBPH (cv2.face)", "subjects": n_subjects,
                     "train_images": len(images), "test_clips": int(len(te)),
                     "accuracy_original": acc_orig, "accuracy_deidentified": acc_deid,
                     "accuracy_by_arm": {"original": acc_orig, **acc_arms},
                     "chance": 1.0 / n_subjects},
    }
    atomic_write_text(run_dir / "deidentify.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(run_dir / "deidentify.md", markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    rec, idn = r["recognition"], r["identity"]
    split = r.get("drop_split")
    by_arm = idn.get("accuracy_by_arm") or {"original": idn["accuracy_original"],
                                             "deidentified": idn["accuracy_deidentified"]}
    return "\n".join([
        f"# De-identification: motion kept, identity removed? ({r['label']})", "",
        f"Command: `{r['command']}`", "",
        f"Recogniser {r['model']} trained on the original clips ({r['protocol']['name']}, "
        f"{r['protocol']['folds']} folds, {r['protocol']['selection']} epoch of "
        f"{r['protocol']['epochs']}); each fold tests its subject's clips, original and "
        f"re-rendered on {len(r['new_faces'])} new face(s)"
        f"{' and on its own face (own_face: identity kept, same motion transfer)' if split else ''}"
        f"; {_how(r)}.",
        "",
        "| test clips | n | UF1 | UAR | accuracy |", "|---|---|---|---|---|",
        *[f"| {k} | {m['n']} | {m['uf1']:.4f} | {m['uar']:.4f} | {m['accuracy']:.4f} |"
          for k, m in rec.items()], "",
        f"UF1 drop {r['uf1_drop']:+.4f} (margin {r['margin']}: "
        f"{'within' if r['within_margin'] else 'NOT within'}).", "",
        *([f"Of it, motion transfer (original -> own_face) {split['motion_transfer']:+.4f}, "
           f"identity change (own_face -> deidentified) {split['identity_change']:+.4f}.", ""]
          if split else []),
        *([f"A recipient of the de-identified clips only (recipient: the same recogniser and "
           f"folds trained and tested on de-identified clips): UF1 drop against the lab's own "
           f"{r['recipient_drop']:+.4f} (margin {r['margin']}: "
           f"{'within' if r['recipient_within_margin'] else 'NOT within'}).", ""]
          if r.get("recipient_drop") is not None else []),
        f"Identity ({idn['classifier']}, {idn['subjects']} subjects, trained on "
        f"{idn['train_images']} original frames, tested on the apex frames of "
        f"{idn['test_clips']} held-out clips):", "",
        "| test frames | identity accuracy |", "|---|---|",
        *[f"| {'de-identified' if k == 'deidentified' else k} | {v:.4f} |"
          for k, v in by_arm.items()],
        f"| chance (1 / subjects) | {idn['chance']:.4f} |", ""])


def _how(r: dict) -> str:
    """How the motion was carried to the new face, in words."""
    if r.get("motion", "tps") == "dense":
        return "motion carried as the whole flow field, pixel by pixel (motion=dense)"
    density = r.get("density", 1)
    points = "the centroid" if density == 1 else f"{density * (density + 1) // 2} inner points"
    return f"control points: landmarks + {points} per landmark triangle (motion=tps)"
