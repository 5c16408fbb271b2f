"""Helpers to build database trees in their real layouts (tiny frames and annotation sheets),
and SynME tiny as generation tests use it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pytest


class TreeBuilder:
    """Writes frame folders and .xlsx sheets the way the database releases lay them out."""

    @staticmethod
    def frames(folder: Path, numbers: Iterable[int], name: str = "img{}.jpg",
               grey: bool = False) -> Path:
        """Tiny images ``folder/name.format(n)`` for each frame number ``n``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for n in numbers:
            shape = (12, 10) if grey else (12, 10, 3)
            cv2.imwrite(str(folder / name.format(n)), np.full(shape, n % 256, np.uint8))
        return folder

    @staticmethod
    def sheet(path: Path, header: list | None, rows: Iterable[Iterable], above: int = 0,
              extra: dict[str, list[list]] | None = None) -> Path:
        """An .xlsx with ``above`` text rows, then ``header`` (None: no header), then ``rows``;
        ``extra`` adds more worksheets {title: rows}."""
        wb = openpyxl.Workbook()
        ws = wb.active
        for i in range(above):
            ws.append([f"release note line {i + 1}"] if i % 3 != 2 else [None])
        if header is not None:
            ws.append(header)
        for r in rows:
            ws.append(list(r))
        for title, extra_rows in (extra or {}).items():
            other = wb.create_sheet(title)
            for r in extra_rows:
                other.append(list(r))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        wb.save(path)
        return Path(path)


@pytest.fixture
def build() -> TreeBuilder:
    return TreeBuilder()


@pytest.fixture(scope="module")
def synme_tiny():
    """SynME tiny's samples (labs tinyA and tinyB), from the default cache."""
    from hydra import compose, initialize_config_dir

    from mer.data.sources import load_samples
    from mer.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", "data.workers=0",
                                           "progress=false"])
    return load_samples(cfg.data, cfg.paths.cache_dir)


@pytest.fixture(scope="module")
def tiny_a(synme_tiny):
    """SynME tiny's colour database tinyA (4 subjects x 3 clips)."""
    return synme_tiny.subset(np.flatnonzero(synme_tiny.meta["database"].to_numpy() == "tinyA"))
