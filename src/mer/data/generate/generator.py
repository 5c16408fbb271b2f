"""A driven-sequence generator over a set of clips: caches each clip's landmarks and driving
flows, renders fused motions onto source faces and writes them as frame folders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mer.data.generate.errors import GenerationError
from mer.data.generate.motion import (
    FUSIONS,
    Clip,
    check_classes,
    clip_landmarks,
    driving_flows,
    driving_motion,
    fuse_motions,
    triangles,
)
from mer.data.generate.render import render_dense, render_sequence, write_frames

MOTIONS = ("tps", "dense")
VERSION = "1"  # bump when the frames made for the same inputs change
DONE = ".done"


@dataclass
class GenerateParams:
    """How a driven sequence is made.

    Attributes:
        drivers: driving clips fused per sequence (the target clip and others of its class).
        phases: knots of normalised time (0 onset .. 0.5 apex .. 1 offset) the motion is
            measured and fused at (odd, >= 3).
        frames: frames of a generated clip (odd, >= 3; the middle one is the apex).
        fusion: ``median`` or ``mean`` over the drivers, per point and phase.
        flow: the data's ``flow`` settings (``method``, ``method_params``) for driving flows.
        density: control points inside each landmark triangle
            (:func:`~mer.data.generate.motion.control_points`; 1: the centroid); ``tps`` only.
        motion: ``tps`` (the drivers' flow at the control points, densified by a TPS) or
            ``dense`` (their whole flow field carried pixel by pixel,
            :mod:`mer.data.generate.dense`).
    """

    drivers: int = 3
    phases: int = 5
    frames: int = 9
    fusion: str = "median"
    flow: dict = field(default_factory=lambda: {"method": "tvl1"})
    density: int = 1
    motion: str = "tps"

    def __post_init__(self) -> None:
        if self.drivers < 1:
            raise GenerationError(f"data.augment.drivers={self.drivers}: need >= 1")
        if self.phases < 3 or self.phases % 2 == 0:
            raise GenerationError(f"data.augment.phases={self.phases}: need an odd number >= 3 "
                                  "(onset, apex in the middle, offset)")
        if self.frames < 3 or self.frames % 2 == 0:
            raise GenerationError(f"data.augment.frames={self.frames}: need an odd number >= 3")
        if self.fusion not in FUSIONS:
            raise GenerationError(f"data.augment.fusion={self.fusion!r}: use one of "
                                  f"{list(FUSIONS)}")
        if not isinstance(self.density, int) or self.density < 1:
            raise GenerationError(f"control point density {self.density!r}: need an integer "
                                  ">= 1 (1: the triangle centroids)")
        if self.motion not in MOTIONS:
            raise GenerationError(f"motion={self.motion!r}: use one of {list(MOTIONS)} (tps: "
                                  "control points and a TPS; dense: the whole flow field)")
        self.flow = {k: v for k, v in dict(self.flow).items()
                     if k in ("method", "method_params")}

    def key(self) -> str:
        d = asdict(self)
        if d["density"] == 1:  # the original control points: sequences made before stay valid
            del d["density"]
        if d["motion"] == "tps":  # likewise
            del d["motion"]
        return json.dumps(d, sort_keys=True, default=str)


class DrivenGenerator:
    """Renders driven sequences of ``clips`` (by id) into ``out_dir``; content-keyed, so a
    sequence already made for the same frames and settings is reused.

    Args:
        clips: every clip that may be a source face or a driver, by :attr:`Clip.id`.
        params: :class:`GenerateParams`.
        out_dir: where generated clip folders are written.
        class_names: for messages.
        detector: face detector for clips without known landmarks (default: MediaPipe).
        flow_store: driving flows shared with other generators over the same clips (keyed by
            clip, phases and flow settings; they do not depend on the motion model or density).
    """

    def __init__(self, clips: dict[str, Clip], params: GenerateParams, out_dir: str | Path,
                 class_names: list[str] | None = None, detector=None,
                 flow_store: dict | None = None) -> None:
        self.clips, self.params, self.out_dir = clips, params, Path(out_dir)
        self.class_names, self.detector = class_names, detector
        self._landmarks: dict[str, np.ndarray] = {}
        self._flows: dict[tuple, np.ndarray] = {} if flow_store is None else flow_store
        self._sha: dict[str, str] = {}
        self.phases = np.linspace(0.0, 1.0, params.phases)

    def landmarks(self, clip_id: str) -> np.ndarray:
        if clip_id not in self._landmarks:
            clip = self.clips[clip_id]
            if clip.landmarks is None and self.detector is None:
                from mer.data.preprocess.face import make_detector

                self.detector = make_detector("mediapipe")
            self._landmarks[clip_id] = clip_landmarks(clip, self.detector)
        return self._landmarks[clip_id]

    def _flow_key(self, clip_id: str) -> tuple:
        return (clip_id, self.params.phases, json.dumps(self.params.flow, sort_keys=True,
                                                        default=str))

    def flows(self, clip_id: str) -> np.ndarray:
        key = self._flow_key(clip_id)
        if key not in self._flows:
            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)  # as the preprocessing workers: same flows, no contention
            try:
                self._flows[key] = driving_flows(self.clips[clip_id], self.phases,
                                                 self.params.flow)
            finally:
                cv2.setNumThreads(threads)
        return self._flows[key]

    def fused_motion(self, target: str, source_landmarks: np.ndarray, drivers: list[str],
                     tri: np.ndarray) -> np.ndarray:
        """(P, M, 2) motion of ``drivers`` (all of ``target``'s class) in the source's frame."""
        check_classes(self.clips[target], [self.clips[d] for d in drivers], self.class_names)
        motions = [driving_motion(self.flows(d), self.landmarks(d), tri, self.params.density)
                   for d in drivers]
        return fuse_motions(motions, [self.landmarks(d) for d in drivers], source_landmarks,
                            self.params.fusion)

    def fused_dense(self, target: str, source_landmarks: np.ndarray, drivers: list[str],
                    height: int, width: int) -> np.ndarray:
        """(P, H, W, 2) dense motion of ``drivers`` (all of ``target``'s class) on the source
        face (:mod:`mer.data.generate.dense`)."""
        from mer.data.generate.dense import dense_motion, fuse_dense

        check_classes(self.clips[target], [self.clips[d] for d in drivers], self.class_names)
        return fuse_dense([dense_motion(self.flows(d), self.landmarks(d), source_landmarks,
                                        height, width) for d in drivers], self.params.fusion)

    def _frame_sha(self, clip_id: str) -> str:
        if clip_id not in self._sha:
            from mer.data.preprocess.cache import file_sha256

            self._sha[clip_id] = file_sha256(self.clips[clip_id].onset_path)
        return self._sha[clip_id]

    def record(self, target: str, source: str, drivers: list[str]) -> dict:
        """Where :meth:`generate` writes this sequence (nothing is rendered): {"folder",
        "onset_path", "apex_path", "onset", "apex", "offset", "key"}; the key is the content
        (settings, clip ids and their onset frames' bytes)."""
        key = hashlib.sha256(json.dumps(
            [VERSION, self.params.key(), target, source, drivers, self._frame_sha(source),
             [self._frame_sha(d) for d in drivers]]).encode()).hexdigest()[:20]
        folder = self.out_dir / key
        n = self.params.frames
        return {"folder": str(folder), "onset_path": str(folder / "img1.jpg"),
                "apex_path": str(folder / f"img{(n + 1) // 2}.jpg"), "onset": 1,
                "apex": (n + 1) // 2, "offset": n, "key": key}

    def generate(self, target: str, source: str, drivers: list[str]) -> dict:
        """Render the motion of ``drivers`` (fused) on the face of clip ``source``'s onset frame.

        Returns:
            :meth:`record`: the clip in the CASME II frame layout (``img1.jpg``..), onset 1,
            apex in the middle.
        """
        record = self.record(target, source, drivers)
        folder = Path(record["folder"])
        n = self.params.frames
        if (folder / DONE).exists():
            check_classes(self.clips[target], [self.clips[d] for d in drivers], self.class_names)
            return record
        src_clip = self.clips[source]
        face = cv2.imread(src_clip.onset_path, cv2.IMREAD_UNCHANGED)
        if face is None:
            raise GenerationError(f"source clip {source}: its onset frame "
                                  f"{src_clip.onset_path} cannot be read")
        lm = self.landmarks(source)
        if self.params.motion == "dense":
            motion = self.fused_dense(target, lm, drivers, *face.shape[:2])
            frames = render_dense(face, motion, n)
        else:
            tri = triangles(lm)
            motion = self.fused_motion(target, lm, drivers, tri)
            frames = render_sequence(face, lm, tri, motion, n, self.params.density)
        write_frames(frames, folder)
        (folder / DONE).write_text(json.dumps({"target": target, "source": source,
                                               "drivers": drivers}))
        return record

    def generate_many(self, jobs: list[tuple[str, str, list[str]]], workers: int = 0,
                      progress: bool = True, label: str = "generating driven sequences"
                      ) -> list[dict]:
        """:meth:`generate` for each ``(target, source, drivers)`` job; records in job order.

        Every job's classes are checked before anything is rendered. With ``workers > 1`` the
        driving flows still missing, then the renders, run in a pool of image workers (one
        OpenCV / torch thread each); the flows come back into this generator's store (shared
        with other arms). A sequence already on disk is not redone, and each one is final only
        when its ``.done`` is written, so an interrupted run resumes where it stopped.
        """
        from rich.progress import Progress

        for target, _, drivers in jobs:
            check_classes(self.clips[target], [self.clips[d] for d in drivers],
                          self.class_names)
        records = [self.record(*job) for job in jobs]
        todo = list({rec["key"]: job for job, rec in zip(jobs, records, strict=True)
                     if not (Path(rec["folder"]) / DONE).exists()}.values())
        with Progress(transient=True, disable=not progress) as bar:
            if workers <= 1 or len(todo) < 2:
                task = bar.add_task(label, total=len(jobs))
                for job in jobs:
                    self.generate(*job)
                    bar.advance(task)
                return records
            from mer.data.workers import image_pool

            missing = sorted({d for _, _, drivers in todo for d in drivers
                              if self._flow_key(d) not in self._flows})
            with image_pool(min(workers, len(todo))) as pool:
                task = bar.add_task("driving flows", total=len(missing))
                args = [(self.clips[c], self.phases, self.params.flow) for c in missing]
                for clip_id, flows in zip(missing, pool.imap(_driving_flows, args),
                                          strict=True):
                    self._flows[self._flow_key(clip_id)] = flows
                    bar.advance(task)
                task = bar.add_task(label, total=len(todo))
                for _ in pool.imap_unordered(_render, [self._render_job(j) for j in todo]):
                    bar.advance(task)
        return records

    def _render_job(self, job: tuple[str, str, list[str]]) -> tuple:
        """What a worker needs to render ``job`` alone: the clips (landmarks found here, once)
        and the drivers' flows."""
        from dataclasses import replace

        target, source, drivers = job
        clips = {c: replace(self.clips[c], landmarks=self.landmarks(c))
                 for c in dict.fromkeys([target, source, *drivers])}
        flows = {self._flow_key(d): self.flows(d) for d in drivers}
        return self.params, self.out_dir, self.class_names, clips, flows, job


def _driving_flows(args: tuple) -> np.ndarray:
    """In a worker: :func:`driving_flows` of one clip."""
    return driving_flows(*args)


def _render(args: tuple) -> dict:
    """In a worker: one :meth:`DrivenGenerator.generate`, from :meth:`_render_job`."""
    params, out_dir, class_names, clips, flows, job = args
    return DrivenGenerator(clips, params, out_dir, class_names, flow_store=flows).generate(*job)
