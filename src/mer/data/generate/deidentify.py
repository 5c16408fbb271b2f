"""De-identification: a lab's clips re-rendered onto other faces, the motion kept.

Each subject of the lab gets one new face (a pseudonym: all its clips move the same new face),
either an identity of another SynME draw (:func:`synme_faces`: other seeds, other people) or a
face image the user gives (:func:`image_face`: landmarks found by the face detector). A clip's
motion (its own, a single driver: nothing fused, nothing of another clip) is measured relative
to its own neutral face, carried into the new face's frame by the similarity between the two
neutral shapes, and rendered on the new face with the TPS motion model
(:class:`~mer.data.generate.generator.DrivenGenerator`). The flow image of the result is
computed by the same preprocessing as the originals.

The control arm (:func:`own_face`) re-renders each clip on *its own* neutral face by the same
machinery: identity kept, motion carried by the same sparse control points and TPS. Its gap to
the originals is what the motion transfer loses; the rest of the de-identified gap is what the
new face changes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mer.data.generate.augment import clip_ids, clips_of, generated_flow, generated_fps
from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import DrivenGenerator, GenerateParams
from mer.data.generate.motion import Clip, face_landmarks
from mer.data.samples import FlowSamples


@dataclass
class Face:
    """A new identity: ``image`` (H, W[, 3]) uint8 neutral face, ``landmarks`` (68, 2) px."""

    name: str
    image: np.ndarray
    landmarks: np.ndarray


def synme_faces(preset: str, seed: int, cache_dir: str | Path) -> list[Face]:
    """The subjects of a SynME draw (``preset``, ``seed``) as faces: each one's onset frame of
    its first clip (neutral) with its known landmarks."""
    from mer.data import synthetic

    if preset not in synthetic.PRESETS:
        raise GenerationError(f"deidentify.identities.preset={preset!r}: use one of "
                              f"{sorted(synthetic.PRESETS)}")
    cfg = synthetic.PRESETS[preset](seed=int(seed))
    root = synthetic.ensure_synme(cfg, Path(cache_dir) / "synme")
    faces = []
    for spec in cfg.databases:
        meta = synthetic.load_meta(root / spec.name)
        for name, sub in sorted(meta["subjects"].items()):
            clip, info = sorted(sub["clips"].items())[0]
            path = root / spec.name / synthetic.FRAME_ROOT / name / clip / \
                f"img{info['onset']}.jpg"
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise GenerationError(f"SynME face {spec.name}/{name}: cannot read {path}")
            faces.append(Face(f"synme{seed}:{spec.name}/{name}", image,
                              np.asarray(sub["landmarks"], np.float64)))
    return faces


def image_face(path: str | Path, detector=None) -> Face:
    """A face image given by the user, its landmarks found by the face detector.

    Raises:
        GenerationError: unreadable image, or no face landmarks found on it (naming it).
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise GenerationError(f"deidentify.face={path}: cannot read the image (missing or not "
                              "an image file)")
    try:
        landmarks = face_landmarks(image, f"face image {path}", detector)
    except GenerationError:
        raise GenerationError(
            f"deidentify.face={path}: no face found on this image ({image.shape[1]}x"
            f"{image.shape[0]} px) by the face detector (MediaPipe Face Mesh), so it cannot be "
            "the new face. Give a frontal photo of one person with the whole face visible, "
            "evenly lit and at least ~100 px across (a passport-style portrait)") from None
    return Face(f"image:{Path(path).name}", image, landmarks)


def _fitted(face: Face, width: int, height: int, grey: bool, folder: Path) -> Clip:
    """The face resized to a clip's frame size, written as a one-frame 'clip' (its onset)."""
    sx, sy = width / face.image.shape[1], height / face.image.shape[0]
    img = cv2.resize(face.image, (width, height), interpolation=cv2.INTER_AREA)
    if grey:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    tag = hashlib.sha256(face.name.encode()).hexdigest()[:12]
    path = folder / f"{tag}_{width}x{height}{'g' if grey else 'c'}" / "img1.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # written whole, then moved into place: never half a face
        part = path.with_name(f"part-{os.getpid()}.png")
        if not cv2.imwrite(str(part), img):
            raise OSError(f"could not write the fitted face {part}")
        os.replace(part, path)
    lm = (face.landmarks + 0.5) * [sx, sy] - 0.5
    return Clip(f"face:{face.name}", f"face:{face.name}", -1, str(path), 1, 1, -1, lm)


def assign_faces(subjects: list[str], faces: list[Face], seed: int) -> dict[str, Face]:
    """One new face per subject key (distinct while there are enough faces), seeded."""
    if not faces:
        raise GenerationError("de-identification needs at least one new face")
    order = np.random.default_rng(seed).permutation(len(faces))
    return {s: faces[int(order[i % len(faces)])] for i, s in enumerate(sorted(subjects))}


