"""The building blocks of mer's config checks: the error (:class:`ConfigError`), what a value
must be (:class:`Check` and its kinds), a :class:`Rule` tying a dotted key to a check, and the
ranges several packages share.

:mod:`mer.config_check` holds the table of every key and the rules between keys; a package
with its own keys keeps their rules beside its code (``mer.spotting.checks``...) built from
these blocks, and ``mer.config_check`` joins them. This module imports nothing of mer, so that
a package's checks never import ``mer.config_check`` (which imports them), and a package that
raises :class:`ConfigError` imports no config table: no import circle. ``mer.config_check``
re-exports every name here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config with one or more bad values; ``problems`` lists each (key, value, fix)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n > 1 else ''} in the config:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


# -- checks -----------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _fmt(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class Check:
    """Base: ``ok(value)`` and a phrase for the message (``must be ...``)."""

    null: bool = False       # None allowed (the code then uses its default)
    words: tuple = ()        # extra allowed strings, e.g. ("auto",)

    def ok(self, v: Any) -> bool:
        return (v is None and self.null) or (isinstance(v, str) and v in self.words) \
            or (v is not None and self._ok(v))

    def _ok(self, v: Any) -> bool:
        raise NotImplementedError

    def _what(self) -> str:
        raise NotImplementedError

    def what(self) -> str:
        extra = [f"'{w}'" for w in self.words] + (["null"] if self.null else [])
        return self._what() + "".join(f" or {e}" for e in extra)

    def example(self) -> str:
        return self.words[0] if self.words else "..."


@dataclass(frozen=True)
class Num(Check):
    """A finite number (``integer``: an int) within ``lo``/``hi``; ``open_lo``/``open_hi``
    exclude the bound."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    integer: bool = False
    eg: Any = None

    def _ok(self, v: Any) -> bool:
        if not (_is_int(v) if self.integer else _is_num(v)):
            return False
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)

    def _what(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return (f"{kind} in {'(' if self.open_lo else '['}{_fmt(self.lo)}, "
                    f"{_fmt(self.hi)}{')' if self.open_hi else ']'}")
        if self.lo is not None:
            return f"{kind} {'>' if self.open_lo else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.open_hi else '<='} {_fmt(self.hi)}"
        return kind

    def example(self) -> str:
        if self.eg is not None:
            return _fmt(self.eg)
        if self.lo is None:
            return "0"
        if self.hi is not None and (self.open_lo or self.open_hi):
            return _fmt(round((self.lo + self.hi) / 2, 3))
        return _fmt(self.lo + (1 if self.open_lo else 0))


def Int(lo: int | None = None, hi: int | None = None, **kw: Any) -> Num:  # noqa: N802
    """An integer within [lo, hi]."""
    return Num(lo=lo, hi=hi, integer=True, **kw)


def Prob(open_lo: bool = False, open_hi: bool = False, **kw: Any) -> Num:  # noqa: N802
    """A probability or fraction in [0, 1] (bounds opened as asked)."""
    return Num(lo=0, hi=1, open_lo=open_lo, open_hi=open_hi, **kw)


@dataclass(frozen=True)
class OneOf(Check):
    """One of ``choices`` (a tuple, or a function returning them: read from the code)."""

    choices: tuple | Callable[[], Sequence[str]] = ()

    def options(self) -> list:
        c = self.choices() if callable(self.choices) else self.choices
        return list(c)

    def _ok(self, v: Any) -> bool:
        return any(v == c and type(v) is type(c) for c in self.options())

    def _what(self) -> str:
        return "one of " + ", ".join(_fmt(c) for c in self.options())

    def example(self) -> str:
        return _fmt(self.options()[0])


@dataclass(frozen=True)
class Bool(Check):
    def _ok(self, v: Any) -> bool:
        return isinstance(v, bool)

    def _what(self) -> str:
        return "true or false"

    def example(self) -> str:
        return "true"


@dataclass(frozen=True)
class Text(Check):
    """A non-empty string (a name, a path)."""

    def _ok(self, v: Any) -> bool:
        return isinstance(v, str) and bool(v.strip())

    def _what(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class ListOf(Check):
    """A list whose items all pass ``item``, with at least ``min_len`` items."""

    item: Check = Text()
    min_len: int = 0

    def _ok(self, v: Any) -> bool:
        return isinstance(v, list) and len(v) >= self.min_len and all(self.item.ok(x) for x in v)

    def _what(self) -> str:
        return (f"a list of {'at least ' + str(self.min_len) + ' ' if self.min_len else ''}"
                f"items, each {self.item.what()}")

    def example(self) -> str:
        return f"[{self.item.example()}]"


@dataclass(frozen=True)
class Mapping(Check):
    """A mapping (``{key: value}``)."""

    def _ok(self, v: Any) -> bool:
        return isinstance(v, dict)

    def _what(self) -> str:
        return "a mapping {key: value}"

    def example(self) -> str:
        return "{}"


@dataclass(frozen=True)
class Either(Check):
    """Passes any of ``options``."""

    options: tuple = ()

    def _ok(self, v: Any) -> bool:
        return any(o.ok(v) for o in self.options)

    def _what(self) -> str:
        return " or ".join(o.what() for o in self.options)

    def example(self) -> str:
        return self.options[0].example()


@dataclass(frozen=True)
class Rule:
    """``key`` (dotted, ``*`` for one level) must pass ``check``; ``note`` says what it is."""

    key: str
    check: Check
    note: str = ""


# -- ranges several packages use -----------------------------------------------------------

POS_INT, COUNT = Int(1), Int(0)
SIZE = Int(1)
LR = Num(lo=0, open_lo=True, eg=1e-3)
DROPOUT = Prob(open_hi=True, eg=0.5)
WORKERS_AUTO = Int(1, words=("auto",))


def problem_text(key: str, value: Any, check: Check, note: str = "") -> str:
    """One problem line: ``key=value: must be <what>; e.g. key=<example>``."""
    shown = _fmt(value) if not isinstance(value, str) else repr(value) if value == "" else value
    why = f" ({note})" if note else ""
    return f"{key}={shown}: must be {check.what()}{why}; e.g. {key}={check.example()}"
