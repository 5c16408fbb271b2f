"""Shared test fixtures: paths to the repository and to ../shared (fixtures may be absent)."""

from __future__ import annotations

import os
import signal
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


def pytest_configure(config: pytest.Config) -> None:
    """A suite started as a background job (``pytest &``, nohup) inherits an ignored SIGINT,
    which mer rightly keeps ignored; the Ctrl-C tests play a foreground terminal, so they get
    Python's own SIGINT handler back (and their subprocesses the default action)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist each test process computes with one thread (and so do the processes
    it starts): two processes on two cores, not four threads fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
