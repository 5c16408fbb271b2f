"""One way from a config name to a thing: a small generic registry used by every package.

Models, databases, label schemes, spotters, federated rules, privacy modes, server optimisers,
attacks, flow methods, protocols... each kind keeps one :class:`Registry`; the thing registers
itself where it is defined (timm's pattern), and its package's ``__init__`` imports the files,
so that importing the package fills the registry::

    MODELS = Registry("model", hint="conf/model/<name>.yaml")

    @MODELS.register("ststnet")
    class STSTNet(nn.Module): ...

    MODELS.get("ststnet")      # the class; an unknown name raises, listing the choices
    MODELS.names()             # ['ststnet', ...], sorted

``mer.config_check`` reads ``names()`` for its choices, so a config and the code cannot drift.
Imports nothing of mer: every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that no entry of a registry has; the message lists the registered names.

    A ``KeyError`` (a failed look-up) and a ``ValueError`` (a bad config value) both."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """``name -> thing`` for one kind of thing.

    Args:
        kind: what the things are, in words ("model", "database"): used in errors.
        hint: where a name comes from, added to the error (e.g. ``conf/model/<name>.yaml``).
        error: the exception class an unknown name raises (default :class:`UnknownNameError`;
            a package may pass its own, e.g. ``DatabaseError``).
    """

    def __init__(self, kind: str, hint: str = "",
                 error: type[Exception] = UnknownNameError) -> None:
        self.kind = kind
        self.hint = hint
        self.error = error
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, thing: T) -> T: ...

    def register(self, name: str, thing: T | None = None):
        """Add ``thing`` under ``name``: ``@REG.register("name")`` on a class or function, or
        ``REG.register("name", thing)``. The same name for another thing is refused."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, "
                             f"got {name!r}")

        def add(obj: T) -> T:
            held = self._items.get(name)
            if held is not None and held is not obj and _where(held) != _where(obj):
                raise ValueError(f"{self.kind} name '{name}' is already registered by "
                                 f"{_where(held)}; pick another name for {_where(obj)}")
            self._items[name] = obj
            return obj

        return add if thing is None else add(thing)

    def get(self, name: str) -> T:
        """The thing registered as ``name``; an unknown name raises ``self.error`` naming it
        and listing every registered name."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" from a config
            pass
        hint = f" ({self.hint})" if self.hint else ""
        raise self.error(f"unknown {self.kind} '{name}': use one of {self.names()}{hint}")

    __getitem__ = get

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, thing)`` pairs, sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.names()})"


def _where(obj: object) -> str:
    """``module.qualname`` of a registered thing (a module re-imported under another name,
    e.g. as ``__main__``, registers the same definition again: that is allowed)."""
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module.split('.')[-1]}.{name}"
