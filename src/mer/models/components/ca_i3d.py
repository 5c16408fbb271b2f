"""CA-I3D: an Inflated 3D ConvNet (Carreira & Zisserman, 2017) whose Inception blocks end in
3D Coordinate Attention (after Hou et al., 2021), for MPFNet's encoders.

Shapes: video (B, C, T, H, W) -> features (B, out_channels) (:meth:`CAI3D.forward`), or the
feature maps after each stage (:meth:`CAI3D.stages_out`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)  # type: ignore[return-value]


class Unit3d(nn.Sequential):
    """Conv3d (no bias, 'same'-style padding) -> BatchNorm3d -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | Sequence[int] = 1,
                 stride: int | Sequence[int] = 1) -> None:
        k = _triple(kernel)
        super().__init__(nn.Conv3d(in_ch, out_ch, k, stride=_triple(stride),
                                   padding=tuple(x // 2 for x in k), bias=False),
                         nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True))


class CoordinateAttention3d(nn.Module):
    """3D Coordinate Attention: gates along T, H and W.

    x (B, C, T, H, W): average-pool to three direction descriptors, (B, C, T) over (H, W),
    (B, C, H) over (T, W), (B, C, W) over (T, H); concatenate along the position axis
    (B, C, T+H+W); one shared 1x1 conv to C/r, BatchNorm, ReLU; split back; a 1x1 conv per
    direction to C and a sigmoid -> gates g_t (B, C, T, 1, 1), g_h (B, C, 1, H, 1),
    g_w (B, C, 1, 1, W). Output ``x * g_t * g_h * g_w``, same shape.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.shared = nn.Sequential(nn.Conv1d(channels, hidden, 1, bias=False),
                                    nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.to_t, self.to_h, self.to_w = (nn.Conv1d(hidden, channels, 1) for _ in range(3))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g_t, g_h, g_w) as in the class doc."""
        b, c, t, h, w = x.shape
        desc = torch.cat([x.mean(dim=(3, 4)), x.mean(dim=(2, 4)), x.mean(dim=(2, 3))], dim=2)
        z = self.shared(desc)
        zt, zh, zw = torch.split(z, [t, h, w], dim=2)
        return (torch.sigmoid(self.to_t(zt)).view(b, c, t, 1, 1),
                torch.sigmoid(self.to_h(zh)).view(b, c, 1, h, 1),
                torch.sigmoid(self.to_w(zw)).view(b, c, 1, 1, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gt, gh, gw = self.gates(x)
        return x * gt * gh * gw


class CAInception3d(nn.Module):
    """I3D Inception block + Coordinate Attention.

    ``widths = (b0, b1a, b1b, b2a, b2b, b3)``: branch 0 a 1x1x1 conv to b0; branch 1 1x1x1 to
    b1a then 3x3x3 to b1b; branch 2 1x1x1 to b2a then 3x3x3 to b2b; branch 3 a 3x3x3 max-pool
    (stride 1) then 1x1x1 to b3. Concatenated: (B, b0 + b1b + b2b + b3, T, H, W), then CA.
    """

    def __init__(self, in_ch: int, widths: Sequence[int], reduction: int = 8) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = (int(w) for w in widths)
        self.b0 = Unit3d(in_ch, b0)
        self.b1 = nn.Sequential(Unit3d(in_ch, b1a), Unit3d(b1a, b1b, 3))
        self.b2 = nn.Sequential(Unit3d(in_ch, b2a), Unit3d(b2a, b2b, 3))
        self.b3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), Unit3d(in_ch, b3))
        self.out_channels = b0 + b1b + b2b + b3
        self.ca = CoordinateAttention3d(self.out_channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ca(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1))


# I3D's published layout: stem conv 64 (7x7x7 / 2), pool, 1x1x1 64, 3x3x3 192, pool; then
# Inception stages 3b-3c, 4b-4f, 5b-5c (out 1024), the last two after a max-pool.
PUBLISHED = {
    "stem": [("conv", 64, 7, 2), ("pool", (1, 3, 3), (1, 2, 2)), ("conv", 64, 1, 1),
             ("conv", 192, 3, 1), ("pool", (1, 3, 3), (1, 2, 2))],
    "stages": [
        [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)],
        [(192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
         (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128)],
        [(256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)],
    ],
    "stage_pools": [None, ((3, 3, 3), (2, 2, 2)), ((2, 2, 2), (2, 2, 2))],
}
# The same shape, narrow and short, for CPUs: out 80 channels.
SMALL = {
    "stem": [("conv", 16, 3, (1, 2, 2)), ("pool", (1, 3, 3), (1, 2, 2)), ("conv", 32, 3, 1)],
    "stages": [[(16, 16, 24, 4, 8, 8)], [(24, 24, 32, 8, 12, 12)]],
    "stage_pools": [None, ((2, 2, 2), (2, 2, 2))],
}
LAYOUTS = {"small": SMALL, "published": PUBLISHED}


def _pool(kernel: int | Sequence[int], stride: int | Sequence[int]) -> nn.MaxPool3d:
    k = _triple(kernel)
    # padding (k - 1) // 2: "same"-like, an even side halves exactly (16 -> 8), as in I3D
    return nn.MaxPool3d(k, _triple(stride), padding=tuple((x - 1) // 2 for x in k))


class CAI3D(nn.Module):
    """A CA-I3D encoder. ``layout``: ``small`` | ``published`` (or a dict like them).

    ``forward``: (B, in_channels, T, H, W) -> (B, out_channels) (global average pool).
    ``stages_out(x, prior=None)``: the feature map after each Inception stage; ``prior``
    (optional): a list, per stage, of maps (or None) *added* to that stage's output (MPFNet-C's
    hierarchical fusion; channels must match ``stage_channels``; T, H, W are resized).
    """

    def __init__(self, in_channels: int = 1, layout: str | dict = "small",
                 reduction: int = 8) -> None:
        super().__init__()
        spec = LAYOUTS[layout] if isinstance(layout, str) else layout
        units: list[nn.Module] = []
        ch = in_channels
        for kind, *args in spec["stem"]:
            if kind == "conv":
                out, kernel, stride = args
                units.append(Unit3d(ch, out, kernel, stride))
                ch = out
            else:
                units.append(_pool(*args))
        self.stem = nn.Sequential(*units)
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        for pool, blocks in zip(spec["stage_pools"], spec["stages"]):
            layers: list[nn.Module] = []
            if pool is not None:
                layers.append(_pool(*pool))
            for widths in blocks:
                block = CAInception3d(ch, widths, reduction)
                layers.append(block)
                ch = block.out_channels
            self.stages.append(nn.Sequential(*layers))
            self.stage_channels.append(ch)
        self.out_channels = ch

    def stages_out(self, x: torch.Tensor, prior: list[torch.Tensor | None] | None = None
                   ) -> list[torch.Tensor]:
        maps, z = [], self.stem(x)
        for i, stage in enumerate(self.stages):
            z = stage(z)
            if prior is not None and prior[i] is not None:
                p = prior[i]
                if p.shape[2:] != z.shape[2:]:
                    p = F.interpolate(p, size=z.shape[2:], mode="trilinear", align_corners=False)
                z = z + p
            maps.append(z)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages_out(x)[-1].mean(dim=(2, 3, 4))
