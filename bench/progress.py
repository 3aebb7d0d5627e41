"""Training progress on stderr: a rich bar on a terminal, plain periodic lines elsewhere, or nothing.

Ours (issue 14, item 5): a rich bar redraws one line in place, so in a CI log, under ``nohup`` or through
``2>&1 | tee`` it shows nothing useful until the end. When stderr is not a terminal, :class:`PlainProgress`
prints one line instead

    progress: arcface step 40/200, 5120 samples, loss 9.873, 412 img/s, ETA 0:00:50

every tenth of the run (:data:`LINES_PER_RUN`) or every ``FACEBENCH_PROGRESS_INTERVAL_S`` seconds
(default 30), whichever comes first, and after the last step. The loss is the newest ``train.jsonl``
window mean (``-`` before the first); img/s and the ETA use this process's steps so far (a resumed run
does not count the steps of the earlier process). ``--no-progress`` silences both kinds.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench.errors import ConfigError

#: Environment variable: seconds between plain progress lines at most (default :data:`DEFAULT_INTERVAL_S`).
INTERVAL_ENV = "FACEBENCH_PROGRESS_INTERVAL_S"
#: Ours: often enough that a stalled CI job shows signs of life, rarely enough to keep logs short.
DEFAULT_INTERVAL_S = 30.0
#: Plain lines per run from the step rule (one every ``ceil(total / LINES_PER_RUN)`` steps).
LINES_PER_RUN = 10


def interval_s() -> float:
    """The plain lines' time interval from :data:`INTERVAL_ENV` (a bad value is one ConfigError line)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also refuses nan
        raise ConfigError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


class PlainProgress:
    """Periodic one-line progress reports, with the part of rich's ``Progress`` interface the runner uses
    (``add_task``, ``update``, a context manager). One task at a time (the runner trains one method)."""

    def __init__(self, console: Console, batch_size: int, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.batch_size, self.interval, self.clock = console, batch_size, interval, clock
        self.fields: dict[str, Any] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        """Start reporting ``description`` (the method) over ``total`` steps, ``completed`` already done."""
        self.description, self.total = description.strip(), total
        self.first_step = self.step = completed
        self.every = max(1, math.ceil(total / LINES_PER_RUN))
        self.started = self.last_line = self.clock()
        self.fields = dict(fields)
        return 0

    def update(self, task: int, completed: int | None = None, **fields: Any) -> None:
        """Record new field values (``loss``); on a new step, print a line if one is due."""
        self.fields.update(fields)
        if completed is None or completed == self.step:
            return
        self.step = completed
        now = self.clock()
        if completed % self.every == 0 or completed >= self.total or now - self.last_line >= self.interval:
            self.last_line = now
            self.console.print(self.line(now), markup=False, highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        """``progress: <method> step S/T, N samples, loss L, R img/s, ETA h:mm:ss``."""
        done = self.step - self.first_step
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = datetime.timedelta(seconds=round((self.total - self.step) / rate)) if rate > 0 else "-"
        return (f"progress: {self.description} step {self.step}/{self.total}, {self.step * self.batch_size} "
                f"samples, loss {self.fields.get('loss', '-')}, {rate * self.batch_size:.0f} img/s, ETA {eta}")


class NoProgress:
    """Progress reporting turned off (``--no-progress``, or a rank other than 0)."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def rich_bar(console: Console) -> Progress:
    """The terminal bar: method, bar, steps, loss, img/s (of the last log window), elapsed, ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=False)


def training_progress(console: Console, show: bool, batch_size: int) -> Progress | PlainProgress | NoProgress:
    """Nothing unless ``show``; else rich's bar when ``console`` is a terminal, plain lines when not."""
    if not show:
        return NoProgress()
    if console.is_terminal:
        return rich_bar(console)
    return PlainProgress(console, batch_size, interval_s())
