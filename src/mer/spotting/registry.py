"""The spotter catalogue: importing this module registers every spotter (``name -> class`` in
:data:`SPOTTERS`), and ``create_spotter(cfg)`` builds one by name (like ``mer.models``).

A new spotter is one file in ``mer/spotting`` whose class is decorated with
``@register_spotter("name")`` (:mod:`mer.spotting.base`), one import line here and one config
file in ``conf/spotting``. The registry itself lives in :mod:`mer.spotting.base`, so that the
spotter files import no catalogue and this one imports them: no import circle, and a config
check (which imports only :mod:`mer.spotting.checks`) loads no network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mer.spotting import apex_score, mdmd, me_tst, mesfusion  # noqa: F401 (registrations)
from mer.spotting.base import SPOTTERS, register_spotter

__all__ = ["SPOTTERS", "create_spotter", "list_spotters", "register_spotter"]


def create_spotter(cfg: Mapping[str, Any], seed: int = 0):
    """Build the spotter a config names (``name`` plus its settings)."""
    cfg = dict(cfg)
    return SPOTTERS.get(cfg.pop("name", None))(seed=seed, **cfg)


def list_spotters() -> list[str]:
    """Every registered spotter name, sorted."""
    return SPOTTERS.names()
