"""What the entry points (``mer.run``, ``mer.prepare``, ``mer.collect``, ``mer.privacy.keys``)
show a user when mer refuses their input.

mer's own exceptions (every class defined in the ``mer`` package: ``DatabaseError``,
``ConfigError``, ``CorruptFileError``, ``WriteError``...) already name the file, row, key or
client and the fix: they are printed as one ``mer: <message>`` block on stderr and the process
exits with status 2, without a stack trace. Anything else is a bug and keeps its traceback.
``MER_TRACEBACK=1`` shows the trace of mer's errors too.

Imports nothing of mer: every layer may use it.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

USER_ERROR_STATUS = 2


def _package(module: str) -> str:
    """The top package of ``module``; an entry point run with ``python -m mer.x`` defines its
    classes in ``__main__``, whose spec still names ``mer.x``."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None) or module
    return module.split(".")[0]


def is_user_error(exc: BaseException) -> bool:
    """True for an exception class mer defines (its message is written for the user)."""
    return any(_package(c.__module__) == "mer" for c in type(exc).__mro__
               if c not in (BaseException, Exception))


def user_errors_exit(func: F) -> F:
    """Decorator for an entry point: mer's own errors become ``mer: <message>`` on stderr and
    exit status 2; other exceptions propagate unchanged."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted into mer's and the rest just below
            if not is_user_error(e) or os.environ.get("MER_TRACEBACK") == "1":
                raise
            print(f"mer: {e}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_STATUS)

    return wrapper  # type: ignore[return-value]
