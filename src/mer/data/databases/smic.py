"""SMIC-HS reader (the high-speed camera part of SMIC).

Layout: ``<root>/HS/s1/micro/negative/s1_ne_01/image046433.bmp`` (``<root>`` may also be the
``HS`` folder itself; the cropped release names frames ``reg_image046433.bmp``).

Quirks written down here:
- No annotation sheet: the clips are the folders under ``s*/micro/<emotion>/``; the emotion is
  the folder name and already a composite class (negative / positive / surprise).
- The clip folder holds the micro-expression only: onset = its first frame, offset = its last.
- No apex is annotated: apex = -1 (estimated by preprocessing, e.g. the frame of largest
  motion).
- ``s*/non_micro/`` holds non-expression clips: not read.
- No AU annotation. 100 fps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mer.data.databases.common import FrameIndex, Problems, collect_samples, find_tree
from mer.data.databases.registry import DATABASES

FPS = 100.0
EMOTIONS = ("negative", "positive", "surprise")


def _natural(path: Path) -> tuple:
    """s2 before s10 (ASCII digits only: ``²`` passes ``str.isdigit()`` but int() refuses it)."""
    parts = re.split(r"([0-9]+)", path.name)
    return tuple((1, int(t), "") if i % 2 else (0, 0, t) for i, t in enumerate(parts))


@DATABASES.register("smic")
def read_smic(
    root: str | Path, sheet: str | Path | None = None, database: str = "smic",
    on_error: str = "raise", emotions: Iterable[str] | None = EMOTIONS,
    check_images: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read a SMIC-HS tree into a sample table (``sheet`` is unused: SMIC has none)."""
    tree = find_tree(Path(root), ["HS", "SMIC_all_raw/HS", "SMIC_all_cropped/HS", "."],
                     "s*/micro", "SMIC-HS subject folders (s1/micro/)")
    problems, index, specs = Problems(tree, database, on_error), FrameIndex(), []
    for micro in sorted(tree.glob("s*/micro"), key=lambda p: _natural(p.parent)):
        subject = micro.parent.name
        for emotion_dir in sorted(p for p in micro.iterdir() if p.is_dir()):
            for clip_dir in sorted((p for p in emotion_dir.iterdir() if p.is_dir()),
                                   key=_natural):
                numbers = sorted(index(clip_dir))
                if not numbers:
                    problems.fail(None, subject, clip_dir.name,
                                  f"no frame images in {clip_dir}")
                    continue
                specs.append({
                    "row": None, "subject": subject, "clip": clip_dir.name,
                    "onset": numbers[0], "apex": -1, "offset": numbers[-1],
                    "frame_dir": clip_dir, "au": None, "emotion": emotion_dir.name,
                })
    table = collect_samples(specs, problems, FPS, emotions, check_images, index)
    return table, problems.skipped
