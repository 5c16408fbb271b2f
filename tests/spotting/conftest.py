"""Stand-in long-video features for spotting tests, with the shapes of
``mer.data.preprocess.longvideo.LongVideoFeatures``: ROI flow (T, R, 2) between t and t+k with
head motion removed, grey crops (T, H, W) uint8, magnitude (T,), known intervals.

Expressions move a few regions out and back (raised-cosine onset -> apex -> offset); the
regions depend on the emotion, so recognition is learnable. Distractors: blinks (eye regions,
fast and large), talking (mouth regions, oscillating), residual head drift, noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mer.spotting.videos import GT_COLUMNS, SpotVideo

R = 12
EYES, MOUTH = (2, 3), (8, 9)
PATTERNS = {"negative": (0, 1, 4), "positive": (6, 7, 10), "surprise": (0, 1, 5, 11)}


def _profile(t, onset, apex, offset):
    up = (t >= onset) & (t <= apex)
    down = (t > apex) & (t <= offset)
    p = np.zeros(len(t))
    p[up] = 0.5 - 0.5 * np.cos(np.pi * (t[up] - onset) / max(1, apex - onset))
    p[down] = 0.5 + 0.5 * np.cos(np.pi * (t[down] - apex) / max(1, offset - apex))
    return p


def make_video(seed: int, database: str = "casme_sq", subject: str = "s01", fps: float = 30.0,
               seconds: float = 40.0, n_micro: int = 4, n_macro: int = 2, crop: int = 16,
               amplitude: float = 1.0) -> SpotVideo:
    rng = np.random.default_rng(seed)
    t_len = int(fps * seconds)
    k = max(1, int(round(0.2 * fps)))
    t = np.arange(t_len + k)
    disp = np.zeros((t_len + k, R, 2))
    rows, cursor = [], int(1.0 * fps)
    kinds = ["micro"] * n_micro + ["macro"] * n_macro
    rng.shuffle(kinds)
    slot = (t_len - 2 * fps) / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        dur = rng.uniform(0.25, 0.45) if kind == "micro" else rng.uniform(1.0, 2.0)
        dur = min(dur, 0.7 * slot / fps)  # expressions never overlap nor pass the end
        n = int(dur * fps)
        onset = int(cursor + i * 0 + rng.uniform(0, max(1, slot - n - fps * 0.5)))
        onset = max(onset, int(cursor))
        apex = onset + int(0.4 * n)
        offset = onset + n
        cursor = int(1.0 * fps + (i + 1) * slot)
        emotion = ["negative", "positive", "surprise"][rng.integers(3)]
        amp = amplitude * (0.6 if kind == "micro" else 1.4)
        prof = _profile(t, onset, apex, offset)
        for r in PATTERNS[emotion]:
            ang = rng.uniform(0, 2 * np.pi)
            disp[:, r] += amp * prof[:, None] * np.array([np.cos(ang), np.sin(ang)])
        rows.append([onset + 1, apex + 1, offset + 1, kind, emotion, (), i])
    # distractors
    for _ in range(int(seconds / 6)):  # blinks: 0.15 s, eye regions, large
        b = int(rng.uniform(0, t_len - fps))
        prof = _profile(t, b, b + int(0.07 * fps), b + int(0.15 * fps))
        for r in EYES:
            disp[:, r, 1] += 1.5 * prof
    for _ in range(int(seconds / 15)):  # talking: 2 s of 4 Hz mouth motion
        s = int(rng.uniform(0, t_len - 2 * fps))
        w = np.zeros(len(t))
        w[s: s + int(2 * fps)] = 1
        for r in MOUTH:
            disp[:, r, 1] += 0.7 * w * np.sin(2 * np.pi * 4 * t / fps)
    drift = np.cumsum(rng.normal(0, 0.01, (len(t), 1, 2)), axis=0)
    disp += drift
    flow = (disp[k:] - disp[:-k]) + rng.normal(0, 0.03, (t_len, R, 2))
    flow = flow.astype(np.float32)
    magnitude = np.linalg.norm(flow, axis=2).mean(1).astype(np.float32)
    # crops: one bright blob per region, shifted by its displacement (x3 px), on a texture
    yy, xx = np.mgrid[0:crop, 0:crop]
    centres = np.stack([rng.uniform(3, crop - 3, R), rng.uniform(3, crop - 3, R)], 1)
    tex = rng.uniform(40, 80, (crop, crop))
    crops = np.empty((t_len, crop, crop), dtype=np.uint8)
    for i in range(t_len):
        c = centres + 3 * disp[i]
        img = tex + 120 * np.exp(-(((xx[None] - c[:, 0, None, None]) ** 2 +
                                    (yy[None] - c[:, 1, None, None]) ** 2) / 4.0)).sum(0)
        crops[i] = np.clip(img, 0, 255)
    gt = pd.DataFrame(rows, columns=GT_COLUMNS)
    return SpotVideo(video=f"{database}/{subject}_{seed}", database=database, subject=subject,
                     fps=fps, k=k, frame_numbers=np.arange(1, t_len + 1), flow=flow,
                     crops=crops, magnitude=magnitude,
                     roi_names=[f"roi{r}" for r in range(R)], gt=gt)


def make_videos(n_subjects: int = 4, seconds: float = 40.0, fps_by_db=None,
                seed: int = 0, **kw) -> list[SpotVideo]:
    fps_by_db = fps_by_db or {"casme_sq": 30.0}
    out = []
    for d, (db, fps) in enumerate(fps_by_db.items()):
        for s in range(n_subjects):
            out.append(make_video(seed * 1000 + d * 100 + s, db, f"s{s + 1:02d}", fps=fps,
                                  seconds=seconds, **kw))
    return out


@pytest.fixture(scope="session")
def standin():
    return make_videos


@pytest.fixture(scope="session")
def standin_videos():
    """4 subjects x 1 video of 20 s at 30 fps, and 3 x 1 of 8 s at 200 fps."""
    return make_videos(4, 20.0) + make_videos(3, 8.0, {"samm_lv": 200.0}, seed=1)
