"""MESFusion: multi-modal hierarchical semantic-guided fusion of optical flow and RGB for
spotting (Xie & Chang, ICASSP 2025).

Each position of a video gives two images: the face crop (grey here: the features keep small
grey crops) and the dense optical flow from it to the crop k positions later (Farneback on
the crops, the crop's median motion subtracted as head motion). A CNN-Transformer scores the
positions of a window:

1. **Stems**: a small strided CNN per modality: rgb (B', 1, S, S) -> (B', c, S/4, S/4), flow
   (B', 2, S, S) -> the same (B' = B x W frames).
2. **MFEM** (multi-scale feature extraction module): on the two stems concatenated, parallel
   3x3 convolutions with dilation 1, 2, 3, concatenated and mixed by a 1x1 convolution: the
   multi-scale fused features G (B', c, h, w) that guide the fusion.
3. **H-CSGFM** (hierarchical cross-modal semantic-guided fusion), one level per scale (each
   next level at half the resolution):
   - **SCAFU** (spatial cross-attention fusion unit): the h*w positions as tokens; flow
     queries (plus G) attend to RGB keys/values and RGB queries (plus G) to flow
     keys/values; each result is added to its own modality (keeping its inherent
     characteristics); the two are fused by a linear layer -> F (B', c, h, w).
   - **CSAFU** (channel self-attention fusion unit): attention across the 3c channels of
     [F, rgb, flow] (a (3c x 3c) map from their spatial responses) re-weights the channels
     against the source images' features, filtering interfering ones; a 1x1 projection back
     to c, added to F.
   Each level's fused map is max-pooled to 2 x 2 (upper/lower, left/right face: where the
   AU motion is, which a whole-face mean would dilute); the levels' maps are concatenated and
   projected linearly to the frame vector (c * levels).
   Normalisation: the face-crop stem normalises each frame (GroupNorm: light changes are
   distractors); the flow stem and MFEM use BatchNorm, which keeps a frame's motion
   amplitude (a per-frame normalisation there made a faint flicker look like an expression).
4. **Temporal Transformer** over the W frame vectors (learned positions) and a per-frame
   head (2 scores: micro, macro), sigmoid.

Small by default (S 32, c 8, 2 levels, 1 transformer layer); ``net: {image_size: 128,
channels: 32, levels: 3, layers: 2, heads: 4}`` is closer to the published size.
"""

from __future__ import annotations

from collections import OrderedDict

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mer.spotting.base import register_spotter
from mer.spotting.learned import LearnedSpotter
from mer.spotting.videos import SpotVideo

_FLOW_CACHE: OrderedDict = OrderedDict()
_FLOW_CACHE_SIZE = 64


def crop_flow(video: SpotVideo, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, 1, S, S) uint8 crops and (T, 2, S, S) float16 dense flow crop t -> crop t + k
    (Farneback, the frame's median flow subtracted), cached per video."""
    key = (video.video, video.length, video.k, video.block, size)
    if key in _FLOW_CACHE:
        _FLOW_CACHE.move_to_end(key)
        return _FLOW_CACHE[key]
    if video.crops is None:
        raise ValueError(f"video {video.video}: no face crops in its features; MESFusion "
                         "needs them (re-run python -m mer.prepare)")
    crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA)
                      for c in video.crops]).astype(np.uint8)
    flows = np.zeros((video.length, 2, size, size), dtype=np.float16)
    for t in range(video.length):
        nxt = crops[min(video.length - 1, t + video.k)]
        f = cv2.calcOpticalFlowFarneback(crops[t], nxt, None, 0.5, 2, 7, 3, 5, 1.1, 0)
        f -= np.median(f.reshape(-1, 2), axis=0)
        flows[t] = f.transpose(2, 0, 1)
    out = (crops[:, None], flows)
    _FLOW_CACHE[key] = out
    while len(_FLOW_CACHE) > _FLOW_CACHE_SIZE:
        _FLOW_CACHE.popitem(last=False)
    return out


def _norm(kind: str, c: int) -> nn.Module:
    # "frame": GroupNorm over a whole frame (per-frame gain removed: right for the face crop,
    # whose light changes are distractors); "batch": BatchNorm, which keeps each frame's
    # amplitude relative to the others (the flow path: motion strength is the signal).
    return nn.GroupNorm(1, c) if kind == "frame" else nn.BatchNorm2d(c)


def _stem(in_ch: int, c: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, c, 3, stride=2, padding=1), _norm(norm, c), nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), _norm(norm, c), nn.ReLU())


