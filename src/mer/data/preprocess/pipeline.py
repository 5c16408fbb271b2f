"""Minimal preprocessing: onset/apex frames -> a (u, v, strain) flow image per sample.

No face detection or alignment here: the frames are taken as they are (cropped databases,
SynME). Steps of :func:`flow_image`: read both frames as grey, resize to ``work_size``
squared, onset->apex optical flow, optical strain, stack (u, v, strain), min-max normalise
each channel to [0, 1] per sample, resize to ``out_size`` squared with ``cv2.INTER_AREA``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mer.data.preprocess.cache import FlowCache, cache_key, file_sha256
from mer.data.preprocess.flow import METHODS, compute_flow, to_grey
from mer.data.preprocess.strain import optical_strain
from mer.data.workers import image_pool

TABLE_COLUMNS = ("database", "subject", "clip", "onset_path", "apex_path")
ON_ERROR = ("raise", "skip")


class PreprocessError(Exception):
    """A sample could not be preprocessed; the message names the sample and the file."""


@dataclass
class FlowParams:
    """How a flow image is made.

    Attributes:
        method: flow method, one of ``mer.data.preprocess.flow.METHODS``.
        work_size: frames are resized to work_size x work_size before the flow.
        out_size: the flow image is resized to out_size x out_size at the end.
        grey: read frames straight as grey (``cv2.IMREAD_GRAYSCALE``); False reads BGR and
            converts with ``cv2.cvtColor`` (the two can differ by rounding for JPEG).
        method_params: overrides of the flow method's defaults.
    """

    method: str = "tvl1"
    work_size: int = 128
    out_size: int = 28
    grey: bool = True
    method_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown flow method {self.method!r}; choose one of {list(METHODS)}")
        if self.work_size < 8 or self.out_size < 2:
            raise ValueError(f"work_size ({self.work_size}) >= 8 and out_size ({self.out_size}) "
                             ">= 2 are needed")
        self.method_params = dict(self.method_params or {})

    def key(self) -> str:
        """A stable string of all parameters (part of the cache key)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=str)


def read_frame(path: str | os.PathLike, sample: str, flags: int = cv2.IMREAD_COLOR
               ) -> np.ndarray:
    """A frame file decoded by ``cv2.imread(path, flags)``, after checking that it decodes
    fully (``cv2.imread`` returns what it could decode of a truncated JPEG, the rest grey).

    Raises:
        PreprocessError: the file is missing, truncated or corrupt; names the sample and file.
    """
    from mer.data.databases.common import image_problem

    if not Path(path).is_file():
        raise PreprocessError(f"{sample}: frame file {path} does not exist; check the database "
                              "root and the sample's frame numbers")
    problem = image_problem(path)  # names the file, the decoder's complaint and the fix
    if problem:
        raise PreprocessError(f"{sample}: cannot decode frame file fully: {problem}")
    image = cv2.imread(str(path), flags)
    if image is None:
        raise PreprocessError(f"{sample}: cannot decode frame file {path} (OpenCV cannot read "
                              "it); replace or re-extract it")
    return image


