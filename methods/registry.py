"""Name registries shared by methods, backbones, datasets, splits and protocols.

Registration happens with a decorator where a thing is defined (as timm does), so adding a method
touches one file. Unlike timm, a duplicate name is an error, and an unknown name is answered with the
list of valid ones, so a typo on the command line fails with one readable line.

This module lives in ``methods`` (which imports only torch and itself) so that both ``methods`` and
the ``bench`` harness can use it without breaking the one-way dependency rule. It imports nothing heavy;
:class:`ConfigError` and :class:`UnknownNameError` (in :mod:`methods.errors`) are re-exported here.

A registry may be given ``populate``, a function that imports the modules whose decorators fill it. It runs
once, at the first lookup (ours: the method registry fills itself when first asked, so nobody has to import
every method module, and torch, up front; issue 14, item 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from methods.errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names (and aliases) to registered objects of one kind."""

    def __init__(self, kind: str, *, populate: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._populate = populate

    def _ensure_populated(self) -> None:
        """Run ``populate`` once, before the first lookup. It is cleared before it runs, so lookups made
        while the modules import do not recurse; restored if it fails, so the next lookup retries."""
        populate, self._populate = self._populate, None
        if populate is None:
            return
        done = False
        try:
            populate()
            done = True
        finally:
            if not done:
                self._populate = populate

    @overload
    def register(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T: ...

    @overload
    def register(self, name: str, obj: None = None, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]: ...

    def register(self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = ()):
        """Register ``obj`` under ``name`` (and ``aliases``); usable as a decorator when ``obj`` is omitted."""

        def add(target: T) -> T:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[name] = target
            for alias in aliases:
                self._aliases[alias] = name
            return target

        return add if obj is None else add(obj)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases."""
        self._ensure_populated()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(self.kind, name, self.names())

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        self._ensure_populated()
        return sorted(self._entries)

    def aliases_of(self, name: str) -> list[str]:
        self._ensure_populated()
        return sorted(alias for alias, target in self._aliases.items() if target == name)

    def __contains__(self, name: object) -> bool:
        self._ensure_populated()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_populated()
        return len(self._entries)


__all__ = ["ConfigError", "Registry", "UnknownNameError"]
