"""Pieces every ``bench`` sub-command shares: the stderr console, one-line error reporting, ``--set``, and
the options several commands take (``--progress``, ``--device``, ``--data-root``, ``--results``, a run's
``--out``), declared once here as ``Annotated`` types so their flags and help cannot drift apart. Their
help states the default (``show_default=False``): where a command passes ``None`` the preset decides.

This module imports typer and rich only (no torch, numpy or pandas): ``bench --help`` loads it.

Exit codes: 0 success, 1 a failed run or check, 2 a usage or configuration error, printed as one line
without a traceback (STYLE.md, CLI). That holds for errors typer finds while parsing (a flag value of the
wrong type, an unknown option, a missing argument: :class:`OneLineUsageErrors`) as for those the commands
raise (:func:`one_line_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from bench.errors import USER_ERRORS, ConfigError

#: Progress, messages and errors go to stderr; stdout carries only results.
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def rank_tag() -> str:
    """``"rank R of W: "`` in a process of a torchrun launch with several ranks, else ``""``: every rank
    reports its own errors, and the line says which one speaks (other messages come from rank 0 only)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '?')} of {world_size}: " if world_size > 1 else ""


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on one line (newlines in ``message`` become ``; ``)."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    err.print(f"[red]error:[/] {rank_tag()}{escape(text)}", highlight=False, soft_wrap=True)


def one_line_errors(func: F) -> F:
    """Report user errors as ``error: <message>`` with exit code 2 (1 for a failed run)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None
        except FloatingPointError as exc:
            print_error(f"training failed: {exc}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _usage_error_type() -> type[Exception]:
    """The base class of typer's parsing errors: ``typer.TyperException`` where typer vendors click (0.2x
    and later), else click's ``ClickException``."""
    if hasattr(typer, "TyperException"):
        return typer.TyperException
    import click  # pragma: no cover - older typer

    return click.ClickException  # pragma: no cover


@contextlib.contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    """Turn a parsing error into ``error: <command>: <message> (see '<command> --help')`` and its exit
    code (2 for usage errors).

    A bare command's help (``NoArgsIsHelpError``, recognised by name as typer's own error printer does) is
    passed on untouched, as is ``--help``, which is no error.
    """
    try:
        yield
    except _usage_error_type() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message()
        print_error(f"{ctx.command_path}: {message} (see '{ctx.command_path} --help')" if ctx is not None else message)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


class OneLineUsageErrors(TyperGroup):
    """The ``bench`` command group: a bad flag value, an unknown option or a missing argument of any
    sub-command prints one line ``error: ...`` and exits 2, like every user error, instead of typer's
    multi-line usage box (STYLE.md, CLI). Sub-commands are parsed inside the group's :meth:`invoke`, so
    wrapping it and :meth:`make_context` (the group's own options and command name) covers them all."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().invoke(ctx)

    def get_help_option(self, ctx: Any) -> Any:
        """The group's ``--help``, defaulting to ``False`` rather than ``None``. Ours: typer coerces a
        parameter's value through pydantic unless it is a bool already, so an unset ``None`` imported
        pydantic (about 0.1 s) for every sub-command, ``bench run --help`` included (issue 14, item 5)."""
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict of dotted keys."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=0.05), got {pair!r}")
        out[key.strip()] = value.strip()
    return out


#: ``--progress/--no-progress`` (bench run, eval, data pack/inspect/verify).
ProgressOption = Annotated[bool, typer.Option(
    "--progress/--no-progress",
    help="Report progress on stderr: bars on a terminal; bench run writes plain lines when stderr is not one.")]

#: ``--device`` (bench run, eval, profile); ``None`` leaves it to the preset.
DeviceOption = Annotated[Optional[str], typer.Option(
    "--device", help="auto (CUDA if available), cpu, cuda or cuda:N. Default: auto.", show_default=False)]

#: ``--data-root`` (bench run, eval, data verify); ``None``: the config's default.
DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Data root: generated data and split files are cached there, real data under it "
                        "(e.g. <root>/eval/). Default: $FACEBENCH_DATA_ROOT or ./datasets.", show_default=False)]

#: ``--results`` (bench report, check, baseline save): the directory of run records read.
ResultsOption = Annotated[Path, typer.Option("--results", help="Directory of run records.")]

#: ``--out`` of the commands that write a run record (bench run, profile).
RunsOutOption = Annotated[Optional[Path], typer.Option(
    "--out", help="Results directory; each run writes OUT/<run-id>/. Default: results.", show_default=False)]
