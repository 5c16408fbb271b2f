"""SynME: the embedded synthetic micro-expression database, deterministic by seed.

Every mer run that has no real data uses SynME. It is written in a real database's layout
(CASME II: frame folders + ``CASME2-coding.xlsx``) so that the same reader, preprocessing and
cache consume it; nothing downstream knows it is synthetic except the report.

How a clip is made:

1. **Identity** (per subject): a face drawn with OpenCV from 68 iBUG landmarks that are known
   exactly (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67), with its own face shape,
   skin tone, multi-scale skin texture (so optical flow has something to track), hair, eyes
   (sclera, iris, pupil), nose shading, lips and background.
2. **Labels**: an emotion from the database's class balance, then AUs from emotion-conditioned
   distributions (upper-face AUs first, lower-face AUs boosted by the upper->lower coordinated
   pairs of the psychological study), with shared AUs, missing optional AUs and ~6.5% of clips
   whose AUs come from another emotion (the label is an *estimated* emotion, as in real sheets).
3. **Motion**: each AU is a sum of Gaussian-windowed displacement vectors anchored at landmarks
   (:func:`au_displacement`); a frame is the neutral face warped by ``cv2.remap`` with
   ``field * profile(t)`` (raised-cosine onset->apex rise, apex->offset fall) plus nuisances:
   sensor noise, illumination drift, sub-pixel head motion and occasional blinks.

The apex field ``D`` (H, W, 2) is the forward displacement of the face content, so the
onset->apex optical flow (``onset(x) ~ apex(x + flow(x))``) is ``D`` up to head motion and noise.

Seeding: subject ``s`` of database ``d`` draws from ``numpy.random.default_rng([seed, d, s, k])``
and its clip ``c`` from ``default_rng([seed, d, s, 1, c])``, so the output does not depend on the
number of worker processes.
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

from mer.data.workers import image_pool

VERSION = "1"
"""Format version of the generated data; part of the fingerprint, bump it when output changes."""

AU_LIST: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
"""AUs the generator animates with displacement fields (AU45, the blink, is a nuisance)."""

BLINK_AU = 45
MAX_DISPLACEMENT_PX = 2.5
MACRO_MAX_DISPLACEMENT_PX = 8.0
"""Cap of a macro-expression's apex displacement (``SynMEConfig.macro``), px."""
FRAME_ROOT = "CASME2_RAW_selected"
SHEET_NAME = "CASME2-coding.xlsx"
META_NAME = "synme_meta.json"
ROOT_META_NAME = "synme.json"
JPEG_QUALITY = 95
# Header of the CASME II coding sheet, in order (None = the unnamed, empty columns).
SHEET_HEADER: tuple[str | None, ...] = (
    "Subject", "Filename", None, "Onset Frame", "Apex Frame", "OffsetFrame", None,
    "Action Units", "emotion", "au",
)

UPPER_AUS = (1, 2, 4, 5, 6, 7)
# Psychological upper->lower coordinated AU pairs (FED-PsyAU's global graph edges).
COORDINATED: dict[int, tuple[int, ...]] = {
    1: (12, 14, 15), 2: (12, 14, 15, 17), 4: (9, 10, 14, 15, 17), 5: (12,),
    6: (9, 12, 14), 7: (9, 10, 12, 14, 15, 17),
}
_PAIR_BOOST_IN = 0.25  # boost of a coordinated lower AU the emotion uses anyway
_PAIR_BOOST_OUT = 0.04  # boost of one it does not (cross-talk between emotions)


# --------------------------------------------------------------------------------------------
# Emotion -> AU model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EmotionAUs:
    upper: dict[int, float]  # P(upper AU)
    lower: dict[int, float]  # base P(lower AU) before the coordinated boosts
    primary: tuple[tuple[int, ...], ...]  # used when nothing was drawn: one of these, at random


_AU_MODEL: dict[str, _EmotionAUs] = {
    # Objective class I: 12, 6, 6+12, 7+12
    "happiness": _EmotionAUs({6: 0.45, 7: 0.15}, {12: 0.7, 25: 0.08}, ((12,), (6, 12), (6,))),
    # II: 1+2, 5, 25, 1+2+25, 25+26
    "surprise": _EmotionAUs({1: 0.65, 2: 0.55, 5: 0.3}, {25: 0.35, 26: 0.25},
                            ((1, 2), (5,), (25,), (1, 2, 25))),
    # III: 4, 7, 4+7, 23, 17+24
    "anger": _EmotionAUs({4: 0.65, 7: 0.45, 5: 0.08}, {23: 0.25, 24: 0.25, 17: 0.2},
                         ((4,), (4, 7), (23,), (17, 24))),
    # IV: 9, 10, 4+9, 4+7+10, 7+10
    "disgust": _EmotionAUs({4: 0.45, 7: 0.3}, {9: 0.45, 10: 0.45}, ((9,), (10,), (4, 9), (7, 10))),
    # V: 1, 15, 1+4, 15+17
    "sadness": _EmotionAUs({1: 0.55, 4: 0.35}, {15: 0.55, 17: 0.3}, ((15,), (1,), (1, 4))),
    # VI: 1+2+4, 20
    "fear": _EmotionAUs({1: 0.5, 2: 0.45, 4: 0.55, 5: 0.15}, {20: 0.5, 25: 0.15},
                        ((1, 2, 4), (20,))),
    "repression": _EmotionAUs({4: 0.08}, {14: 0.35, 15: 0.3, 17: 0.4, 24: 0.3},
                              ((14,), (15,), (17,), (24,))),
}
_CONTEMPT = "contempt"  # unilateral 12 or 14
_OTHERS = ("others", "other")  # one random weak AU
_ALIASES = {"positive": ("happiness",), "negative": ("anger", "disgust", "sadness", "fear")}
_NEGATIVE_WEIGHTS = (0.3, 0.3, 0.2, 0.2)
KNOWN_EMOTIONS: tuple[str, ...] = (
    *_AU_MODEL, _CONTEMPT, *_OTHERS, "positive", "negative",
)


def _au_key(au: int, side: str = "") -> str:
    return f"{side}{au}"


def _parse_au_key(key: int | str) -> tuple[str, int]:
    """``12`` -> ("", 12); ``"R14"`` -> ("R", 14)."""
    if isinstance(key, (int, np.integer)):
        return "", int(key)
    m = re.fullmatch(r"([LR]?)(\d+)", str(key).strip())
    if not m:
        raise ValueError(f"AU key {key!r}: expected an AU number with an optional L/R prefix")
    return m.group(1), int(m.group(2))


def _draw_aus(emotion: str, rng: np.random.Generator, peak: float) -> dict[str, float]:
    """AU intensities (apex displacement, px) for one clip whose AUs follow ``emotion``.

    Keys are ``"12"`` (bilateral) or ``"R14"`` / ``"L12"`` (one side of the face: R is the
    subject's right, the image's left).
    """
    if emotion in _ALIASES:
        subs = _ALIASES[emotion]
        weights = _NEGATIVE_WEIGHTS if len(subs) > 1 else (1.0,)
        emotion = subs[int(rng.choice(len(subs), p=weights))]

    if emotion in _OTHERS:
        n = 1 if rng.random() < 0.75 else 2
        chosen = rng.choice(len(AU_LIST), size=n, replace=False)
        return {_au_key(AU_LIST[i]): float(peak * rng.uniform(0.45, 0.8)) for i in sorted(chosen)}

    if emotion == _CONTEMPT:
        side = "R" if rng.random() < 0.5 else "L"
        au = 14 if rng.random() < 0.55 else 12
        aus = {_au_key(au, side): float(peak * rng.uniform(0.75, 1.0))}
        if rng.random() < 0.15:
            aus[_au_key(4)] = float(peak * rng.uniform(0.4, 0.8))
        return aus

    model = _AU_MODEL[emotion]
    active: list[int] = [au for au, p in model.upper.items() if rng.random() < p]
    if 2 in active and 1 not in active and rng.random() < 0.7:  # AU2 rarely comes alone
        active.insert(0, 1)
    for au, p in model.lower.items():
        k = sum(au in COORDINATED.get(u, ()) for u in active)
        if rng.random() < 1.0 - (1.0 - p) * (1.0 - _PAIR_BOOST_IN) ** k:
            active.append(au)
    # cross-talk: coordinated lower AUs outside the emotion's repertoire, rarely
    for u in [a for a in active if a in COORDINATED]:
        for au in COORDINATED[u]:
            if au not in active and au not in model.lower and rng.random() < _PAIR_BOOST_OUT:
                active.append(au)
    if not active:
        active = list(model.primary[int(rng.integers(len(model.primary)))])

    main = set(model.primary[0])
    aus: dict[str, float] = {}
    for au in sorted(active):
        lo, hi = (0.75, 1.0) if au in main else (0.45, 0.95)
        aus[_au_key(au)] = float(peak * rng.uniform(lo, hi))
    # now and then a lower-face AU is coded on one side only, as real sheets do (R12)
    lower = [k for k in aus if int(k) not in UPPER_AUS]
    if len(aus) == 1 and lower and rng.random() < 0.1:
        key = lower[0]
        aus = {("R" if rng.random() < 0.5 else "L") + key: aus[key]}
    return aus