class MFEM(nn.Module):
    """Multi-scale feature extraction: (B, 2c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(2 * c, c, 3, padding=d, dilation=d)
                                       for d in (1, 2, 3)])
        self.mix = nn.Sequential(nn.Conv2d(3 * c, c, 1), _norm("batch", c), nn.ReLU())

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        x = torch.cat([rgb, flow], dim=1)
        return self.mix(torch.cat([torch.relu(b(x)) for b in self.branches], dim=1))


class SCAFU(nn.Module):
    """Spatial cross-attention fusion unit: rgb, flow, guide (B, c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int, heads: int = 2) -> None:
        super().__init__()
        heads = heads if c % heads == 0 else 1
        self.flow_from_rgb = nn.MultiheadAttention(c, heads, batch_first=True)
        self.rgb_from_flow = nn.MultiheadAttention(c, heads, batch_first=True)
        self.norm_rgb, self.norm_flow = nn.LayerNorm(c), nn.LayerNorm(c)
        self.fuse = nn.Linear(2 * c, c)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor, guide: torch.Tensor
                ) -> torch.Tensor:
        b, c, h, w = rgb.shape
        r, f, g = (t.flatten(2).transpose(1, 2) for t in (rgb, flow, guide))   # (B, hw, c)
        rn, fn = self.norm_rgb(r), self.norm_flow(f)
        f2 = f + self.flow_from_rgb(fn + g, rn, rn, need_weights=False)[0]
        r2 = r + self.rgb_from_flow(rn + g, fn, fn, need_weights=False)[0]
        fused = self.fuse(torch.cat([r2, f2], dim=-1))
        return fused.transpose(1, 2).reshape(b, c, h, w)


class CSAFU(nn.Module):
    """Channel self-attention fusion unit: fused, rgb, flow (B, c, h, w) -> (B, c, h, w)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(3 * c, 9 * c, 1)
        self.temperature = nn.Parameter(torch.ones(1))
        self.proj = nn.Conv2d(3 * c, c, 1)

    def forward(self, fused: torch.Tensor, rgb: torch.Tensor, flow: torch.Tensor
                ) -> torch.Tensor:
        x = torch.cat([fused, rgb, flow], dim=1)                      # (B, 3c, h, w)
        b, c3, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, c3, h * w).unbind(1)      # (B, 3c, hw)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) * self.temperature, dim=-1)  # (B, 3c, 3c)
        out = (attn @ v).reshape(b, c3, h, w)
        return fused + self.proj(out)


class MESFusionNet(nn.Module):
    """MESFusion scores (module docstring): batch ``rgb`` (B, W, 1, S, S) uint8 and ``flow``
    (B, W, 2, S, S) -> (B, W, 2)."""

    def __init__(self, image_size: int = 32, channels: int = 8, levels: int = 2,
                 layers: int = 1, heads: int = 2, window: int = 32, dropout: float = 0.1,
                 flow_scale: float = 1.0) -> None:
        super().__init__()
        c = channels
        self.image_size = image_size
        self.register_buffer("flow_scale", torch.tensor(float(flow_scale)))
        self.rgb_stem, self.flow_stem = _stem(1, c, "frame"), _stem(2, c, "batch")
        self.mfem = MFEM(c)
        self.scafu = nn.ModuleList([SCAFU(c, heads) for _ in range(levels)])
        self.csafu = nn.ModuleList([CSAFU(c) for _ in range(levels)])
        d = c * levels
        self.pos = nn.Parameter(torch.zeros(1, window, d))
        layer = nn.TransformerEncoderLayer(d, heads if d % heads == 0 else 1, 2 * d, dropout,
                                           batch_first=True)
        self.temporal = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.readout = nn.Linear(4 * d, d)  # the levels' 2 x 2 maps -> the frame vector
        self.head = nn.Linear(d, 2)

    def frame_embeddings(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """(B', 1, S, S) float and (B', 2, S, S) float -> (B', c * levels)."""
        r, f = self.rgb_stem(rgb), self.flow_stem(flow)
        g = self.mfem(r, f)
        pooled = []
        for i, (scafu, csafu) in enumerate(zip(self.scafu, self.csafu)):
            if i:
                r, f, g = (F.avg_pool2d(t, 2) if t.shape[-1] > 1 else t for t in (r, f, g))
            fused = csafu(scafu(r, f, g), r, f)
            pooled.append(F.adaptive_max_pool2d(fused, 2).flatten(1))   # (B', 4c)
            g = g + fused  # the fused semantics guide the next level
        return self.readout(torch.cat(pooled, dim=1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rgb, flow = batch["rgb"], batch["flow"]
        b, w = rgb.shape[:2]
        e = self.frame_embeddings(rgb.flatten(0, 1).float() / 255.0,
                                  flow.flatten(0, 1).float() * self.flow_scale)
        e = e.reshape(b, w, -1) + self.pos[:, :w]
        return torch.sigmoid(self.head(self.temporal(e)))


@register_spotter("mesfusion")
class MESFusionSpotter(LearnedSpotter):
    """MESFusion; ``net``: kwargs of :class:`MESFusionNet` (its window is the spotter's)."""

    def __init__(self, **kw) -> None:
        kw.setdefault("window", 32)
        super().__init__(**kw)
        self.image_size = int(self.net_kwargs.get("image_size", 32))

    def build_net(self, in_features: int, video: SpotVideo) -> nn.Module:
        kw = {**self.net_kwargs, "window": self.window}
        kw.setdefault("flow_scale", 1.0 / max(1e-3, float(self.flow_std)))
        return MESFusionNet(**kw)

    def setup(self, videos: list[SpotVideo]) -> None:
        sample = np.concatenate([crop_flow(v, self.image_size)[1][::7].astype(np.float32)
                                 .ravel() for v in videos])
        self.flow_std = float(np.percentile(np.abs(sample), 99)) if len(sample) else 1.0
        super().setup(videos)

    def inputs(self, video: SpotVideo) -> dict[str, np.ndarray]:
        rgb, flow = crop_flow(video, self.image_size)
        return {"rgb": rgb, "flow": flow}
