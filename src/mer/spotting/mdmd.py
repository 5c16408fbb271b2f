"""MDMD: main directional maximal difference (He, Wang, Li, Yap; the MEGC2020 baseline).

Training-free. An expression moves a facial region away from neutral and back; head drift
and lighting changes keep going or stay. For each position t and region r, with head frame
``t - K`` and tail frame ``t + K`` (K = k for micro, a multiple of k near the training
subjects' median macro onset->apex time for macro):

- ``a = d(t - K -> t)``: the region's displacement from the head frame to the current one;
- ``b = d(t - K -> t + K)``: from the head frame to the tail frame;
- the *main direction* is the one of ``n_directions`` sectors (4: right, up, left, down)
  holding ``a``; ``u`` its unit vector;
- ``MDMD_r(t) = max(0, a.u - |b.u|)``: large when the region went out along its main
  direction and came back (an expression), small for a monotone drift (b.u ~ 2 a.u) or a
  step (b.u ~ a.u).

The frame score is the mean of the top third of the regions' values (the paper keeps the
largest third of its blocks). Displacements come from the features' ROI mean flow, where
``flow[t]`` is the motion t -> t + k: ``d(t -> t + n k) = sum_j flow[t + j k]`` (exact for
n = 1, a sum of consecutive steps otherwise). The paper's per-pixel direction histograms
within 6x6 blocks are replaced by the ROI means mer prepares (written down here, the one
departure).

Peaks above ``mean + p (max - mean)`` of the video's own score become intervals; ``p`` (per
type) is chosen on training subjects only (``thresholds``: its candidates).
"""

from __future__ import annotations

import math

import numpy as np

from mer.spotting.base import Spotter, register_spotter
from mer.spotting.videos import SpotVideo


def displacement(flow: np.ndarray, start: np.ndarray, steps: int, k: int) -> np.ndarray:
    """d(start -> start + steps k) = sum_{j < steps} flow[start + j k]; zero outside.

    Args:
        flow: (T, R, 2) motion t -> t + k.
        start: (N,) int positions.
        steps, k: how many k-steps, and k.

    Returns:
        (N, R, 2) float64.
    """
    t = len(flow)
    out = np.zeros((len(start), flow.shape[1], 2))
    for j in range(steps):
        idx = start + j * k
        ok = (idx >= 0) & (idx < t)
        out[ok] += flow[idx[ok]]
    return out


def mdmd_scores(flow: np.ndarray, k: int, steps: int = 1, n_directions: int = 4,
                top_fraction: float = 1 / 3) -> np.ndarray:
    """(T,) MDMD score per position (module docstring).

    Args:
        flow: (T, R, 2) ROI flow, t -> t + k.
        k: flow step in positions.
        steps: K = steps * k.
        n_directions: main-direction sectors.
        top_fraction: share of regions averaged (the largest values).
    """
    t = np.arange(len(flow))
    big_k = steps * k
    a = displacement(flow, t - big_k, steps, k)          # head -> current
    b = displacement(flow, t - big_k, 2 * steps, k)      # head -> tail
    angle = np.arctan2(a[..., 1], a[..., 0])
    sector = np.round(angle / (2 * np.pi / n_directions)) * (2 * np.pi / n_directions)
    u = np.stack([np.cos(sector), np.sin(sector)], axis=-1)
    along_a = (a * u).sum(-1)
    along_b = (b * u).sum(-1)
    value = np.maximum(0.0, along_a - np.abs(along_b))  # (T, R)
    m = max(1, int(math.ceil(top_fraction * value.shape[1])))
    return np.sort(value, axis=1)[:, -m:].mean(axis=1)


@register_spotter("mdmd")
class MDMD(Spotter):
    """MDMD spotter (module docstring); ``thresholds`` are the candidates of ``p``."""

    learned = False
    threshold_mode = "relative"

    def __init__(self, n_directions: int = 4, top_fraction: float = 1 / 3, **kw) -> None:
        super().__init__(**kw)
        self.n_directions, self.top_fraction = int(n_directions), float(top_fraction)

    def steps(self, video: SpotVideo, kind: str) -> int:
        if kind == "micro":
            return 1
        before = self.lengths["macro"]["before_s"] * video.fps
        return max(1, int(round(before / video.k)))

    def _scores(self, video: SpotVideo) -> np.ndarray:
        return np.stack([mdmd_scores(video.flow, video.k, self.steps(video, kind),
                                     self.n_directions, self.top_fraction)
                         for kind in ("micro", "macro")], axis=1)
