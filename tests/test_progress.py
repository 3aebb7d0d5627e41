"""Training progress when stderr is not a terminal (issue 14, item 5): plain lines every tenth of the run or
every FACEBENCH_PROGRESS_INTERVAL_S seconds, the rich bar on a terminal, nothing with --no-progress."""

from __future__ import annotations

import io
import re
import subprocess

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from bench.cli import app
from bench.progress import INTERVAL_ENV, NoProgress, PlainProgress, training_progress
from tests.faults.fault_helpers import assert_one_error_line, hooked_bench_argv, hooked_env, snapshot


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plain(interval: float, total: int, completed: int = 0, batch_size: int = 8):
    out, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(Console(file=out, force_terminal=False, width=200), batch_size, interval, clock)
    task = bar.add_task("  arcface", total=total, completed=completed, loss="-", speed="-")
    return bar, task, clock, out


def _steps(bar, task, clock, steps, seconds_per_step, loss_at=None):
    for step in steps:
        clock.now += seconds_per_step
        if loss_at and step in loss_at:
            bar.update(task, loss=loss_at[step], speed="1")
        bar.update(task, completed=step)


def test_plain_lines_every_tenth_of_the_run_with_hand_computed_values():
    """100 steps of batch 8 at 0.5 s each, interval never reached: lines at steps 10, 20, ..., 100 only.
    At step 10: 80 samples, 2 steps/s = 16 img/s, 90 steps left = 45 s. Catches a wrong step rule, a
    line on every step, samples not scaled by the batch, a wrong rate or ETA, or a stale loss."""
    bar, task, clock, out = _plain(interval=1e9, total=100)
    _steps(bar, task, clock, range(1, 101), 0.5, loss_at={10: "9.123", 100: "4.500"})
    lines = out.getvalue().splitlines()
    assert [int(re.search(r"step (\d+)/100", line).group(1)) for line in lines] == list(range(10, 101, 10))
    assert lines[0] == "progress: arcface step 10/100, 80 samples, loss 9.123, 16 img/s, ETA 0:00:45"
    assert lines[-1] == "progress: arcface step 100/100, 800 samples, loss 4.500, 16 img/s, ETA 0:00:00"


def test_plain_lines_every_interval_when_steps_are_slow():
    """1000 steps (a line due every 100) at 0.4 s each with a 1 s interval: lines at steps 3, 6, 9 (1.2 s,
    2.4 s, 3.6 s). Catches the time rule missing (no line for a long stretch of a slow run) or measured
    from the start instead of from the previous line."""
    bar, task, clock, out = _plain(interval=1.0, total=1000)
    _steps(bar, task, clock, range(1, 11), 0.4)
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in out.getvalue().splitlines()]
    assert steps == [3, 6, 9]
    assert "loss -" in out.getvalue()  # no window closed yet


def test_plain_rate_of_a_resumed_run_counts_only_this_process():
    """Resumed at step 50 of 100, 10 steps at 1 s: 10 steps/s would be wrong (it counts the earlier
    process's steps); 1 step/s x batch 4 = 4 img/s, 40 s left. Catches a rate over all steps done."""
    bar, task, clock, out = _plain(interval=1e9, total=100, completed=50, batch_size=4)
    _steps(bar, task, clock, range(51, 61), 1.0)
    assert out.getvalue().splitlines() == ["progress: arcface step 60/100, 240 samples, loss -, 4 img/s, ETA 0:00:40"]


def test_terminal_gets_the_bar_and_no_progress_gets_nothing(monkeypatch):
    """Which reporter: the rich bar on a terminal, plain lines elsewhere, nothing when turned off (even on a
    terminal). Catches plain lines on a terminal, the bar in a log, or --no-progress ignored."""
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    log = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(training_progress(terminal, True, 8), Progress)
    plain = training_progress(log, True, 8)
    assert isinstance(plain, PlainProgress) and plain.interval == 30.0
    assert isinstance(training_progress(terminal, False, 8), NoProgress)
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert training_progress(log, True, 8).interval == 0.5


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_faults_bad_progress_interval_is_one_line_before_anything_is_written(tmp_path, monkeypatch, value):
    """A bad FACEBENCH_PROGRESS_INTERVAL_S: one ``error:`` line naming the variable, exit 2, and no results
    directory created. Catches the value read only once training starts (a traceback mid-run, after the
    run directory exists) or a negative/NaN interval accepted."""
    monkeypatch.setenv(INTERVAL_ENV, value)
    result = CliRunner().invoke(app, ["run", "--methods", "arcface", "--out", str(tmp_path / "results"),
                                      "--data-root", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert_one_error_line(result.output, INTERVAL_ENV, repr(value))
    assert not (tmp_path / "results").exists() and snapshot(tmp_path) == {}


@pytest.mark.slow
def test_bench_run_with_stderr_to_a_file_leaves_progress_lines(tmp_path):
    """``python -m bench run ... 2>log`` (stderr a file, not a terminal) with the interval set to 0: one plain
    line per step, 1..10 of 10, each with method, samples, loss, img/s and ETA; with --no-progress, none.
    Catches progress lost when stderr is not a terminal (a rich bar there prints nothing until the end),
    the env variable ignored, or --no-progress not silencing the plain lines."""
    args = ["run", "--methods", "arcface", "--backbone", "fault-linear", "--eval", "synth-lfw", "--budget", "320",
            "--batch-size", "32", "--device", "cpu", "--data-root", str(tmp_path / "data"),
            "--set", "data.synthface.num_identities=24", "--set", "data.synthface.images_per_identity=4",
            "--set", "train.embedding_size=16", "--set", "train.log_every=5"]
    env = hooked_env(tiny_eval=True, linear_backbone=True) | {INTERVAL_ENV: "0"}
    for flag, expected in (("--no-progress", []), ("--progress", list(range(1, 11)))):
        log = tmp_path / f"{flag}.log"
        with log.open("w") as stderr:
            proc = subprocess.run(hooked_bench_argv(*args, flag, "--out", str(tmp_path / flag)), stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, env=env, cwd=tmp_path, timeout=300)
        text = log.read_text()
        assert proc.returncode == 0, text
        lines = [line for line in text.splitlines() if line.startswith("progress:")]
        assert [int(re.search(r"step (\d+)/10,", line).group(1)) for line in lines] == expected, text
        pattern = r"progress: arcface step \d+/10, \d+ samples, loss (-|\d+\.\d{3}), \d+ img/s, ETA (-|\d+:\d\d:\d\d)$"
        assert all(re.fullmatch(pattern, line) for line in lines), lines
    # at step 5 the first log window closed: its loss is shown (not "-"), with 5 x 32 samples
    assert re.match(r"progress: arcface step 5/10, 160 samples, loss \d+\.\d{3},", lines[4]), lines
