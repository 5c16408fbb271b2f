"""HTNet (Wang, Zhang, Luo, Sankaranarayana, 2024): hierarchical transformer over face regions.

Input (B, C, S, S) flow (u, v, strain), S = 28 by default. Four S/2 x S/2 regions are cut
around the left eye, right eye, left and right lip corners (placed by the canonical face
template of :mod:`mer.models.dpk_gat`, clamped inside the image, so at 28 px they are
overlapping quadrant-like crops) and tiled 2 x 2 into an S x S mosaic
``[[left eye, right eye], [left lip, right lip]]``.

The mosaic is cut into ``patch_size`` patches (a token map of side S / patch_size) and passed
through a nested hierarchy of ``len(block_repeats)`` levels. At level l (bottom first) the map
is split into 2^(L-1-l) x 2^(L-1-l) blocks, a transformer (``block_repeats[l]`` pre-norm
blocks, dim ``dim * 2^l``, ``heads * 2^l`` heads) attends within each block, and an aggregation
(3x3 conv to the next level's dim, channel LayerNorm, 3x3 max-pool of stride 2) halves the
map; the top is layer-normed, averaged and classified.

Defaults follow the published configuration (patch 7, dim 256, 3 heads, block repeats
(2, 2, 10)); they make a large network (about 140M parameters). At 28 px the token map is
4 x 4, so, as in that configuration, every block holds a single token: the bottom level works
per 7x7 patch, the middle one per region (one pooled token each) and the top on the whole face.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mer.data.landmarks import FACE_TEMPLATE_68
from mer.models.registry import register_model

# iBUG landmark groups whose centre places each region, in mosaic order
REGION_CENTRES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("left_eye", tuple(range(36, 42))), ("right_eye", tuple(range(42, 48))),
    ("left_lip", (48,)), ("right_lip", (54,)),
)


def region_origins(size: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of the four size/2 regions in a size x size template face."""
    side = size // 2
    origins = []
    for _, points in REGION_CENTRES:
        cx, cy = (FACE_TEMPLATE_68[list(points)].mean(dim=0) * size).tolist()
        row = min(max(round(cy - side / 2), 0), size - side)
        col = min(max(round(cx - side / 2), 0), size - side)
        origins.append((row, col))
    return origins


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Block(nn.Module):
    """Pre-norm transformer block on (N, T, D) token sequences."""

    def __init__(self, dim: int, heads: int, mlp_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        inner = self.dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_mult * dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(mlp_mult * dim, dim), nn.Dropout(dropout),
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, dim_head)
        a = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, -1))
        return x + self.mlp(self.norm2(x))


class _Level(nn.Module):
    """Transformer blocks applied within each of blocks x blocks windows of a token map."""

    def __init__(self, dim: int, heads: int, depth: int, blocks: int, tokens: int,
                 mlp_mult: int, dropout: float) -> None:
        super().__init__()
        self.blocks = blocks
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[_Block(dim, heads, mlp_mult, dropout)
                                      for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D, H, W)."""
        b, d, h, w = x.shape
        k = self.blocks
        bh, bw = h // k, w // k
        seq = (x.view(b, d, k, bh, k, bw).permute(0, 2, 4, 3, 5, 1)
               .reshape(b * k * k, bh * bw, d))
        seq = self.layers(seq + self.position)
        return (seq.view(b, k, k, bh, bw, d).permute(0, 5, 1, 3, 2, 4)
                .reshape(b, d, h, w))


@register_model("htnet")
class HTNet(nn.Module):
    """HTNet. ``forward``: (B, in_channels, S, S) -> logits (B, num_classes).

    Args:
        input_size: S; the four regions are S/2 x S/2 and the mosaic S x S.
        patch_size: side of a patch token; S / patch_size must be divisible by
            2^(len(block_repeats) - 1).
        dim, heads: bottom level width and heads (doubled at each level up).
        block_repeats: transformer blocks per level, bottom first.
        use_regions: False feeds the whole image instead of the region mosaic.
    """

    def __init__(
        self, num_classes: int = 3, in_channels: int = 3, input_size: int = 28,
        patch_size: int = 7, dim: int = 256, heads: int = 3,
        block_repeats: tuple[int, ...] | list[int] = (2, 2, 10), mlp_mult: int = 4,
        dropout: float = 0.0, use_regions: bool = True,
    ) -> None:
        super().__init__()
        levels = len(block_repeats)
        fmap = input_size // patch_size
        top_blocks = 2 ** (levels - 1)
        if input_size % 2 or input_size % patch_size or fmap % top_blocks:
            raise ValueError(
                f"HTNet: input_size {input_size} must be even and a multiple of patch_size "
                f"{patch_size}, and input_size / patch_size ({fmap}) a multiple of "
                f"2^(levels-1) = {top_blocks}; change patch_size or block_repeats"
            )
        self.input_size, self.use_regions = input_size, use_regions
        self.origins = region_origins(input_size)
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        tokens = (fmap // top_blocks) ** 2  # tokens per block, the same at every level
        self.levels = nn.ModuleList()
        self.aggregates = nn.ModuleList()
        for level, depth in enumerate(block_repeats):
            width, blocks = dim * 2 ** level, top_blocks // 2 ** level
            self.levels.append(_Level(width, heads * 2 ** level, depth, blocks, tokens,
                                      mlp_mult, dropout))
            if level < levels - 1:
                self.aggregates.append(nn.Sequential(
                    nn.Conv2d(width, 2 * width, 3, padding=1), _ChannelNorm(2 * width),
                    nn.MaxPool2d(3, stride=2, padding=1),
                ))
        top = dim * 2 ** (levels - 1)
        self.norm = nn.LayerNorm(top)
        self.head = nn.Linear(top, num_classes)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> the 2 x 2 mosaic of the four S/2 regions, (B, C, S, S)."""
        side = self.input_size // 2
        crops = [x[..., r:r + side, c:c + side] for r, c in self.origins]
        return torch.cat([torch.cat(crops[:2], dim=-1), torch.cat(crops[2:], dim=-1)], dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"HTNet was built for {self.input_size}x{self.input_size} input, "
                             f"got {tuple(x.shape[-2:])}; set model.kwargs.input_size")
        x = self.embed(self.regions(x) if self.use_regions else x)
        for level, transformer in enumerate(self.levels):
            x = transformer(x)
            if level < len(self.aggregates):
                x = self.aggregates[level](x)
        return self.head(self.norm(x.mean(dim=(2, 3))))
