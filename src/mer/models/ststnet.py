"""STSTNet (Liong et al., 2019): shallow triple-stream 3D CNN on onset->apex u, v, strain.

Input (B, 3, 28, 28). Three parallel 3x3 conv branches with 3, 5 and 8 filters (padding 2),
each ReLU -> BatchNorm -> MaxPool(3, stride 3, padding 1) -> Dropout(0.5); the 16 maps are
concatenated, average-pooled by 2 and flattened to 16 * 5 * 5 = 400 -> Linear(400, classes).
"""

from __future__ import annotations

import torch
from torch import nn

from mer.models.registry import register_model


class _Branch(nn.Sequential):
    def __init__(self, in_channels: int, filters: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, filters, kernel_size=3, padding=2),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(filters),
            nn.MaxPool2d(kernel_size=3, stride=3, padding=1),
            nn.Dropout(dropout),
        )


@register_model("ststnet")
class STSTNet(nn.Module):
    """STSTNet. ``forward``: (B, in_channels, 28, 28) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, dropout: float = 0.5,
                 input_size: int = 28) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_Branch(in_channels, f, dropout) for f in (3, 5, 8))
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        side = ((input_size + 2 + 2 - 3) // 3 + 1) // 2  # conv pad 2, maxpool 3/3 pad 1, avg 2
        self.fc = nn.Linear(16 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))
