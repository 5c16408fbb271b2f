"""The full preprocessing pipeline (``python -m mer.prepare``): clip -> aligned flow images.

Per clip (:func:`prepare_clip`):

1. read the onset frame; find the face and its iBUG-68 landmarks (``face.py``);
2. one eye-level similarity transform for the clip: a square ``size`` px crop (``align.py``);
3. the apex: the sheet's, or, when it has none (apex -1, SMIC), the frame of largest flow
   magnitude relative to onset over onset..offset, on the face only (the convex hull of the
   landmarks; ``apex.py``);
4. optional Eulerian magnification of the aligned onset..apex frames (``magnify.py``);
5. onset -> apex optical flow on the aligned crops, optical strain, each channel min-max
   normalised: ``flow_hi`` (3, size, size) for landmark patches, area-resized to ``flow``
   (3, out_size, out_size); the landmarks carried into the crop frame.

Over a sample table (:func:`prepare_table`): each clip's entry is looked up in a
:class:`FlowCache` by the sha256 of the frames it uses and the parameters; misses are computed
in worker processes and stored atomically as they arrive, so an interrupted run resumes where it
stopped. A clip that fails (no face, a corrupt frame...) is remembered under the same key with
its reason, so later runs list it without trying again (nor loading the detector) until its
frames or the parameters change. Without a face detector (``detector: none``) the whole frame
is resized to the crop.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mer.data.preprocess.align import alignment_matrix, resize_points, transform_points, warp
from mer.data.preprocess.apex import estimate_apex, face_mask, frame_path
from mer.data.preprocess.cache import FlowCache, cache_key
from mer.data.preprocess.flow import METHODS, compute_flow, to_grey
from mer.data.preprocess.pipeline import (
    ON_ERROR,
    PreprocessError,
    check_finite_flow,
    frame_sha256,
    minmax_normalise,
    read_frame,
    skip_hint,
)
from mer.data.preprocess.strain import optical_strain
from mer.data.workers import image_pool

STAGES = ("read", "face", "align", "apex", "magnify", "flow", "post")
ROW_COLUMNS = ("database", "subject", "clip", "onset", "apex", "offset", "onset_path",
               "apex_path")
# bump when prepare_clip's output changes for the same inputs and parameters
VERSION = "2"  # 2: apex estimated on the face only; entries carry their content hash


@dataclass
class MagnifyParams:
    """Eulerian magnification settings (``data.magnify``, see ``magnify.py``); off by default."""

    enabled: bool = False
    alpha: float = 8.0
    low_hz: float = 1.0
    high_hz: float = 15.0
    levels: int = 4
    skip_levels: int = 1

    def __post_init__(self) -> None:
        if self.enabled and not 0 <= self.low_hz < self.high_hz:
            raise ValueError(f"data.magnify: need 0 <= low_hz < high_hz, got {self.low_hz}, "
                             f"{self.high_hz}")
        if self.levels < 1 or self.skip_levels < 0:
            raise ValueError("data.magnify: levels >= 1 and skip_levels >= 0 are needed")


@dataclass
class PrepareParams:
    """Parameters of the full pipeline (all part of the cache key).

    Attributes:
        detector: ``mediapipe`` or ``none`` (frames used whole, resized to the crop).
        min_confidence: face-detection confidence threshold.
        margin: crop border around the landmark box, a fraction of its side.
        size: side of the aligned crop; the flow is computed at this size (``data.flow
            .work_size``) and kept as ``flow_hi``.
        out_size: side of the global flow image (``data.flow.out_size``).
        method: optical flow method; method_params: its overrides.
        apex_method: flow method for apex estimation (only when the sheet has no apex).
        magnify: Eulerian magnification settings (off by default).
    """

    detector: str = "mediapipe"
    min_confidence: float = 0.5
    margin: float = 0.1
    size: int = 128
    out_size: int = 28
    method: str = "tvl1"
    method_params: dict = field(default_factory=dict)
    apex_method: str = "dis"
    magnify: MagnifyParams = field(default_factory=MagnifyParams)

    def __post_init__(self) -> None:
        if isinstance(self.magnify, dict):
            self.magnify = MagnifyParams(**self.magnify)
        if self.method not in METHODS or self.apex_method not in METHODS:
            raise ValueError(f"flow methods must be among {list(METHODS)}: got {self.method!r}, "
                             f"{self.apex_method!r}")
        if self.size < 16 or not 2 <= self.out_size <= self.size:
            raise ValueError(f"need size >= 16 and 2 <= out_size <= size, got {self.size}, "
                             f"{self.out_size}")
        self.method_params = dict(self.method_params or {})

    def key(self) -> str:
        """A stable string of every parameter (part of the cache key)."""
        d = asdict(self)
        if not self.magnify.enabled:
            d["magnify"] = {"enabled": False}
        return json.dumps({**d, "version": VERSION}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_data_cfg(cls, data_cfg: Any) -> PrepareParams:
        """From a data config: ``data.face``, ``data.flow``, ``data.apex``, ``data.magnify``."""
        def get(node: Any, name: str) -> dict:
            value = node.get(name) if node is not None else None
            if value is None:
                return {}
            try:
                from omegaconf import OmegaConf

                return dict(OmegaConf.to_container(value, resolve=True))
            except ValueError:
                return dict(value)

        face, flow = get(data_cfg, "face"), get(data_cfg, "flow")
        apex, magnify = get(data_cfg, "apex"), get(data_cfg, "magnify")
        known = {"detector", "min_confidence", "margin"}
        unknown = sorted(set(face) - known)
        if unknown:
            raise ValueError(f"data.face: unknown keys {unknown}; known: {sorted(known)}")
        return cls(
            detector=face.get("detector", "mediapipe"),
            min_confidence=float(face.get("min_confidence", 0.5)),
            margin=float(face.get("margin", 0.1)),
            size=int(flow.get("work_size", 128)), out_size=int(flow.get("out_size", 28)),
            method=flow.get("method", "tvl1"), method_params=flow.get("method_params") or {},
            apex_method=apex.get("method", "dis"), magnify=MagnifyParams(**magnify),
        )


# ----------------------------------------------------------------------------- one clip


def describe(row: dict[str, Any]) -> str:
    """``db/subject/clip (sheet row N)`` for messages."""
    name = f"{row['database']}/{row['subject']}/{row['clip']}"
    return f"{name} (sheet row {row['row']})" if row.get("row") is not None else name


def _read(path: str | Path, sample: str) -> np.ndarray:
    """(H, W, 3) BGR uint8 frame, fully decoded; PreprocessError naming the sample and file
    when it is missing, truncated or corrupt."""
    return read_frame(path, sample, cv2.IMREAD_COLOR)


def _last_frame(row: dict[str, Any]) -> int:
    """Last frame number to search for an apex: the offset, else the clip's last frame file."""
    onset, offset = int(row["onset"]), int(row.get("offset", -1))
    if offset > onset:
        return offset
    p = Path(row["onset_path"])
    digits = list(re.finditer(r"\d+", p.stem))
    if not digits:
        return onset
    m = digits[-1]
    name = re.compile(re.escape(p.stem[:m.start()]) + r"(\d+)" + re.escape(p.stem[m.end():])
                      + re.escape(p.suffix))
    numbers = [int(f.group(1)) for q in p.parent.iterdir() if (f := name.fullmatch(q.name))]
    return max([k for k in numbers if k > onset], default=onset)


