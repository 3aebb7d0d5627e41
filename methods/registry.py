"""Name registries shared by methods, backbones, datasets, splits and protocols.

Registration happens with a decorator where a thing is defined (as timm does), so adding a method
touches one file. Unlike timm, a duplicate name is an error, and an unknown name is answered with the
list of valid ones, so a typo on the command line fails with one readable line.

This module lives in ``methods`` (which imports only torch and itself) so that both ``methods`` and
the ``bench`` harness can use it without breaking the one-way dependency rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad name or value supplied by a user (command line, YAML preset, method parameters).

    The message is one line and names the problem; the CLI prints it and exits with code 2.
    """


class UnknownNameError(ConfigError):
    """A name that is not in a registry."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} '{name}'; valid: {', '.join(valid) or '(none registered)'}")


class Registry(Generic[T]):
    """A mapping from names (and aliases) to registered objects of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

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
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(self.kind, name, self.names())

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(alias for alias, target in self._aliases.items() if target == name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
