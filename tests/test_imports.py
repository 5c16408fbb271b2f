"""Import order must not matter: every mer module imports as the first mer module.

An import circle whose first file is entered from the "wrong" side fails only then (it did:
``import mer.spotting.checks`` alone raised ImportError while ``mer.config_check`` imported
it); a fresh interpreter per module finds every such order."""

from __future__ import annotations

import subprocess
import sys
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


# One interpreter: the third-party libraries are imported once (they are the slow part and make
# no circle with mer), then each mer module is imported with every ``mer`` module forgotten
# first, so it is the first mer module entered, exactly as in a fresh interpreter.
_EACH_FIRST = """
import importlib, sys, traceback
import torch, lightning, numpy, pandas, cv2  # noqa: F401 (third-party, imported once)
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "mer" or m.startswith("mer.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001 (reported, whatever it is)
        failed[name] = traceback.format_exception_only(e)[-1].strip()
for name, why in failed.items():
    print(f"{name}: {why}")
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_of_mer():
    mods = mer_modules()
    done = subprocess.run([sys.executable, "-c", _EACH_FIRST, *mods], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_check_finds_a_circle(tmp_path):
    """The check itself fails on a package whose two modules import each other's names."""
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circ.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from circ.a import A\nB = 2\n")
    script = _EACH_FIRST.replace('"mer"', '"circ"').replace('"mer."', '"circ."')
    done = subprocess.run([sys.executable, "-c", script, "circ.a"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1 and "circ.a: ImportError" in done.stdout, done.stdout