def _read_grey(path: str | os.PathLike, grey: bool, sample: str) -> np.ndarray:
    if not str(path):
        raise PreprocessError(f"{sample}: no frame path given (apex unknown?); choose an apex "
                              "frame for this sample before preprocessing")
    image = read_frame(path, sample, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    return image if grey else to_grey(image)


def check_finite_flow(flow: np.ndarray, sample: str, frames: str) -> None:
    """PreprocessError when a flow field holds NaN/inf: normalising would turn the whole
    channel into zeros without a word."""
    if not np.isfinite(flow).all():
        bad = int((~np.isfinite(flow)).any(axis=-1).sum())
        raise PreprocessError(f"{sample}: optical flow {frames} gave non-finite values at {bad} "
                              "pixels; check the frames, or try another data.flow.method")


def skip_hint(message: str, on_error: str) -> str:
    """``message`` with, under ``on_error=raise``, how to leave such samples out instead."""
    if on_error != "raise":
        return message
    return (f"{message} (or set data.on_error=skip to leave such samples out; they are listed "
            "in the report)")


def minmax_normalise(stack: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C, H, W) float32, each channel scaled to [0, 1]; a constant channel -> 0."""
    stack = np.asarray(stack, dtype=np.float32)
    lo = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - lo
    scaled = (stack - lo) / np.where(span > 0, span, 1.0)
    return np.where(span > 0, scaled, 0.0).astype(np.float32)


def flow_image(
    onset_path: str | os.PathLike,
    apex_path: str | os.PathLike,
    params: FlowParams,
    sample: str = "",
) -> np.ndarray:
    """The normalised (u, v, strain) image of one sample.

    Args:
        onset_path, apex_path: frame image files.
        params: how to compute it.
        sample: the sample's name for error messages.

    Returns:
        (3, out_size, out_size) float32 in [0, 1].

    Raises:
        PreprocessError: a frame is missing, unreadable, or the two differ in size.
    """
    sample = sample or f"sample ({onset_path}, {apex_path})"
    onset = _read_grey(onset_path, params.grey, sample)
    apex = _read_grey(apex_path, params.grey, sample)
    if onset.shape != apex.shape:
        raise PreprocessError(f"{sample}: onset {onset_path} is {onset.shape[::-1]} but apex "
                              f"{apex_path} is {apex.shape[::-1]} (w, h); frames of a clip must "
                              "have one size")
    size = (params.work_size, params.work_size)
    onset = cv2.resize(onset, size, interpolation=cv2.INTER_AREA)
    apex = cv2.resize(apex, size, interpolation=cv2.INTER_AREA)
    try:
        flow = compute_flow(onset, apex, params.method, **params.method_params)
    except cv2.error as exc:
        raise PreprocessError(f"{sample}: optical flow failed on {onset_path} -> {apex_path}: "
                              f"{exc}") from exc
    check_finite_flow(flow, sample, f"{onset_path} -> {apex_path}")
    stack = np.concatenate([flow.transpose(2, 0, 1), optical_strain(flow)[None]], axis=0)
    stack = minmax_normalise(stack)
    out = cv2.resize(stack.transpose(1, 2, 0), (params.out_size, params.out_size),
                     interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def _describe(row: dict[str, Any]) -> str:
    name = f"{row['database']}/{row['subject']}/{row['clip']}"
    return f"{name} (sheet row {row['row']})" if "row" in row else name


def _compute(task: tuple) -> tuple[int, np.ndarray | None, str | None]:
    """Worker body; errors come back as text so that nothing unpicklable crosses processes."""
    pos, onset_path, apex_path, params, sample = task
    try:
        return pos, flow_image(onset_path, apex_path, params, sample), None
    except PreprocessError as exc:
        return pos, None, str(exc)


def _run(tasks: list[tuple], workers: int) -> Generator[tuple[int, np.ndarray | None, str | None]]:
    if workers <= 0 or len(tasks) <= 1:
        # One OpenCV thread, as in the workers, so results do not depend on the worker count.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for task in tasks:
                yield _compute(task)
        finally:
            cv2.setNumThreads(threads)
        return
    n = min(workers, len(tasks))
    chunk = max(1, min(16, len(tasks) // (4 * n)))
    with image_pool(n) as pool:
        yield from pool.imap(_compute, tasks, chunksize=chunk)


def frame_sha256(path: str, sample: str, shas: dict[str, str]) -> str:
    """sha256 of a frame file, memoised in ``shas``; PreprocessError naming the sample when
    the file cannot be read."""
    if path not in shas:
        try:
            shas[path] = file_sha256(path)
        except OSError as exc:
            raise PreprocessError(f"{sample}: cannot read frame file {path!r} "
                                  f"({exc.strerror or exc}); check the database root and the "
                                  "sample's frame numbers") from exc
    return shas[path]


def flow_images(
    table: pd.DataFrame,
    params: FlowParams,
    cache: FlowCache | None = None,
    workers: int = 0,
    on_error: str = "raise",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Flow images of every row of a sample table.

    Args:
        table: sample table (``mer.data.samples``) with at least ``database, subject, clip,
            onset_path, apex_path`` (``row`` is used in messages when present).
        params: how to compute the images.
        cache: where computed images are stored and looked up (None: no cache).
        workers: processes to use (0: in this process). Results do not depend on it.
        on_error: ``raise`` stops at the first bad sample (in table order); ``skip`` leaves it
            out and reports it.
        progress: show a rich progress bar.

    Returns:
        x: (K, 3, out_size, out_size) float32, one image per kept row, in table order.
        kept: (K,) int positions (0-based) of the kept rows in ``table``.
        failures: the rows left out, each ``{"database", "subject", "clip", "reason"}``.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise PreprocessError(f"sample table lacks column(s) {missing}; it has "
                              f"{list(table.columns)} and needs {list(TABLE_COLUMNS)}")
    rows = table.reset_index(drop=True).to_dict("records")
    n, size = len(rows), params.out_size
    x = np.zeros((n, 3, size, size), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    keys: dict[int, str] = {}
    shas: dict[str, str] = {}  # frames shared by several rows are hashed once

    def fail(pos: int, message: str) -> None:
        if on_error == "raise":
            raise PreprocessError(skip_hint(message, on_error))
        errors[pos] = message

    params_key = params.key()
    columns = [TextColumn("[bold]flow images"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("flow", total=n)
        tasks = []
        for pos, row in enumerate(rows):
            sample = _describe(row)
            onset_path, apex_path = str(row["onset_path"]), str(row["apex_path"])
            if cache is not None:
                try:
                    keys[pos] = cache_key(frame_sha256(onset_path, sample, shas),
                                          frame_sha256(apex_path, sample, shas),
                                          params_key)
                except PreprocessError as exc:
                    fail(pos, str(exc))
                    bar.advance(job)
                    continue
                hit = cache.get(keys[pos])
                if hit is not None and hit.shape == x.shape[1:]:
                    x[pos], ok[pos] = hit, True
                    bar.advance(job)
                    continue
            tasks.append((pos, onset_path, apex_path, params, sample))

        if cache is not None and tasks:
            cache.check_writable()  # a read-only cache fails now, not after the computing
        # closing(): on a raise, stop the workers now rather than when garbage collected
        with closing(_run(tasks, workers)) as results:
            for pos, image, error in results:
                if error is not None:
                    fail(pos, error)
                else:
                    x[pos], ok[pos] = image, True
                    if cache is not None:
                        cache.put(keys[pos], image)
                bar.advance(job)

    failures = [
        {"database": rows[p]["database"], "subject": rows[p]["subject"],
         "clip": rows[p]["clip"], "reason": errors[p]}
        for p in sorted(errors)
    ]
    kept = np.flatnonzero(ok)
    return x[kept], kept, failures
