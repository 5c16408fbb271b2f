"""MFDAN (Cai et al., TCSVT 2024): multi-level flow-driven attention network.

Two branches (the source documents' reading; the paper's exact widths are not in them, so
``size="published"`` is a ViT-small-like reading, not the paper's numbers):

- **Optical-flow encoding**: the onset->apex flow x (B, 3, F, F) (u, v, strain) through two
  conv-BN-ReLU layers and a 2x max-pool -> a feature map, pooled to the image branch's P x P
  token grid -> flow tokens f (B, P*P, Cf); their mean is the flow feature (B, Cf).
- **Image encoding**, driven by the flow: the apex frame's grey face crop (B, 1, S, S) cut into
  P x P patches (P = S / patch) -> tokens + a learned position embedding + a *flow position
  embedding* (a linear map of f), then ``depth`` pre-norm Transformer blocks. In block l the
  attention logits of every query get, for each key j, the bias
  ``b_lj = gamma_l * s_j + w_l . f_j``: s the flow saliency of patch j (:func:`flow_saliency`,
  where the face moves; in [0, 1]) and a learned map of the flow token (zero at init). Tokens
  where the flow moves are attended more, at every level ("multi-level"). DropKey on those
  logits in training (:func:`mer.models.components.attention.drop_keys`).
- The mean image token and the flow feature are concatenated -> LayerNorm -> dropout ->
  Linear -> logits. Train with focal loss: ``model.loss={kind: focal, gamma: 2}``.

Inputs: ``("flow", "apex_crop")``, the crop at ``image_size`` (from ``mer.prepare``'s aligned
crops or the frames, :mod:`mer.data.inputs`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mer.models.components.attention import BiasedSelfAttention
from mer.models.registry import register_model

SIZES: dict[str, dict] = {
    # a few thousand parameters per block: seconds per LOSO fold on 2 CPU cores
    "small": {"image_size": 28, "patch": 4, "dim": 32, "depth": 2, "heads": 2,
              "flow_channels": (16, 32)},
    "published": {"image_size": 112, "patch": 8, "dim": 256, "depth": 6, "heads": 8,
                  "flow_channels": (64, 128)},
}


def flow_saliency(flow: torch.Tensor, grid: int) -> torch.Tensor:
    """Where the face moves, per patch of a ``grid`` x ``grid`` token map, in [0, 1].

    flow (B, C>=2, H, W) with u, v in channels 0, 1 (min-max normalised per sample, so no
    motion is not 0: it is the value most pixels have) -> (B, grid*grid). Per pixel the motion
    is ``|u - median u| + |v - median v|``; it is averaged over each patch and divided by the
    sample's largest patch value (a motionless sample gives zeros).
    """
    uv = flow[:, :2]
    med = uv.flatten(2).median(dim=2).values[..., None, None]
    motion = (uv - med).abs().sum(dim=1, keepdim=True)  # (B, 1, H, W)
    pooled = F.adaptive_avg_pool2d(motion, grid).flatten(1)  # (B, grid*grid)
    return pooled / pooled.amax(dim=1, keepdim=True).clamp_min(1e-8)


class _Block(nn.Module):
    """Pre-norm Transformer block with flow-driven attention: (B, N, D), bias (B, N)."""

    def __init__(self, dim: int, heads: int, flow_dim: int, drop_key: float,
                 saliency_scale: float, mlp_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = BiasedSelfAttention(dim, heads, drop_key)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_mult * dim, dim))
        self.gamma = nn.Parameter(torch.tensor(float(saliency_scale)))
        # no bias term: a constant added to every key's logit would not change the softmax
        self.flow_bias = nn.Linear(flow_dim, 1, bias=False)
        nn.init.zeros_(self.flow_bias.weight)

    def forward(self, x: torch.Tensor, saliency: torch.Tensor,
                flow_tokens: torch.Tensor) -> torch.Tensor:
        bias = self.gamma * saliency + self.flow_bias(flow_tokens)[..., 0]
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


@register_model("mfdan")
class MFDAN(nn.Module):
    """MFDAN. ``forward(x, apex_crop)``: x (B, in_channels, F, F) flow, apex_crop
    (B, 1, S, S) -> logits (B, num_classes). ``size``: ``small`` | ``published`` defaults;
    any of ``image_size, patch, dim, depth, heads, flow_channels`` overrides them."""

    inputs = ("flow", "apex_crop")
    input_names = ("apex_crop",)
    head_prefixes = ("classifier.",)

    def __init__(self, num_classes: int = 3, in_channels: int = 3, size: str = "small",
                 flow_size: int = 28, image_size: int | None = None, patch: int | None = None,
                 dim: int | None = None, depth: int | None = None, heads: int | None = None,
                 flow_channels: tuple[int, int] | list[int] | None = None,
                 drop_key: float = 0.1, saliency_scale: float = 2.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"MFDAN: size={size!r}, use one of {sorted(SIZES)}")
        given = {"image_size": image_size, "patch": patch, "dim": dim, "depth": depth,
                 "heads": heads, "flow_channels": flow_channels}
        c = {**SIZES[size], **{k: v for k, v in given.items() if v is not None}}
        if c["image_size"] % c["patch"]:
            raise ValueError(f"MFDAN: image_size {c['image_size']} is not a multiple of patch "
                             f"{c['patch']}")
        if in_channels < 2:
            raise ValueError("MFDAN: the flow needs u and v (in_channels >= 2)")
        self.flow_size, self.image_size, self.grid = flow_size, c["image_size"], \
            c["image_size"] // c["patch"]
        c1, c2 = (int(v) for v in c["flow_channels"])
        self.flow_encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        d = int(c["dim"])
        self.patch_embed = nn.Conv2d(1, d, c["patch"], stride=c["patch"])
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2, d) * 0.02)
        self.flow_pos = nn.Linear(c2, d)
        self.blocks = nn.ModuleList(
            _Block(d, int(c["heads"]), c2, drop_key, saliency_scale, dropout=dropout)
            for _ in range(int(c["depth"])))
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Sequential(nn.LayerNorm(d + c2), nn.Dropout(dropout),
                                        nn.Linear(d + c2, num_classes))

    def input_spec(self) -> dict[str, dict]:
        """Named inputs beyond the flow and their sizes (``mer.data.inputs``)."""
        return {"apex_crop": {"size": self.image_size}}

    def attention_maps(self) -> list[torch.Tensor]:
        """Each block's last attention probabilities (B, heads, N, N)."""
        return [b.attn.last_attention for b in self.blocks]

    def forward(self, x: torch.Tensor, apex_crop: torch.Tensor) -> torch.Tensor:
        fmap = self.flow_encoder(x)  # (B, c2, F/2, F/2)
        flow_tokens = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)
        saliency = flow_saliency(x, self.grid)
        tokens = self.patch_embed(apex_crop).flatten(2).transpose(1, 2)  # (B, N, d)
        tokens = tokens + self.pos_embed + self.flow_pos(flow_tokens)
        for block in self.blocks:
            tokens = block(tokens, saliency, flow_tokens)
        image = self.norm(tokens).mean(dim=1)
        return self.classifier(torch.cat([image, fmap.mean(dim=(2, 3))], dim=1))
