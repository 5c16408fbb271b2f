"""Eulerian video magnification (linear EVM, Wu et al. 2012), in torch with kornia pyramids.

Each frame is split into a Laplacian pyramid; every pyramid level is band-passed in time
(an ideal filter: FFT over the frames, keep ``low_hz`` .. ``high_hz``); the band-passed signal
is multiplied by ``alpha`` and added back; the pyramid is collapsed. The finest ``skip_levels``
levels are not amplified (amplified fine detail turns into noise and breaks the flow).
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.geometry.transform import pyrdown
from torch.nn import functional as F


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def laplacian_pyramid(frames: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """(T, C, H, W) -> ``levels`` band images, finest first; the last is the Gaussian residual.

    Collapsing with :func:`collapse` gives the input back exactly (up to float rounding).
    """
    out, g = [], frames
    for _ in range(levels - 1):
        if min(g.shape[-2:]) < 4:
            break
        down = pyrdown(g)
        out.append(g - _up(down, g.shape[-2:]))
        g = down
    out.append(g)
    return out


def collapse(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`laplacian_pyramid`: band images -> (T, C, H, W)."""
    g = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        g = band + _up(g, band.shape[-2:])
    return g


def bandpass(x: torch.Tensor, fps: float, low_hz: float, high_hz: float) -> torch.Tensor:
    """Ideal temporal band-pass along dim 0 of (T, ...) -> same shape."""
    n = x.shape[0]
    spec = torch.fft.rfft(x, dim=0)
    freqs = torch.fft.rfftfreq(n, d=1.0 / fps).to(x.device)
    keep = ((freqs >= low_hz) & (freqs <= high_hz)).to(spec.real.dtype)
    return torch.fft.irfft(spec * keep.view(-1, *([1] * (x.dim() - 1))), n=n, dim=0)


def magnify(frames: np.ndarray, fps: float, alpha: float = 8.0, low_hz: float = 1.0,
            high_hz: float = 15.0, levels: int = 4, skip_levels: int = 1) -> np.ndarray:
    """Magnify the motion of a clip.

    Args:
        frames: (T, H, W) uint8 or float grey frames (T >= 2), in time order.
        fps: frame rate (Hz), for the band-pass.
        alpha: amplification of the band-passed signal.
        low_hz, high_hz: the temporal pass band.
        levels: Laplacian pyramid levels (the last is the Gaussian residual).
        skip_levels: finest levels left unamplified.

    Returns:
        (T, H, W) float32 in [0, 255].
    """
    x = torch.as_tensor(np.asarray(frames, dtype=np.float32))[:, None]  # (T, 1, H, W)
    if x.shape[0] < 2:
        return x[:, 0].numpy()
    pyramid = laplacian_pyramid(x, levels)
    out = []
    for level, band in enumerate(pyramid):
        if level < skip_levels:
            out.append(band)
        else:
            out.append(band + alpha * bandpass(band, fps, low_hz, high_hz))
    return collapse(out)[:, 0].clamp(0, 255).numpy()
