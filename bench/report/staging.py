"""All-or-nothing writing of a report's files (``bench report``).

A report is a set of files that refer to each other (``results.md`` embeds ``figures/*.png``). Each
file alone is written atomically (:func:`bench.records.atomic_write_with`: temporary file, fsync,
rename), but a disk that fills up half-way through the set would still leave a mixture of new and old
files. So every file is first written in full to a *staged* name beside its final one; only when all of
them are on disk are they renamed into place (a rename needs no free space). If any write fails, the
staged files are removed and the previous report is left exactly as it was (ours: issue 13).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from bench.errors import BenchError
from bench.records import atomic_write_with


class ReportWriteError(BenchError):
    """A report file could not be written; the previous report is unchanged."""


class StagedFiles:
    """Stage files with :meth:`write`; the ``with`` block's clean exit renames them all into place, an
    exception removes them all.

    >>> with StagedFiles(out_dir) as files:            # doctest: +SKIP
    ...     files.write(out_dir / "results.md", lambda handle: handle.write(b"# report"))
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._staged: list[tuple[Path, Path]] = []  # (staged name, final name)

    def __enter__(self) -> StagedFiles:
        return self

    def write(self, path: Path, write: Callable[[BinaryIO], Any]) -> Path:
        """Write ``path``'s new content (``write(handle)``) to its staged name; returns ``path``."""
        path = Path(path)
        staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.staged")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(staged, write)
        except OSError as exc:
            raise self._error(path, exc) from None
        self._staged.append((staged, path))
        return path

    def write_text(self, path: Path, text: str) -> Path:
        return self.write(path, lambda handle: handle.write(text.encode("utf-8")))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            self.discard()
            return
        renamed = 0
        try:
            for staged, final in self._staged:
                os.replace(staged, final)
                renamed += 1
        except OSError as error:
            # a rename within a directory needs no space, so this is rare; say what is left
            state = "unchanged" if renamed == 0 else f"partly updated ({renamed} of {len(self._staged)} files)"
            self.discard()
            raise self._error(final, error, state) from None
        self._staged.clear()

    def discard(self) -> None:
        """Remove every staged file that is still there."""
        for staged, _ in self._staged:
            staged.unlink(missing_ok=True)
        self._staged.clear()

    def _error(self, path: Path, exc: OSError, state: str = "unchanged") -> ReportWriteError:
        return ReportWriteError(f"cannot write the report file {path}: {exc.strerror or exc}; the previous "
                                f"report in {self.out_dir} is {state}")
