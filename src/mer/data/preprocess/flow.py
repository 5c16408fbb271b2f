"""Dense optical flow between two frames (onset -> apex).

Convention (OpenCV's): ``onset[y, x] ~ apex[y + v, x + u]``, so content that moves right and
down between onset and apex has positive u and v, in pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

# Dual TV-L1 defaults as the MER field uses them (OpenCV's own defaults for the rest).
TVL1_DEFAULTS: dict[str, Any] = {
    "tau": 0.25, "lambda_": 0.15, "theta": 0.3, "nscales": 5, "warps": 5, "epsilon": 0.01,
    "innnerIterations": 30, "outerIterations": 10, "scaleStep": 0.8, "gamma": 0.0,
    "medianFiltering": 5,
}
FARNEBACK_DEFAULTS: dict[str, Any] = {
    "pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
    "poly_sigma": 1.2, "flags": 0,
}
# DIS: a preset, then optional overrides applied with the matching setter.
DIS_SETTERS = {
    "finest_scale": "setFinestScale",
    "patch_size": "setPatchSize",
    "patch_stride": "setPatchStride",
    "gradient_descent_iterations": "setGradientDescentIterations",
    "variational_refinement_iterations": "setVariationalRefinementIterations",
    "variational_refinement_alpha": "setVariationalRefinementAlpha",
    "variational_refinement_delta": "setVariationalRefinementDelta",
    "variational_refinement_gamma": "setVariationalRefinementGamma",
    "use_mean_normalization": "setUseMeanNormalization",
    "use_spatial_propagation": "setUseSpatialPropagation",
}
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
METHODS = ("tvl1", "farneback", "dis")


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3|4) BGR(A) uint8 -> (H, W) uint8 grey."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"expected a grey or BGR image, got shape {image.shape}")


def _merge(method: str, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {method} flow parameter(s) {unknown}; known: {sorted(defaults)}"
        )
    return {**defaults, **params}


def _tvl1(onset: np.ndarray, apex: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    if "lambda" in params:  # `lambda` is what configs write; OpenCV's keyword is `lambda_`
        params = {**params, "lambda_": params["lambda"]}
        del params["lambda"]
    p = _merge("tvl1", TVL1_DEFAULTS, params)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(**p)
    return tvl1.calc(onset, apex, None)


def _farneback(onset: np.ndarray, apex: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    p = _merge("farneback", FARNEBACK_DEFAULTS, params)
    return cv2.calcOpticalFlowFarneback(onset, apex, None, **p)


def _dis(onset: np.ndarray, apex: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    params = dict(params)
    preset = params.pop("preset", "medium")
    if preset not in DIS_PRESETS:
        raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(DIS_PRESETS)}")
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
    unknown = sorted(set(params) - set(DIS_SETTERS))
    if unknown:
        raise ValueError(
            f"unknown dis flow parameter(s) {unknown}; known: {['preset', *sorted(DIS_SETTERS)]}"
        )
    for name, value in params.items():
        getattr(dis, DIS_SETTERS[name])(value)
    return dis.calc(onset, apex, None)


_FLOWS = {"tvl1": _tvl1, "farneback": _farneback, "dis": _dis}


def compute_flow(
    onset: np.ndarray, apex: np.ndarray, method: str = "tvl1", **params: Any
) -> np.ndarray:
    """Dense optical flow from ``onset`` to ``apex``.

    Args:
        onset, apex: (H, W) grey or (H, W, 3) BGR uint8 frames of the same size.
        method: ``tvl1`` (Dual TV-L1, the field's choice), ``farneback`` or ``dis``.
        **params: method parameters overriding the defaults (``TVL1_DEFAULTS``,
            ``FARNEBACK_DEFAULTS``, DIS ``preset`` plus the keys of ``DIS_SETTERS``).

    Returns:
        (H, W, 2) float32 flow (u, v) in pixels.
    """
    if method not in _FLOWS:
        raise ValueError(f"unknown flow method {method!r}; choose one of {list(METHODS)}")
    onset, apex = to_grey(onset), to_grey(apex)
    if onset.shape != apex.shape:
        raise ValueError(f"onset {onset.shape} and apex {apex.shape} differ in size")
    flow = _FLOWS[method](onset, apex, params)
    return np.ascontiguousarray(flow, dtype=np.float32)
