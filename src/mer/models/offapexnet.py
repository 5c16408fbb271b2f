"""Off-ApexNet (Gan et al., 2019): onset->apex optical flow in two CNN streams.

Input (B, C, 28, 28) where channels 0 and 1 are u and v (strain, if given, is not used).
Each of u and v passes its own stream: Conv 5x5 (6) -> ReLU -> MaxPool 2 -> Conv 5x5 (16) ->
ReLU -> MaxPool 2, 'same' padding, giving 16 x 7 x 7; the two are concatenated (1568) ->
Linear 1024 -> ReLU -> Dropout -> Linear classes.
"""

from __future__ import annotations

import torch
from torch import nn

from mer.models.registry import register_model


def _stream() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )


@register_model("offapexnet")
class OffApexNet(nn.Module):
    """Off-ApexNet. ``forward``: (B, C>=2, 28, 28) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, hidden: int = 1024,
                 dropout: float = 0.5, input_size: int = 28) -> None:
        super().__init__()
        if in_channels < 2:
            raise ValueError("Off-ApexNet needs the u and v flow channels (in_channels >= 2)")
        self.u_stream, self.v_stream = _stream(), _stream()
        side = input_size // 4
        self.head = nn.Sequential(
            nn.Linear(2 * 16 * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.u_stream(x[:, 0:1])
        v = self.v_stream(x[:, 1:2])
        return self.head(torch.cat([u.flatten(1), v.flatten(1)], dim=1))
