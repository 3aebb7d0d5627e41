"""Faults in what `bench report`, `bench baseline save` and `bench check` read, and a full disk under
`bench report` (issue 13).

A broken file in one complete run record (metrics.json truncated, binary, a JSON list; config.yaml not
YAML; perf.json truncated; train.jsonl with a torn line) must cost that run only: each command skips it
with exactly one ``warning:`` line naming the file and why, and reports the good runs. The broken run is
chosen so that reading it would change every answer (arcface seed 1 at 20 % accuracy and 10 img/s next
to seed 0 at 80 % and 1000 img/s): a report that still shows ``n = 1`` and 80.00 %, a baseline whose
arcface entry is seed 0's, and a check that passes prove it was left out, not misread. When every
record is broken, or the baseline cannot be read, the commands stop with one ``error:`` line and exit 2,
which ``bench check`` keeps apart from a regression (exit 1); so does a baseline that cannot be written.
Every test snapshots the results directory (and the previous report or baseline) and proves nothing in it
changed.

A full disk under `bench report` is real (a small tmpfs, :func:`run_on_small_fs`): the previous report
(Markdown, LaTeX, PNG and PDF figures) stays byte for byte, no staged file is left behind, and the command
prints one error line. An in-process twin injects the failure at the third file, so the all-or-nothing
property is also checked where tmpfs cannot be mounted.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from collections.abc import Callable

import pytest
from typer.testing import CliRunner, Result

from bench.cli import app
from tests.faults.fault_helpers import (
    assert_one_error_line,
    assert_one_warning_line,
    assert_preserved,
    bench_argv,
    run_on_small_fs,
    small_fs_available,
    snapshot,
)
from tests.report_records import write_record

runner = CliRunner()

GOOD = [("20260101-000000-arcface-s0-aaaa", "arcface", 0, 0.80),
        ("20260101-000001-cosface-s0-bbbb", "cosface", 0, 0.78)]
#: Newest arcface run, seed 1: if it were read, arcface's row would be the mean of 80 % and 20 %.
BROKEN_RUN = "20260101-000002-arcface-s1-cccc"


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _tear_last_line(data: bytes) -> bytes:
    return data.rstrip(b"\n")[:-5]  # a crash in the middle of the last appended line


#: kind -> (file, how its bytes are broken, a fragment of the reason the warning must give)
CORRUPTIONS: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "metrics-truncated": ("metrics.json", _truncate, "not valid JSON"),
    "metrics-binary": ("metrics.json", lambda _: b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not UTF-8 text"),
    "metrics-list": ("metrics.json", lambda _: b"[0.2, 0.1]", "holds a list, expected a mapping"),
    "config-not-yaml": ("config.yaml", lambda _: b"method: [arcface\ntrain: {seed: 1\n", "not valid YAML"),
    "perf-truncated": ("perf.json", _truncate, "not valid JSON"),
    "train-torn-line": ("train.jsonl", _tear_last_line, "line 4: not valid JSON"),
}


def _write_good(results: Path) -> None:
    for name, method, seed, accuracy in GOOD:
        write_record(results, name, method, seed, accuracy, 0.5)


def _corrupt(record: Path, kind: str) -> Path:
    name, breaks, _ = CORRUPTIONS[kind]
    path = record / name
    path.write_bytes(breaks(path.read_bytes()))
    return path


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    """A baseline saved from the two good runs alone, before anything is broken."""
    results = tmp_path / "good"
    _write_good(results)
    out = tmp_path / "baseline.json"
    saved = runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out)])
    assert saved.exit_code == 0, saved.output
    return out


def _results_with_broken_run(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    results = tmp_path / "results"
    _write_good(results)
    broken = write_record(results, BROKEN_RUN, "arcface", 1, 0.20, 0.05, img_s=10.0, peak_mib=9000.0)
    return results, _corrupt(broken, kind)


def _invoke(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_faults_broken_record_is_skipped_by_report(tmp_path: Path, kind: str) -> None:
    """Catches: a broken record crashing `bench report` (traceback, no report), being read into the table
    (arcface n = 2, 50 %), or being skipped silently or with more than one line."""
    results, broken = _results_with_broken_run(tmp_path, kind)
    before = snapshot(results)
    result = _invoke("report", "--results", str(results), "--out", str(tmp_path / "reports"), "--no-figures")
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(broken), CORRUPTIONS[kind][2])
    table = (tmp_path / "reports" / "results.md").read_text()
    arcface = next(line for line in table.splitlines() if "| arcface " in line)
    assert "| 1 " in arcface and "80.00 ± 1.00" in arcface  # seed 0 alone (its fold std is 1.00)
    assert "| cosface " in table
    assert_preserved(before, results)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_faults_broken_record_is_skipped_by_baseline_save(tmp_path: Path, kind: str) -> None:
    """Catches: `bench baseline save` crashing on a broken record, or saving it (arcface's entry would hold
    seed 1's run id and a 50 % mean)."""
    results, broken = _results_with_broken_run(tmp_path, kind)
    before = snapshot(results)
    out = tmp_path / "saved.json"
    result = _invoke("baseline", "save", "--results", str(results), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(broken), CORRUPTIONS[kind][2])
    entries = {e["key"]["method"]: e for e in json.loads(out.read_text())["entries"]}
    assert entries["arcface"]["run_ids"] == [GOOD[0][0]] and entries["arcface"]["metrics"]["synth-lfw acc"] == 0.80
    assert set(entries) == {"arcface", "cosface"}
    assert_preserved(before, results)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_faults_broken_record_is_skipped_by_check(tmp_path: Path, baseline: Path, kind: str) -> None:
    """Catches: `bench check` crashing on a broken record, or counting it (arcface would drop 30 pp and
    1000 -> 505 img/s: exit 1)."""
    results, broken = _results_with_broken_run(tmp_path, kind)
    before, baseline_before = snapshot(results), baseline.read_bytes()
    result = _invoke("check", "--baseline", str(baseline), "--results", str(results))
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(broken), CORRUPTIONS[kind][2])
    assert "REGRESSED" not in result.stdout and "OK: 10 values within tolerance" in result.stderr
    assert_preserved(before, results)
    assert baseline.read_bytes() == baseline_before


