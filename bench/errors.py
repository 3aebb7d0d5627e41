"""Errors a user can cause and fix: each prints as one line and exits with code 2 (STYLE.md, CLI).

:class:`methods.errors.ConfigError` (bad name or value) is raised by both packages; the harness adds
errors about files and directories here. Importing this module imports neither torch nor numpy, so the
CLI can print help and errors without them.
"""

from __future__ import annotations

from methods.errors import ConfigError, UnknownNameError


class BenchError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class DataError(BenchError):
    """A data file is missing, unreadable or corrupt; the message names the file and the problem."""


class ResultsDirError(BenchError):
    """The results directory cannot be created or written."""


#: Exceptions the CLI reports as one line with exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (BenchError, ConfigError)

__all__ = ["BenchError", "ConfigError", "DataError", "ResultsDirError", "UnknownNameError", "USER_ERRORS"]
