"""Learned apex-score spotter: per-frame score regression over sliding windows, then peaks.

The common deep baseline of MEGC spotting (e.g. the SOFTNet/LGSNet family's per-frame
"apex score"): a temporal convolutional network reads the per-position features (ROI flow
(u, v) of R regions and the face magnitude: (T, 2R + 1)) of a window and regresses, for
micro and for macro, a score that follows a pseudo-Gaussian peaking at 1 on each ground
truth's apex within ``[onset, offset]`` and is 0 elsewhere. Peaks of the score above the
threshold chosen on training subjects become ``[peak - before, peak + after]`` with the
training subjects' median onset->apex / apex->offset durations at the video's frame rate.

Network (:class:`TemporalScoreNet`), shapes for a batch of B windows of W positions:
``x (B, W, C) -> conv1d 1x1 (B, h, W) -> residual dilated conv blocks (dilation 1, 2, 4, 8)
-> conv1d 1x1 -> sigmoid (B, W, 2)``.
"""

from __future__ import annotations

import torch
from torch import nn

from mer.spotting.base import register_spotter
from mer.spotting.learned import LearnedSpotter
from mer.spotting.videos import SpotVideo


class _Block(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.norm = nn.GroupNorm(1, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(torch.relu(self.norm(self.conv(h))))


class TemporalScoreNet(nn.Module):
    """Per-position scores from per-position features (module docstring).

    Args:
        in_features: C.
        hidden: h.
        dilations: one residual block per dilation.
        dropout: in each block.
        outputs: score channels (2: micro, macro).
    """

    def __init__(self, in_features: int, hidden: int = 32,
                 dilations: tuple[int, ...] = (1, 2, 4, 8), dropout: float = 0.1,
                 outputs: int = 2) -> None:
        super().__init__()
        self.inp = nn.Conv1d(in_features, hidden, 1)
        self.blocks = nn.Sequential(*[_Block(hidden, d, dropout) for d in dilations])
        self.out = nn.Conv1d(hidden, outputs, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.blocks(torch.relu(self.inp(batch["x"].transpose(1, 2))))
        return torch.sigmoid(self.out(h)).transpose(1, 2)


@register_spotter("apex_score")
class ApexScoreSpotter(LearnedSpotter):
    """The learned apex-score spotter; ``net``: kwargs of :class:`TemporalScoreNet`."""

    def build_net(self, in_features: int, video: SpotVideo) -> nn.Module:
        kw = dict(self.net_kwargs)
        if "dilations" in kw:
            kw["dilations"] = tuple(kw["dilations"])
        return TemporalScoreNet(in_features, **kw)
