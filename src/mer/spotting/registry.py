"""Spotter registry: ``name -> class`` and ``create_spotter(cfg)`` (like ``mer.models``).

A new spotter is one file in ``mer/spotting`` whose class is decorated with
``@register_spotter("name")`` plus one config file in ``conf/spotting``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SPOTTERS: dict[str, type] = {}


def register_spotter(name: str) -> Callable[[type], type]:
    """Class decorator adding a spotter to the registry under ``name``."""

    def add(cls: type) -> type:
        if name in SPOTTERS and SPOTTERS[name] is not cls:
            raise ValueError(f"spotter name '{name}' is already registered by {SPOTTERS[name]}")
        SPOTTERS[name] = cls
        cls.name = name
        return cls

    return add


def create_spotter(cfg: Mapping[str, Any], seed: int = 0):
    """Build the spotter a config names (``name`` plus its settings)."""
    _import_all()
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SPOTTERS:
        raise KeyError(f"unknown spotter '{name}'; registered: {sorted(SPOTTERS)} "
                       "(conf/spotting/<name>.yaml)")
    return SPOTTERS[name](seed=seed, **cfg)


def list_spotters() -> list[str]:
    _import_all()
    return sorted(SPOTTERS)


def _import_all() -> None:
    # Importing the spotter modules runs their @register_spotter decorators.
    from mer.spotting import apex_score, mdmd, me_tst, mesfusion  # noqa: F401