def clip_frames(row: dict[str, Any], params: PrepareParams) -> list[tuple[int, str]]:
    """(number, path) of every frame the clip's entry depends on, onset first.

    onset and apex; onset..apex when magnifying; onset..last frame when the apex is unknown.
    """
    onset, apex = int(row["onset"]), int(row["apex"])
    onset_path = str(row["onset_path"])
    if apex >= 0 and not params.magnify.enabled:
        return [(onset, onset_path), (apex, str(row["apex_path"]))]
    last = apex if apex >= 0 else _last_frame(row)
    try:
        return [(k, str(frame_path(onset_path, onset, k))) for k in range(onset, last + 1)]
    except ValueError as exc:
        raise PreprocessError(f"{describe(row)}: {exc}") from exc


_DETECTORS: dict[tuple, Any] = {}


def _detector(params: PrepareParams):
    """One detector per process and setting (loading the model takes ~0.1 s)."""
    from mer.data.preprocess.face import make_detector

    k = (params.detector, params.min_confidence)
    if k not in _DETECTORS:
        _DETECTORS[k] = make_detector(params.detector, min_confidence=params.min_confidence) \
            if params.detector not in ("none", None) else None
    return _DETECTORS[k]


def prepare_clip(row: dict[str, Any], params: PrepareParams) -> dict[str, np.ndarray]:
    """The full pipeline for one clip (a sample-table row as a dict).

    Returns:
        flow (3, out, out) and flow_hi (3, size, size) float32 in [0, 1] (u, v, strain);
        flow_px (2, size, size) float16 raw flow in crop pixels; landmarks (68, 2) float32 in
        the crop's pixel frame (NaN without a detector); matrix (2, 3) frame -> crop;
        apex () int64 (the sheet's or estimated); times: JSON seconds per stage.

    Raises:
        PreprocessError: a missing or unreadable frame, no face, a failed flow; the message
            names the sample, its sheet row and the file.
    """
    sample = describe(row)
    times = dict.fromkeys(STAGES, 0.0)
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[stage] += now - t
        t = now

    frames = clip_frames(row, params)
    onset_bgr = _read(frames[0][1], sample)
    lap("read")
    size = params.size
    landmarks = np.full((68, 2), np.nan)
    region = None  # the face's pixels in the crop, where the apex is looked for
    detector = _detector(params)
    if detector is not None:
        face = detector(onset_bgr)
        if face is None:
            raise PreprocessError(f"{sample}: no face found on the onset frame {frames[0][1]}; "
                                  "check the frame or lower data.face.min_confidence")
        matrix = alignment_matrix(face.landmarks, size, params.margin)
        landmarks = transform_points(face.landmarks, matrix)
        region = face_mask(landmarks, size)
    else:
        h, w = onset_bgr.shape[:2]
        matrix = np.array([[size / w, 0, 0.5 * size / w - 0.5],
                           [0, size / h, 0.5 * size / h - 0.5]])
    lap("face")

    def aligned(bgr: np.ndarray) -> np.ndarray:
        if bgr.shape != onset_bgr.shape:
            raise PreprocessError(f"{sample}: frames of a clip must have one size; the onset "
                                  f"{frames[0][1]} is {onset_bgr.shape[1::-1]}, another "
                                  f"{bgr.shape[1::-1]} (w, h)")
        return warp(to_grey(bgr), matrix, size)

    onset = aligned(onset_bgr)
    lap("align")
    need_all = len(frames) > 2 or int(row["apex"]) < 0
    crops: dict[int, np.ndarray] = {frames[0][0]: onset}
    if need_all:
        for k, path in frames[1:]:
            image = _read(path, sample)
            lap("read")
            crops[k] = aligned(image)
            lap("align")
    apex = int(row["apex"])
    if apex < 0:
        numbers = [k for k, _ in frames]
        if len(numbers) < 2:
            raise PreprocessError(f"{sample}: no apex in the sheet and no frame after the onset "
                                  f"{frames[0][1]} to estimate one from")
        apex = estimate_apex([crops[k] for k in numbers], numbers, mask=region,
                             method=params.apex_method)
        lap("apex")
    if apex not in crops:
        crops[apex] = aligned(_read(frames[-1][1], sample))
        lap("align")
    onset_img, apex_img = crops[frames[0][0]], crops[apex]
    if params.magnify.enabled and apex > frames[0][0]:
        from mer.data.preprocess.magnify import magnify

        seq = np.stack([crops[k] for k in range(frames[0][0], apex + 1)])
        m = params.magnify
        boosted = magnify(seq, float(row.get("fps") or 200.0), m.alpha, m.low_hz, m.high_hz,
                          m.levels, m.skip_levels)
        onset_img, apex_img = (np.clip(np.rint(boosted[i]), 0, 255).astype(np.uint8)
                               for i in (0, -1))
        lap("magnify")
    try:
        flow = compute_flow(onset_img, apex_img, params.method, **params.method_params)
    except cv2.error as exc:
        raise PreprocessError(f"{sample}: optical flow failed on {frames[0][1]} -> apex "
                              f"{apex}: {exc}") from exc
    check_finite_flow(flow, sample, f"{frames[0][1]} -> apex {apex}")
    lap("flow")
    stack = np.concatenate([flow.transpose(2, 0, 1), optical_strain(flow)[None]], axis=0)
    flow_hi = minmax_normalise(stack)
    small = cv2.resize(flow_hi.transpose(1, 2, 0), (params.out_size, params.out_size),
                       interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    lap("post")
    return {
        "flow": np.ascontiguousarray(small, dtype=np.float32), "flow_hi": flow_hi,
        "flow_px": flow.transpose(2, 0, 1).astype(np.float16),
        "landmarks": landmarks.astype(np.float32), "matrix": matrix.astype(np.float64),
        "apex": np.int64(apex), "times": np.array(json.dumps(times)),
    }


# ----------------------------------------------------------------------------- a table


@dataclass
class PreparedSet:
    """Output of :func:`prepare_table` for the K kept rows (table order).

    Attributes:
        x: (K, 3, out, out) float32; x_hi: (K, 3, size, size) float32 (u, v, strain, [0, 1]).
        landmarks: (K, 68, 2) float32 in the pixel frame of ``x_hi`` (NaN without detector).
        apex: (K,) int64 apex frame used (estimated where the sheet had none).
        kept: (K,) int positions of the kept rows in the table.
        failures: rows left out, ``{"database", "subject", "clip", "reason"}``.
        stage_seconds: summed seconds per stage over the clips computed in this run.
        phase_seconds: wall seconds of ``hash`` (hashing + cache lookup) and ``compute``.
        hits, computed: clips found in the cache / computed now.
        remembered: failures listed from the cache (not tried again: same input as the run
            that failed); they are in ``failures`` too, their reason saying so.
        matrix: (K, 2, 3) frame -> crop transform of each kept clip (for its face crops,
            ``mer.data.inputs``).
    """

    x: np.ndarray
    x_hi: np.ndarray
    landmarks: np.ndarray
    apex: np.ndarray
    kept: np.ndarray
    failures: list[dict]
    stage_seconds: dict[str, float]
    phase_seconds: dict[str, float]
    hits: int
    computed: int
    remembered: int = 0
    matrix: np.ndarray | None = None

    def landmarks_at(self, size: int) -> np.ndarray:
        """(K, 68, 2) landmarks in the pixel frame of a ``size`` x ``size`` image."""
        return resize_points(self.landmarks, self.x_hi.shape[-1], size).astype(np.float32)


def _work(task: tuple) -> tuple[int, dict | None, str | None]:
    """Worker body; errors travel back as text (nothing unpicklable crosses processes)."""
    pos, row, params = task
    try:
        return pos, prepare_clip(row, params), None
    except PreprocessError as exc:
        return pos, None, str(exc)


def _run(tasks: list[tuple], workers: int) -> Generator[tuple[int, dict | None, str | None]]:
    if workers <= 1 or len(tasks) <= 1:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # as in the workers: results do not depend on the worker count
        try:
            for task in tasks:
                yield _work(task)
        finally:
            cv2.setNumThreads(threads)
        return
    with image_pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_work, tasks, chunksize=1)


