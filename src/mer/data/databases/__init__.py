"""Database readers (one file each), the flow-cache format and the registry by name.

See :mod:`mer.data.databases.registry` for ``read_database`` / ``read_intervals``.
"""

from mer.data.databases.common import DatabaseError
from mer.data.databases.registry import DATABASES, LONG_VIDEO, read_database, read_intervals

__all__ = ["DATABASES", "LONG_VIDEO", "DatabaseError", "read_database", "read_intervals"]