def au_string(au_intensity: dict[int | str, float]) -> str:
    """The sheet's AU string for an intensity dict: ``{"4": .., "7": ..}`` -> ``"4+7"``."""
    keys = sorted((_parse_au_key(k) for k in au_intensity), key=lambda sk: (sk[1], sk[0]))
    return "+".join(f"{side}{au}" for side, au in keys)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class SynDatabaseSpec:
    """One synthetic database.

    Attributes:
        name: folder name under the SynME root (``synA``).
        fps: frame rate.
        height, width: frame size in pixels (face crops).
        color: colour frames (else 1-channel greyscale JPEGs).
        n_subjects: number of subjects.
        clips_per_subject: (min, max) clips per subject, inclusive.
        emotion_weights: class balance, emotion word -> weight (normalised when drawn).
        noise_sigma: std of the Gaussian sensor noise, grey levels.
        intensity: database factor on the per-clip apex displacement (px, 1 = 0.5-2 px).
        illumination_drift: relative amplitude of the slow gain drift (0.03 = 3%).
        head_motion_px: scale of the global head-motion drift over a clip, px.
        blink_prob: probability that a clip contains a blink.
        au_confusion: fraction of clips whose AUs come from another emotion's distribution.
    """

    name: str
    fps: int
    height: int
    width: int
    color: bool
    n_subjects: int
    clips_per_subject: tuple[int, int]
    emotion_weights: dict[str, float]
    noise_sigma: float = 1.0
    intensity: float = 1.0
    illumination_drift: float = 0.03
    head_motion_px: float = 0.3
    blink_prob: float = 0.2
    au_confusion: float = 0.065

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.fps, self.height, self.width = int(self.fps), int(self.height), int(self.width)
        self.color = bool(self.color)
        self.n_subjects = int(self.n_subjects)
        lo, hi = (int(v) for v in self.clips_per_subject)
        self.clips_per_subject = (lo, hi)
        self.emotion_weights = {str(k): float(v) for k, v in self.emotion_weights.items()}
        for name in ("noise_sigma", "intensity", "illumination_drift", "head_motion_px",
                     "blink_prob", "au_confusion"):
            setattr(self, name, float(getattr(self, name)))
        where = f"SynME database {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"{where}: name must be letters, digits, '_' or '-'")
        if self.fps < 30 or min(self.height, self.width) < 64:
            raise ValueError(f"{where}: need fps >= 30 and frames at least 64x64 px")
        if self.n_subjects < 1 or not 1 <= lo <= hi:
            raise ValueError(f"{where}: need n_subjects >= 1 and 1 <= clips_per_subject min <= max")
        unknown = sorted(set(self.emotion_weights) - set(KNOWN_EMOTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown emotions {unknown}; known: {list(KNOWN_EMOTIONS)}")
        if not self.emotion_weights or min(self.emotion_weights.values()) < 0 or sum(
            self.emotion_weights.values()
        ) <= 0:
            raise ValueError(f"{where}: emotion_weights must be non-negative with a positive sum")


@dataclass
class SynMEConfig:
    """A SynME collection: the seed and its databases (each a :class:`SynDatabaseSpec`).

    ``macro=True`` makes the *macro-expression* set of the same collection: the same subjects
    (identities, faces, landmarks: drawn from the same seeds) showing larger (3-6x the
    database's micro intensity, capped at :data:`MACRO_MAX_DISPLACEMENT_PX`) and longer
    (0.5-1.0 s) expressions, about half as many clips per subject, named ``MA..`` (for
    macro-to-micro transfer). ``macro`` is left out of :meth:`to_dict` while False, so the
    fingerprint, hence every cached SynME, of the micro set is what it was before the option.
    """

    seed: int
    databases: list[SynDatabaseSpec] = field(default_factory=list)
    macro: bool = False

    def __post_init__(self) -> None:
        self.seed = int(self.seed)
        self.macro = bool(self.macro)
        self.databases = [
            d if isinstance(d, SynDatabaseSpec) else SynDatabaseSpec(**d) for d in self.databases
        ]
        names = [d.name for d in self.databases]
        if len(set(names)) != len(names):
            raise ValueError(f"SynME config: database names must be unique, got {names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        d = asdict(self)
        for db in d["databases"]:
            db["clips_per_subject"] = list(db["clips_per_subject"])
        if not self.macro:  # absent while False: the micro set's fingerprint is unchanged
            del d["macro"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynMEConfig:
        """Inverse of :meth:`to_dict`; accepts ``OmegaConf.to_container(cfg)`` output.

        Keys starting with ``_`` (Hydra's ``_target_``) are ignored; unknown keys are errors.
        """
        fields = {f.name for f in dataclasses.fields(SynDatabaseSpec)}
        databases = []
        for db in d.get("databases", []):
            db = {k: v for k, v in db.items() if not str(k).startswith("_")}
            unknown = sorted(set(db) - fields)
            if unknown:
                raise ValueError(f"SynME database {db.get('name')!r}: unknown keys {unknown}; "
                                 f"known: {sorted(fields)}")
            databases.append(SynDatabaseSpec(**db))
        return cls(seed=d["seed"], databases=databases, macro=bool(d.get("macro", False)))

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of the config and :data:`VERSION`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((canonical + "|" + VERSION).encode()).hexdigest()


def default_synme_config(seed: int = 0) -> SynMEConfig:
    """Three databases that differ as CASME II, SAMM and SMIC-HS do (~230 clips in all)."""
    return SynMEConfig(seed=seed, databases=[
        SynDatabaseSpec(
            name="synA", fps=200, height=150, width=130, color=True, n_subjects=12,
            clips_per_subject=(6, 9),
            emotion_weights={"others": 0.36, "disgust": 0.25, "happiness": 0.13,
                             "repression": 0.11, "surprise": 0.10, "sadness": 0.035,
                             "fear": 0.015},
            noise_sigma=1.0, intensity=1.0, illumination_drift=0.02, head_motion_px=0.25,
            blink_prob=0.15,
        ),
        SynDatabaseSpec(
            name="synB", fps=200, height=170, width=150, color=False, n_subjects=10,
            clips_per_subject=(6, 9),
            emotion_weights={"anger": 0.33, "contempt": 0.10, "disgust": 0.07, "fear": 0.05,
                             "happiness": 0.16, "sadness": 0.05, "surprise": 0.10,
                             "other": 0.14},
            noise_sigma=2.0, intensity=0.75, illumination_drift=0.03, head_motion_px=0.35,
            blink_prob=0.2,
        ),
        SynDatabaseSpec(
            name="synC", fps=100, height=120, width=110, color=True, n_subjects=8,
            clips_per_subject=(6, 10),
            emotion_weights={"negative": 0.43, "positive": 0.31, "surprise": 0.26},
            noise_sigma=3.0, intensity=0.9, illumination_drift=0.04, head_motion_px=0.45,
            blink_prob=0.25,
        ),
    ])


def tiny_synme_config(seed: int = 0) -> SynMEConfig:
    """Two small databases (colour 200 fps, grey 100 fps; 4 subjects x 3 clips) for tests."""
    weights = {"happiness": 0.3, "surprise": 0.2, "disgust": 0.2, "sadness": 0.1,
               "anger": 0.1, "others": 0.1}
    return SynMEConfig(seed=seed, databases=[
        SynDatabaseSpec(name="tinyA", fps=200, height=96, width=88, color=True, n_subjects=4,
                        clips_per_subject=(3, 3), emotion_weights=weights, noise_sigma=1.0,
                        blink_prob=0.3),
        SynDatabaseSpec(name="tinyB", fps=100, height=96, width=88, color=False, n_subjects=4,
                        clips_per_subject=(3, 3), emotion_weights=weights, noise_sigma=2.0,
                        intensity=0.8, blink_prob=0.3),
    ])


# Stand-ins for the databases of FED-PsyAU's own federated settings and of the cross-database
# setting. Class balances are rough readings of the releases, not their counts.
DFME_EMOTIONS = {"disgust": 0.26, "surprise": 0.20, "happiness": 0.15, "fear": 0.12,
                 "anger": 0.10, "sadness": 0.10, "contempt": 0.07}
CASME3_EMOTIONS = {"disgust": 0.33, "others": 0.18, "surprise": 0.16, "fear": 0.11,
                   "anger": 0.07, "happiness": 0.075, "sadness": 0.075}


def _dfme_like(seed: int, n_subjects: int, clips: tuple[int, int], size: tuple[int, int]
               ) -> SynMEConfig:
    return SynMEConfig(seed=seed, databases=[
        SynDatabaseSpec(name=f"synDFME{fps}", fps=fps, height=size[0], width=size[1],
                        color=True, n_subjects=n_subjects, clips_per_subject=clips,
                        emotion_weights=DFME_EMOTIONS, noise_sigma=1.0 + 0.5 * i,
                        intensity=1.0 - 0.1 * i, blink_prob=0.2)
        for i, fps in enumerate((200, 300, 500))])


def dfme_synme_config(seed: int = 0) -> SynMEConfig:
    """Shaped like DFME: its 7 emotions (anger, contempt, disgust, fear, happiness, sadness,
    surprise) and its 3 frame rates, one synthetic database per rate (``synDFME200``,
    ``synDFME300``, ``synDFME500``; 6 subjects x 4-6 clips each): a SynME database has one
    frame rate, as a DFME subject was recorded at one."""
    return _dfme_like(seed, 6, (4, 6), (112, 100))


def dfme_tiny_synme_config(seed: int = 0) -> SynMEConfig:
    """:func:`dfme_synme_config` at test size: 3 rates x 4 subjects x 2 clips, 64x64 px."""
    return _dfme_like(seed, 4, (2, 2), (64, 64))


def casme3_synme_config(seed: int = 0) -> SynMEConfig:
    """Shaped like CAS(ME)^3 Part A: one 30 fps colour database (``synCASME3``, 12 subjects x
    4-8 clips) with its emotions (others, happiness/sadness written as SynME's words)."""
    return SynMEConfig(seed=seed, databases=[SynDatabaseSpec(
        name="synCASME3", fps=30, height=120, width=110, color=True, n_subjects=12,
        clips_per_subject=(4, 8), emotion_weights=CASME3_EMOTIONS, noise_sigma=1.5,
        intensity=1.2, blink_prob=0.2)])


def casme3_tiny_synme_config(seed: int = 0) -> SynMEConfig:
    """:func:`casme3_synme_config` at test size: 6 subjects x 3 clips, 64x64 px."""
    return SynMEConfig(seed=seed, databases=[SynDatabaseSpec(
        name="synCASME3", fps=30, height=64, width=64, color=True, n_subjects=6,
        clips_per_subject=(3, 3), emotion_weights=CASME3_EMOTIONS, noise_sigma=1.5,
        intensity=1.2, blink_prob=0.2)])


def casme2_samm_synme_config(seed: int = 0) -> SynMEConfig:
    """The CASME II- and SAMM-like databases of :func:`default_synme_config` (``synA``,
    ``synB``: the same clips, seeded by position) without the SMIC-like one, which in reality
    has no AUs: the composite of the 5 objective classes (MEGC2018 cross-database)."""
    cfg = default_synme_config(seed)
    return SynMEConfig(seed=seed, databases=cfg.databases[:2])


PRESETS = {
    "default": default_synme_config, "tiny": tiny_synme_config,
    "dfme": dfme_synme_config, "dfme_tiny": dfme_tiny_synme_config,
    "casme3": casme3_synme_config, "casme3_tiny": casme3_tiny_synme_config,
    "casme2_samm": casme2_samm_synme_config,
}
"""SynME presets by name (``data.preset``)."""


# --------------------------------------------------------------------------------------------
# Identity: landmarks and the neutral face
# --------------------------------------------------------------------------------------------

# iBUG-68 left/right mirror map (index -> index of the symmetric point).
MIRROR = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
     26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
     27, 28, 29, 30, 35, 34, 33, 32, 31,
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _draw_identity(rng: np.random.Generator, spec: SynDatabaseSpec) -> dict[str, Any]:
    """Identity parameters: geometry in face units (x: half face width, y: its height scale)."""
    h, w = spec.height, spec.width
    s = w * _u(rng, 0.29, 0.33)
    sy = s * _u(rng, 1.12, 1.26)
    skin_t = _u(rng, 0.0, 1.0)
    light, dark = np.array([175.0, 195.0, 232.0]), np.array([62.0, 92.0, 140.0])
    skin = (1 - skin_t) * light + skin_t * dark + rng.normal(0, 6, 3)
    hair = np.array([_u(rng, 15, 50), _u(rng, 20, 65), _u(rng, 25, 90)]) * _u(rng, 0.6, 1.0)
    iris_palette = [(35, 65, 105), (25, 45, 70), (140, 105, 60), (75, 115, 70)]
    iris = np.array(iris_palette[int(rng.integers(len(iris_palette)))]) + rng.normal(0, 8, 3)
    bg_palette = [(120, 120, 120), (150, 130, 110), (110, 130, 150), (90, 100, 95),
                  (170, 170, 165), (130, 150, 140)]
    bg = np.array(bg_palette[int(rng.integers(len(bg_palette)))]) + rng.normal(0, 10, 3)
    ey = _u(rng, -0.26, -0.18)
    ny = _u(rng, 0.24, 0.34)
    nb = ny + _u(rng, 0.06, 0.08)
    my = nb + _u(rng, 0.2, 0.3)
    lt = _u(rng, 0.09, 0.13)
    return {
        "cx": w / 2 + _u(rng, -0.03, 0.03) * w,
        "cy": h * _u(rng, 0.48, 0.52),
        "s": s, "sy": sy,
        "roll_deg": _u(rng, -3.0, 3.0),
        "jaw_n": _u(rng, 2.0, 2.8), "jaw_taper": _u(rng, 0.0, 0.15),
        "chin": min(my + lt + _u(rng, 0.22, 0.3), 1.1),
        "eye_x": _u(rng, 0.38, 0.45), "eye_y": ey, "eye_w": _u(rng, 0.16, 0.2),
        "eye_h": _u(rng, 0.065, 0.09), "eye_tilt": _u(rng, -0.03, 0.0),
        "brow_gap": _u(rng, 0.17, 0.24), "brow_arch": _u(rng, 0.03, 0.08),
        "brow_in": _u(rng, 0.12, 0.19), "brow_out": _u(rng, 0.72, 0.84),
        "brow_thick": _u(rng, 0.06, 0.1),
        "nose_tip": ny, "nose_base": nb, "nose_w": _u(rng, 0.16, 0.23),
        "mouth_y": my, "mouth_w": _u(rng, 0.32, 0.42),
        "lip_up": _u(rng, 0.07, 0.1), "lip_low": lt, "cupid": _u(rng, 0.01, 0.025),
        "gaze": [_u(rng, -0.15, 0.15), _u(rng, -0.1, 0.1)],
        "hair_y": _u(rng, -0.65, -0.55), "hair_h": _u(rng, 0.6, 0.72),
        "skin": skin.tolist(), "hair": hair.tolist(), "iris": iris.tolist(), "bg": bg.tolist(),
        "lip_red": _u(rng, 0.35, 0.55), "texture_amp": _u(rng, 0.035, 0.06),
        "light": _u(rng, -1.0, 1.0),
        "texture_seed": int(rng.integers(2**31)),
    }


def _to_px(ident: dict[str, Any], pts: np.ndarray) -> np.ndarray:
    """(N, 2) face units -> (N, 2) float64 pixels (scaled, rolled, placed)."""
    a = math.radians(ident["roll_deg"])
    xy = np.asarray(pts, dtype=np.float64) * [ident["s"], ident["sy"]]
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return xy @ rot.T + [ident["cx"], ident["cy"]]


def _landmarks_units(p: dict[str, Any]) -> np.ndarray:
    """(68, 2) iBUG landmarks in face units; index 0 is on the image's left (subject's right)."""
    pts = np.zeros((68, 2))
    y0, n = p["eye_y"] + 0.02, p["jaw_n"]
    for i in range(17):
        a = math.pi * i / 16
        c, sn = math.cos(a), math.sin(a)
        x = -math.copysign(abs(c) ** (2 / n), c) * (1 - p["jaw_taper"] * sn**2)
        pts[i] = x, y0 + (p["chin"] - y0) * abs(sn) ** (2 / n)
    by = p["eye_y"] - p["brow_gap"]
    for k in range(5):  # 17 (outer) .. 21 (inner)
        u = 1 - k / 4
        pts[17 + k] = -(p["brow_in"] + u * (p["brow_out"] - p["brow_in"])), \
            by - p["brow_arch"] * math.sin(math.pi * 0.85 * u) + 0.02 * u**2
    ey, nb = p["eye_y"], p["nose_base"]
    for k, y in enumerate(np.linspace(ey - 0.04, p["nose_tip"], 4)):
        pts[27 + k] = 0.0, y
    nw = p["nose_w"]
    pts[31:36] = [(-nw, nb - 0.03), (-nw / 2, nb + 0.01), (0, nb + 0.02), (nw / 2, nb + 0.01),
                  (nw, nb - 0.03)]
    ex, ew, eh, tilt = p["eye_x"], p["eye_w"], p["eye_h"], p["eye_tilt"]
    pts[36:42] = [(-ex - ew, ey + tilt), (-ex - 0.35 * ew, ey - eh), (-ex + 0.35 * ew, ey - eh),
                  (-ex + ew, ey + 0.01), (-ex + 0.35 * ew, ey + 0.85 * eh),
                  (-ex - 0.35 * ew, ey + 0.85 * eh)]
    my, mw, ut, lt, cb = p["mouth_y"], p["mouth_w"], p["lip_up"], p["lip_low"], p["cupid"]
    pts[48:55] = [(-mw, my), (-0.55 * mw, my - 0.8 * ut), (-0.22 * mw, my - ut),
                  (0, my - ut + cb), (0.22 * mw, my - ut), (0.55 * mw, my - 0.8 * ut), (mw, my)]
    pts[55:60] = [(0.55 * mw, my + 0.8 * lt), (0.22 * mw, my + lt), (0, my + 1.02 * lt),
                  (-0.22 * mw, my + lt), (-0.55 * mw, my + 0.8 * lt)]
    pts[60:68] = [(-0.8 * mw, my), (-0.3 * mw, my - 0.008), (0, my - 0.006),
                  (0.3 * mw, my - 0.008), (0.8 * mw, my), (0.3 * mw, my + 0.008),
                  (0, my + 0.006), (-0.3 * mw, my + 0.008)]
    # the left brow and eye mirror the right ones
    for a, b in ((22, 27), (42, 48)):
        pts[a:b] = pts[MIRROR[a:b]] * [-1, 1]
    return pts


def _catmull(pts: np.ndarray, n: int = 6) -> np.ndarray:
    """(K, 2) control points -> (~n*K, 2) points of a Catmull-Rom curve through them."""
    p = np.vstack([pts[:1], pts, pts[-1:]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, n, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (3 * p1 - p0 - 3 * p2 + p3) * t3))
    out.append(pts[-1])
    return np.array(out)


class _Canvas:
    """Supersampled float32 drawing surface (H*ss, W*ss, 3) with anti-aliased masks."""

    SHIFT = 4

    def __init__(self, h: int, w: int, ss: int) -> None:
        self.h, self.w, self.ss = h * ss, w * ss, ss
        self.img = np.zeros((self.h, self.w, 3), np.float32)
        yy, xx = np.mgrid[0:self.h, 0:self.w].astype(np.float32)
        self.xx, self.yy = (xx + 0.5) / ss - 0.5, (yy + 0.5) / ss - 0.5  # frame pixel coords

    def _fix(self, pts: np.ndarray) -> np.ndarray:
        q = (np.asarray(pts) + 0.5) * self.ss - 0.5
        return np.round(q * (1 << self.SHIFT)).astype(np.int32).reshape(-1, 1, 2)

    def poly(self, pts: np.ndarray, blur: float = 0.0) -> np.ndarray:
        m = np.zeros((self.h, self.w), np.float32)
        cv2.fillPoly(m, [self._fix(pts)], 1.0, cv2.LINE_AA, self.SHIFT)
        return cv2.GaussianBlur(m, (0, 0), blur * self.ss) if blur > 0 else m

    def line(self, pts: np.ndarray, thick: float, blur: float = 0.0) -> np.ndarray:
        m = np.zeros((self.h, self.w), np.float32)
        t = max(1, int(round(thick * self.ss)))
        cv2.polylines(m, [self._fix(pts)], False, 1.0, t, cv2.LINE_AA, self.SHIFT)
        return cv2.GaussianBlur(m, (0, 0), blur * self.ss) if blur > 0 else m

    def ellipse(self, c: np.ndarray, axes: tuple[float, float], angle: float = 0.0,
                blur: float = 0.0) -> np.ndarray:
        m = np.zeros((self.h, self.w), np.float32)
        box = (((c[0] + 0.5) * self.ss - 0.5, (c[1] + 0.5) * self.ss - 0.5),
               (2 * axes[0] * self.ss, 2 * axes[1] * self.ss), angle)
        cv2.ellipse(m, box, 1.0, -1, cv2.LINE_AA)
        return cv2.GaussianBlur(m, (0, 0), blur * self.ss) if blur > 0 else m

    def blob(self, c: np.ndarray, sx: float, sy: float) -> np.ndarray:
        return np.exp(-0.5 * (((self.xx - c[0]) / sx) ** 2 + ((self.yy - c[1]) / sy) ** 2))

    def paint(self, mask: np.ndarray, color: np.ndarray | list[float]) -> None:
        m = np.clip(mask, 0, 1)[..., None]
        self.img = self.img * (1 - m) + np.asarray(color, np.float32) * m

    def shade(self, mask: np.ndarray, factor: float) -> None:
        """Multiply by (1 + factor * mask): darken with factor < 0, brighten with > 0."""
        self.img *= (1 + factor * mask)[..., None]


def _noise_texture(rng: np.random.Generator, h: int, w: int,
                   sigmas: tuple[float, ...], amps: tuple[float, ...]) -> np.ndarray:
    """(h, w) float32 multi-scale smoothed noise with unit std."""
    tex = np.zeros((h, w), np.float32)
    for sigma, amp in zip(sigmas, amps, strict=True):
        layer = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
        tex += amp * layer / (layer.std() + 1e-6)
    return tex / (tex.std() + 1e-6)


def _eye_curves(lm: np.ndarray, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """Upper lid curve (outer -> inner corner) and lower lid curve (inner -> outer) of one eye."""
    i = 36 if right else 42
    upper = _catmull(lm[[i, i + 1, i + 2, i + 3]])
    lower = _catmull(lm[[i + 3, i + 4, i + 5, i]])
    return upper, lower


def render_face(ident: dict[str, Any], landmarks: np.ndarray, height: int, width: int,
                eyes_closed: bool = False) -> np.ndarray:
    """The neutral face of an identity: (H, W, 3) float32 BGR in [0, 255].

    ``landmarks`` (68, 2) are in frame pixels; ``eyes_closed`` draws shut lids instead of eyes
    (the blink target; the texture and everything else are identical).
    """
    ss = 2
    cv = _Canvas(height, width, ss)
    lm = landmarks
    s, sy = ident["s"], ident["sy"]
    skin = np.array(ident["skin"], np.float32)
    hair = np.array(ident["hair"], np.float32)
    trng = np.random.default_rng(ident["texture_seed"])
    tex_fine = _noise_texture(trng, cv.h, cv.w, (1.0, 2.5, 6.0, 14.0), (0.5, 0.8, 0.7, 0.5))
    tex_bg = _noise_texture(trng, cv.h, cv.w, (3.0, 12.0), (0.5, 1.0))
    tex_hair = _noise_texture(trng, cv.h, cv.w, (0.8, 2.0), (1.0, 0.5))

    # background with a vertical gradient
    bg = np.array(ident["bg"], np.float32)
    grad = 1 + 0.12 * (0.5 - cv.yy / height)
    cv.img[:] = bg * grad[..., None]
    cv.img *= (1 + 0.05 * tex_bg)[..., None]

    # hair (a large ellipse, mostly hidden by the face), ears, neck
    hair_c = _to_px(ident, [[0, ident["hair_y"]]])[0]
    hmask = cv.ellipse(hair_c, (1.15 * s, ident["hair_h"] * sy), ident["roll_deg"])
    cv.paint(hmask, hair)
    cv.img *= (1 + 0.12 * tex_hair * hmask)[..., None]
    for side in (-1, 1):
        ear = _to_px(ident, [[side * 1.0, -0.05]])[0]
        cv.paint(cv.ellipse(ear, (0.12 * s, 0.24 * sy), ident["roll_deg"]), skin * 0.85)
    neck = _to_px(ident, [[-0.5, 0.3], [0.5, 0.3], [0.55, 3.0], [-0.55, 3.0]])
    cv.paint(cv.poly(neck), skin * 0.72)

    # face: jaw + forehead arc, shaded and textured skin
    y0 = ident["eye_y"] + 0.02
    arc = [[0.98 * math.cos(b), y0 - (y0 + 1.0) * math.sin(b)] for b in np.linspace(0, np.pi, 24)]
    outline = np.vstack([lm[:17], _to_px(ident, arc)])
    fmask = cv.poly(outline, blur=0.4)
    centre = _to_px(ident, [[0, 0.05]])[0]
    rn2 = ((cv.xx - centre[0]) / s) ** 2 + ((cv.yy - centre[1]) / (1.1 * sy)) ** 2
    shading = 1 - 0.2 * rn2 + 0.06 * ident["light"] * (cv.xx - centre[0]) / s
    face_layer = skin * (shading * (1 + ident["texture_amp"] * tex_fine))[..., None]
    m = fmask[..., None]
    cv.img = cv.img * (1 - m) + face_layer * m
    # hairline over the top of the forehead
    top = _to_px(ident, [[0, -0.97]])[0]
    fringe = cv.ellipse(top, (0.8 * s, 0.08 * sy), ident["roll_deg"], blur=1.0)
    cv.paint(fringe * fmask * 0.9, hair)

    # cheeks: faint blush
    red = np.array([60, 60, 200], np.float32)
    for side in (36, 45):
        c = lm[side] + [0, 0.3 * sy] + [(0.08 if side == 36 else -0.08) * s, 0]
        cv.paint(0.08 * cv.blob(c, 0.16 * s, 0.1 * sy) * fmask, red)

    # nose: side shadows, tip highlight, nostrils, shadow below
    for i, j in ((31, -1), (35, 1)):
        pts = np.array([lm[27] + [j * 0.08 * s, 0.02 * sy], lm[29] + [j * 0.1 * s, 0],
                        lm[i] + [j * 0.01 * s, -0.04 * sy]])
        cv.shade(cv.line(_catmull(pts), 0.8, blur=1.2), -0.22)
        cv.shade(cv.line(_catmull(np.array([lm[i] + [0, -0.05 * sy], lm[i] + [-j * 0.01 * s, 0],
                                            lm[i] + [-j * 0.04 * s, 0.02 * sy]])), 0.7, 0.5),
                 -0.25)
    cv.shade(cv.blob(lm[30], 0.07 * s, 0.05 * sy), 0.08)
    for a, b in ((31, 32), (35, 34)):
        c = 0.45 * lm[a] + 0.55 * lm[b] + [0, -0.015 * sy]
        cv.paint(cv.ellipse(c, (0.045 * s, 0.022 * sy), ident["roll_deg"], blur=0.3), skin * 0.3)
    cv.shade(cv.blob(lm[33] + [0, 0.05 * sy], 0.12 * s, 0.03 * sy), -0.1)

    # nasolabial folds
    for n, mth, j in ((31, 48, -1), (35, 54, 1)):
        pts = np.array([lm[n] + [j * 0.06 * s, -0.02 * sy],
                        0.5 * (lm[n] + lm[mth]) + [j * 0.14 * s, 0],
                        lm[mth] + [j * 0.08 * s, 0.04 * sy]])
        cv.shade(cv.line(_catmull(pts), 0.7, blur=1.0), -0.12)

    # eyes: socket shadow, then sclera/iris/pupil or closed lids
    for right in (True, False):
        upper, lower = _eye_curves(lm, right)
        i = 36 if right else 42
        ec = lm[i:i + 6].mean(axis=0)
        eye_w = np.linalg.norm(lm[i + 3] - lm[i])
        cv.shade(cv.blob(ec + [0, -0.05 * sy], 0.22 * s, 0.09 * sy), -0.1)
        eye = np.vstack([upper, lower])
        crease = upper + [0, -0.055 * sy]
        cv.shade(cv.line(crease[2:-2], 0.6, blur=0.6), -0.18)
        if eyes_closed:
            cv.paint(cv.poly(eye, blur=0.3), skin * 0.9)
            lid = 0.35 * upper[::-1] + 0.65 * lower  # lash line along the lower part
            cv.paint(cv.line(lid, 0.9, blur=0.2), hair * 0.6)
            continue
        emask = cv.poly(eye)
        sclera = np.array([212, 220, 228], np.float32) * (0.9 + 0.1 * cv.blob(
            ec, 0.5 * eye_w, 0.3 * eye_w))[..., None]
        cv.img = cv.img * (1 - emask[..., None]) + sclera * emask[..., None]
        ic = ec + np.array(ident["gaze"]) * eye_w * [1, 0.5]
        r = 0.22 * eye_w
        iris = cv.ellipse(ic, (r, r)) * emask
        cv.paint(iris, ident["iris"])
        cv.shade(cv.ellipse(ic, (r, r)) * (1 - cv.ellipse(ic, (0.8 * r, 0.8 * r))) * emask, -0.4)
        cv.paint(cv.ellipse(ic, (0.42 * r, 0.42 * r)) * emask, [15, 15, 15])
        cv.paint(cv.ellipse(ic + [-0.3 * r, -0.35 * r], (0.22 * r, 0.22 * r)) * emask,
                 [240, 240, 240])
        cv.paint(cv.line(upper, 0.9, blur=0.2), hair * 0.5)
        cv.shade(cv.line(lower, 0.5, blur=0.3), -0.18)

    # brows: filled tapered band along 17-21 / 22-26
    t = ident["brow_thick"] * sy
    for idx in ((17, 18, 19, 20, 21), (26, 25, 24, 23, 22)):
        c = _catmull(lm[list(idx)])  # outer -> inner
        prof = np.linspace(0.55, 1.0, len(c))[:, None]
        off = np.array([0.0, 0.5 * t]) * prof
        band = np.vstack([c - off, (c + off)[::-1]])
        bmask = cv.poly(band, blur=0.5)
        cv.paint(0.85 * bmask * (1 + 0.15 * tex_hair).clip(0, 1.2), hair)

    # mouth: lips, the line between them, highlights and the chin sulcus
    lip = skin * (1 - ident["lip_red"]) + np.array([70, 70, 175]) * ident["lip_red"]
    upper_lip = np.vstack([_catmull(lm[48:55]), _catmull(lm[[64, 63, 62, 61, 60]])])
    lower_lip = np.vstack([_catmull(lm[[54, 55, 56, 57, 58, 59, 48]]),
                           _catmull(lm[[60, 67, 66, 65, 64]])])
    cv.paint(cv.poly(upper_lip, blur=0.3), lip * 0.88)
    cv.paint(cv.poly(lower_lip, blur=0.3), lip)
    cv.shade(cv.blob(0.5 * (lm[57] + lm[66]), 0.12 * s, 0.025 * sy), 0.08)
    mid = np.array([lm[60], 0.5 * (lm[61] + lm[67]), 0.5 * (lm[62] + lm[66]),
                    0.5 * (lm[63] + lm[65]), lm[64]])
    cv.paint(cv.line(_catmull(mid), 0.8, blur=0.3), lip * 0.4)
    for k in (48, 54):
        cv.shade(cv.blob(lm[k], 0.03 * s, 0.02 * sy), -0.2)
    cv.shade(cv.blob(lm[57] + [0, 0.08 * sy], 0.13 * s, 0.035 * sy), -0.1)
    cv.shade(cv.blob(lm[8] + [0, 0.1 * sy], 0.5 * s, 0.08 * sy) * (1 - fmask), -0.35)

    img = cv2.resize(cv.img, (width, height), interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), 0.5)
    return np.clip(img, 0, 255).astype(np.float32)


# --------------------------------------------------------------------------------------------
# AU displacement fields
# --------------------------------------------------------------------------------------------

# One component: (landmark indices averaged, offset (x, y), direction (x, y), sigma, weight).
# Offsets and sigmas are in inter-ocular distances; directions in the face frame (x to the
# image's right, y down). Lateral components are written for the subject's right side (image
# left: +x points to the face's midline there) and mirrored for the left side; "C" components
# sit on the midline.
_Comp = tuple[tuple[int, ...], tuple[float, float], tuple[float, float], float, float]
_AU_COMPONENTS: dict[int, dict[str, list[_Comp]]] = {
    1: {"side": [((21,), (0, 0), (0.15, -1), 0.16, 1.0), ((20,), (0, 0), (0.1, -1), 0.16, 0.8),
                 ((21,), (0, -0.18), (0.1, -1), 0.2, 0.5)]},
    2: {"side": [((18,), (0, 0), (-0.1, -1), 0.16, 1.0), ((17,), (0, 0), (-0.1, -1), 0.16, 0.8),
                 ((19,), (0, 0), (0, -1), 0.15, 0.4), ((18,), (0, -0.18), (0, -1), 0.2, 0.5)]},
    4: {"side": [((20,), (0, 0), (0.55, 0.85), 0.16, 1.0), ((21,), (0, 0), (0.6, 0.8), 0.14, 1.0),
                 ((19,), (0, 0), (0.3, 0.95), 0.16, 0.7)]},
    5: {"side": [((37,), (0, 0), (0, -1), 0.09, 1.0), ((38,), (0, 0), (0, -1), 0.09, 1.0),
                 ((37, 38), (0, -0.1), (0, -1), 0.12, 0.4)]},
    6: {"side": [((40, 41), (0, 0.35), (0.15, -1), 0.22, 1.0),
                 ((40, 41), (0, 0.08), (0, -1), 0.12, 0.6),
                 ((36,), (-0.08, 0), (0.5, -0.6), 0.1, 0.5)]},
    7: {"side": [((40,), (0, 0), (0.25, -1), 0.09, 1.0), ((41,), (0, 0), (0.25, -1), 0.09, 1.0),
                 ((37, 38), (0, 0), (0, 0.6), 0.09, 0.4)]},
    9: {"side": [((31,), (-0.05, -0.15), (0.15, -1), 0.13, 1.0),
                 ((31,), (0, 0), (0.1, -1), 0.1, 0.8), ((21,), (0, 0.05), (0.2, 0.6), 0.14, 0.35)],
        "C": [((28,), (0, 0), (0, -0.5), 0.12, 0.4), ((51,), (0, 0), (0, -1), 0.12, 0.3)]},
    10: {"side": [((50,), (0, 0), (0, -1), 0.12, 1.0), ((31, 49), (0, 0), (0.05, -1), 0.13, 0.6)],
         "C": [((51,), (0, 0), (0, -1), 0.12, 1.0)]},
    12: {"side": [((48,), (0, 0), (-0.75, -0.65), 0.14, 1.0),
                  ((48,), (-0.12, -0.2), (-0.6, -0.8), 0.18, 0.6),
                  ((49,), (0, 0), (-0.5, -0.4), 0.1, 0.3)]},
    14: {"side": [((48,), (0, 0), (0.85, -0.15), 0.11, 1.0),
                  ((48,), (-0.12, 0), (0.9, 0), 0.12, 0.7)]},
    15: {"side": [((48,), (0, 0), (-0.2, 1), 0.12, 1.0), ((48,), (0, 0.15), (-0.1, 1), 0.15, 0.6),
                  ((59,), (0, 0), (0, 0.6), 0.1, 0.3)]},
    17: {"side": [((58,), (0, 0), (0, -0.8), 0.12, 0.5)],
         "C": [((8,), (0, -0.3), (0, -1), 0.2, 1.0), ((57,), (0, 0), (0, -1), 0.12, 0.8)]},
    20: {"side": [((48,), (0, 0), (-1, 0.1), 0.13, 1.0),
                  ((48,), (-0.15, 0.05), (-1, 0.1), 0.16, 0.5),
                  ((59,), (0, 0), (-0.6, 0.1), 0.1, 0.3)]},
    23: {"side": [((48,), (0, 0), (1, 0), 0.1, 0.8), ((50,), (0, 0), (0.2, 0.5), 0.08, 0.5),
                  ((58,), (0, 0), (0.2, -0.5), 0.08, 0.5)],
         "C": [((51,), (0, 0.02), (0, 0.6), 0.08, 0.6), ((57,), (0, -0.02), (0, -0.6), 0.08, 0.6)]},
    24: {"side": [((61,), (0, 0), (0, 1), 0.08, 0.6), ((67,), (0, 0), (0, -1), 0.08, 0.6)],
         "C": [((62,), (0, 0), (0, 1), 0.08, 0.8), ((66,), (0, 0), (0, -1), 0.08, 0.8),
               ((57,), (0, 0), (0, -1), 0.1, 0.6)]},
    25: {"side": [((58,), (0, 0), (0, 1), 0.1, 0.6)],
         "C": [((57,), (0, 0), (0, 1), 0.1, 1.0), ((66,), (0, 0), (0, 1), 0.08, 0.8),
               ((51,), (0, 0), (0, -0.4), 0.08, 0.4)]},
    26: {"side": [((6,), (0, 0), (0.1, 1), 0.25, 0.6)],
         "C": [((8,), (0, 0), (0, 1), 0.3, 1.0), ((57,), (0, 0), (0, 1), 0.15, 0.7)]},
}


def _face_frame(landmarks: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Inter-ocular distance and the face's x / y unit axes in the image, from the eyes."""
    v = landmarks[42:48].mean(axis=0) - landmarks[36:42].mean(axis=0)
    iod = float(np.hypot(*v))
    ex = v / iod
    return iod, ex, np.array([-ex[1], ex[0]])


def _single_au_field(landmarks: np.ndarray, au: int, side: str, xx: np.ndarray,
                     yy: np.ndarray) -> np.ndarray:
    """(H, W, 2) field of one AU with unit maximum magnitude; ``side`` "", "R" or "L"."""
    iod, ax, ay = _face_frame(landmarks)
    comps = _AU_COMPONENTS[au]
    terms: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for idx, off, d, sigma, wgt in comps.get("side", []):
        for s_name, mirror in (("R", False), ("L", True)):
            if side and side != s_name:
                continue
            ids = MIRROR[list(idx)] if mirror else list(idx)
            sx = -1.0 if mirror else 1.0
            anchor = landmarks[ids].mean(axis=0) + iod * (sx * off[0] * ax + off[1] * ay)
            terms.append((anchor, sx * d[0] * ax + d[1] * ay, sigma * iod, wgt))
    for idx, off, d, sigma, wgt in comps.get("C", []):
        anchor = landmarks[list(idx)].mean(axis=0) + iod * (off[0] * ax + off[1] * ay)
        terms.append((anchor, d[0] * ax + d[1] * ay, sigma * iod, wgt * (0.5 if side else 1.0)))
    disp = np.zeros(xx.shape + (2,), np.float64)
    for anchor, direction, sigma, wgt in terms:
        g = wgt * np.exp(-((xx - anchor[0]) ** 2 + (yy - anchor[1]) ** 2) / (2 * sigma**2))
        unit = direction / np.hypot(*direction)
        disp[..., 0] += g * unit[0]
        disp[..., 1] += g * unit[1]
    peak = np.sqrt((disp**2).sum(-1)).max()
    return disp / peak if peak > 0 else disp


def au_displacement(landmarks: np.ndarray, au_intensity: dict[int | str, float], height: int,
                    width: int, max_px: float | None = None) -> np.ndarray:
    """Apex displacement field of a set of AUs: (H, W, 2) float32 (dx, dy) in pixels.

    Args:
        landmarks: (68, 2) iBUG landmarks of the neutral face, frame pixels.
        au_intensity: AU -> peak displacement in px. Keys are AU numbers (``12``, ``"12"``,
            both sides) or strings with a side prefix (``"R14"``: subject's right = image left).
        height, width: frame size.

    Each AU's field has its maximum magnitude equal to its intensity; the sum is scaled down
    if its maximum exceeds ``max_px`` (default :data:`MAX_DISPLACEMENT_PX`; macro-expressions:
    :data:`MACRO_MAX_DISPLACEMENT_PX`). It is the forward displacement of the
    face content from onset to apex (= the onset->apex optical flow).
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (68, 2):
        raise ValueError(f"au_displacement: landmarks must be (68, 2), got {landmarks.shape}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    total = np.zeros((height, width, 2), np.float64)
    for key, value in au_intensity.items():
        side, au = _parse_au_key(key)
        if au not in _AU_COMPONENTS:
            raise ValueError(f"au_displacement: AU {key!r} cannot be animated; known: {AU_LIST}")
        total += float(value) * _single_au_field(landmarks, au, side, xx, yy)
    cap = MAX_DISPLACEMENT_PX if max_px is None else float(max_px)
    peak = np.sqrt((total**2).sum(-1)).max() if au_intensity else 0.0
    if peak > cap:
        total *= cap / peak
    return total.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------


def _profile(k: np.ndarray | int, onset: int, apex: int, offset: int) -> np.ndarray:
    """Temporal profile in [0, 1] at frame index ``k``: raised-cosine rise and fall."""
    k = np.asarray(k, np.float64)
    rise = 0.5 * (1 - np.cos(np.pi * np.clip((k - onset) / max(apex - onset, 1), 0, 1)))
    fall = 0.5 * (1 + np.cos(np.pi * np.clip((k - apex) / max(offset - apex, 1), 0, 1)))
    return np.where(k <= apex, rise, fall)


def _plan_clip(spec: SynDatabaseSpec, rng: np.random.Generator,
               macro: bool = False) -> dict[str, Any]:
    """Everything random about a clip except its per-frame noise (``macro``: a larger, longer
    macro-expression; the micro draws are unchanged)."""
    names = list(spec.emotion_weights)
    p = np.array([spec.emotion_weights[n] for n in names])
    emotion = names[int(rng.choice(len(names), p=p / p.sum()))]
    au_emotion = emotion
    if emotion not in _OTHERS and rng.random() < spec.au_confusion:
        alt = [n for n in names if n != emotion and n not in _OTHERS] or [
            n for n in _AU_MODEL if n != emotion]
        au_emotion = alt[int(rng.integers(len(alt)))]
    if macro:
        peak = float(np.clip(spec.intensity * rng.uniform(3.0, 6.0), 2.0,
                             MACRO_MAX_DISPLACEMENT_PX - 0.5))
    else:
        peak = float(np.clip(spec.intensity * rng.uniform(0.5, 2.0), 0.35, 2.4))
    aus = _draw_aus(au_emotion, rng, peak)

    fps = spec.fps
    if macro:
        dur = _u(rng, 0.5, 1.0)
        rise = _u(rng, 0.15, 0.35)
    else:
        dur = _u(rng, 0.2, 0.45)
        rise = min(_u(rng, 0.07, 0.2), dur - 0.06)
    rise_k = max(2, round(rise * fps))
    dur_k = max(rise_k + 2, round(dur * fps))
    pre, post = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    n_frames = pre + dur_k + 1 + post
    onset_k, apex_k, offset_k = pre, pre + rise_k, pre + dur_k
    start = int(rng.integers(1, 150))

    h = spec.head_motion_px
    head = {"tx": _u(rng, -1, 1) * h, "ty": _u(rng, -1, 1) * h,
            "rot_px": _u(rng, -1, 1) * h,  # rotation as displacement at one face half-width
            "wobble_px": _u(rng, 0, 0.3) * h, "wobble_hz": _u(rng, 0.5, 2.0),
            "wobble_phase": _u(rng, 0, 2 * math.pi)}
    light = {"ramp": _u(rng, -1, 1) * spec.illumination_drift,
             "wave": _u(rng, 0, 0.3) * spec.illumination_drift, "wave_hz": _u(rng, 0.5, 3.0),
             "wave_phase": _u(rng, 0, 2 * math.pi)}
    blink = None
    if rng.random() < spec.blink_prob:
        dur_b = max(3, round(_u(rng, 0.08, 0.15) * fps))
        if rng.random() < 0.35:  # near the apex, where it hurts most
            centre = apex_k + round(_u(rng, -0.05, 0.05) * fps)
        else:
            centre = int(rng.integers(0, n_frames))
        blink = {"start": int(centre - dur_b // 2), "length": int(dur_b),
                 "closure": _u(rng, 0.6, 1.0)}
    return {"emotion": emotion, "au_emotion": au_emotion, "peak_px": peak, "aus": aus,
            "macro": macro, "n_frames": n_frames, "start": start, "onset_k": onset_k,
            "apex_k": apex_k, "offset_k": offset_k, "head": head, "light": light, "blink": blink}


def _blink_closure(blink: dict[str, Any] | None, k: int) -> float:
    if not blink:
        return 0.0
    t = (k - blink["start"]) / blink["length"]
    return float(blink["closure"] * 0.5 * (1 - math.cos(2 * math.pi * t))) if 0 <= t <= 1 else 0.0


def _eyelid_alpha(landmarks: np.ndarray, closure: float, xx: np.ndarray,
                  yy: np.ndarray) -> np.ndarray:
    """(H, W) weight of the closed-eye render: the lid sweeps down to ``closure`` of the eye."""
    alpha = np.zeros(xx.shape, np.float32)
    for i in (36, 42):
        pts = landmarks[i:i + 6]
        c = pts.mean(axis=0)
        a = 0.65 * abs(pts[3, 0] - pts[0, 0])
        b = 0.9 * (pts[4:6, 1].mean() - pts[1:3, 1].mean()) + 1.0
        inside = np.clip(1.5 - ((xx - c[0]) / a) ** 2 - ((yy - c[1]) / b) ** 2, 0, 0.5) * 2
        lid = c[1] - b + 2 * b * closure
        alpha = np.maximum(alpha, inside * np.clip(lid - yy + 0.5, 0, 1))
    return alpha


def _head_displacement(head: dict[str, Any], t: float, t_total: float, centre: np.ndarray,
                       scale: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(H, W, 2) rigid head-motion displacement at time t (s): smooth drift plus a wobble."""
    ramp = 0.5 * (1 - math.cos(math.pi * min(t / max(t_total, 1e-6), 1.0)))
    wob = head["wobble_px"] * math.sin(2 * math.pi * head["wobble_hz"] * t + head["wobble_phase"])
    tx, ty = head["tx"] * ramp + wob, head["ty"] * ramp + 0.5 * wob
    theta = head["rot_px"] * ramp / scale
    dx = np.float32(-theta) * (yy - np.float32(centre[1])) + np.float32(tx)
    dy = np.float32(theta) * (xx - np.float32(centre[0])) + np.float32(ty)
    return np.stack([dx, dy], axis=-1)


def _clip_frames(plan: dict[str, Any], neutral: np.ndarray, closed: np.ndarray,
                 landmarks: np.ndarray, ident: dict[str, Any], spec: SynDatabaseSpec,
                 rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield the clip's frames as uint8 (H, W, 3) BGR or (H, W) grey."""
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    disp = au_displacement(landmarks, plan["aus"], h, w,
                           max_px=MACRO_MAX_DISPLACEMENT_PX if plan["macro"] else None)
    centre = np.array([ident["cx"], ident["cy"]])
    t_total = (plan["n_frames"] - 1) / spec.fps
    light = plan["light"]
    for k in range(plan["n_frames"]):
        t = k / spec.fps
        closure = _blink_closure(plan["blink"], k)
        base = neutral
        if closure > 0:
            alpha = _eyelid_alpha(landmarks, closure, xx, yy)
            alpha = alpha[..., None] if neutral.ndim == 3 else alpha
            base = neutral * (1 - alpha) + closed * alpha
        d = disp * np.float32(_profile(k, plan["onset_k"], plan["apex_k"], plan["offset_k"]))
        d = d + _head_displacement(plan["head"], t, t_total, centre, ident["s"], xx, yy)
        # backward map of the forward displacement (exact to first order: d is small, smooth)
        frame = cv2.remap(base, xx - d[..., 0], yy - d[..., 1], cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT)
        gain = 1 + light["ramp"] * (2 * t / max(t_total, 1e-6) - 1) + light["wave"] * math.sin(
            2 * math.pi * light["wave_hz"] * t + light["wave_phase"])
        noise = rng.standard_normal(frame.shape, dtype=np.float32) * np.float32(spec.noise_sigma)
        frame = frame * np.float32(gain) + noise
        yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _clip_names(rng: np.random.Generator, n: int, prefix: str = "EP") -> list[str]:
    """n distinct CASME II-like clip names (``EP02_01f``; ``MA02_01`` for macro), sorted."""
    names: set[str] = set()
    while len(names) < n:
        name = f"{prefix}{int(rng.integers(1, 20)):02d}_{int(rng.integers(1, 13)):02d}"
        names.add(name + ("f" if rng.random() < 0.25 else ""))
    return sorted(names)


def _generate_subject(task: tuple[dict[str, Any], int, int, str]) -> dict[str, Any]:
    """Worker: one subject's identity and clips; writes its frames, returns its meta."""
    cfg_dict, db_index, subject_index, db_dir = task
    cv2.setNumThreads(1)
    cfg = SynMEConfig.from_dict(cfg_dict)
    spec, seed = cfg.databases[db_index], cfg.seed
    rng = np.random.default_rng([seed, db_index, subject_index, 0])
    ident = _draw_identity(rng, spec)
    landmarks = _to_px(ident, _landmarks_units(ident))
    neutral = render_face(ident, landmarks, spec.height, spec.width)
    closed = render_face(ident, landmarks, spec.height, spec.width, eyes_closed=True)
    if not spec.color:
        neutral = cv2.cvtColor(neutral, cv2.COLOR_BGR2GRAY)
        closed = cv2.cvtColor(closed, cv2.COLOR_BGR2GRAY)

    lo, hi = spec.clips_per_subject
    if cfg.macro:  # same identity as above; own streams for the clips (3: macro)
        srng = np.random.default_rng([seed, db_index, subject_index, 3, 0])
        names = _clip_names(srng, int(srng.integers(max(1, lo // 2), max(1, hi // 2) + 1)),
                            prefix="MA")
    else:
        srng = np.random.default_rng([seed, db_index, subject_index, 2])
        names = _clip_names(srng, int(srng.integers(lo, hi + 1)))
    subject = f"sub{subject_index + 1:02d}"
    clips = {}
    for c, name in enumerate(names):
        crng = np.random.default_rng([seed, db_index, subject_index, 3, 1, c] if cfg.macro
                                     else [seed, db_index, subject_index, 1, c])
        plan = _plan_clip(spec, crng, macro=cfg.macro)
        folder = Path(db_dir) / FRAME_ROOT / subject / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(_clip_frames(plan, neutral, closed, landmarks, ident, spec,
                                               crng)):
            ok = cv2.imwrite(str(folder / f"img{plan['start'] + k}.jpg"), frame,
                             [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise OSError(f"SynME: could not write a frame into {folder}")
        start, blink = plan["start"], plan["blink"]
        blink_frames = [start + k for k in range(plan["n_frames"])
                        if _blink_closure(blink, k) > 0.05]
        clips[name] = {
            "first_frame": start, "last_frame": start + plan["n_frames"] - 1,
            "onset": start + plan["onset_k"], "apex": start + plan["apex_k"],
            "offset": start + plan["offset_k"],
            "emotion": plan["emotion"], "au_emotion": plan["au_emotion"],
            "action_units": au_string(plan["aus"]), "au_intensity": plan["aus"],
            "peak_px": plan["peak_px"], **({"macro": True} if cfg.macro else {}),
            "blink": blink, "blink_frames": blink_frames,
            "head_motion": plan["head"], "illumination": plan["light"],
            "noise_sigma": spec.noise_sigma,
        }
    return {"subject": subject, "subject_number": subject_index + 1,
            "landmarks": landmarks.tolist(), "identity": ident, "clips": clips}


# --------------------------------------------------------------------------------------------
# Writing a database
# --------------------------------------------------------------------------------------------


def _sheet_au_cell(aus: str) -> int | str:
    """Real sheets store a lone bilateral AU as a number (``12``), anything else as text."""
    return int(aus) if aus.isdigit() else aus


def _write_sheet(path: Path, rows: list[list[Any]]) -> None:
    """Write the coding sheet as a byte-reproducible xlsx (fixed timestamps)."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(SHEET_HEADER))
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


def _write_database(db_dir: Path, spec: SynDatabaseSpec, subjects: list[dict[str, Any]]) -> None:
    rows = []
    for sub in subjects:
        for name, clip in sub["clips"].items():
            numbers = ",".join(str(_parse_au_key(k)[1]) for k in clip["action_units"].split("+"))
            rows.append([sub["subject_number"], name, None, clip["onset"], clip["apex"],
                         clip["offset"], None, _sheet_au_cell(clip["action_units"]),
                         clip["emotion"], numbers])
    _write_sheet(db_dir / SHEET_NAME, rows)
    meta = {"version": VERSION, "database": spec.name, "spec": asdict(spec),
            "frame_root": FRAME_ROOT, "sheet": SHEET_NAME,
            "subjects": {sub["subject"]: sub for sub in subjects}}
    meta["spec"]["clips_per_subject"] = list(spec.clips_per_subject)
    (db_dir / META_NAME).write_text(json.dumps(meta, indent=1))


def generate_synme(cfg: SynMEConfig, out_dir: str | Path, workers: int = 0,
                   progress: bool = False) -> Path:
    """Generate all databases of ``cfg`` into ``out_dir`` (created; must not hold a SynME).

    Output does not depend on ``workers`` (0 = in this process). ``workers > 0`` starts
    ``spawn`` processes, so a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    tasks = [(cfg_dict, d, s, str(out / spec.name))
             for d, spec in enumerate(cfg.databases) for s in range(spec.n_subjects)]
    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        job = bar.add_task("SynME: generating subjects", total=len(tasks))
    try:
        if workers > 0:
            with image_pool(workers) as pool:
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
        subjects = [r for r, t in zip(results, tasks, strict=True) if t[1] == d]
        _write_database(out / spec.name, spec, subjects)
    root_meta = {"version": VERSION, "fingerprint": cfg.fingerprint(), "config": cfg_dict,
                 "databases": [spec.name for spec in cfg.databases], "layout": "casme2"}
    (out / ROOT_META_NAME).write_text(json.dumps(root_meta, indent=1))
    return out


def ensure_synme(cfg: SynMEConfig, cache_dir: str | Path, workers: int = 0,
                 progress: bool = False) -> Path:
    """Root ``<cache_dir>/synme-<fingerprint[:12]>`` of the generated SynME, made if missing.

    Generation goes into a temporary folder next to it, renamed into place at the end, so an
    interrupted run never leaves a half database that looks complete. A changed config has a
    new fingerprint, hence a new root.
    """
    cache = Path(cache_dir)
    root = cache / f"synme-{cfg.fingerprint()[:12]}"
    if (root / ROOT_META_NAME).exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_synme(cfg, tmp, workers=workers, progress=progress)
        if (root / ROOT_META_NAME).exists():  # another process finished first (and may be
            shutil.rmtree(tmp, ignore_errors=True)  # reading it): keep theirs
            return root
        if root.exists():  # a stale, incomplete root (no synme.json): replace it
            shutil.rmtree(root)
        os.rename(tmp, root)
    except OSError:
        if (root / ROOT_META_NAME).exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


def load_meta(db_dir: str | Path) -> dict[str, Any]:
    """The ``synme_meta.json`` of one generated database (landmarks, identities, clip truth)."""
    path = Path(db_dir) / META_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a SynME database folder (no {META_NAME})")
    return json.loads(path.read_text())


def apex_displacement(db_dir: str | Path, subject: str | int, clip: str,
                      meta: dict[str, Any] | None = None) -> np.ndarray:
    """(H, W, 2) float32 apex displacement (dx, dy) of one clip, recomputed from the meta.

    ``subject`` is ``"sub01"`` or ``1``; ``clip`` the sheet's Filename. Pass ``meta`` to avoid
    re-reading the JSON in loops.
    """
    meta = meta or load_meta(db_dir)
    key = f"sub{subject:02d}" if isinstance(subject, int) else str(subject)
    try:
        sub = meta["subjects"][key]
        info = sub["clips"][clip]
    except KeyError as err:
        raise KeyError(f"{db_dir}: no SynME clip {key}/{clip}") from err
    spec = meta["spec"]
    return au_displacement(np.array(sub["landmarks"]), info["au_intensity"], spec["height"],
                           spec["width"],
                           max_px=MACRO_MAX_DISPLACEMENT_PX if info.get("macro") else None)
