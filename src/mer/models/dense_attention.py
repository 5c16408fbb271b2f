"""Dense connections + mixed attention (Gan, Xiao, Zhu, Jain, Struc; KBS 2024).

The source documents name the parts: Eulerian video magnification (EVM) in preprocessing, a
densely connected feature extractor, a mixed (channel + spatial) attention mechanism, and
pretraining on macro-expression data before fine-tuning on micro-expressions. Our reading:

- input: the onset->apex flow (u, v, strain) of the *magnified* clip, ``magnified_flow``
  (B, 3, S, S) (:mod:`mer.data.inputs`: ``mer.prepare`` output with
  ``data.magnify.enabled=true``, or computed from the frames with ``data.magnify``'s settings);
- a stem conv, then DenseNet blocks (Huang et al.): layer i of a block sees the concatenation
  of the block input and every earlier layer's output (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv
  to k = ``growth``); after each block :class:`MixedAttention` (channel gate then spatial gate)
  and, between blocks, a transition (BN-ReLU-1x1 conv halving the channels, 2x avg-pool);
- BN-ReLU, global average pool, ``classifier`` (Linear).

``size="published"`` is DenseNet-121's widths (growth 32, blocks 6-12-24-16, stem 64, 7x7/2 +
max-pool) on the flow upsampled to 112 px: the paper's own widths are not in the source
documents. ``size="small"`` (growth 12, blocks 3-3, stem 24) trains in seconds on a CPU.
Macro-to-micro transfer: ``+experiment=dense_macro_micro`` (``model.pretrain``,
:mod:`mer.engine.transfer`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mer.models.components.attention import MixedAttention
from mer.models.registry import register_model

SIZES: dict[str, dict] = {
    "small": {"growth": 12, "blocks": (3, 3), "stem": 24, "resize": None},
    "published": {"growth": 32, "blocks": (6, 12, 24, 16), "stem": 64, "resize": 112},
}


class _DenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, 4 * growth, 1),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DenseBlock(nn.Module):
    """(B, C, H, W) -> (B, C + n * growth, H, W): each layer's input is the concatenation of
    the block input and all earlier layers' outputs; the output concatenates them all."""

    def __init__(self, in_ch: int, n_layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(in_ch + i * growth, growth)
                                    for i in range(n_layers))
        self.out_channels = in_ch + n_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


@register_model("dense_attention")
class DenseAttentionNet(nn.Module):
    """``forward(x, magnified_flow)``: magnified_flow (B, in_channels, S, S) -> logits
    (B, num_classes); x (the plain flow) is not used. ``size``: ``small`` | ``published``;
    ``growth``, ``blocks``, ``stem``, ``resize`` override it. ``channel_attention`` /
    ``spatial_attention`` False drop that half of every mixed attention (ablations)."""

    inputs = ("magnified_flow",)
    input_names = ("magnified_flow",)
    head_prefixes = ("classifier.",)

    def __init__(self, num_classes: int = 3, in_channels: int = 3, size: str = "small",
                 input_size: int = 28, growth: int | None = None,
                 blocks: tuple[int, ...] | list[int] | None = None, stem: int | None = None,
                 resize: int | None = None, reduction: int = 8, dropout: float = 0.2,
                 channel_attention: bool = True, spatial_attention: bool = True) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"dense_attention: size={size!r}, use one of {sorted(SIZES)}")
        c = dict(SIZES[size])
        for k, v in {"growth": growth, "blocks": blocks, "stem": stem}.items():
            if v is not None:
                c[k] = v
        if resize is not None:
            c["resize"] = resize or None
        self.input_size, self.resize = int(input_size), c["resize"]
        self.flow_size = self.input_size
        if c["resize"]:  # DenseNet's stem: 7x7 stride 2, 3x3 max-pool stride 2
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c["stem"], 7, stride=2, padding=3),
                                      nn.BatchNorm2d(c["stem"]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c["stem"], 3, padding=1),
                                      nn.BatchNorm2d(c["stem"]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        ch = int(c["stem"])
        for i, n in enumerate(c["blocks"]):
            block = DenseBlock(ch, int(n), int(c["growth"]))
            ch = block.out_channels
            stages += [block, MixedAttention(ch, reduction, channel=channel_attention,
                                             spatial=spatial_attention)]
            if i < len(c["blocks"]) - 1:
                stages.append(nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                                            nn.Conv2d(ch, ch // 2, 1), nn.AvgPool2d(2)))
                ch //= 2
        self.features = nn.Sequential(*stages, nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.feature_dim = ch
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))

    def input_spec(self) -> dict[str, dict]:
        """Named inputs and their sizes (``mer.data.inputs``)."""
        return {"magnified_flow": {"size": self.input_size}}

    def embed(self, magnified_flow: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, feature_dim) pooled features."""
        z = magnified_flow
        if self.resize:
            z = F.interpolate(z, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False)
        return self.features(self.stem(z)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, magnified_flow: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(magnified_flow))
