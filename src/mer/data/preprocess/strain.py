"""Optical strain of a flow field."""

from __future__ import annotations

import numpy as np


def optical_strain(flow: np.ndarray) -> np.ndarray:
    """Magnitude of the optical strain tensor of a flow field.

    strain = sqrt(u_x^2 + v_y^2 + 0.5 (u_y + v_x)^2), with the derivatives taken by central
    differences (one-sided at the border, ``np.gradient``).

    Args:
        flow: (H, W, 2) flow (u, v), H and W >= 2.

    Returns:
        (H, W) float32.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2 or min(flow.shape[:2]) < 2:
        raise ValueError(f"expected an (H, W, 2) flow with H, W >= 2, got {flow.shape}")
    u_y, u_x = np.gradient(flow[:, :, 0])  # axis 0 is y, axis 1 is x
    v_y, v_x = np.gradient(flow[:, :, 1])
    return np.sqrt(u_x**2 + v_y**2 + 0.5 * (u_y + v_x) ** 2).astype(np.float32)
