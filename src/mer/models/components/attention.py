"""Attention blocks: self-attention with a per-key logit bias and DropKey (MFDAN), mixed
channel + spatial attention (CBAM-style; dense connections + mixed attention)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def drop_keys(logits: torch.Tensor, p: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """DropKey (Li et al., CVPR 2023): each (query, key) attention *logit* is set to -inf with
    probability ``p`` before the softmax, so each query's remaining keys share its whole
    attention (unlike dropout on the probabilities, nothing is rescaled after). A query that
    would lose every key keeps them all. logits (..., Nq, Nk) -> same shape."""
    if p <= 0:
        return logits
    mask = torch.rand(logits.shape, device=logits.device, generator=generator) < p
    mask &= ~mask.all(dim=-1, keepdim=True)
    return logits.masked_fill(mask, float("-inf"))


class BiasedSelfAttention(nn.Module):
    """Multi-head self-attention whose logits get an additive bias per key, with DropKey.

    ``forward(x, key_bias)``: x (B, N, D), key_bias (B, N) or None -> (B, N, D). The logits are
    ``q k^T / sqrt(d) + key_bias[:, None, None, :]``; in training, DropKey with ``drop_key``.
    The last attention probabilities (B, H, N, N) are kept in ``last_attention`` (detached).
    """

    def __init__(self, dim: int, heads: int, drop_key: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: dim {dim} is not divisible by heads {heads}")
        if not 0.0 <= drop_key < 1.0:
            raise ValueError(f"attention: drop_key must be in [0, 1), got {drop_key}")
        self.heads, self.scale, self.drop_key = heads, (dim // heads) ** -0.5, float(drop_key)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :]
        if self.training:
            logits = drop_keys(logits, self.drop_key)
        attn = logits.softmax(dim=-1)
        self.last_attention = attn.detach()
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ChannelAttention(nn.Module):
    """CBAM channel attention: (B, C, H, W) -> gate (B, C, 1, 1) =
    sigmoid(MLP(avgpool x) + MLP(maxpool x)), the MLP shared (C -> C/r -> C)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) +
                             self.mlp(F.adaptive_max_pool2d(x, 1)))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: (B, C, H, W) -> gate (B, 1, H, W) =
    sigmoid(conv_k([mean over C, max over C]))."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class MixedAttention(nn.Module):
    """Mixed attention: channel gate, then spatial gate on the channel-refined map.

    ``forward``: (B, C, H, W) -> (B, C, H, W), ``x' = x * Mc(x)``, ``out = x' * Ms(x')``.
    ``channel`` / ``spatial`` False skip that part (ablations).
    """

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7,
                 channel: bool = True, spatial: bool = True) -> None:
        super().__init__()
        self.channel_gate = ChannelAttention(channels, reduction)
        self.spatial_gate = SpatialAttention(kernel_size)
        self.use_channel, self.use_spatial = channel, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_channel:
            x = x * self.channel_gate(x)
        if self.use_spatial:
            x = x * self.spatial_gate(x)
        return x
