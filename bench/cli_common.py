"""Pieces every ``bench`` sub-command shares: the stderr console, one-line error reporting, ``--set``.

Exit codes: 0 success, 1 a failed run or check, 2 a usage or configuration error, printed as one line
without a traceback (STYLE.md, CLI).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bench.errors import USER_ERRORS
from methods.registry import ConfigError

#: Progress, messages and errors go to stderr; stdout carries only results.
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def rank_tag() -> str:
    """``"rank R of W: "`` in a process of a torchrun launch with several ranks, else ``""``: every rank
    reports its own errors, and the line says which one speaks (other messages come from rank 0 only)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '?')} of {world_size}: " if world_size > 1 else ""


def one_line_errors(func: F) -> F:
    """Report user errors as ``error: <message>`` with exit code 2 (1 for a failed run)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            err.print(f"[red]error:[/] {rank_tag()}{escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except FloatingPointError as exc:
            err.print(f"[red]error:[/] {rank_tag()}training failed: {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict of dotted keys."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=0.05), got {pair!r}")
        out[key.strip()] = value.strip()
    return out
