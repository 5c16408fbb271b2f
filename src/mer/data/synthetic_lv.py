"""SynME-LV: the embedded long-video database for spotting (synthetic, deterministic by seed).

Every spotting run that has no real data uses SynME-LV. It writes two databases in their REAL
release layouts and annotation sheets, so the existing readers load them unchanged:

- ``casme_sq`` (CAS(ME)^2-like, 30 fps, colour): ``rawpic/s15/15_0101disgustingteeth/img1.jpg``
  and ``CAS(ME)^2code_final.xlsx`` (header-less code sheet plus the two naming sheets);
  reader :mod:`mer.data.databases.casme_sq`.
- ``samm_lv`` (SAMM-LV-like, 200 fps, grey): ``SAMM_longvideos/006_1/006_1_0001.jpg`` and
  ``SAMM_LongVideos_V2_Release.xlsx`` (10 text rows above the header), plus SAMM's micro
  sheet ``SAMM_Micro_FACS_Codes_v2.xlsx`` with the micro-expressions' emotions (the long-video
  sheet has none; pass it as the reader's ``micro_sheet``); reader
  :mod:`mer.data.databases.samm_lv`.

Each database folder also holds ``meta.json``, the ground truth (``synthetic: true``): per
video its subject, frame folder, frame count and the intervals exactly as the reader yields them
(onset, apex, offset, type, emotion, AUs, sheet row), the distractor events and what is needed
to recompute each frame's landmarks (:func:`video_landmarks`).

Interface (shared with ``mer.spotting``)::

    cfg = SynMELVConfig.preset("tiny")           # or "default"; seed=...
    root = ensure_synme_lv(cfg, cache_dir)       # <cache_dir>/synme_lv-<fingerprint[:12]>
    root / "casme_sq", root / "samm_lv"          # one database root each (spec.name)
    load_lv_meta(root / "samm_lv")["videos"]["006_1"]["intervals"]

A video (``plan_video``, ``render_video``):

1. **Identity** per subject: SynME's face, landmarks and renderer (:mod:`mer.data.synthetic`).
2. **Expressions** at known, non-overlapping intervals: micro (0.2-0.45 s from onset to offset,
   <= 0.5 s) and macro (0.8-3.5 s, with a hold at the apex), AUs drawn from the emotion with
   SynME's emotion->AU model and animated with its AU displacement fields
   (:func:`mer.data.synthetic.au_displacement`) under a raised-cosine profile.
3. **Distractors**: blinks (the eyelid rendering of SynME), head turns (rigid shift, in-plane
   rotation and a yaw-like sideways bulge, each over 0.5-1.5 s) and slow drift, talking-like
   mouth motion (AU25/26 oscillating at 2.5-4.5 Hz), illumination changes (gain steps with a
   sideways gradient) and sensor noise.

Head turns move the whole face by several pixels: a spotter that thresholds raw whole-face
motion fires on them (and on illumination steps); once the nose-region flow is subtracted
(:mod:`mer.data.preprocess.longvideo`) the expressions stand out in the ROI flow, above the
distractors' level but not trivially (blinks and talking stay in the eye and mouth ROIs).

Seeding: subject ``s`` of database ``d`` draws its identity from ``default_rng([seed, d, s, 0])``,
video ``v`` its events from ``default_rng([seed, d, s, 1, v])`` and frame ``n``'s noise from
``default_rng([seed, d, s, 2, v, n])``: frames can be rendered in any order, in any process, and
a 10-minute video can be streamed without writing it (``render_video``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mer.data.synthetic import (
    SynDatabaseSpec,
    _draw_aus,
    _draw_identity,
    _eyelid_alpha,
    _landmarks_units,
    _profile,
    _to_px,
    au_displacement,
    au_string,
    render_face,
)
from mer.data.workers import image_pool

VERSION = "2"
"""Format version of the generated data; part of the fingerprint, bump it when output changes."""

LAYOUTS = ("casme_sq", "samm_lv")
META_NAME = "meta.json"
ROOT_META_NAME = "synme_lv.json"
CASME_SQ_SHEET = "CAS(ME)^2code_final.xlsx"
SAMM_LV_SHEET = "SAMM_LongVideos_V2_Release.xlsx"
SAMM_MICRO_SHEET = "SAMM_Micro_FACS_Codes_v2.xlsx"
JPEG_QUALITY = 95
MICRO_SECONDS = (0.2, 0.45)  # onset -> offset of a micro-expression (MEGC: <= 0.5 s)
MACRO_SECONDS = (0.8, 3.5)  # of a macro-expression (0.5-4 s)

# Internal emotion -> weight; drawn per expression, then written in each layout's words.
EMOTIONS: dict[str, float] = {
    "happiness": 0.25, "disgust": 0.2, "surprise": 0.15, "anger": 0.1, "sadness": 0.1,
    "fear": 0.05, "contempt": 0.05, "others": 0.1,
}
_CASME_SQ_WORD = {"happiness": "positive", "surprise": "surprise", "others": "others"}
# CAS(ME)^2 video names, codes and folder suffixes (rawpic/s15/15_0101disgustingteeth)
CASME_SQ_VIDEOS: tuple[tuple[str, str, str], ...] = (
    ("disgust1", "0101", "disgustingteeth"), ("disgust2", "0102", "eatingworms"),
    ("anger1", "0401", "girlcrashing"), ("anger2", "0402", "sickness"),
    ("happy1", "0502", "awkwardfail"), ("happy2", "0503", "lobster"),
    ("happy3", "0505", "funnyerrors"), ("happy4", "0507", "climbing"),
    ("happy5", "0508", "funnydunkey"),
)
SAMM_FIRST_SUBJECT = 6  # SAMM numbers its subjects from 006


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class SynLVDatabaseSpec:
    """One synthetic long-video database.

    Attributes:
        name: folder name under the SynME-LV root (also the ``database`` of its tables).
        layout: ``casme_sq`` or ``samm_lv``: the release layout and sheets written.
        fps: frame rate; height, width: frame size (px); color: BGR (else grey) JPEGs.
        n_subjects: subjects; videos_per_subject: (min, max) videos each, inclusive.
        seconds: (min, max) length of a video.
        expressions_per_minute: mean rate of expressions; micro_fraction: share of micro.
        intensity: factor on the apex displacement of expressions (1: micro 1.2-2.2 px at the
            AU's centre, macro 1.8-2.5 px).
        noise_sigma: sensor noise, grey levels.
        blinks_per_minute, head_turns_per_minute, talks_per_minute, light_changes_per_minute:
            mean rates of the distractors.
        head_turn_px: largest head shift of a turn (px); drift_px: amplitude of the slow drift.
        talk_px: mouth opening of talking (px); light_change: largest relative gain step.
    """

    name: str
    layout: str
    fps: int
    height: int
    width: int
    color: bool
    n_subjects: int
    videos_per_subject: tuple[int, int]
    seconds: tuple[float, float]
    expressions_per_minute: float = 10.0
    micro_fraction: float = 0.5
    intensity: float = 1.0
    noise_sigma: float = 1.5
    blinks_per_minute: float = 12.0
    head_turns_per_minute: float = 3.0
    head_turn_px: float = 3.0
    drift_px: float = 2.0
    talks_per_minute: float = 2.0
    talk_px: float = 0.7
    light_changes_per_minute: float = 2.0
    light_change: float = 0.08

    def __post_init__(self) -> None:
        self.name, self.layout = str(self.name), str(self.layout)
        self.fps, self.height, self.width = int(self.fps), int(self.height), int(self.width)
        self.color, self.n_subjects = bool(self.color), int(self.n_subjects)
        lo, hi = (int(v) for v in self.videos_per_subject)
        self.videos_per_subject = (lo, hi)
        s_lo, s_hi = (float(v) for v in self.seconds)
        self.seconds = (s_lo, s_hi)
        for f in dataclasses.fields(self):
            if f.type == "float":
                setattr(self, f.name, float(getattr(self, f.name)))
        where = f"SynME-LV database {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"{where}: name must be letters, digits, '_' or '-'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{where}: layout {self.layout!r}; use one of {list(LAYOUTS)}")
        if self.fps < 25 or min(self.height, self.width) < 64:
            raise ValueError(f"{where}: need fps >= 25 and frames at least 64x64 px")
        if self.n_subjects < 1 or not 1 <= lo <= hi:
            raise ValueError(f"{where}: need n_subjects >= 1 and 1 <= videos_per_subject "
                             "min <= max")
        if self.layout == "casme_sq" and hi > len(CASME_SQ_VIDEOS):
            raise ValueError(f"{where}: at most {len(CASME_SQ_VIDEOS)} videos per subject in "
                             "the CAS(ME)^2 layout (one per stimulus video)")
        if not 5.0 <= s_lo <= s_hi:
            raise ValueError(f"{where}: need 5 <= seconds min <= max (got {self.seconds})")
        if not 0.0 <= self.micro_fraction <= 1.0 or self.expressions_per_minute <= 0:
            raise ValueError(f"{where}: need 0 <= micro_fraction <= 1 and "
                             "expressions_per_minute > 0")
        rates = ("blinks_per_minute", "head_turns_per_minute", "talks_per_minute",
                 "light_changes_per_minute", "head_turn_px", "drift_px", "talk_px",
                 "light_change", "noise_sigma", "intensity")
        negative = [r for r in rates if getattr(self, r) < 0]
        if negative:
            raise ValueError(f"{where}: {negative} must be >= 0")

    def identity_spec(self) -> SynDatabaseSpec:
        """The SynME database spec whose identities (face geometry) this database shares."""
        return SynDatabaseSpec(name=self.name, fps=max(self.fps, 30), height=self.height,
                               width=self.width, color=self.color, n_subjects=self.n_subjects,
                               clips_per_subject=(1, 1), emotion_weights={"others": 1.0})


@dataclass
class SynMELVConfig:
    """A SynME-LV collection: the seed and its databases (each a :class:`SynLVDatabaseSpec`).

    ``SynMELVConfig.preset("default" | "tiny", seed)`` gives the two standard ones.
    """

    seed: int
    databases: list[SynLVDatabaseSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seed = int(self.seed)
        self.databases = [d if isinstance(d, SynLVDatabaseSpec) else SynLVDatabaseSpec(**d)
                          for d in self.databases]
        names = [d.name for d in self.databases]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"SynME-LV config: need database names, unique; got {names}")

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> SynMELVConfig:
        """The ``default`` (a few subjects x 1-2 videos of 1-2 minutes per database) or
        ``tiny`` (4 subjects x 1 video of 15-30 s, small frames; tests) collection."""
        if name not in PRESETS:
            raise ValueError(f"SynME-LV preset {name!r}: use one of {sorted(PRESETS)}")
        return PRESETS[name](seed)

    def select(self, names: list[str] | tuple[str, ...]) -> SynMELVConfig:
        """The same collection restricted to the databases ``names`` (in that order)."""
        known = {d.name: d for d in self.databases}
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"SynME-LV: databases {unknown or names} are not in this preset; "
                             f"choose among {sorted(known)}")
        return SynMELVConfig(self.seed, [known[n] for n in names])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        d = asdict(self)
        for db in d["databases"]:
            db["videos_per_subject"] = list(db["videos_per_subject"])
            db["seconds"] = list(db["seconds"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynMELVConfig:
        """Inverse of :meth:`to_dict`; unknown keys are errors naming the database."""
        fields = {f.name for f in dataclasses.fields(SynLVDatabaseSpec)}
        dbs = []
        for db in d.get("databases", []):
            db = {k: v for k, v in db.items() if not str(k).startswith("_")}
            unknown = sorted(set(db) - fields)
            if unknown:
                raise ValueError(f"SynME-LV database {db.get('name')!r}: unknown keys "
                                 f"{unknown}; known: {sorted(fields)}")
            dbs.append(SynLVDatabaseSpec(**db))
        return cls(seed=d["seed"], databases=dbs)

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of the config and :data:`VERSION`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((canonical + "|lv|" + VERSION).encode()).hexdigest()


def default_synme_lv_config(seed: int = 0) -> SynMELVConfig:
    """CAS(ME)^2-like (6 subjects, 1-2 videos of 60-100 s at 30 fps) and SAMM-LV-like
    (5 subjects, 1 video of 50-70 s at 200 fps) databases; about 80k frames in all."""
    return SynMELVConfig(seed=seed, databases=[
        SynLVDatabaseSpec(name="casme_sq", layout="casme_sq", fps=30, height=128, width=112,
                          color=True, n_subjects=6, videos_per_subject=(1, 2),
                          seconds=(60.0, 100.0), noise_sigma=1.5),
        SynLVDatabaseSpec(name="samm_lv", layout="samm_lv", fps=200, height=120, width=104,
                          color=False, n_subjects=5, videos_per_subject=(1, 1),
                          seconds=(50.0, 70.0), noise_sigma=2.0, intensity=0.9),
    ])


def tiny_synme_lv_config(seed: int = 0) -> SynMELVConfig:
    """4 subjects x 1 video per database (20-30 s at 30 fps; 15-20 s at 200 fps), 96x88 and
    80x72 px frames, more events per minute; generated in seconds (tests)."""
    return SynMELVConfig(seed=seed, databases=[
        SynLVDatabaseSpec(name="casme_sq", layout="casme_sq", fps=30, height=96, width=88,
                          color=True, n_subjects=4, videos_per_subject=(1, 1),
                          seconds=(20.0, 30.0), expressions_per_minute=14.0,
                          blinks_per_minute=15.0, head_turns_per_minute=5.0,
                          talks_per_minute=4.0, light_changes_per_minute=4.0),
        SynLVDatabaseSpec(name="samm_lv", layout="samm_lv", fps=200, height=80, width=72,
                          color=False, n_subjects=4, videos_per_subject=(1, 1),
                          seconds=(15.0, 20.0), expressions_per_minute=16.0,
                          blinks_per_minute=15.0, head_turns_per_minute=5.0,
                          talks_per_minute=4.0, light_changes_per_minute=4.0,
                          noise_sigma=2.0, intensity=0.9),
    ])


PRESETS = {"default": default_synme_lv_config, "tiny": tiny_synme_lv_config}


# --------------------------------------------------------------------------------------------
# Planning a video: every event, at known frames
# --------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _layout_emotion(layout: str, emotion: str) -> str:
    """The sheet word of an internal emotion: CAS(ME)^2's four classes, SAMM's words."""
    if layout == "casme_sq":
        return _CASME_SQ_WORD.get(emotion, "negative")
    return "other" if emotion == "others" else emotion


def _poisson_starts(rng: np.random.Generator, per_minute: float, n_frames: int, fps: int,
                    min_len: int) -> list[int]:
    """0-based start frames of events at ``per_minute`` (at least ``min_len`` apart)."""
    if per_minute <= 0:
        return []
    starts, t = [], _u(rng, 0.0, 60.0 / per_minute)
    while True:
        k = int(round(t * fps))
        if k + min_len >= n_frames:
            return starts
        starts.append(k)
        t = k / fps + min_len / fps + float(rng.exponential(60.0 / per_minute))


def _plan_expressions(spec: SynLVDatabaseSpec, rng: np.random.Generator,
                      n_frames: int) -> list[dict[str, Any]]:
    """Non-overlapping expressions (0-based frames ``onset <= apex <= hold <= offset``)."""
    fps, out = spec.fps, []
    names = list(EMOTIONS)
    weights = np.array([EMOTIONS[n] for n in names])
    # mean start-to-start spacing 60 / rate: the gap after an expression makes up the rest
    mean_len = spec.micro_fraction * 0.33 + (1 - spec.micro_fraction) * 2.1
    mean_gap = max(60.0 / spec.expressions_per_minute - mean_len, 1.0)
    t = _u(rng, 0.6, 1.5)
    while True:
        micro = rng.random() < spec.micro_fraction
        if micro:
            length = max(3, int(round(_u(rng, *MICRO_SECONDS) * fps)))
            length = min(length, int(0.5 * fps))  # onset..offset spans <= 0.5 s
            rise = max(1, int(round(length * _u(rng, 0.35, 0.6))))
            hold = 0
            peak = spec.intensity * _u(rng, 1.2, 2.2)
        else:
            length = int(round(_u(rng, *MACRO_SECONDS) * fps))
            rise = max(2, int(round(_u(rng, 0.15, 0.45) * fps)))
            hold = int(round(_u(rng, 0.1, 0.5) * (length - rise)))
            peak = spec.intensity * _u(rng, 1.8, 2.6)
        onset = int(round(t * fps))
        offset = onset + length
        if offset >= n_frames - int(0.5 * fps):
            return out
        emotion = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        aus = _draw_aus(emotion, rng, float(min(peak, 2.5)))
        out.append({"type": "micro" if micro else "macro", "onset": onset,
                    "apex": onset + rise, "hold": onset + rise + hold, "offset": offset,
                    "emotion": emotion, "aus": aus, "peak_px": float(peak)})
        gap = max(0.7, 0.5 * mean_gap + float(rng.exponential(0.5 * mean_gap)))
        t = offset / fps + gap


def _plan_distractors(spec: SynLVDatabaseSpec, rng: np.random.Generator, n_frames: int,
                      expressions: list[dict[str, Any]]) -> dict[str, Any]:
    fps = spec.fps
    blinks = []
    for start in _poisson_starts(rng, spec.blinks_per_minute, n_frames, fps, int(0.4 * fps)):
        length = max(3, int(round(_u(rng, 0.1, 0.2) * fps)))
        blinks.append({"start": start, "length": length, "closure": _u(rng, 0.5, 1.0)})
    turns, pose = [], np.zeros(4)
    for start in _poisson_starts(rng, spec.head_turns_per_minute, n_frames, fps, int(1.6 * fps)):
        length = max(2, int(round(_u(rng, 0.5, 1.5) * fps)))
        a = spec.head_turn_px
        target = np.array([_u(rng, -a, a), _u(rng, -0.4 * a, 0.4 * a),
                           _u(rng, -0.12 * a, 0.12 * a), _u(rng, -0.15 * a, 0.15 * a)])
        if rng.random() < 0.4:  # a glance away and back: ends where it began
            target = pose.copy()
            length = max(4, length)
            delta = np.array([_u(rng, -a, a), _u(rng, -0.3 * a, 0.3 * a), 0.0, 0.0])
            turns.append({"start": start, "length": length, "tx": 0.0, "ty": 0.0,
                          "rot_px": 0.0, "yaw_px": 0.0, "glance": delta.tolist()})
            continue
        delta = target - pose
        pose = target
        turns.append({"start": start, "length": length, "tx": float(delta[0]),
                      "ty": float(delta[1]), "rot_px": float(delta[2]), "yaw_px": float(delta[3]),
                      "glance": [0.0, 0.0, 0.0, 0.0]})
    drift = [{"amp": _u(rng, 0.3, 1.0) * spec.drift_px / 2, "hz": _u(rng, 0.005, 0.04),
              "phase": _u(rng, 0, 2 * math.pi), "axis": int(rng.integers(2))} for _ in range(3)]
    # talking is kept clear of the expressions (their truth stays clean): each talk goes into
    # the free stretch at or after its drawn start, shortened to fit (left out under 0.8 s)
    margin = int(0.3 * fps)
    free, at = [], 0
    for e in expressions:
        free.append((at, e["onset"] - margin))
        at = e["offset"] + margin
    free.append((at, n_frames - 1))
    talks, taken = [], -1
    for start in _poisson_starts(rng, spec.talks_per_minute, n_frames, fps, int(3.5 * fps)):
        length = int(round(_u(rng, 1.0, 3.0) * fps))
        hz, amp, phase = _u(rng, 2.5, 4.5), spec.talk_px * _u(rng, 0.6, 1.4), _u(rng, 0, math.pi)
        for a, b in free:
            begin = max(start, a, taken + 1)
            if begin + int(0.8 * fps) <= b:
                length = min(length, b - begin)
                talks.append({"start": begin, "length": length, "hz": hz, "amp": amp,
                              "phase": phase})
                taken = begin + length
                break
    lights, gain = [], np.zeros(2)
    for start in _poisson_starts(rng, spec.light_changes_per_minute, n_frames, fps,
                                 int(0.8 * fps)):
        c = spec.light_change
        target = np.array([_u(rng, -c, c), _u(rng, -0.6 * c, 0.6 * c)])
        delta, gain = target - gain, target
        lights.append({"start": start, "length": max(2, int(round(_u(rng, 0.1, 0.5) * fps))),
                       "gain": float(delta[0]), "gradient": float(delta[1])})
    return {"blinks": blinks, "head_turns": turns, "drift": drift, "talks": talks,
            "lights": lights,
            "talk_aus": {"25": 1.0, "26": _u(rng, 0.5, 0.9), "17": _u(rng, 0.0, 0.3)}}


def _video_name(spec: SynLVDatabaseSpec, subject_index: int, video_index: int,
                order: list[int]) -> dict[str, str]:
    """Subject folder, video folder, sheet names of one video in the database's layout."""
    if spec.layout == "casme_sq":
        code = 15 + subject_index
        vname, vcode, suffix = CASME_SQ_VIDEOS[order[video_index]]
        return {"subject": f"s{code}", "subject_code": str(code),
                "video": f"{code}_{vcode}{suffix}", "video_name": vname, "video_code": vcode}
    number = SAMM_FIRST_SUBJECT + subject_index
    return {"subject": f"{number:03d}", "subject_code": str(number),
            "video": f"{number:03d}_{video_index + 1}", "video_name": "", "video_code": ""}


def plan_video(cfg: SynMELVConfig, db_index: int, subject_index: int,
               video_index: int) -> dict[str, Any]:
    """Everything about one video but its pixels (JSON-able): identity, landmarks, frame
    count, expressions and distractors (0-based frame indices; frame files are numbered from 1)."""
    spec = cfg.databases[db_index]
    irng = np.random.default_rng([cfg.seed, db_index, subject_index, 0])
    ident = _draw_identity(irng, spec.identity_spec())
    landmarks = _to_px(ident, _landmarks_units(ident))
    order = [int(i) for i in irng.permutation(len(CASME_SQ_VIDEOS))]
    n_videos = int(irng.integers(spec.videos_per_subject[0], spec.videos_per_subject[1] + 1))
    rng = np.random.default_rng([cfg.seed, db_index, subject_index, 1, video_index])
    n_frames = int(round(_u(rng, *spec.seconds) * spec.fps))
    expressions = _plan_expressions(spec, rng, n_frames)
    return {"seed": cfg.seed, "db_index": db_index, "subject_index": subject_index,
            "video_index": video_index, "n_videos": n_videos, "fps": spec.fps,
            "height": spec.height, "width": spec.width, "color": spec.color,
            "noise_sigma": spec.noise_sigma, "n_frames": n_frames,
            **_video_name(spec, subject_index, video_index, order),
            "identity": ident, "landmarks": landmarks.tolist(), "expressions": expressions,
            "distractors": _plan_distractors(spec, rng, n_frames, expressions)}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _smooth(x: float) -> float:
    """0 -> 1 raised-cosine ramp of x in [0, 1] (clipped)."""
    x = min(max(x, 0.0), 1.0)
    return 0.5 * (1 - math.cos(math.pi * x))


def _envelope(k: int, e: dict[str, Any]) -> float:
    """Expression profile at frame index k: rise to the apex, hold, fall to the offset."""
    onset, apex, hold, offset = e["onset"], e["apex"], e["hold"], e["offset"]
    if k < onset or k > offset:
        return 0.0
    if apex <= k <= hold:
        return 1.0
    if k < apex:
        return float(_profile(k, onset, apex, offset))
    return float(_profile(k - (hold - apex), onset, apex, offset - (hold - apex)))


def head_pose(plan: dict[str, Any], k: int) -> tuple[float, float, float, float]:
    """(tx, ty, rot_px, yaw_px) of the head at frame index ``k``: turns, glances and drift."""
    d = plan["distractors"]
    t = k / plan["fps"]
    pose = [0.0, 0.0, 0.0, 0.0]
    for turn in d["head_turns"]:
        x = (k - turn["start"]) / turn["length"]
        if x <= 0:
            continue
        r = _smooth(x)
        for i, name in enumerate(("tx", "ty", "rot_px", "yaw_px")):
            pose[i] += turn[name] * r
        if x < 1:
            bump = math.sin(math.pi * x) ** 2
            for i in range(4):
                pose[i] += turn["glance"][i] * bump
    for c in d["drift"]:
        pose[c["axis"]] += c["amp"] * math.sin(2 * math.pi * c["hz"] * t + c["phase"])
    return pose[0], pose[1], pose[2], pose[3]


def _head_field(pose: tuple[float, float, float, float], ident: dict[str, Any], x: np.ndarray,
                y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward displacement (dx, dy) of the content at (x, y) for a head pose."""
    tx, ty, rot, yaw = pose
    cx, cy, s = ident["cx"], ident["cy"], ident["s"]
    theta = rot / s
    bulge = np.clip(1 - ((x - cx) / s) ** 2, 0, None)  # a turn moves the midline most
    dx = tx - theta * (y - cy) + yaw * bulge
    dy = ty + theta * (x - cx)
    return dx.astype(np.float32), dy.astype(np.float32)


def video_landmarks(plan: dict[str, Any], number: int) -> np.ndarray:
    """(68, 2) float64 landmarks of frame file ``number`` (1-based) in frame pixels: the
    neutral landmarks moved with the head (what a perfect detector would find, up to the
    expression's own few-pixel motion). SynME-LV's "detector" for long-video preprocessing."""
    lm = np.asarray(plan["landmarks"], np.float64)
    pose = head_pose(plan, number - 1)
    dx, dy = _head_field(pose, plan["identity"], lm[:, 0], lm[:, 1])
    return lm + np.stack([dx, dy], axis=1)


class VideoRenderer:
    """Frames of one planned video, rendered on demand (any order, deterministic).

    ``frame(number)`` -> (H, W, 3) BGR or (H, W) grey uint8 for frame files 1..n_frames.
    """

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        h, w = plan["height"], plan["width"]
        ident, self.ident = plan["identity"], plan["identity"]
        self.lm = np.asarray(plan["landmarks"], np.float64)
        neutral = render_face(ident, self.lm, h, w)
        closed = render_face(ident, self.lm, h, w, eyes_closed=True)
        if not plan["color"]:
            neutral = cv2.cvtColor(neutral, cv2.COLOR_BGR2GRAY)
            closed = cv2.cvtColor(closed, cv2.COLOR_BGR2GRAY)
        self.neutral, self.closed = neutral, closed
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        talk = au_displacement(self.lm, plan["distractors"]["talk_aus"], h, w)
        self.talk_field = talk / max(float(np.sqrt((talk ** 2).sum(-1)).max()), 1e-6)
        self._fields: dict[int, np.ndarray] = {}

    def _expression_field(self, i: int) -> np.ndarray:
        if i not in self._fields:
            if len(self._fields) > 8:  # long videos: keep only the fields in use
                self._fields.clear()
            e = self.plan["expressions"][i]
            self._fields[i] = au_displacement(self.lm, e["aus"], self.plan["height"],
                                              self.plan["width"])
        return self._fields[i]

    def frame(self, number: int) -> np.ndarray:
        plan, d = self.plan, self.plan["distractors"]
        k, fps = number - 1, plan["fps"]
        if not 0 <= k < plan["n_frames"]:
            raise IndexError(f"frame {number} outside 1..{plan['n_frames']}")
        base = self.neutral
        closure = 0.0
        for b in d["blinks"]:
            x = (k - b["start"]) / b["length"]
            if 0 <= x <= 1:
                closure = max(closure, b["closure"] * 0.5 * (1 - math.cos(2 * math.pi * x)))
        if closure > 0:
            alpha = _eyelid_alpha(self.lm, closure, self.xx, self.yy)
            alpha = alpha[..., None] if base.ndim == 3 else alpha
            base = base * (1 - alpha) + self.closed * alpha
        face = None  # the expression + talking field, in the face's own frame
        for i, e in enumerate(plan["expressions"]):
            if e["onset"] <= k <= e["offset"]:
                f = self._expression_field(i) * np.float32(_envelope(k, e))
                face = f if face is None else face + f
        for tk in d["talks"]:
            x = (k - tk["start"]) / tk["length"]
            if 0 <= x <= 1:
                window = min(_smooth(x * tk["length"] / (0.15 * fps)),
                             _smooth((1 - x) * tk["length"] / (0.15 * fps)))
                phase = 2 * math.pi * tk["hz"] * (k - tk["start"]) / fps + tk["phase"]
                a = tk["amp"] * window * 0.5 * (1 - math.cos(phase))
                f = self.talk_field * np.float32(a)
                face = f if face is None else face + f
        hx, hy = _head_field(head_pose(plan, k), self.ident, self.xx, self.yy)
        if face is not None:  # the face content moves with the head: d(x) = h + e(x - h)
            face = cv2.remap(face, self.xx - hx, self.yy - hy, cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
            hx, hy = hx + face[..., 0], hy + face[..., 1]
        img = cv2.remap(np.asarray(base, np.float32), self.xx - hx, self.yy - hy,
                        cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        gain, grad = 0.0, 0.0
        for li in d["lights"]:
            r = _smooth((k - li["start"]) / li["length"])
            gain, grad = gain + li["gain"] * r, grad + li["gradient"] * r
        light = 1 + gain + grad * (self.xx - self.ident["cx"]) / plan["width"]
        img = img * (light[..., None] if img.ndim == 3 else light)
        rng = np.random.default_rng([plan["seed"], plan["db_index"], plan["subject_index"], 2,
                                     plan["video_index"], number])
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
            plan["noise_sigma"])
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_video(plan: dict[str, Any], start: int = 1,
                 stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Stream ``(frame number, frame)`` for numbers ``start..stop`` (default: all), one frame
    in memory at a time (a 30-minute video can be streamed without writing it)."""
    renderer = VideoRenderer(plan)
    stop = plan["n_frames"] if stop is None else min(stop, plan["n_frames"])
    for number in range(start, stop + 1):
        yield number, renderer.frame(number)


def long_plan(spec: SynLVDatabaseSpec, minutes: float, seed: int = 0) -> dict[str, Any]:
    """The plan of one video of ``minutes`` in database ``spec`` (benchmarks: a 10-minute
    200 fps SynME-LV video is streamed with :func:`render_video`, never written)."""
    long_spec = dataclasses.replace(spec, seconds=(60.0 * minutes, 60.0 * minutes),
                                    n_subjects=1, videos_per_subject=(1, 1))
    return plan_video(SynMELVConfig(seed, [long_spec]), 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Writing the databases in their real layouts
# --------------------------------------------------------------------------------------------


def _frame_name(plan: dict[str, Any], number: int) -> str:
    if plan["video_name"]:  # CAS(ME)^2
        return f"img{number}.jpg"
    width = max(4, len(str(plan["n_frames"])))  # 006_1_0001.jpg
    return f"{plan['video']}_{number:0{width}d}.jpg"


def _frame_dir(layout: str, plan: dict[str, Any]) -> str:
    if layout == "casme_sq":
        return f"rawpic/{plan['subject']}/{plan['video']}"
    return f"SAMM_longvideos/{plan['video']}"


def _generate_subject(task: tuple[dict[str, Any], int, int, str]) -> list[dict[str, Any]]:
    """Worker: write one subject's videos (frames only); returns their plans."""
    cfg_dict, db_index, subject_index, db_dir = task
    cv2.setNumThreads(1)
    cfg = SynMELVConfig.from_dict(cfg_dict)
    spec = cfg.databases[db_index]
    plans = []
    first = plan_video(cfg, db_index, subject_index, 0)
    for v in range(first["n_videos"]):
        plan = first if v == 0 else plan_video(cfg, db_index, subject_index, v)
        folder = Path(db_dir) / _frame_dir(spec.layout, plan)
        folder.mkdir(parents=True, exist_ok=True)
        for number, frame in render_video(plan):
            path = folder / _frame_name(plan, number)
            if not cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise OSError(f"SynME-LV: could not write frame {path}")
        plans.append(plan)
    return plans


def _au_cell(aus: str) -> int | str:
    """Real sheets store a lone bilateral AU as a number (``12``), anything else as text."""
    return int(aus) if aus.isdigit() else aus


def _save_workbook(sheets: dict[str, list[list[Any]]], path: Path) -> None:
    """An .xlsx with one worksheet per item, byte-reproducible (fixed timestamps)."""
    from openpyxl import Workbook

    wb = Workbook()
    for i, (title, rows) in enumerate(sheets.items()):
        ws = wb.active if i == 0 else wb.create_sheet()
        ws.title = title
        for row in rows:
            ws.append(row)
    buf = io.BytesIO()
    wb.save(buf)
    stamp = "2000-01-01T00:00:00Z"
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "docProps/core.xml":
                text = data.decode()
                for tag in ("created", "modified"):
                    text = re.sub(rf"(<dcterms:{tag}[^>]*>)[^<]*(</dcterms:{tag}>)",
                                  rf"\g<1>{stamp}\g<2>", text)
                data = text.encode()
            zout.writestr(zipfile.ZipInfo(info.filename, (2000, 1, 1, 0, 0, 0)), data,
                          zipfile.ZIP_DEFLATED)


def _intervals(spec: SynLVDatabaseSpec, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The video's expressions as the reader yields them (1-based frame numbers)."""
    out = []
    for i, e in enumerate(plan["expressions"]):
        out.append({"onset": e["onset"] + 1, "apex": e["apex"] + 1, "offset": e["offset"] + 1,
                    "type": e["type"], "emotion": _layout_emotion(spec.layout, e["emotion"]),
                    "au": au_string(e["aus"]), "index": i + 1,
                    "expression": (f"{plan['video_name']}_{i + 1}" if plan["video_name"]
                                   else f"{plan['video']}_{i + 1}")})
    return out


def _write_casme_sq(db_dir: Path, spec: SynLVDatabaseSpec, videos: list[dict[str, Any]]) -> None:
    # a title line (the reader leaves such lines out), then the header-less code rows
    rows = [["SynME-LV: synthetic CAS(ME)^2-like code sheet (not real data)"]]
    row = len(rows)
    subjects: dict[str, list] = {}
    names: dict[str, str] = {}
    for v in videos:
        number = v["plan"]["subject_index"] + 1
        subjects[v["plan"]["subject"]] = [v["plan"]["subject"], int(v["plan"]["subject_code"]),
                                          number]
        names[v["plan"]["video_code"]] = v["plan"]["video_name"]
        for it in v["intervals"]:
            row += 1
            it["row"] = row
            rows.append([number, it["expression"], it["onset"], it["apex"], it["offset"],
                         _au_cell(it["au"]), it["emotion"], f"{it['type']}-expression",
                         it["emotion"]])
    _save_workbook({"Sheet1": rows, "naming rule1": list(subjects.values()),
                    "naming rule2": [[c, n] for c, n in sorted(names.items())]},
                   db_dir / CASME_SQ_SHEET)


_SAMM_HEADER = ["Subject", "Filename", "Inducement Code", "Onset", "Apex", "Offset", "Duration",
                "Type", "Action Units", "Notes"]
_SAMM_MICRO_HEADER = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame",
                      "Offset Frame", "Duration", "Type", "Action Units", "Notes",
                      "Estimated Emotion"]


def _write_samm_lv(db_dir: Path, spec: SynLVDatabaseSpec, videos: list[dict[str, Any]]) -> None:
    above = [["SAMM Long Videos (SynME-LV: synthetic, written in the V2 release layout)"],
             ["Frames are numbered from 1; 200 fps"], [None]] + [[f"note {i}"] for i in range(7)]
    rows, micro = [], []
    for v in videos:
        p = v["plan"]
        for it in v["intervals"]:
            it["row"] = len(above) + 2 + len(rows)  # text rows, then the header row
            cells = [int(p["subject_code"]), it["expression"], 1, it["onset"], it["apex"],
                     it["offset"], it["offset"] - it["onset"] + 1,
                     "Macro" if it["type"] == "macro" else "Micro - 1/2", _au_cell(it["au"]),
                     "synthetic"]
            rows.append(cells)
            if it["type"] == "micro":
                micro.append(cells[:7] + ["Micro", cells[8], None, it["emotion"].capitalize()])
    _save_workbook({"Sheet1": above + [_SAMM_HEADER] + rows}, db_dir / SAMM_LV_SHEET)
    micro_above = [[f"SAMM micro-expressions (SynME-LV, synthetic) {i}"] for i in range(13)]
    _save_workbook({"Sheet1": micro_above + [_SAMM_MICRO_HEADER] + micro},
                   db_dir / SAMM_MICRO_SHEET)


def _write_database(db_dir: Path, spec: SynLVDatabaseSpec, plans: list[dict[str, Any]]) -> None:
    videos = [{"plan": p, "intervals": _intervals(spec, p)} for p in plans]
    if spec.layout == "casme_sq":
        _write_casme_sq(db_dir, spec, videos)
    else:
        _write_samm_lv(db_dir, spec, videos)
    meta = {"synthetic": True, "version": VERSION, "database": spec.name,
            "layout": spec.layout, "fps": spec.fps, "spec": asdict(spec),
            "sheet": CASME_SQ_SHEET if spec.layout == "casme_sq" else SAMM_LV_SHEET,
            "micro_sheet": SAMM_MICRO_SHEET if spec.layout == "samm_lv" else None,
            "videos": {}}
    for v in videos:
        p = v["plan"]
        d = p["distractors"]
        meta["videos"][p["video"]] = {
            "subject": p["subject"], "frame_dir": _frame_dir(spec.layout, p),
            "first_frame": 1, "last_frame": p["n_frames"], "n_frames": p["n_frames"],
            "frame_name": _frame_name(p, 1), "intervals": v["intervals"],
            "events": {  # distractors as 1-based frame ranges [first, last]
                "blinks": [[b["start"] + 1, b["start"] + b["length"]] for b in d["blinks"]],
                "head_turns": [[t["start"] + 1, t["start"] + t["length"]]
                               for t in d["head_turns"]],
                "talks": [[t["start"] + 1, t["start"] + t["length"]] for t in d["talks"]],
                "lights": [[li["start"] + 1, li["start"] + li["length"]] for li in d["lights"]],
            },
            "plan": p,
        }
    (db_dir / META_NAME).write_text(json.dumps(meta, indent=1))


def generate_synme_lv(cfg: SynMELVConfig, out_dir: str | Path, workers: int = 0,
                      progress: bool = False) -> Path:
    """Write every database of ``cfg`` into ``out_dir`` (``out_dir/<spec.name>/``).

    Output does not depend on ``workers`` (0 = in this process; > 0 spawns processes, so a
    calling script needs the ``if __name__ == "__main__":`` guard).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    tasks = [(cfg_dict, d, s, str(out / spec.name))
             for d, spec in enumerate(cfg.databases) for s in range(spec.n_subjects)]
    bar = job = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        job = bar.add_task("SynME-LV: generating subjects", total=len(tasks))
    results: list[list[dict[str, Any]]] = []
    try:
        if workers > 0 and len(tasks) > 1:
            with image_pool(min(workers, len(tasks))) as pool:
                for res in pool.imap(_generate_subject, tasks):
                    results.append(res)
                    if bar:
                        bar.advance(job)
        else:
            for task in tasks:
                results.append(_generate_subject(task))
                if bar:
                    bar.advance(job)
    finally:
        if bar:
            bar.stop()
    for d, spec in enumerate(cfg.databases):
        plans = [p for res, t in zip(results, tasks, strict=True) if t[1] == d for p in res]
        _write_database(out / spec.name, spec, plans)
    (out / ROOT_META_NAME).write_text(json.dumps({
        "synthetic": True, "version": VERSION, "fingerprint": cfg.fingerprint(),
        "config": cfg_dict, "databases": {s.name: s.layout for s in cfg.databases}}, indent=1))
    return out


def ensure_synme_lv(cfg: SynMELVConfig, cache_dir: str | Path, workers: int = 0,
                    progress: bool = False) -> Path:
    """Root ``<cache_dir>/synme_lv-<fingerprint[:12]>`` of the generated SynME-LV, made if
    missing (once: later calls with the same config return it at once).

    Generation goes into a temporary folder next to it, renamed into place at the end, so an
    interrupted run never leaves a half database that looks complete.
    """
    cache = Path(cache_dir)
    root = cache / f"synme_lv-{cfg.fingerprint()[:12]}"
    if (root / ROOT_META_NAME).exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_synme_lv(cfg, tmp, workers=workers, progress=progress)
        if (root / ROOT_META_NAME).exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if root.exists():  # a stale, incomplete root (no synme_lv.json): replace it
            shutil.rmtree(root)
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / ROOT_META_NAME).exists():
            return root
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def load_lv_meta(db_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of one generated database (ground truth, plans, ``synthetic: true``)."""
    path = Path(db_dir) / META_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a SynME-LV database folder (no {META_NAME}); "
                                "generate it with ensure_synme_lv")
    return json.loads(path.read_text())
