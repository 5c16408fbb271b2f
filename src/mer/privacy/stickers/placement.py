"""Where a sticker goes on a face, and how it follows the face from frame to frame.

**Sites.** The four AU regions of :mod:`mer.data.preprocess.regions` (brows, eyes/cheeks, nose,
mouth/chin) are bilateral and large: the centre of "eyes and cheeks" is the bridge of the nose.
A sticker goes on a *site*, a small group of iBUG-68 landmarks inside one region
(:data:`SITES`: each brow, the glabella, each eye, each cheek, the nose, each mouth corner,
the chin); its centre is the mean of the site's landmarks.

**Size.** A sticker's area is a fraction of the face area: the area of the convex hull of the
68 landmarks (:func:`face_area`). The face itself (:func:`face_mask`) is that hull with the
forehead added (the brows raised by their distance to the eyes).

**Following the face.** A sticker is stuck on the skin: on every frame the site's landmarks are
tracked from the onset frame (pyramidal Lucas-Kanade, ``cv2.calcOpticalFlowPyrLK``); the
sticker's centre moves by their mean displacement and turns with the face (the rotation of the
similarity transform between the onset and tracked landmarks). ``track=False`` leaves it where
it was on the onset frame (a sticker on the lens, not on the face).

**Bad input** (:class:`StickerError`, naming the clip): a sticker larger than the face, of no
area, centred off the face or lying mostly outside it, or a clip with no landmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from mer.data.preprocess.regions import AU_REGIONS, face_polygon
from mer.privacy.stickers.styles import StickerStyle, paste, render_alpha


class StickerError(ValueError):
    """A sticker that cannot be placed on a clip; the message names the clip and the fix."""


# name -> iBUG landmark indices. Each site lies inside one AU region (SITE_REGION, tested).
SITES: dict[str, tuple[int, ...]] = {
    "brow_r": (17, 18, 19, 20, 21),
    "brow_l": (22, 23, 24, 25, 26),
    "glabella": (21, 22, 27),
    "eye_r": (36, 37, 38, 39, 40, 41),
    "eye_l": (42, 43, 44, 45, 46, 47),
    "cheek_r": (1, 2, 40, 41),
    "cheek_l": (14, 15, 46, 47),
    "nose": (27, 28, 29, 30, 31, 32, 33, 34, 35),
    "mouth_r": (48, 49, 59),
    "mouth_l": (53, 54, 55),
    "chin": (7, 8, 9, 57),
}


def _region_of(ids: tuple[int, ...]) -> str:
    for name, (points, _) in AU_REGIONS.items():
        if set(ids) <= set(points):
            return name
    # the glabella (21, 22, 27): brows + the top of the nose bridge; counted with the brows
    return max(AU_REGIONS, key=lambda n: len(set(ids) & set(AU_REGIONS[n][0])))


SITE_REGION: dict[str, str] = {name: _region_of(ids) for name, ids in SITES.items()}
MIN_ON_FACE = 0.5  # least share of a sticker's area that must lie on the face


def _check_landmarks(landmarks: np.ndarray, clip: str) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64) if landmarks is not None else None
    if lm is None or lm.shape != (68, 2) or not np.isfinite(lm).all():
        shape = None if lm is None else lm.shape
        raise StickerError(f"{clip}: a sticker is placed from the face's 68 landmarks, but the "
                           f"clip has none usable (got {shape}); use data with landmarks "
                           "(SynME, or a database prepared with a face detector)")
    return lm


def face_area(landmarks: np.ndarray) -> float:
    """Area (px^2) of the convex hull of the (68, 2) landmarks."""
    hull = cv2.convexHull(np.asarray(landmarks, dtype=np.float32))
    return float(cv2.contourArea(hull))


def face_mask(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 coverage of each pixel by :func:`face_polygon`."""
    return render_alpha(face_polygon(landmarks), shape)


def site_centre(landmarks: np.ndarray, site: str) -> np.ndarray:
    """(2,) mean of the site's landmarks (x, y)."""
    if site not in SITES:
        raise StickerError(f"unknown sticker site {site!r}; known: {sorted(SITES)}")
    return np.asarray(landmarks, dtype=np.float64)[list(SITES[site])].mean(axis=0)


@dataclass(frozen=True)
class Sticker:
    """One sticker: a style on a site, ``area_fraction`` of the face area."""

    style: StickerStyle
    site: str
    area_fraction: float

    def label(self) -> str:
        return f"{self.style.name}@{self.site}/{self.area_fraction:g}"


