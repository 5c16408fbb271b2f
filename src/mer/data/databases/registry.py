"""Database readers by name: one call from a release folder to a sample table.

    from mer.data.databases import read_database, read_intervals

    table, excluded = read_database("samm", "/data/SAMM")
    table, excluded = read_database("casme2", root, sheet="/x/CASME2-coding.xlsx",
                                    on_error="skip")
    intervals, excluded = read_intervals("samm_lv", "/data/SAMM-LV")

``read_database(name, root, sheet=None, on_error="raise", **options)``:

- ``name``: one of :data:`DATABASES` (``casme2, samm, smic, casme_sq, casme3, samm_lv, mmew,
  fourdme, dfme``).
- ``root``: the release folder (each reader's docstring shows the layout it expects; the
  folder above the release's top folder works too).
- ``sheet``: the annotation sheet, when it is not in ``root`` under its release name.
- ``on_error``: ``raise`` -> a :class:`DatabaseError` naming the sheet, the row and the fix at
  the first bad sample; ``skip`` -> bad samples are left out and listed in ``excluded``.
  Bad: a frame cell that is no whole number >= 0 (``46.5``, ``inf``, ``-7``; blank, ``/`` and
  -1 mean "not annotated"), frames out of order or outside those on disk, a subject or clip
  that is no folder name, an AU number outside FACS 1..99, an objective class outside I..VII,
  an unknown emotion, a duplicate (``mer.data.databases.common.collect_samples``).
- ``options`` go to the reader: ``database`` (the name written into the table; default
  ``name``), ``emotions`` (the emotion words accepted), ``check_images`` (open the onset and
  apex images; default True), ``types`` (long videos: which expressions become samples,
  default ``("micro",)``), ``micro_sheet`` (SAMM-LV: SAMM's micro sheet for emotions),
  ``parts`` (DFME: which of train / testA / testB).

Returns ``(table, excluded)``: the sample table (``mer.data.samples.SAMPLE_COLUMNS``; apex -1
where the database has none, e.g. SMIC) and ``[{"database", "subject", "clip", "reason"}]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mer.data.databases.casme2 import EMOTIONS as CASME2_EMOTIONS
from mer.data.databases.casme2 import read_casme2
from mer.data.databases.casme3 import read_casme3
from mer.data.databases.casme_sq import read_casme_sq, read_casme_sq_intervals
from mer.data.databases.common import DatabaseError
from mer.data.databases.dfme import read_dfme
from mer.data.databases.fourdme import read_fourdme
from mer.data.databases.mmew import read_mmew
from mer.data.databases.samm import read_samm
from mer.data.databases.samm_lv import read_samm_lv, read_samm_lv_intervals
from mer.data.databases.smic import read_smic

log = logging.getLogger(__name__)


def _casme2(root, sheet=None, **options):
    # the real CASME II: its own emotion words only (SynME calls read_casme2 directly)
    options.setdefault("emotions", CASME2_EMOTIONS)
    return read_casme2(root, sheet, **options)


DATABASES: dict[str, Callable[..., tuple[pd.DataFrame, list[dict]]]] = {
    "casme2": _casme2,
    "samm": read_samm,
    "smic": read_smic,
    "casme_sq": read_casme_sq,
    "casme3": read_casme3,
    "samm_lv": read_samm_lv,
    "mmew": read_mmew,
    "fourdme": read_fourdme,
    "dfme": read_dfme,
}
LONG_VIDEO: dict[str, Callable[..., tuple[pd.DataFrame, list[dict]]]] = {
    "casme_sq": read_casme_sq_intervals,
    "samm_lv": read_samm_lv_intervals,
}


def read_database(
    name: str, root: str | Path, sheet: str | Path | None = None, on_error: str = "raise",
    **options,
) -> tuple[pd.DataFrame, list[dict]]:
    """Sample table of database ``name`` under ``root`` and the samples excluded (module doc)."""
    if name not in DATABASES:
        raise DatabaseError(f"unknown database '{name}': use one of {sorted(DATABASES)}")
    options.setdefault("database", name)
    table, excluded = DATABASES[name](Path(root), sheet, on_error=on_error, **options)
    unknown = [f"row {row}: {', '.join(map(repr, toks))}"
               for row, toks in zip(table["row"], table["au_unknown"]) if toks]
    if unknown:  # kept in au_raw / au_unknown; said here so that nobody is surprised
        log.warning("%s: AU tokens that are not AUs: %s", name, "; ".join(unknown))
    return table, excluded


def read_intervals(
    name: str, root: str | Path, sheet: str | Path | None = None, on_error: str = "raise",
    **options,
) -> tuple[pd.DataFrame, list[dict]]:
    """Interval table (``mer.data.samples.INTERVAL_COLUMNS``) of a long-video database."""
    if name not in LONG_VIDEO:
        raise DatabaseError(f"'{name}' has no long videos: use one of {sorted(LONG_VIDEO)}")
    options.setdefault("database", name)
    return LONG_VIDEO[name](Path(root), sheet, on_error=on_error, **options)
