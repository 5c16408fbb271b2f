"""Stickered clips through mer's own preprocessing: frames -> sticker -> flow image.

The sticker is pasted on the frames the flow pipeline reads (onset and apex, as
:func:`mer.data.preprocess.pipeline.flow_image` reads them: grey, or BGR with
``FlowParams.grey=False``), following the face from onset to apex; the stickered frames are
written losslessly (PNG) and go through :func:`mer.data.preprocess.pipeline.flow_images`, with
its cache (keyed by the frames' content) and worker processes. A clip with no sticker gives
exactly the flow image of the original clip (tested), so every difference is the sticker's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mer.data.preprocess.cache import FlowCache
from mer.data.preprocess.pipeline import FlowParams, PreprocessError, flow_images, read_frame
from mer.privacy.stickers.placement import Sticker, StickerError, sticker_frames


@dataclass(frozen=True)
class Clip:
    """What a sticker needs of a clip: its name (``db/subject/clip``), onset and apex frame
    files, and the onset's (68, 2) landmarks in the frame's pixels."""

    name: str
    onset_path: str
    apex_path: str
    landmarks: np.ndarray


def read_pair(clip: Clip, grey: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The clip's onset and apex frames as the flow pipeline reads them."""
    flags = cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR
    return read_frame(clip.onset_path, clip.name, flags), read_frame(clip.apex_path, clip.name,
                                                                     flags)


def stickered_pair(clip: Clip, sticker: Sticker | None, grey: bool = True, track: bool = True
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """([onset, apex] with the sticker, its outline on each); ``sticker=None``: the frames
    as read, no outline."""
    frames = list(read_pair(clip, grey))
    if frames[0].shape[:2] != frames[1].shape[:2]:
        raise StickerError(f"{clip.name}: onset and apex frames differ in size")
    if sticker is None:
        return frames, []
    return sticker_frames(frames, clip.landmarks, sticker, clip.name, track=track)


def stickered_flows(clips: list[Clip], jobs: list[tuple[int, Sticker | None]],
                    params: FlowParams, workdir: str | Path, cache: FlowCache | None = None,
                    workers: int = 0, track: bool = True, progress: bool = False
                    ) -> np.ndarray:
    """Flow images of stickered clips.

    Args:
        clips: the clips; jobs: (clip position, sticker or None) pairs, one flow image each.
        params: the flow pipeline's parameters (those the recogniser was trained with).
        workdir: where the stickered frames are written (PNG, named by content).
        cache: the flow cache (None: compute every image).
        workers: flow worker processes (0: this process).

    Returns:
        (len(jobs), 3, out_size, out_size) float32, in job order.

    Raises:
        StickerError: a sticker does not fit its clip's face (names the clip).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for pos, sticker in jobs:
        clip = clips[pos]
        frames, _ = stickered_pair(clip, sticker, params.grey, track)
        paths = []
        for frame in frames:
            ok, buf = cv2.imencode(".png", frame)
            if not ok:
                raise StickerError(f"{clip.name}: cannot encode a stickered frame")
            data = buf.tobytes()
            path = workdir / f"{hashlib.sha256(data).hexdigest()[:24]}.png"
            if not path.exists():
                path.write_bytes(data)
            paths.append(str(path))
        database, subject, name = (clip.name.split("/", 2) + ["", ""])[:3]
        rows.append({"database": database, "subject": subject,
                     "clip": f"{name}+{sticker.label() if sticker else 'none'}",
                     "onset_path": paths[0], "apex_path": paths[1]})
    if not rows:
        return np.zeros((0, 3, params.out_size, params.out_size), np.float32)
    x, kept, _ = flow_images(pd.DataFrame(rows), params, cache, workers=workers,
                             on_error="raise", progress=progress)
    if len(kept) != len(rows):  # on_error=raise: cannot happen; kept for safety
        raise PreprocessError("stickered flow images: some clips failed")
    return x
