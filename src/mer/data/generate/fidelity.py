"""Does a driven sequence move as the fused driving motion says? End-point error (EPE) of the
optical flow of a generated clip (onset -> apex, the data's flow method) against:

- the **intended** motion: the TPS field of the fused driving displacements at the apex
  (``motion=tps``), or the fused dense field (``motion=dense``): what the generator was asked
  to render, and
- the **true** fused motion (SynME only, where every clip's apex displacement is known
  exactly): each driver's true field, head motion removed, carried to the source face and fused
  the same way (``tps``: sampled at its control points and densified by the same TPS;
  ``dense``: carried pixel by pixel, :mod:`mer.data.generate.dense`);

over the source face (the convex hull of its landmarks). For scale: the EPE of the drivers'
own flow against their true fields (how well the flow method sees a real SynME clip), and of a
zero flow against the intended and the true fused motion (no motion at all).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mer.data.generate.augment import clip_ids, clips_of
from mer.data.generate.dense import dense_motion, fuse_dense
from mer.data.generate.generator import DrivenGenerator, GenerateParams
from mer.data.generate.motion import (
    control_points,
    fuse_motions,
    read_grey,
    sample_field,
    triangles,
)
from mer.data.generate.tps import tps_field
from mer.data.samples import FlowSamples


def face_mask(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: inside the convex hull of the landmarks."""
    mask = np.zeros((height, width), np.uint8)
    hull = cv2.convexHull(np.rint(landmarks).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


def epe(flow: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean end-point error ``|flow - ref|`` (px) over ``mask``."""
    return float(np.linalg.norm((flow - ref)[mask], axis=-1).mean())


def motion_fidelity(samples: FlowSamples, n: int, drivers: int, flow: dict,
                    cache_dir: str | Path, seed: int = 0, motion: str = "tps") -> dict:
    """EPE figures (see the module doc) over ``n`` driven sequences of SynME ``samples``:
    each a seeded target clip, ``drivers`` clips of its class (the target first) from
    subjects other than the source's, and a source face of another subject."""
    from mer.data.preprocess.flow import compute_flow
    from mer.data.synthetic import apex_displacement, load_meta

    if not samples.synthetic or "root" not in samples.provenance:
        raise ValueError("motion_fidelity needs SynME samples (the true motion is known there)")
    root = Path(samples.provenance["root"])
    metas: dict[str, dict] = {}
    clips = clips_of(samples)
    ids = clip_ids(samples.meta)
    keys, labels = samples.meta["subject_key"].to_numpy(), samples.labels
    params = GenerateParams(drivers=drivers, phases=5, frames=9, flow=flow, motion=motion)
    gen = DrivenGenerator(clips, params, Path(cache_dir) / "generated", samples.class_names)
    rng = np.random.default_rng(seed)
    rows = []

    def true_field(cid: str) -> np.ndarray:
        db, sub, clip = cid.split("/")
        meta = metas.setdefault(db, load_meta(root / db))
        return apex_displacement(root / db, sub, clip, meta)

    for t in rng.permutation(len(ids)):
        if len(rows) >= n:
            break
        same = [i for i in rng.permutation(len(ids)) if labels[i] == labels[t] and i != t]
        others = [i for i in range(len(ids)) if keys[i] != keys[t]]
        if len(same) < drivers - 1 or not others:
            continue
        s = int(rng.choice(others))
        drv = [int(t)] + [i for i in same if keys[i] != keys[s]][:drivers - 1]
        rec = gen.generate(ids[t], ids[s], [ids[d] for d in drv])
        src = clips[ids[s]]
        lm = gen.landmarks(ids[s])
        tri = triangles(lm)
        onset = cv2.imread(rec["onset_path"], cv2.IMREAD_GRAYSCALE)
        apex = cv2.imread(rec["apex_path"], cv2.IMREAD_GRAYSCALE)
        h, w = onset.shape
        f_gen = compute_flow(onset, apex, flow.get("method", "tvl1"),
                             **dict(flow.get("method_params") or {}))
        mask = face_mask(lm, h, w)
        knot = params.phases // 2
        true_m, true_fields, drv_epe = [], [], []
        for d in drv:
            dl = gen.landmarks(ids[d])
            field = true_field(ids[d])
            true_fields.append(field)
            m = sample_field(field, control_points(dl, tri))
            true_m.append((m - np.median(m, axis=0))[None])
            dc = clips[ids[d]]
            own = compute_flow(read_grey(dc, dc.onset), read_grey(dc, dc.apex),
                               flow.get("method", "tvl1"), **dict(flow.get("method_params")
                                                                  or {}))
            dh, dw = own.shape[:2]
            drv_epe.append(epe(own, field, face_mask(dl, dh, dw)))
        chosen = [ids[d] for d in drv]
        if motion == "dense":  # the same carrying and fusion, on the true fields
            f_int = gen.fused_dense(ids[t], lm, chosen, h, w)[knot]
            f_true = fuse_dense([dense_motion(f[None], gen.landmarks(c), lm, h, w)
                                 for f, c in zip(true_fields, chosen, strict=True)],
                                params.fusion)[0]
        else:
            points = control_points(lm, tri)
            intended = gen.fused_motion(ids[t], lm, chosen, tri)[knot]
            fused_true = fuse_motions(true_m, [gen.landmarks(c) for c in chosen], lm,
                                      params.fusion)[0]
            f_int = tps_field(points, intended, h, w)
            f_true = tps_field(points, fused_true, h, w)
        rows.append({"target": ids[t], "source": src.id, "drivers": [ids[d] for d in drv],
                     "epe_vs_intended": epe(f_gen, f_int, mask),
                     "epe_vs_true_fused": epe(f_gen, f_true, mask),
                     "epe_intended_vs_true": epe(f_int, f_true, mask),
                     "epe_zero_vs_intended": epe(np.zeros_like(f_int), f_int, mask),
                     "epe_zero_vs_true": epe(np.zeros_like(f_true), f_true, mask),
                     "epe_drivers_flow_vs_true": float(np.mean(drv_epe)),
                     "true_peak_px": float(np.linalg.norm(f_true[mask], axis=-1).max())})
    keys_ = [k for k in rows[0] if k.startswith("epe") or k == "true_peak_px"] if rows else []
    return {"sequences": len(rows), "drivers": drivers, "motion": motion,
            "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys_},
            "per_sequence": rows}
