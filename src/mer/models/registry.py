"""Model registry: ``name -> class``, and ``create_model(name, **kwargs)`` (timm-style).

A new network is one file in ``mer/models`` decorated with ``@register_model("name")``, one
import line in ``mer/models/__init__.py`` and one config file in ``conf/model``. Every
registered class takes ``num_classes`` and ``in_channels``. This module imports no model: the
package's ``__init__`` imports them all, so ``import mer.models.registry`` (which runs the
package first) finds every network registered, and no import circle is formed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mer.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model", hint="model=<name>, conf/model/")


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a network to :data:`MODELS` under ``name``."""
    return MODELS.register(name)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered network by name (an unknown name raises, listing the choices)."""
    return MODELS.get(name)(**kwargs)


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return MODELS.names()
