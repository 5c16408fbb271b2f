"""Import order must not matter: every mer module imports alone in a fresh interpreter.

An import circle whose first file is entered from the "wrong" side fails only then (it did:
``import mer.spotting.checks`` alone raised ImportError while ``mer.config_check`` imported
it); a fresh interpreter per module finds every such order."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def mer_modules() -> list[str]:
    """Every module of the mer package, by dotted name."""
    out = []
    for path in sorted((SRC / "mer").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def import_alone(module: str) -> str | None:
    """None when ``module`` imports in a fresh interpreter, else the end of its error."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=300)
    return None if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def test_the_module_list_is_complete():
    mods = mer_modules()
    assert {"mer", "mer.registry", "mer.models", "mer.models.registry",
            "mer.spotting.checks", "mer.federated.runner"} <= set(mods)
    assert not any(m.endswith("__init__") for m in mods)


@pytest.mark.parametrize("module", ["mer.spotting.checks", "mer.config_rules"])
def test_a_package_checks_module_imports_first(module):
    """Was an import circle through mer.config_check (ImportError when entered here)."""
    assert import_alone(module) is None


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    mods = mer_modules()
    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = dict(zip(mods, pool.map(import_alone, mods)))
    failed = {m: e for m, e in errors.items() if e is not None}
    assert not failed, "\n".join(f"{m}: {e}" for m, e in failed.items())
