"""The ``bench`` command line (typer). Commands stay thin: parse, build the config, call library code.

Progress and messages go to stderr (rich); stdout carries only results (tables, listings), so it can be
piped. Exit codes: 0 success, 1 a failed run (e.g. a non-finite loss), 2 a usage or configuration error,
printed as one line without a traceback.
"""

from __future__ import annotations

import sys

import typer

from bench.cli.common import OneLineUsageErrors

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FaceBench: train and evaluate face-recognition methods on equal terms.")


def _register_commands() -> None:
    """Attach every sub-command; each module imports its heavy dependencies inside the command."""
    from bench.cli.data import app as data_app
    from bench.cli.eval import eval_command
    from bench.cli.invert import invert_command
    from bench.cli.listing import list_command
    from bench.cli.report import baseline_app, check_command, profile_command, report_command
    from bench.cli.reproduce import reproduce_command
    from bench.cli.run import run_command

    app.command("run")(run_command)
    app.command("list")(list_command)
    app.add_typer(data_app, name="data")
    app.command("eval")(eval_command)
    app.command("invert")(invert_command)
    app.command("reproduce")(reproduce_command)
    app.command("report")(report_command)
    app.command("profile")(profile_command)
    app.command("check")(check_command)
    app.add_typer(baseline_app, name="baseline")


_register_commands()


def main() -> None:
    app(prog_name="bench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
