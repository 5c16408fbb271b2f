"""MPFNet (Ma, Zhao, Pei, Xie, Yin, Yan; ICASSP 2025): multi-prior fusion network.

Two complementary encoders, each a CA-I3D (:class:`mer.models.components.ca_i3d.CAI3D`: I3D
with Coordinate Attention in its Inception blocks):

- the **generic** encoder on the clip's frames, ``frames`` (B, 1, T, S, S): onset..offset
  resampled to T frames (:mod:`mer.data.inputs`);
- the **advanced** encoder on magnified motion, ``magnified_frames`` (B, 1, T, S, S): the same
  frames after Eulerian magnification (``data.magnify`` settings).

Two ways of integrating the priors (the two variants, after infants' parallel and hierarchical
processing):

- **MPFNet-P** (``variant="P"``, parallel): both encoders run side by side; their pooled
  features are concatenated -> ``classifier``. The advanced features do not depend on the
  generic encoder.
- **MPFNet-C** (``variant="C"``, cascaded / hierarchical): the generic encoder's feature map
  after each Inception stage, through a 1x1x1 conv (``bridges``), is added to the advanced
  encoder's map of the same stage: the advanced encoder builds on the generic one's features as
  its prior; ``classifier`` sees the advanced features only.

**Progressive training** (our reading of "trained progressively"): stage 1, the first
``stage1_fraction`` of the optimiser steps of a fit, trains the generic encoder alone through
its own head (``generic_head``); stage 2 trains the advanced encoder, the bridges (-C) and the
classifier with the generic encoder frozen (run without gradients: its weights stay as stage
1 left them). The module tells the network its progress (``set_progress``, a neutral hook of
:class:`mer.engine.module.MERModule`). Evaluation always uses the full network. In a
federated run each local fit runs both stages.

``size="published"``: I3D's own widths (out 1024 channels per encoder), T = 16, S = 112 (the
paper's input size is not in the source documents); ``small``: a narrow CA-I3D (80 channels),
T = 8, S = 32.
"""

from __future__ import annotations

import torch
from torch import nn

from mer.models.components.ca_i3d import CAI3D
from mer.models.registry import register_model

SIZES: dict[str, dict] = {
    "small": {"layout": "small", "frames": 8, "image_size": 32},
    "published": {"layout": "published", "frames": 16, "image_size": 112},
}


class MPFNet(nn.Module):
    """``forward(x, frames, magnified_frames)`` -> logits (B, num_classes); x (the flow
    image) is not used. See the module doc for the variants and the training stages."""

    inputs = ("frames", "magnified_frames")
    input_names = ("frames", "magnified_frames")
    head_prefixes = ("classifier.", "generic_head.")

    def __init__(self, num_classes: int = 3, in_channels: int = 3, variant: str = "P",
                 size: str = "small", frames: int | None = None, image_size: int | None = None,
                 stage1_fraction: float = 0.5, reduction: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        if variant not in ("P", "C"):
            raise ValueError(f"MPFNet: variant={variant!r}, use 'P' (parallel) or 'C' "
                             "(cascaded)")
        if size not in SIZES:
            raise ValueError(f"MPFNet: size={size!r}, use one of {sorted(SIZES)}")
        if not 0.0 <= stage1_fraction < 1.0:
            raise ValueError(f"MPFNet: stage1_fraction must be in [0, 1), got {stage1_fraction}")
        c = SIZES[size]
        self.variant, self.stage1_fraction = variant, float(stage1_fraction)
        self.frames = int(frames or c["frames"])
        self.image_size = int(image_size or c["image_size"])
        self.generic = CAI3D(1, c["layout"], reduction)
        self.advanced = CAI3D(1, c["layout"], reduction)
        d = self.generic.out_channels
        self.generic_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, num_classes))
        if variant == "C":
            self.bridges = nn.ModuleList(nn.Conv3d(ch, ch, 1)
                                         for ch in self.generic.stage_channels)
        fused = 2 * d if variant == "P" else d
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused, num_classes))
        self.progress = 1.0  # fraction of training done (set by the module each step)

    def input_spec(self) -> dict[str, dict]:
        """Named inputs and their sizes (``mer.data.inputs``)."""
        spec = {"size": self.image_size, "length": self.frames}
        return {"frames": dict(spec), "magnified_frames": dict(spec)}

    def set_progress(self, fraction: float) -> None:
        self.progress = float(fraction)

    @property
    def stage(self) -> int:
        """1 (generic encoder only) or 2; evaluation is always stage 2."""
        return 1 if self.training and self.progress < self.stage1_fraction else 2

    def features(self, frames: torch.Tensor, magnified_frames: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(generic (B, d), advanced (B, d)) pooled features, as stage 2 computes them."""
        if self.training:  # frozen in stage 2: no gradients, batch-norm statistics kept
            self.generic.train(False)
            try:
                with torch.no_grad():
                    g_maps = self.generic.stages_out(frames)
            finally:
                self.generic.train(True)
        else:
            g_maps = self.generic.stages_out(frames)
        prior = None
        if self.variant == "C":
            prior = [bridge(m) for bridge, m in zip(self.bridges, g_maps)]
        a_maps = self.advanced.stages_out(magnified_frames, prior)
        return g_maps[-1].mean(dim=(2, 3, 4)), a_maps[-1].mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor, frames: torch.Tensor,
                magnified_frames: torch.Tensor) -> torch.Tensor:
        if self.stage == 1:
            return self.generic_head(self.generic(frames))
        g, a = self.features(frames, magnified_frames)
        return self.classifier(torch.cat([g, a], dim=1) if self.variant == "P" else a)


@register_model("mpfnet_p")
class MPFNetP(MPFNet):
    """MPFNet-P: parallel integration of the two encoders' features."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, size: str = "small",
                 frames: int | None = None, image_size: int | None = None,
                 stage1_fraction: float = 0.5, reduction: int = 8, dropout: float = 0.3) -> None:
        super().__init__(num_classes, in_channels, "P", size, frames, image_size,
                         stage1_fraction, reduction, dropout)


@register_model("mpfnet_c")
class MPFNetC(MPFNet):
    """MPFNet-C: cascaded; the advanced encoder builds on the generic one's features."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, size: str = "small",
                 frames: int | None = None, image_size: int | None = None,
                 stage1_fraction: float = 0.5, reduction: int = 8, dropout: float = 0.3) -> None:
        super().__init__(num_classes, in_channels, "C", size, frames, image_size,
                         stage1_fraction, reduction, dropout)
