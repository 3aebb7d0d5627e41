"""Errors a user can cause in ``methods`` (a bad name or value), importable without torch.

Ours: these lived in :mod:`methods.registry`, which sits in a package whose ``__init__`` imported every
method (and torch); here they import nothing, so the ``bench`` CLI can name them while printing its help
(issue 14, item 5). :mod:`methods.registry` and :mod:`bench.errors` re-export them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad name or value supplied by a user (command line, YAML preset, method parameters).

    The message is one line and names the problem; the CLI prints it and exits with code 2.
    """


class UnknownNameError(ConfigError):
    """A name that is not in a registry."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} '{name}'; valid: {', '.join(valid) or '(none registered)'}")


__all__ = ["ConfigError", "UnknownNameError"]
