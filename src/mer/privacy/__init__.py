"""Privacy layer of the federated loop: secure aggregation (CKKS, pairwise masks), DP-SGD and
central DP (Opacus), and the attacks that measure them (``mer.privacy.attacks``).

:func:`from_config` turns a ``conf/privacy/*.yaml`` group into the object the loop uses.
"""

from __future__ import annotations

from typing import Any


def _params(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("name", None)
    return d


def from_config(cfg: Any):
    """The privacy object for a ``privacy`` config group (by ``name``):

    - ``none``: None
    - ``ckks``: :class:`mer.privacy.encrypted.CKKSAggregation`
    - ``secagg``: :class:`mer.privacy.secagg.MaskedAggregation`
    - ``dp``: :class:`mer.privacy.dp.DPConfig` (per-client DP-SGD settings)
    - ``central_dp``: :class:`mer.privacy.dp.CentralDPConfig`
    """
    name = cfg["name"] if cfg is not None else "none"
    if name == "none":
        return None
    if name == "ckks":
        from mer.privacy.encrypted import CKKSAggregation, CKKSParams

        return CKKSAggregation(CKKSParams(**_params(cfg)))
    if name == "secagg":
        from mer.privacy.secagg import MaskedAggregation, MaskParams

        return MaskedAggregation(MaskParams(**_params(cfg)))
    if name == "dp":
        from mer.privacy.dp import DPConfig

        return DPConfig(**_params(cfg))
    if name == "central_dp":
        from mer.privacy.dp import CentralDPConfig

        return CentralDPConfig(**_params(cfg))
    raise ValueError(f"unknown privacy '{name}': none, ckks, secagg, dp or central_dp")
