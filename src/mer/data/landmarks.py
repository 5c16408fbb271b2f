"""iBUG-68 landmark conventions shared by the data and the models.

:data:`FACE_TEMPLATE_68` is a schematic aligned face: 68 points in iBUG order, unit
coordinates (x right, y down; index 0 on the image's left). Models place their landmark
patches on it when a sample has no detected landmarks (DPK-GAT, HTNet), and the gradient-
inversion attack draws its prior faces from it; multiply by the image side for pixels.
"""

from __future__ import annotations

import math

import torch


def _mirror(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(1.0 - x, y) for x, y in points]


def _face_template() -> torch.Tensor:
    """(68, 2) schematic aligned face, iBUG order, unit coordinates (x right, y down)."""
    t = torch.linspace(0.0, math.pi, 17)
    jaw = torch.stack([0.5 - 0.42 * torch.cos(t), 0.40 + 0.57 * torch.sin(t)], dim=1)  # 0-16
    brow = [(0.17, 0.33), (0.23, 0.29), (0.30, 0.28), (0.37, 0.29), (0.44, 0.31)]  # 17-21
    nose = [(0.50, 0.42), (0.50, 0.49), (0.50, 0.56), (0.50, 0.63),  # 27-30 bridge
            (0.42, 0.67), (0.46, 0.685), (0.50, 0.69), (0.54, 0.685), (0.58, 0.67)]  # 31-35
    eye = [(0.25, 0.43), (0.29, 0.405), (0.34, 0.405), (0.39, 0.435), (0.34, 0.45),
           (0.29, 0.45)]  # 36-41, outer corner first, clockwise in the image
    other_eye = _mirror([eye[3], eye[2], eye[1], eye[0], eye[5], eye[4]])  # 42-47
    outer_lip = [(0.36, 0.80), (0.41, 0.775), (0.46, 0.76), (0.50, 0.765)]  # 48-51
    outer_lip += _mirror(outer_lip[2::-1])  # 52-54
    outer_lip += [(0.59, 0.84), (0.54, 0.86), (0.50, 0.865), (0.46, 0.86), (0.41, 0.84)]  # 55-59
    inner_lip = [(0.39, 0.80), (0.45, 0.79), (0.50, 0.795), (0.55, 0.79), (0.61, 0.80),
                 (0.55, 0.815), (0.50, 0.82), (0.45, 0.815)]  # 60-67
    rest = brow + _mirror(brow[::-1]) + nose + eye + other_eye + outer_lip + inner_lip
    return torch.cat([jaw, torch.tensor(rest)], dim=0)


FACE_TEMPLATE_68: torch.Tensor = _face_template()
