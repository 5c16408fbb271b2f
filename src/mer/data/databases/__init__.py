"""Database readers (one file each), the flow-cache format and the registry by name.

Each reader file registers its reader with :data:`DATABASES` (and a long-video one with
:data:`LONG_VIDEO`); importing this package imports them all. A new database: one reader file,
one line here, one ``conf/data/<name>.yaml``. See :mod:`mer.data.databases.registry` for
``read_database`` / ``read_intervals``.
"""

from mer.data.databases import (  # noqa: F401 (imported for their registrations)
    casme2,
    casme3,
    casme_sq,
    dfme,
    fourdme,
    mmew,
    samm,
    samm_lv,
    smic,
)
from mer.data.databases.common import DatabaseError
from mer.data.databases.registry import DATABASES, LONG_VIDEO, read_database, read_intervals

__all__ = ["DATABASES", "LONG_VIDEO", "DatabaseError", "read_database", "read_intervals"]
