"""Named model inputs beyond the flow image: face crops, frame stacks, magnified motion.

A network declares what it needs (``inputs = ("flow", "apex_crop")`` on its class, sizes from
its keyword arguments, :meth:`request`); :func:`provide` fills ``FlowSamples.inputs`` with those
arrays, one row per sample, from the frames the samples were made from, and the datamodule
carries them next to ``x`` in every batch (``(x, y, *inputs in declared order)``).

=================== ============================================================================
name                array per sample
=================== ============================================================================
``flow``            ``x`` itself: (3, S, S) u, v, strain in [0, 1] (``data.flow.out_size``)
``apex_crop``       (1, S, S) float32 grey apex frame in [0, 1]
``onset_crop``      (1, S, S) float32 grey onset frame in [0, 1]
``frames``          (1, T, S, S) float32 grey frames onset..offset resampled to T, [0, 1]
``magnified_frames`` the same after Eulerian magnification (``data.magnify`` settings)
``magnified_flow``  (3, S, S) onset->apex flow of the magnified clip (as ``mer.prepare`` with
                    ``data.magnify.enabled=true``; that very ``x`` when the data is prepared so)
=================== ============================================================================

Where the pixels come from: with ``mer.prepare`` output (``data.prepared``), the aligned face
crop of each frame (the clip's own similarity transform, kept in the prepare cache); otherwise
the whole frame resized (cropped releases, SynME). Frames are read grey. ``frames`` spans
onset..offset (onset..apex where the sheet has no offset after the apex) and takes T frame
numbers evenly spaced over it (``numpy.linspace``, rounded): a clip with fewer than T frames
there is an :class:`InputError` naming it. Computed arrays are cached on disk
(``<cache_dir>/inputs``) under the sha256 of the frames used, the request and the crop transform.
A flow cache (``data=flowcache``) has no frames: asking it for any of these names the
``mer.prepare`` command that makes a dataset which has them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FRAME_INPUTS = ("apex_crop", "onset_crop", "frames", "magnified_frames", "magnified_flow")
INPUT_NAMES = ("flow", *FRAME_INPUTS)
VERSION = "1"  # bump when what an input holds changes for the same frames and request


class InputError(ValueError):
    """A model input that cannot be served; the message names the sample or source and the fix."""


@dataclass(frozen=True)
class InputRequest:
    """One named input a network needs: ``size`` S (side in px) and ``length`` T (frames)."""

    name: str
    size: int
    length: int = 0

    def __post_init__(self) -> None:
        if self.name not in FRAME_INPUTS:
            raise InputError(f"unknown model input '{self.name}': known {list(INPUT_NAMES)}")
        if self.size < 8:
            raise InputError(f"input '{self.name}': size {self.size} px, need >= 8")
        if self.name in ("frames", "magnified_frames") and self.length < 2:
            raise InputError(f"input '{self.name}': length {self.length} frames, need >= 2")

    def shape(self) -> tuple[int, ...]:
        """Per-sample array shape."""
        if self.name in ("frames", "magnified_frames"):
            return (1, self.length, self.size, self.size)
        if self.name == "magnified_flow":
            return (3, self.size, self.size)
        return (1, self.size, self.size)


@dataclass
class InputSource:
    """Where a :class:`~mer.data.samples.FlowSamples`' frames are, row for row.

    Attributes:
        rows: one dict per sample: ``database, subject, clip, onset, apex, offset, onset_path,
            fps`` and ``row`` (the sheet row) when known; ``apex`` the one the flow used.
        origin: the data config's name, for messages (``synme``, ``casme2``...).
        matrices: (N, 2, 3) frame -> aligned crop transforms of ``mer.prepare`` (None: the
            whole frame is resized); crop_size: the side of that crop.
        flow: ``data.flow`` (method, work_size, method_params); magnify: ``data.magnify``.
        x_magnified: the samples' ``x`` is already the flow of magnified clips.
        cache_dir: where computed inputs are cached (None: not cached).
    """

    rows: list[dict]
    origin: str = "data"
    matrices: np.ndarray | None = None
    crop_size: int = 128
    flow: dict = field(default_factory=dict)
    magnify: dict = field(default_factory=dict)
    x_magnified: bool = False
    cache_dir: str | None = None

    def subset(self, index: np.ndarray) -> InputSource:
        index = np.asarray(index, dtype=np.int64)
        return replace(self, rows=[self.rows[i] for i in index],
                       matrices=None if self.matrices is None else self.matrices[index])


def describe(row: dict) -> str:
    """``db/subject/clip (sheet row N)``."""
    name = f"{row.get('database')}/{row.get('subject')}/{row.get('clip')}"
    return f"{name} (sheet row {row['row']})" if row.get("row") not in (None, "") else name


def no_frames_error(name: str, origin: str) -> InputError:
    """The error for a dataset that has only flow images (a flow cache)."""
    return InputError(
        f"the model needs input '{name}', made from the clips' frames, but data={origin} holds "
        "flow images only (a flow cache has no frames). Train on the database itself: "
        "`python -m mer.prepare data=<database> data.root=/path/to/it` prepares its aligned "
        "face crops (add data.magnify.enabled=true for magnified flow), then "
        "`python -m mer.run data=<database> data.root=/path/to/it model=...` uses them "
        "(data=casme2, samm, smic, casme3, ... or data=composite with data.roots)")


def provide(samples: Any, requests: list[InputRequest], progress: bool = False) -> None:
    """Set ``samples.inputs`` to exactly the arrays of ``requests``, in that order.

    Arrays already there with the requested shape are kept (a federated run rebuilds its
    module every round); the rest are computed (or read from the cache) for every sample.

    Raises:
        InputError: samples without frames (a flow cache), a clip too short for T frames, a
            missing apex; the message names the sample and the fix.
    """
    have = dict(getattr(samples, "inputs", {}) or {})
    out: dict[str, np.ndarray] = {}
    for req in requests:
        current = have.get(req.name)
        if current is not None and current.shape[1:] == req.shape() and \
                len(current) == len(samples.x):
            out[req.name] = current
            continue
        source: InputSource | None = getattr(samples, "input_source", None)
        if req.name == "magnified_flow" and source is not None and source.x_magnified \
                and samples.x.shape[1:] == req.shape():
            out[req.name] = samples.x
            continue
        if source is None:
            raise no_frames_error(req.name, (samples.provenance or {}).get("source", "flowcache"))
        if len(source.rows) != len(samples.x):
            raise InputError(f"input source of data={source.origin} lists {len(source.rows)} "
                             f"clips for {len(samples.x)} samples")
        out[req.name] = compute(source, req, progress=progress)
    samples.inputs = out


def compute(source: InputSource, req: InputRequest, progress: bool = False) -> np.ndarray:
    """(N, *req.shape()) float32 for every row of ``source``, through the on-disk cache."""
    from rich.progress import Progress

    from mer.data.preprocess.cache import FlowCache

    cache = FlowCache(Path(source.cache_dir) / "inputs") if source.cache_dir else None
    out = np.zeros((len(source.rows), *req.shape()), np.float32)
    shas: dict[str, str] = {}
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task(f"model input {req.name}", total=len(source.rows))
        for i, row in enumerate(source.rows):
            matrix = None if source.matrices is None else source.matrices[i]
            frames = frame_numbers(row, req)
            key = None
            if cache is not None:
                key = _key(row, frames, req, source, matrix, shas)
                hit = cache.get(key)
                if hit is not None and hit.shape == req.shape():
                    out[i] = hit
                    bar.advance(job)
                    continue
            out[i] = clip_input(row, req, source, matrix, frames)
            if cache is not None:
                cache.put(key, out[i])
            bar.advance(job)
    return out


def frame_numbers(row: dict, req: InputRequest) -> list[int]:
    """The frame numbers an input of ``row`` reads (see the module doc)."""
    onset, apex, offset = int(row["onset"]), int(row["apex"]), int(row.get("offset", -1))
    sample = describe(row)
    if req.name == "onset_crop":
        return [onset]
    if apex < 0:
        raise InputError(f"{sample}: no apex frame (the sheet has none and the data was not "
                         "prepared): run `python -m mer.prepare` for this data config, which "
                         "estimates it")
    if req.name == "apex_crop":
        return [apex]
    if req.name == "magnified_flow":
        if apex <= onset:
            raise InputError(f"{sample}: apex {apex} is not after the onset {onset}: no motion "
                             "to magnify; check the sheet's frame numbers")
        return list(range(onset, apex + 1))
    end = offset if offset > apex else apex
    span = list(range(onset, end + 1))
    if len(span) < req.length:
        raise _too_short(sample, len(span), req, onset, end)
    if req.name == "magnified_frames":
        return span  # magnified over the whole span, then sampled
    return [span[i] for i in sample_positions(len(span), req.length)]  # distinct: span >= T


def sample_positions(n: int, length: int) -> np.ndarray:
    """``length`` evenly spaced positions into ``n`` frames (rounded)."""
    return np.rint(np.linspace(0, n - 1, length)).astype(np.int64)


def _too_short(sample: str, n: int, req: InputRequest, onset: int, end: int) -> InputError:
    return InputError(
        f"{sample}: the model input '{req.name}' takes {req.length} frames but the clip has "
        f"{n} (frames {onset}..{end}); lower model.kwargs.frames to {n} or fewer, or leave "
        "the clip out of the annotation sheet")


def clip_input(row: dict, req: InputRequest, source: InputSource, matrix: np.ndarray | None,
               numbers: list[int]) -> np.ndarray:
    """One sample's array for ``req`` (shape ``req.shape()``), from its frames."""
    from mer.data.preprocess.apex import frame_path
    from mer.data.preprocess.pipeline import PreprocessError, read_frame

    sample = describe(row)
    work = max(req.size, 64) if req.name.startswith("magnified") else req.size
    if req.name == "magnified_flow":
        work = int(source.flow.get("work_size", 128))

    def read(k: int) -> np.ndarray:
        try:
            path = row["onset_path"] if k == int(row["onset"]) else \
                frame_path(row["onset_path"], int(row["onset"]), k)
            grey = read_frame(path, sample, cv2.IMREAD_GRAYSCALE)
        except (PreprocessError, ValueError) as exc:
            raise InputError(f"{sample}: frame {k} for model input '{req.name}': {exc}") from exc
        if matrix is not None:
            from mer.data.preprocess.align import warp

            grey = warp(grey, matrix, source.crop_size)
        return cv2.resize(grey, (work, work), interpolation=cv2.INTER_AREA)

    seq = np.stack([read(k) for k in numbers]).astype(np.float32)
    if req.name in ("apex_crop", "onset_crop"):
        return (seq / 255.0).reshape(req.shape())
    if req.name == "frames":
        return (seq / 255.0)[None].astype(np.float32)
    boosted = _magnify(seq, row, source)
    if req.name == "magnified_frames":
        pick = sample_positions(len(boosted), req.length)
        small = np.stack([cv2.resize(f, (req.size, req.size), interpolation=cv2.INTER_AREA)
                          for f in boosted[pick]])
        return (small / 255.0)[None].astype(np.float32)
    return _flow_image(boosted[0], boosted[-1], req.size, source, sample)