def test_faults_broken_record_warns_once_in_a_report_with_figures(tmp_path: Path) -> None:
    """Catches: the figures (or the profile table) reading the records a second time, which would print the
    warning again, or drawing the broken run (a training curve with n=2)."""
    results, broken = _results_with_broken_run(tmp_path, "metrics-truncated")
    before = snapshot(results)
    result = _invoke("report", "--results", str(results), "--out", str(tmp_path / "reports"))
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(broken))
    assert (tmp_path / "reports" / "figures" / "training-synthface-shallow-small-1000.png").is_file()
    assert "n=2" not in (tmp_path / "reports" / "results.md").read_text()
    assert_preserved(before, results)


def test_faults_regression_next_to_a_broken_record_still_fails_with_exit_1(tmp_path: Path, baseline: Path) -> None:
    """Catches: a broken record turning a real regression into exit 2 (or 0): cosface drops 78 -> 70 %."""
    results, broken = _results_with_broken_run(tmp_path, "metrics-list")
    write_record(results, "20260101-000003-cosface-s0-dddd", "cosface", 0, 0.70, 0.5)
    result = _invoke("check", "--baseline", str(baseline), "--results", str(results))
    assert result.exit_code == 1, result.output
    assert_one_warning_line(result.stderr, str(broken))
    assert "error:" not in result.output and "FAIL: 1 of 10 values regressed" in result.stderr


def _all_broken(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    _write_good(results)
    for (name, *_), kind in zip(GOOD, ("metrics-binary", "perf-truncated")):
        _corrupt(results / name, kind)
    return results


@pytest.mark.parametrize("command", ["report", "baseline", "check"])
def test_faults_every_record_broken_is_exit_2(tmp_path: Path, baseline: Path, command: str) -> None:
    """Catches: unreadable records taken for "no runs" (an empty report replacing the previous one, a check
    failing with exit 1 as if every value regressed) instead of one error line and exit 2."""
    results = _all_broken(tmp_path)
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "results.md").write_text("# the previous report\n")
    shutil.copy(baseline, previous / "baseline.json")
    before, before_previous = snapshot(results), snapshot(previous)
    args = {"report": ["report", "--results", str(results), "--out", str(previous)],
            "baseline": ["baseline", "save", "--results", str(results), "--out", str(previous / "baseline.json")],
            "check": ["check", "--baseline", str(previous / "baseline.json"), "--results", str(results)]}[command]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, f"no readable run record under {results}: all 2 are broken",
                          str(results / GOOD[0][0] / "metrics.json"), "not UTF-8 text")
    assert "warning:" not in result.output and result.stdout == ""
    assert_preserved(before, results)
    assert_preserved(before_previous, previous)
    assert snapshot(previous).keys() == before_previous.keys()


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"format": 1, "entries": [{"key": ', "not a readable baseline JSON"),     # truncated
    (b"\x00\xff\xfe\x89 binary", "not a readable baseline JSON"),               # binary bytes
    (b"[1, 2]", "not a FaceBench baseline"),                                     # a list, not an object
    (b'{"format": 1, "entries": [], "tolerances": ["loose"]}', "'tolerances' must map"),
    (b'{"format": 1, "entries": [], "tolerances": {"max_accuracy_drop": "two"}}', "tolerances must be numbers"),
])
def test_faults_unreadable_baseline_is_exit_2(tmp_path: Path, content: bytes, reason: str) -> None:
    """Catches: a broken baseline file crashing `bench check` (binary bytes were a UnicodeDecodeError
    traceback) or being mistaken for a regression (exit 1)."""
    results = tmp_path / "results"
    _write_good(results)
    path = tmp_path / "baseline.json"
    path.write_bytes(content)
    before = snapshot(results)
    result = _invoke("check", "--baseline", str(path), "--results", str(results))
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, str(path), reason)
    assert_preserved(before, results)
    assert path.read_bytes() == content


