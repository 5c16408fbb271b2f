"""``data.augment.generate=K``: K driven sequences per training clip of each fold, built only
from that fold's training subjects, fed to the recogniser through the normal data path.

For a training clip ``c`` (class y) and ``k < K``, the plan draws (from generators seeded by
``seed``, ``c`` and ``k`` only, never by the fold):

- the **source face**: the first subject of a seeded permutation of all subjects that is a
  training subject of the fold other than ``c``'s own (``c``'s own when it is the only one),
  and the first of a seeded permutation of that subject's clips (its onset frame, neutral);
- the **drivers**: ``c`` itself and the first ``drivers - 1`` clips of class y of a seeded
  permutation that belong to the fold's training subjects.

Validation and test subjects are skipped, so neither their faces nor their motion is used.
Because the draws do not depend on the fold, most folds plan the same sequences, and each
distinct one is rendered once (frames under ``<cache_dir>/generated``, content-keyed); its
flow image is computed by the same preprocessing as the real clips (:func:`generated_flow`):
the plain flow of whole frames (same ``data.flow``, same flow cache), or, when the data is
``mer.prepare``'s aligned crops (``data.prepared``), that very pipeline: the face found on the
generated onset frame (the source's own face), the same eye-level alignment, apex and
magnification settings, flow on the crop. Generation itself runs on whole frames (the aligned
landmarks are mapped back through each clip's alignment matrix), so a generated clip reaches the
model by exactly the path a real one does.

Generated rows carry ``generated=True``, ``source`` (the source clip), ``drivers`` (the driving
clips, ``;``-joined), ``target`` and ``from_subjects`` (every subject whose face or motion was
used); their ``subject`` is the source's (the face shown). They join the fold's training
positions only (:func:`mer.engine.protocols.augment_folds` checks it): never tested, never in
validation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import DrivenGenerator, GenerateParams
from mer.data.generate.motion import Clip
from mer.data.samples import FlowSamples

log = logging.getLogger(__name__)

GENERATED_COLUMNS = ("generated", "source", "drivers", "target", "from_subjects")


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def clip_ids(meta: pd.DataFrame) -> list[str]:
    return [f"{d}/{s}/{c}" for d, s, c in zip(meta["database"], meta["subject"], meta["clip"])]


def clips_of(samples: FlowSamples) -> dict[str, Clip]:
    """Every sample as a :class:`Clip` (frames from ``samples.input_source``; landmarks in
    frame pixels from ``samples.landmarks``: from the flow image's frame to the whole frame,
    or, for ``mer.prepare``'s aligned crops, to the crop then through the inverse of the
    clip's alignment matrix)."""
    import cv2

    source = samples.input_source
    if source is None:
        raise GenerationError("data.augment.generate needs the clips' frames, but this data "
                              "holds flow images only (a flow cache); train on the database "
                              "itself (data=<database> data.root=...)")
    ids = clip_ids(samples.meta)
    out: dict[str, Clip] = {}
    out_size = samples.x.shape[-1]
    for i, (cid, row) in enumerate(zip(ids, source.rows, strict=True)):
        lm = None
        if samples.landmarks is not None and source.matrices is not None:
            crop = (samples.landmarks[i].astype(np.float64) + 0.5) * \
                source.crop_size / out_size - 0.5
            inv = cv2.invertAffineTransform(np.asarray(source.matrices[i], np.float64))
            lm = crop @ inv[:, :2].T + inv[:, 2]
        elif samples.landmarks is not None:
            img = cv2.imread(str(row["onset_path"]), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise GenerationError(f"clip {cid}: onset frame {row['onset_path']} cannot be "
                                      "read")
            h, w = img.shape[:2]
            frac = (samples.landmarks[i].astype(np.float64) + 0.5) / out_size
            lm = frac * [w, h] - 0.5
        out[cid] = Clip(cid, samples.meta["subject_key"].iloc[i],
                        int(samples.meta["label"].iloc[i]), str(row["onset_path"]),
                        int(row["onset"]), int(row["apex"]), int(row.get("offset", -1)), lm,
                        float(row.get("fps", 200.0)))
    return out


def plan_fold(meta: pd.DataFrame, train_idx: np.ndarray, k_per_clip: int, drivers: int,
              seed: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(target, k, source, drivers) positions of the sequences one fold trains on.

    Only positions of ``train_idx`` are ever chosen (see the module doc for the draws)."""
    keys = meta["subject_key"].to_numpy()
    labels = meta["label"].to_numpy()
    ids = clip_ids(meta)
    order = np.argsort(ids, kind="stable")  # a fold-independent order of all clips
    subjects = sorted(set(keys))
    train = set(int(i) for i in train_idx)
    train_subjects = set(keys[list(train)])
    plan = []
    for t in sorted(train):
        for k in range(k_per_clip):
            base = [seed, _stable(ids[t]), k]
            perm = np.random.default_rng(base + [0]).permutation(len(subjects))
            cands = [subjects[j] for j in perm if subjects[j] in train_subjects]
            src_subject = next((s for s in cands if s != keys[t]), keys[t])
            own = [int(i) for i in order if keys[i] == src_subject]
            src = own[int(np.random.default_rng(base + [1]).permutation(len(own))[0])]
            same = [int(i) for i in order if labels[i] == labels[t] and i != t]
            dperm = np.random.default_rng(base + [2]).permutation(len(same))
            others = [same[j] for j in dperm if same[j] in train][:drivers - 1]
            plan.append((t, k, src, (t, *others)))
    return plan


def generated_fps(clip: Clip, frames: int) -> float:
    """Frame rate of a ``frames``-frame clip generated for ``clip``: its onset..offset lasts as
    long in seconds as the target's (onset..apex mirrored when it has no offset), so that a
    temporal filter (Eulerian magnification) sees the same motion speed."""
    span = clip.offset - clip.onset if clip.offset > clip.apex else 2 * (clip.apex - clip.onset)
    return float(clip.fps) * (frames - 1) / span if span > 0 else float(clip.fps)


def generated_flow(samples: FlowSamples, table: pd.DataFrame, cache_dir: str | Path,
                   default_flow: dict | None = None, workers: int = 0, progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Flow images of generated clips by the path the samples' own flow took.

    Args:
        table: one row per generated clip: ``database, subject, clip, onset, apex, offset,
            onset_path, apex_path, fps`` (whole frames, as :class:`DrivenGenerator` writes them).
        default_flow: ``data.flow`` when the samples do not record theirs.

    Returns:
        x (G, 3, S, S) float32; landmarks (G, 68, 2) in x's pixels found by ``mer.prepare``'s
        face detector (None without one: the caller knows them); matrices (G, 2, 3) frame ->
        crop (None unless the samples are prepared).

    Raises:
        GenerationError: a generated clip the pipeline refuses (no face found on it...), naming
            it and the clip it was made for.
    """
    from mer.data.preprocess.cache import FlowCache
    from mer.data.preprocess.pipeline import FlowParams, PreprocessError, flow_images
    from mer.data.preprocess.prepared import PrepareParams, prepare_table

    source = samples.input_source
    if source.matrices is None:
        data_flow = source.flow or dict(default_flow or {})
        fparams = FlowParams(**{k: v for k, v in data_flow.items()
                                if k in ("method", "work_size", "out_size", "grey",
                                         "method_params")})
        cache = FlowCache(Path(cache_dir) / "flow") if cache_dir else None
        x, kept, _ = flow_images(table, fparams, cache, workers=workers, on_error="raise",
                                 progress=progress)
        assert len(kept) == len(table)  # on_error=raise
        return x, None, None
    info = samples.provenance.get("prepare") or {}
    settings = {k: v for k, v in (info.get("params") or {}).items() if k != "version"}
    if not settings:
        raise GenerationError("these samples are mer.prepare's aligned crops but do not record "
                              "the pipeline's parameters (provenance.prepare.params), so "
                              "generated clips cannot be prepared the same way; load them with "
                              "mer.data.sources.load_samples")
    params = PrepareParams(**settings)
    cache = FlowCache(Path(info["cache"])) if info.get("cache") else None
    try:
        res = prepare_table(table, params, cache, workers=workers, on_error="raise",
                            progress=progress)
    except PreprocessError as exc:
        raise GenerationError(
            f"a generated clip cannot go through mer.prepare's pipeline as the real clips do: "
            f"{exc}. Its onset frame is its source clip's face; leave that clip out (or lower "
            "data.face.min_confidence)") from exc
    lm = res.landmarks_at(params.out_size)
    return res.x, (lm if np.isfinite(lm).all() else None), res.matrix


def generate_for_folds(samples: FlowSamples, folds: list, k_per_clip: int,
                       params: GenerateParams, cache_dir: str | Path, seed: int,
                       workers: int = 0, progress: bool = True) -> tuple[FlowSamples, list]:
    """The samples with every fold's generated sequences appended, and the folds with those
    positions added to their training positions (``fold.train_idx``; test and validation
    untouched). A "fold" is anything with ``train_idx`` (a LOSO fold, a federated lab's split:
    its sequences then come from that lab's training clips only). See the module doc."""
    from dataclasses import replace

    from mer.data.inputs import InputSource

    clips = clips_of(samples)
    meta = samples.meta
    ids = clip_ids(meta)
    plans = [plan_fold(meta, f.train_idx, k_per_clip, params.drivers, seed) for f in folds]
    unique: dict[tuple, int] = {}
    for plan in plans:
        for item in plan:
            unique.setdefault((item[0], item[2], item[3]), len(unique))
    gen = DrivenGenerator(clips, params, Path(cache_dir) / "generated", samples.class_names)
    made = gen.generate_many([(ids[t], ids[s], [ids[d] for d in drv]) for (t, s, drv) in unique],
                             workers, progress)
    rows, records = [], []
    for (t, s, drv), rec in zip(unique, made, strict=True):
        src_meta = meta.iloc[s]
        tgt = meta.iloc[t]
        used = sorted({meta["subject_key"].iloc[i] for i in (s, *drv)})
        rows.append({
            "database": src_meta["database"], "subject": src_meta["subject"],
            "clip": f"gen_{rec['key'][:12]}", "label": int(tgt["label"]),
            "emotion": tgt.get("emotion", ""), "au_raw": tgt.get("au_raw", ""),
            "aus": tgt.get("aus", ()), "onset": rec["onset"], "apex": rec["apex"],
            "apex_estimated": False, "has_aus": bool(tgt.get("has_aus", False)),
            "subject_key": src_meta["subject_key"], "generated": True,
            "source": ids[s], "drivers": ";".join(ids[d] for d in drv),
            "target": ids[t], "from_subjects": ";".join(used),
        })
        records.append({"database": src_meta["database"], "subject": src_meta["subject"],
                        "clip": rows[-1]["clip"], "onset": rec["onset"],
                        "apex": rec["apex"], "offset": rec["offset"],
                        "onset_path": rec["onset_path"],
                        "fps": generated_fps(clips[ids[t]], params.frames)})
        rows[-1]["apex_path"] = rec["apex_path"]
    table = pd.DataFrame(rows)
    flow_table = pd.DataFrame(records).assign(apex_path=table["apex_path"].to_numpy())
    x_gen, found, matrices = generated_flow(samples, flow_table, cache_dir, dict(params.flow),
                                            workers, progress)
    real = meta.copy()
    for col, value in zip(GENERATED_COLUMNS, (False, "", "", "", "")):
        if col not in real:
            real[col] = value
    gen_meta = table.drop(columns=["apex_path"])
    new_meta = pd.concat([real, gen_meta], ignore_index=True)
    landmarks = None
    if samples.landmarks is not None:  # the onset is the source's face: its landmarks
        src_pos = [s for (_, s, _) in unique]
        landmarks = np.concatenate([samples.landmarks, samples.landmarks[src_pos]
                                    if found is None else found.astype(np.float32)])
    n = len(meta)
    old = samples.input_source
    source = InputSource(**{**old.__dict__, "rows": list(old.rows) + records,
                            "matrices": None if old.matrices is None else
                            np.concatenate([old.matrices, matrices])})
    out = FlowSamples(np.concatenate([samples.x, x_gen]), new_meta, samples.class_names,
                      samples.excluded, samples.synthetic,
                      {**samples.provenance, "generated": {
                          "per_clip": k_per_clip, "sequences": len(unique),
                          "flow_path": "mer.prepare (aligned crops)" if matrices is not None
                          else "flow of whole frames",
                          "params": {"drivers": params.drivers, "phases": params.phases,
                                     "frames": params.frames, "fusion": params.fusion}}},
                      landmarks, {}, source, samples.pretrain)
    new_folds = []
    for fold, plan in zip(folds, plans, strict=True):
        extra = np.array(sorted({n + unique[(t, s, drv)] for (t, _, s, drv) in plan}),
                         dtype=np.int64)
        new_folds.append(replace(fold, train_idx=np.concatenate([fold.train_idx, extra])))
    return out, new_folds


def fold_augmenter(data_cfg, cache_dir: str | Path, seed: int, progress: bool = True
                   ) -> Callable | None:
    """The ``(samples, folds) -> (samples, folds)`` augmenter ``data.augment`` asks for, or
    None when ``data.augment.generate`` is 0 (the default) or absent."""
    aug = data_cfg.get("augment") if hasattr(data_cfg, "get") else None
    k = int((aug or {}).get("generate", 0) or 0)
    if k <= 0:
        return None
    from omegaconf import OmegaConf

    flow = OmegaConf.to_container(data_cfg.flow, resolve=True) if data_cfg.get("flow") else {}
    params = GenerateParams(drivers=int(aug.get("drivers", 3)), phases=int(aug.get("phases", 5)),
                            frames=int(aug.get("frames", 9)),
                            fusion=str(aug.get("fusion", "median")), flow=flow,
                            motion=str(aug.get("motion", "tps")))
    from mer.data.sources import data_workers

    workers = data_workers(data_cfg)

    def augment(samples: FlowSamples, folds: list) -> tuple[FlowSamples, list]:
        return generate_for_folds(samples, folds, k, params, cache_dir, seed, workers, progress)

    return augment


def generated_summary(samples: FlowSamples, folds: list, csv_path: str | Path | None = None
                      ) -> dict:
    """What a report says about the generated samples: how many, made how, how many each fold
    trained on (never tested); with ``csv_path``, one row per generated sample (clip, class,
    source, drivers, target, from_subjects, the folds that trained on it) written there."""
    meta = samples.meta
    flags = meta["generated"].to_numpy(bool)
    gen_pos = np.flatnonzero(flags)
    used_by: dict[int, list[str]] = {int(i): [] for i in gen_pos}
    for f in folds:
        for i in f.train_idx:
            if int(i) in used_by:
                used_by[int(i)].append(f.name)
    if csv_path is not None:
        rows = meta.iloc[gen_pos][["database", "subject", "clip", "label", "source", "drivers",
                                   "target", "from_subjects"]].copy()
        rows["class"] = [samples.class_names[int(k)] for k in rows["label"]]
        rows["generated"] = True
        rows["trained_in_folds"] = [";".join(used_by[int(i)]) for i in gen_pos]
        from mer.data.io import atomic_write_text

        atomic_write_text(Path(csv_path), rows.to_csv(index=False))
    return {**samples.provenance.get("generated", {}), "n_generated": int(len(gen_pos)),
            "per_fold": {f.name: int(flags[f.train_idx].sum()) for f in folds},
            "tested": int(sum(flags[f.test_idx].sum() for f in folds)),
            "csv": None if csv_path is None else Path(csv_path).name}
