"""Privacy layer of the federated loop: secure aggregation (CKKS, pairwise masks), DP-SGD and
central DP (Opacus), and the attacks that measure them (``mer.privacy.attacks``).

:func:`from_config` turns a ``conf/privacy/*.yaml`` group into the object the loop uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mer.registry import Registry

RENAMED_MIN_SURVIVORS = (
    "privacy.min_survivors={value}: this key was renamed privacy.min_clients (the fewest labs "
    "whose protected sum is released; a round with fewer is skipped); replace "
    "privacy.min_survivors={value} with privacy.min_clients={value} in your config")


def _params(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("name", None)
    if "min_survivors" in d:  # an old config: named, not a bare TypeError from the dataclass
        from mer.config_rules import ConfigError

        raise ConfigError([RENAMED_MIN_SURVIVORS.format(value=d["min_survivors"])])
    return d


# privacy mode name -> builder of its object from the ``privacy`` config's settings. The
# builders import their module only when called (TenSEAL, Opacus are heavy).
PRIVACY_MODES: Registry[Callable[[dict], Any]] = Registry(
    "privacy", hint="privacy=<name>, conf/privacy/<name>.yaml", error=ValueError)


@PRIVACY_MODES.register("none")
def _none(params: dict) -> None:
    return None


@PRIVACY_MODES.register("ckks")
def _ckks(params: dict):
    from mer.privacy.encrypted import CKKSAggregation, CKKSParams

    return CKKSAggregation(CKKSParams(**params))


@PRIVACY_MODES.register("secagg")
def _secagg(params: dict):
    from mer.privacy.secagg import MaskedAggregation, MaskParams

    return MaskedAggregation(MaskParams(**params))


@PRIVACY_MODES.register("dp")
def _dp(params: dict):
    from mer.privacy.dp import DPConfig

    return DPConfig(**params)


@PRIVACY_MODES.register("central_dp")
def _central_dp(params: dict):
    from mer.privacy.dp import CentralDPConfig

    return CentralDPConfig(**params)


def from_config(cfg: Any):
    """The privacy object for a ``privacy`` config group (by ``name``, :data:`PRIVACY_MODES`):

    - ``none``: None
    - ``ckks``: :class:`mer.privacy.encrypted.CKKSAggregation`
    - ``secagg``: :class:`mer.privacy.secagg.MaskedAggregation`
    - ``dp``: :class:`mer.privacy.dp.DPConfig` (per-client DP-SGD settings)
    - ``central_dp``: :class:`mer.privacy.dp.CentralDPConfig`
    """
    name = cfg["name"] if cfg is not None else "none"
    build = PRIVACY_MODES.get(name)
    return None if name == "none" else build(_params(cfg))