# --------------------------------------------------------------------------------------------------
# A full disk while `bench report` writes
# --------------------------------------------------------------------------------------------------


def _previous_report(tmp_path: Path) -> tuple[Path, Path]:
    """A results directory of one run and the complete report of it (Markdown, LaTeX, figures), then
    newer runs, so that the next report changes every file and adds the figures of a second split."""
    results, reports = tmp_path / "seed" / "results", tmp_path / "seed" / "reports"
    write_record(results, GOOD[0][0], "arcface", 0, 0.80, 0.5)
    assert _invoke("report", "--results", str(results), "--out", str(reports)).exit_code == 0
    write_record(results, "20260101-000005-arcface-s1-eeee", "arcface", 1, 0.84, 0.6)
    write_record(results, "20260101-000006-cosface-s0-ffff", "cosface", 0, 0.70, 0.4)
    write_record(results, "20260101-000007-arcface-s0-gggg", "arcface", 0, 0.60, 0.3, split="longtail")
    return results, reports


def _disk_use_kib(root: Path) -> int:
    """KiB a tmpfs needs for the files under ``root`` (whole 4 KiB pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in root.rglob("*") if p.is_file())


@pytest.mark.slow  # a `python -m bench report` subprocess, after two reports in process
@pytest.mark.skipif(not small_fs_available(), reason="needs root and `unshare -m` to mount a small tmpfs")
def test_faults_report_on_a_full_disk_keeps_the_previous_report(tmp_path: Path) -> None:
    """Catches: `bench report` overwriting report files in place or one by one (the full disk would leave a
    truncated PNG, a mixture of new and old files, or new figures no results.md links to), leaving staged
    files behind, or dying with a traceback."""
    results, reports = _previous_report(tmp_path)
    probe = tmp_path / "probe"  # the new report, written on the real disk only to measure it
    assert _invoke("report", "--results", str(results), "--out", str(probe)).exit_code == 0
    growth = _disk_use_kib(probe) - _disk_use_kib(reports)
    assert growth > 64, growth  # the longtail figures alone are far more
    # free space for half of what the new report adds: no way of writing it can succeed
    size_kib = _disk_use_kib(tmp_path / "seed") + growth // 2
    before_reports, before_results = snapshot(reports), snapshot(results)
    work = tmp_path / "work"
    done = run_on_small_fs(work, size_kib, bench_argv("report", "--results", str(work / "results"),
                                                      "--out", str(work / "reports")),
                           seed_from=tmp_path / "seed", timeout=300)
    assert done.returncode == 2, done.stderr
    line = assert_one_error_line(done.stderr, "cannot write the report file", "No space left on device",
                                 f"the previous report in {work / 'reports'} is unchanged")
    assert "Traceback" not in done.stdout + done.stderr, line
    assert_preserved(before_reports, work / "reports")
    assert snapshot(work / "reports").keys() == before_reports.keys()  # no staged or temporary file left
    assert_preserved(before_results, work / "results")


def test_faults_report_write_failure_keeps_every_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """The same fault injected in process (ENOSPC at the third file: after some files were staged).
    Catches: files renamed into place before all were written, or staged files left behind."""
    import bench.report.staging as staging

    results, reports = _previous_report(tmp_path)
    before = snapshot(reports)
    real_write, calls = staging.atomic_write_with, []

    def fail_third(path: Path, write: Callable) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, write)

    monkeypatch.setattr(staging, "atomic_write_with", fail_third)
    result = _invoke("report", "--results", str(results), "--out", str(reports))
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, "No space left on device", f"the previous report in {reports} is unchanged")
    assert len(calls) == 3
    assert_preserved(before, reports)
    assert snapshot(reports).keys() == before.keys()


def test_faults_baseline_save_to_an_unwritable_place_is_exit_2(tmp_path: Path) -> None:
    """Catches: an OSError while writing the baseline (here: its folder is a file) surfacing as a
    traceback instead of one error line; the results are untouched."""
    results = tmp_path / "results"
    _write_good(results)
    (tmp_path / "taken").write_text("a file, not a folder\n")
    before = snapshot(results)
    result = _invoke("baseline", "save", "--results", str(results), "--out", str(tmp_path / "taken" / "b.json"))
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, f"cannot write the baseline {tmp_path / 'taken' / 'b.json'}")
    assert_preserved(before, results)
    assert (tmp_path / "taken").read_text() == "a file, not a folder\n"
