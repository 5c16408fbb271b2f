"""Model registry: ``name -> class``, and ``create_model(name, **kwargs)`` (timm-style).

A new network is one file in ``mer/models`` decorated with ``@register_model("name")`` plus one
config file in ``conf/model``. Every registered class takes ``num_classes`` and ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a network to the registry under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name '{name}' is already registered by {MODELS[name]}")
        MODELS[name] = cls
        return cls

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered network by name."""
    _import_all()
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}'; registered: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def list_models() -> list[str]:
    _import_all()
    return sorted(MODELS)


def _import_all() -> None:
    # Importing the model modules runs their @register_model decorators.
    from mer.models import (  # noqa: F401
        dense_attention,
        dpk_gat,
        frozen_head,
        htnet,
        mfdan,
        mpfnet,
        offapexnet,
        ststnet,
        timm_backbone,
    )
