"""Database readers by name: one call from a release folder to a sample table.

    from mer.data.databases import read_database, read_intervals

    table, excluded = read_database("samm", "/data/SAMM")
    table, excluded = read_database("casme2", root, sheet="/x/CASME2-coding.xlsx",
                                    on_error="skip")
    intervals, excluded = read_intervals("samm_lv", "/data/SAMM-LV")

``read_database(name, root, sheet=None, on_error="raise", **options)``:

- ``name``: one of :data:`DATABASES` (``casme2, samm, smic, casme_sq, casme3, samm_lv, mmew,
  fourdme, dfme``; each reader file registers itself).
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

from mer.data.databases.common import DatabaseError
from mer.registry import Registry

log = logging.getLogger(__name__)

Reader = Callable[..., tuple[pd.DataFrame, list[dict]]]
# Each reader file registers its reader (``@DATABASES.register("samm")``); the package's
# ``__init__`` imports the reader files, so importing this module finds them all.
DATABASES: Registry[Reader] = Registry("database", hint="data=<name>, conf/data/",
                                       error=DatabaseError)
LONG_VIDEO: Registry[Reader] = Registry("long-video database", error=DatabaseError)


def read_database(
    name: str, root: str | Path, sheet: str | Path | None = None, on_error: str = "raise",
    **options,
) -> tuple[pd.DataFrame, list[dict]]:
    """Sample table of database ``name`` under ``root`` and the samples excluded (module doc)."""
    reader = DATABASES.get(name)  # an unknown name: DatabaseError listing the databases
    options.setdefault("database", name)
    table, excluded = reader(Path(root), sheet, on_error=on_error, **options)
    if len(table) == 0:
        where = f"sheet {sheet}" if sheet else f"the annotation sheet under {root}"
        if excluded:  # on_error=skip: returned as asked, but said
            log.warning("%s: every row of %s was excluded (%d rows; the first: %s)",
                        name, where, len(excluded), excluded[0])
            return table, excluded
        raise DatabaseError(f"{name}: {where} has a header but no sample rows; list one clip "
                            "per row (see README, Data) or point data.root/data.sheet elsewhere")
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
    return LONG_VIDEO.get(name)(Path(root), sheet, on_error=on_error, **options)