def _magnify(seq: np.ndarray, row: dict, source: InputSource) -> np.ndarray:
    from mer.data.preprocess.magnify import magnify

    m = {"alpha": 8.0, "low_hz": 1.0, "high_hz": 15.0, "levels": 4, "skip_levels": 1,
         **{k: v for k, v in source.magnify.items() if k != "enabled"}}
    fps = float(row.get("fps") or 200.0)
    high = min(float(m["high_hz"]), fps / 2)
    return magnify(seq, fps, float(m["alpha"]), float(m["low_hz"]), high, int(m["levels"]),
                   int(m["skip_levels"]))


def _flow_image(onset: np.ndarray, apex: np.ndarray, size: int, source: InputSource,
                sample: str) -> np.ndarray:
    """(3, size, size) u, v, strain of onset -> apex, each min-max normalised (the pipeline's)."""
    from mer.data.preprocess.flow import compute_flow
    from mer.data.preprocess.pipeline import check_finite_flow, minmax_normalise
    from mer.data.preprocess.strain import optical_strain

    a, b = (np.clip(np.rint(f), 0, 255).astype(np.uint8) for f in (onset, apex))
    flow = compute_flow(a, b, source.flow.get("method", "tvl1"),
                        **(source.flow.get("method_params") or {}))
    try:
        check_finite_flow(flow, sample, "of the magnified clip")
    except Exception as exc:
        raise InputError(str(exc)) from exc
    stack = minmax_normalise(np.concatenate([flow.transpose(2, 0, 1),
                                             optical_strain(flow)[None]], axis=0))
    return cv2.resize(stack.transpose(1, 2, 0), (size, size),
                      interpolation=cv2.INTER_AREA).transpose(2, 0, 1).astype(np.float32)


def _key(row: dict, numbers: list[int], req: InputRequest, source: InputSource,
         matrix: np.ndarray | None, shas: dict[str, str]) -> str:
    from mer.data.preprocess.apex import frame_path
    from mer.data.preprocess.pipeline import PreprocessError, frame_sha256

    sample = describe(row)
    digests = []
    for k in numbers:
        path = str(row["onset_path"]) if k == int(row["onset"]) else \
            str(frame_path(row["onset_path"], int(row["onset"]), k))
        try:
            digests.append(frame_sha256(path, sample, shas))
        except PreprocessError as exc:
            raise InputError(f"{sample}: frame {k} for model input '{req.name}': {exc}") from exc
    params: dict[str, Any] = {"request": [req.name, req.size, req.length], "version": VERSION,
                              "crop": None if matrix is None else
                              [source.crop_size, np.round(matrix, 6).tolist()]}
    if req.name.startswith("magnified"):
        params["magnify"] = {k: v for k, v in sorted(source.magnify.items()) if k != "enabled"}
        params["fps"] = float(row.get("fps") or 200.0)
    if req.name == "magnified_flow":
        params["flow"] = source.flow
    text = "\n".join(digests) + "\n" + json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