def check_sticker(sticker: Sticker, landmarks: np.ndarray, shape: tuple[int, int], clip: str
                  ) -> tuple[float, np.ndarray]:
    """(area px^2, alpha on the onset frame) of a sticker that fits the face; else StickerError.

    Refused: area fraction <= 0 or > 1 (larger than the face), a centre off the face, or less
    than :data:`MIN_ON_FACE` of the sticker on the face (partly off the frame counts as off)."""
    lm = _check_landmarks(landmarks, clip)
    f = float(sticker.area_fraction)
    if not f > 0:
        raise StickerError(f"{clip}: sticker {sticker.label()} has no area (area fraction {f}); "
                           "give a fraction of the face area in (0, 1]")
    if f > 1:
        raise StickerError(f"{clip}: sticker {sticker.label()} is larger than the face "
                           f"({f:g} x the face area of {face_area(lm):.0f} px^2); give an area "
                           "fraction <= 1 (stickers of a few percent of the face are typical)")
    area = f * face_area(lm)
    centre = site_centre(lm, sticker.site)
    poly = face_polygon(lm)
    if cv2.pointPolygonTest(poly.astype(np.float32), (float(centre[0]), float(centre[1])),
                            False) < 0:
        raise StickerError(f"{clip}: sticker {sticker.label()} is centred at "
                           f"({centre[0]:.1f}, {centre[1]:.1f}), outside the face; check the "
                           "clip's landmarks")
    alpha = render_alpha(sticker.style.outline(centre, area), shape)
    on_face = float((alpha * face_mask(lm, shape)).sum())
    total = float(area)  # the sticker's full area, including any part beyond the frame
    if on_face < MIN_ON_FACE * total:
        raise StickerError(f"{clip}: sticker {sticker.label()} lies outside the face: only "
                           f"{on_face / total:.0%} of its {total:.0f} px^2 is on the face (at "
                           f"least {MIN_ON_FACE:.0%} must be); make it smaller or choose "
                           "another site")
    return area, alpha


def track_landmarks(onset: np.ndarray, frame: np.ndarray, landmarks: np.ndarray
                    ) -> np.ndarray:
    """(68, 2) landmarks of ``onset`` (grey uint8) followed onto ``frame`` by pyramidal
    Lucas-Kanade; a point LK loses moves by the median displacement of the others."""
    p0 = np.asarray(landmarks, dtype=np.float32).reshape(-1, 1, 2)
    p1, status, _ = cv2.calcOpticalFlowPyrLK(
        onset, frame, p0, None, winSize=(15, 15), maxLevel=2,
        criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    d = (p1 - p0)[:, 0, :].astype(np.float64)
    ok = status[:, 0].astype(bool) & np.isfinite(d).all(axis=1)
    median = np.median(d[ok], axis=0) if ok.any() else np.zeros(2)
    d[~ok] = median
    return np.asarray(landmarks, dtype=np.float64) + d


def pose_change(src: np.ndarray, dst: np.ndarray) -> float:
    """Rotation (degrees, counter-clockwise in the image) of the least-squares similarity
    transform taking the (N, 2) points ``src`` to ``dst``."""
    m, _ = cv2.estimateAffinePartial2D(np.asarray(src, np.float32), np.asarray(dst, np.float32),
                                       method=cv2.LMEDS)
    if m is None:
        return 0.0
    return -math.degrees(math.atan2(m[1, 0], m[0, 0]))


def sticker_frames(frames: list[np.ndarray], landmarks: np.ndarray, sticker: Sticker,
                   clip: str, track: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The frames of a clip (onset first) with the sticker on the face, frame after frame.

    Args:
        frames: (H, W) grey or (H, W, 3) BGR uint8 frames of one size, onset first.
        landmarks: (68, 2) landmarks of the onset frame, its pixel frame.
        sticker: what to paste where.
        clip: the clip's name for errors.
        track: follow the face (True) or keep the onset's position (a sticker on the lens).

    Returns:
        (stickered frames, the sticker's (P, 2) outline on each frame).

    Raises:
        StickerError: the sticker does not fit the face (:func:`check_sticker`).
    """
    if not frames:
        raise StickerError(f"{clip}: no frames to put a sticker on")
    shape = frames[0].shape[:2]
    if any(f.shape[:2] != shape for f in frames):
        raise StickerError(f"{clip}: frames of a clip must have one size")
    lm = _check_landmarks(landmarks, clip)
    area, _ = check_sticker(sticker, lm, shape, clip)
    grey = [f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    ids = list(SITES[sticker.site])
    outlines, out = [], []
    for k, frame in enumerate(frames):
        if k == 0 or not track:
            now, turn = lm, 0.0
        else:
            now = track_landmarks(grey[0], grey[k], lm)
            turn = pose_change(lm, now)
        centre = site_centre(lm, sticker.site) + (now[ids] - lm[ids]).mean(axis=0)
        poly = sticker.style.outline(centre, area, turn)
        outlines.append(poly)
        out.append(paste(frame, render_alpha(poly, shape), sticker.style))
    return out, outlines
