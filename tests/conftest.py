"""Shared test fixtures: paths to the repository and to ../shared (fixtures may be absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ANNOTATIONS = SHARED / "fixtures" / "annotations"


@pytest.fixture
def annotation_sheet():
    """Path of a real annotation sheet in ../shared/fixtures/annotations, or skip."""

    def get(name: str) -> Path:
        path = ANNOTATIONS / name
        if not path.exists():
            pytest.skip(f"real annotation sheet not available: {path}")
        return path

    return get