def deidentify(samples: FlowSamples, faces: list[Face], params: GenerateParams,
               cache_dir: str | Path, seed: int = 0, workers: int = 0,
               progress: bool = True, flow_store: dict | None = None) -> FlowSamples:
    """Every clip of ``samples`` re-rendered on its subject's new face (row i <-> row i).

    The result's meta keeps ``database, subject, clip, label`` (and ``subject_key``: whose
    motion it is) and adds ``generated=True``, ``deidentified=True``, ``arm="deidentified"``,
    ``source`` (the new face) and ``drivers`` (the clip itself). ``flow_store``: the clips'
    driving flows, shared between arms (:class:`DrivenGenerator`).
    """
    return _rerender(samples, faces, params, cache_dir, seed, workers, progress, flow_store)


def own_face(samples: FlowSamples, params: GenerateParams, cache_dir: str | Path,
             workers: int = 0, progress: bool = True, flow_store: dict | None = None
             ) -> FlowSamples:
    """The control arm: every clip re-rendered on its own onset frame by its own motion
    (row i <-> row i), the same control points and TPS as :func:`deidentify`.

    Meta as :func:`deidentify`'s, with ``deidentified=False``, ``arm="own_face"`` and
    ``source`` the clip itself.
    """
    return _rerender(samples, None, params, cache_dir, 0, workers, progress, flow_store)


def _rerender(samples: FlowSamples, faces: list[Face] | None, params: GenerateParams,
              cache_dir: str | Path, seed: int, workers: int, progress: bool,
              flow_store: dict | None = None) -> FlowSamples:
    """Each clip's motion rendered on its subject's new face (``faces``) or, ``faces=None``,
    on its own onset frame."""
    from mer.data.inputs import InputSource

    clips = clips_of(samples)
    ids = clip_ids(samples.meta)
    keys = samples.meta["subject_key"].tolist()
    own = faces is None
    assigned = {} if own else assign_faces(sorted(set(keys)), faces, seed)
    out_dir = Path(cache_dir) / "deidentified"
    gen = DrivenGenerator(clips, replace(params, drivers=1), out_dir, samples.class_names,
                          flow_store=flow_store)
    jobs = []
    for i, cid in enumerate(ids):
        if own:
            jobs.append((cid, cid, [cid]))
            continue
        img = cv2.imread(clips[cid].onset_path, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise GenerationError(f"clip {cid}: onset frame {clips[cid].onset_path} "
                                  "cannot be read")
        face = _fitted(assigned[keys[i]], img.shape[1], img.shape[0], img.ndim == 2,
                       out_dir / "faces")
        gen.clips[face.id] = face
        jobs.append((cid, face.id, [cid]))
    made = gen.generate_many(jobs, workers, progress, "re-rendering clips on their own faces"
                             if own else "de-identifying clips")
    rows, records = [], []
    for i, (cid, rec) in enumerate(zip(ids, made, strict=True)):
        rows.append({"database": samples.meta["database"].iloc[i],
                     "subject": samples.meta["subject"].iloc[i],
                     "clip": samples.meta["clip"].iloc[i], "onset_path": rec["onset_path"],
                     "apex_path": rec["apex_path"]})
        records.append({**rows[-1], "onset": rec["onset"], "apex": rec["apex"],
                        "offset": rec["offset"], "fps": generated_fps(clips[cid],
                                                                      params.frames)})
    # the originals' flow path: whole frames, or mer.prepare's pipeline (aligned crops)
    x, found, matrices = generated_flow(samples, pd.DataFrame(records), cache_dir,
                                        dict(params.flow), workers, progress)
    meta = samples.meta.copy()
    meta["generated"] = True
    meta["deidentified"] = not own
    meta["arm"] = "own_face" if own else "deidentified"
    meta["source"] = ids if own else [assigned[k].name for k in keys]
    meta["drivers"] = ids
    meta["onset"], meta["apex"] = 1, (params.frames + 1) // 2
    landmarks = None
    if found is not None:  # found by mer.prepare's detector on the new faces
        landmarks = found.astype(np.float32)
    elif samples.landmarks is not None and own:  # the same faces, the same frame size
        landmarks = samples.landmarks.astype(np.float32)
    elif samples.landmarks is not None:  # the new faces' landmarks in the flow image's frame
        out_size = samples.x.shape[-1]
        landmarks = np.stack([_flow_frame_landmarks(assigned[k], clips[c], out_size)
                              for k, c in zip(keys, ids, strict=True)]).astype(np.float32)
    source = InputSource(**{**samples.input_source.__dict__, "rows": records,
                            "matrices": matrices})
    return FlowSamples(x, meta, samples.class_names, [], samples.synthetic,
                       {**samples.provenance, "deidentified": not own,
                        "rerendered": "own_face" if own else "new_faces"}, landmarks, {}, source)


def _flow_frame_landmarks(face: Face, clip: Clip, out_size: int) -> np.ndarray:
    """The new face's landmarks, fitted to ``clip``'s frame, in the flow image's pixels."""
    img = cv2.imread(clip.onset_path, cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    sx, sy = w / face.image.shape[1], h / face.image.shape[0]
    lm = (face.landmarks + 0.5) * [sx, sy] - 0.5
    return (lm + 0.5) / [w, h] * out_size - 0.5