FAILURE = "failure"  # the array of a remembered failure entry: its reason


def entry_key(row: dict[str, Any], params: PrepareParams, shas: dict[str, str]) -> str:
    """Cache key of a clip: sha256 of the frames it uses + the parameters + VERSION."""
    sample = describe(row)
    digests = [frame_sha256(path, sample, shas) for _, path in clip_frames(row, params)]
    rest = hashlib.sha256("".join(digests[1:]).encode()).hexdigest()
    return cache_key(digests[0], rest, params.key(), version="prepare-" + VERSION)


def prepare_table(
    table: pd.DataFrame,
    params: PrepareParams,
    cache: FlowCache | None = None,
    workers: int = 0,
    on_error: str = "raise",
    progress: bool = True,
) -> PreparedSet:
    """Run :func:`prepare_clip` over every row of a sample table, through the cache.

    Args:
        table: sample table (``mer.data.samples``): ``database, subject, clip, onset, apex,
            offset, onset_path, apex_path`` (``row``, ``fps`` used when present).
        params: pipeline parameters.
        cache: where entries are looked up and stored (None: no cache).
        workers: processes (0 or 1: this process). Results do not depend on it.
        on_error: ``raise`` stops at the first bad sample; ``skip`` leaves it out, listed in
            ``failures`` with its reason.
        progress: show a rich progress bar.

    Raises:
        PreprocessError: a bad sample under ``on_error=raise`` (naming it, its row and file).
        CacheError: a changed or damaged cache entry (naming the file to delete); a cache that
            is not writable while clips need computing (before any is computed); a full disk.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    missing = [c for c in ROW_COLUMNS if c not in table.columns]
    if missing:
        raise PreprocessError(f"sample table lacks column(s) {missing}; it has "
                              f"{list(table.columns)}")
    rows = table.reset_index(drop=True).to_dict("records")
    n, size, out = len(rows), params.size, params.out_size
    x = np.zeros((n, 3, out, out), np.float32)
    x_hi = np.zeros((n, 3, size, size), np.float32)
    lms = np.full((n, 68, 2), np.nan, np.float32)
    apex = np.full(n, -1, np.int64)
    matrix = np.zeros((n, 2, 3), np.float64)
    ok = np.zeros(n, bool)
    errors: dict[int, str] = {}
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    keys: dict[int, str] = {}
    shas: dict[str, str] = {}
    hits = computed = remembered = 0

    def fail(pos: int, message: str) -> None:
        if on_error == "raise":
            raise PreprocessError(skip_hint(message, on_error))
        errors[pos] = message

    def take(pos: int, entry: dict) -> None:
        x[pos], x_hi[pos] = entry["flow"], entry["flow_hi"]
        lms[pos], apex[pos], ok[pos] = entry["landmarks"], int(entry["apex"]), True
        matrix[pos] = entry["matrix"]

    columns = [TextColumn("[bold]prepare {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("clips", total=n)
        tasks = []
        for pos, row in enumerate(rows):
            if cache is not None:
                try:
                    keys[pos] = entry_key(row, params, shas)
                except PreprocessError as exc:
                    fail(pos, str(exc))
                    bar.advance(job)
                    continue
                entry = cache.get_arrays(keys[pos], finite=("flow", "flow_hi"))
                if entry is not None and FAILURE in entry:
                    remembered += 1
                    bar.advance(job)
                    fail(pos, f"{entry[FAILURE]} [remembered from an earlier run: not tried "
                              "again until the clip's frames or the parameters change; delete "
                              f"{cache.path(keys[pos])} to try now]")
                    continue
                if entry is not None and entry.get("flow_hi", np.empty(0)).shape == (3, size,
                                                                                     size):
                    take(pos, entry)
                    hits += 1
                    bar.advance(job)
                    continue
            tasks.append((pos, row, params))
        if cache is not None and tasks:
            cache.check_writable()  # a read-only cache fails now, not after the computing
        t1 = time.perf_counter()
        with closing(_run(tasks, workers)) as results:
            for pos, entry, error in results:
                if error is not None:
                    if cache is not None:  # remembered: not tried again for the same input
                        cache.put_arrays(keys[pos], {FAILURE: np.array(error)})
                    fail(pos, error)
                else:
                    take(pos, entry)
                    computed += 1
                    for stage, s in json.loads(str(entry["times"])).items():
                        stage_seconds[stage] += s
                    if cache is not None:
                        cache.put_arrays(keys[pos], entry)
                bar.advance(job)
        t2 = time.perf_counter()
    failures = [{"database": rows[p]["database"], "subject": rows[p]["subject"],
                 "clip": rows[p]["clip"], "reason": errors[p]} for p in sorted(errors)]
    kept = np.flatnonzero(ok)
    return PreparedSet(x[kept], x_hi[kept], lms[kept], apex[kept], kept, failures,
                       stage_seconds, {"hash": t1 - t0, "compute": t2 - t1}, hits, computed,
                       remembered, matrix[kept])


# ----------------------------------------------------------------------------- data configs

# Data-config keys that do not change what preprocessing produces.
_NOT_PREPROCESSING = ("batch_size", "shuffle", "workers", "on_error", "label_scheme", "families",
                      "prepared")


def config_id(data_cfg: Any) -> str:
    """Short hash naming what a data config preprocesses (source + pipeline parameters)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) \
        else dict(data_cfg)
    d = {k: v for k, v in d.items() if k not in _NOT_PREPROCESSING}
    d["_params"] = PrepareParams.from_data_cfg(data_cfg).key()
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return f"{d.get('name', 'data')}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def manifest_dir(data_cfg: Any, cache_dir: str | Path) -> Path:
    """Folder where ``mer.prepare`` leaves its report for this data config."""
    return Path(cache_dir) / "prepared" / "runs" / config_id(data_cfg)


