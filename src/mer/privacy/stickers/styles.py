"""Sticker styles (shape, colour, aspect) and their rendering as a sub-pixel alpha mask.

A sticker is a flat-coloured shape of a given area (pixels) centred at a point, at an angle:
``circle`` (an ellipse of the given aspect), ``rectangle`` (width / height = aspect) or
``star`` (five points, inner radius ``inner`` of the outer one). The alpha mask is drawn at
``SUPERSAMPLE`` times the resolution and area-averaged down, so a sticker that moves by a
fraction of a pixel between two frames changes its edge pixels by that fraction, as a camera
would record it. Pixel centres are at integer coordinates (as everywhere in mer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "rectangle", "star")
SUPERSAMPLE = 8
_SHIFT = 4  # fixed-point bits of cv2.fillPoly's coordinates (1/16 px)


@dataclass(frozen=True)
class StickerStyle:
    """How a sticker looks.

    Attributes:
        name: the style's name in reports (``black_circle``).
        shape: one of :data:`SHAPES`.
        colour: (B, G, R) 0-255, OpenCV's channel order.
        aspect: width / height of the circle (an ellipse) or rectangle; a star ignores it.
        inner: a star's inner radius as a fraction of its outer radius.
        angle: rotation in degrees (counter-clockwise in the image), on top of the face's.
    """

    name: str
    shape: str = "circle"
    colour: tuple[int, int, int] = (20, 20, 20)
    aspect: float = 1.0
    inner: float = 0.45
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"sticker style {self.name!r}: shape {self.shape!r} is not one of "
                             f"{list(SHAPES)}")
        colour = tuple(int(c) for c in self.colour)
        if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise ValueError(f"sticker style {self.name!r}: colour must be 3 values (B, G, R) "
                             f"in 0..255, got {list(self.colour)}")
        object.__setattr__(self, "colour", colour)
        if not self.aspect > 0 or not 0 < self.inner < 1:
            raise ValueError(f"sticker style {self.name!r}: need aspect > 0 and 0 < inner < 1, "
                             f"got {self.aspect}, {self.inner}")

    @classmethod
    def from_dict(cls, d: dict) -> StickerStyle:
        """From a config entry ``{name, shape, colour, aspect, inner, angle}``."""
        known = {"name", "shape", "colour", "aspect", "inner", "angle"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sticker style {d.get('name')!r}: unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**{k: (tuple(v) if k == "colour" else v) for k, v in d.items()})

    def grey(self) -> float:
        """The colour's luma as OpenCV's BGR -> grey conversion gives it (0-255)."""
        pixel = np.array([[self.colour]], dtype=np.uint8)
        return float(cv2.cvtColor(pixel, cv2.COLOR_BGR2GRAY)[0, 0])

    def outline(self, centre: tuple[float, float], area: float, angle: float = 0.0
                ) -> np.ndarray:
        """(P, 2) float64 polygon (x, y) of the sticker with ``area`` px^2 centred at ``centre``
        and turned by ``angle`` + the style's own angle (degrees, counter-clockwise)."""
        if not area > 0:
            raise ValueError(f"sticker area must be > 0 px^2, got {area}")
        if self.shape == "circle":
            b = math.sqrt(area / (math.pi * self.aspect))  # semi-axes a = aspect * b
            t = np.linspace(0.0, 2 * math.pi, 96, endpoint=False)
            # the inscribed 96-gon has a slightly smaller area than the ellipse: compensate
            k = math.sqrt((2 * math.pi / 96) / math.sin(2 * math.pi / 96))
            pts = np.stack([self.aspect * b * k * np.cos(t), b * k * np.sin(t)], axis=1)
        elif self.shape == "rectangle":
            h = math.sqrt(area / self.aspect)
            w = self.aspect * h
            pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        else:  # five-pointed star: 10 vertices alternating outer radius R and inner r = inner R
            n = 5
            r_out = math.sqrt(area / (n * self.inner * math.sin(math.pi / n)))
            t = -math.pi / 2 + np.arange(2 * n) * math.pi / n
            radius = np.where(np.arange(2 * n) % 2 == 0, r_out, self.inner * r_out)
            pts = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
        a = math.radians(angle + self.angle)
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # y down
        return pts @ rot.T + np.asarray(centre, dtype=np.float64)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a (P, 2) polygon."""
    x, y = np.asarray(points, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def inset(polygon: np.ndarray, d: float) -> np.ndarray:
    """The (P, 2) polygon with every edge moved inwards by ``d`` (mitred vertices; convex or
    not, either orientation)."""
    p = np.asarray(polygon, dtype=np.float64)
    x, y = p.T
    sign = 1.0 if float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0 else -1.0
    edge = np.roll(p, -1, axis=0) - p  # edge i: p[i] -> p[i + 1]
    edge /= np.linalg.norm(edge, axis=1, keepdims=True)
    normal = sign * np.stack([edge[:, 1], -edge[:, 0]], axis=1)  # outward
    n_prev, n_next = np.roll(normal, 1, axis=0), normal
    miter = (n_prev + n_next) / (1.0 + np.sum(n_prev * n_next, axis=1, keepdims=True))
    return p - d * miter


def render_alpha(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 coverage in [0, 1] of each pixel by a (P, 2) polygon (x, y) in pixels.

    Drawn at :data:`SUPERSAMPLE` x resolution with 1/16-px vertices, then area-averaged; the
    outline is first moved in by half a supersampled pixel, since ``cv2.fillPoly`` also fills
    the pixels the boundary crosses (the coverage then sums to the polygon's area)."""
    h, w = int(shape[0]), int(shape[1])
    s = SUPERSAMPLE
    canvas = np.zeros((h * s, w * s), np.uint8)
    # pixel centre p of the frame sits at (p + 0.5) * s - 0.5 of the supersampled canvas
    poly = inset(polygon, 0.5 / s)
    pts = ((poly + 0.5) * s - 0.5) * (1 << _SHIFT)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_8,
                 shift=_SHIFT)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)


def paste(frame: np.ndarray, alpha: np.ndarray, style: StickerStyle) -> np.ndarray:
    """``frame`` (H, W) grey or (H, W, 3) BGR uint8 with the sticker composited over it:
    ``(1 - alpha) * frame + alpha * colour`` (the colour's luma on a grey frame), rounded."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) uint8 frame, got {frame.dtype} "
                         f"{frame.shape}")
    a = np.asarray(alpha, dtype=np.float32)
    if frame.ndim == 2:
        out = (1 - a) * frame + a * style.grey()
    else:
        out = (1 - a[..., None]) * frame + a[..., None] * np.array(style.colour, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
