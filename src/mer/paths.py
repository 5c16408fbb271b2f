"""Where mer's Hydra configs live: the one helper every entry point, app and check uses.

``conf/`` sits at the repository root, beside ``src/``; an installed copy of mer run from a
checkout finds it there too. Imports nothing of mer: every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR: Path = Path(__file__).resolve().parents[2] / "conf"


def conf_file(group: str, option: str) -> Path:
    """The file of one option of a config group: ``conf/<group>/<option>.yaml``."""
    return CONF_DIR / group / f"{option}.yaml"