def use_prepared(data_cfg: Any, cache_dir: str | Path) -> bool:
    """Whether to serve a data config through the full pipeline.

    ``data.prepared``: true / false, or ``auto`` (the default): true once ``python -m
    mer.prepare`` has prepared this very config (its report is in :func:`manifest_dir`).
    """
    flag = data_cfg.get("prepared", "auto") if hasattr(data_cfg, "get") else "auto"
    if isinstance(flag, bool):
        return flag
    if flag != "auto":
        raise ValueError(f"data.prepared must be true, false or auto, got {flag!r}")
    return (manifest_dir(data_cfg, cache_dir) / f"{REPORT_NAME}.json").exists()


def prepared_images(
    table: pd.DataFrame, data_cfg: Any, cache_dir: str | Path, workers: int, on_error: str,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray | None, dict]:
    """What ``load_samples`` needs from the full pipeline for a (labelled) sample table.

    Returns x (K, 3, out, out); kept (K,) row positions; failures; landmarks (K, 68, 2) in
    x's pixel frame (the detector's; without one, the table's ``landmarks`` fractions if any,
    else None); and provenance: parameters, cache dir, apex per kept row, timings.
    """
    params = PrepareParams.from_data_cfg(data_cfg)
    root = Path(cache_dir) / "prepared" / "clips"
    cache = FlowCache(root)
    res = prepare_table(table, params, cache, workers=workers, on_error=on_error,
                        progress=progress)
    landmarks = res.landmarks_at(params.out_size)
    if not np.isfinite(landmarks).all():
        landmarks = None
        if "landmarks" in table and len(res.kept):
            frac = np.stack(list(table["landmarks"].iloc[res.kept]))
            landmarks = (frac * params.out_size - 0.5).astype(np.float32)
    info = {"params": json.loads(params.key()), "cache": str(root), "hits": res.hits,
            "computed": res.computed, "remembered": res.remembered,
            "stage_seconds": res.stage_seconds,
            "phase_seconds": res.phase_seconds, "apex": res.apex.tolist(),
            "matrix": res.matrix, "config_id": config_id(data_cfg)}
    return res.x, res.kept, res.failures, landmarks, info


REPORT_NAME = "prepare_report"
