"""Any timm image classifier as a flow-image network (randomly initialised; nothing downloads).

``TimmBackbone(num_classes, in_channels, backbone="resnet18")`` wraps
``timm.create_model(backbone, pretrained=False, num_classes=num_classes, in_chans=in_channels)``.
Small flow images can be upsampled first (``resize``) for backbones that downsample by 32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mer.models.registry import register_model


@register_model("timm")
class TimmBackbone(nn.Module):
    """A timm model. ``forward``: (B, in_channels, S, S) -> logits (B, num_classes).

    Args:
        backbone: a timm model name (``timm.list_models()``).
        input_size: S, the side of the flow images.
        resize: side the input is bilinearly resized to before the backbone (default S: none).
        pretrained: must be False; pretrained weights would need a download.
        **kwargs: passed on to ``timm.create_model`` (drop_rate, ...).
    """

    def __init__(
        self, num_classes: int = 3, in_channels: int = 3, backbone: str = "resnet18",
        input_size: int = 28, resize: int | None = None, pretrained: bool = False, **kwargs,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError(
                f"TimmBackbone({backbone!r}): pretrained=True needs weights from the internet, "
                "which this project does not download; set model.kwargs.pretrained=false, or "
                "load a local checkpoint into the network yourself"
            )
        import timm

        self.input_size = input_size
        self.resize = resize or input_size
        self.net = timm.create_model(backbone, pretrained=False, num_classes=num_classes,
                                     in_chans=in_channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False)
        return self.net(x)
