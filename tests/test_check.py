"""The regression gate, `bench baseline save` and `bench check`, run through the CLI on hand-written records.

Shows: a baseline saved from a results directory checks clean against it (exit 0, a table on stdout);
a newer record that is worse beyond tolerance (accuracy drop > 0.5 pp, throughput drop > 10 %, memory
growth > 10 %) fails with exit 1 and a table row naming the configuration, the metric, the baseline and
current values and REGRESSED, while a change of exactly the tolerance passes; tolerances come from the
defaults, then the baseline file's own ``tolerances``, then the command line; a baseline configuration
with no current run is ``missing`` and fails; bad input is one ``error: ...`` line naming the file, exit 2.
Every expected value is computed by hand in the test (e.g. 80.00 % -> 79.40 % is a 0.60 pp drop).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bench.check import Tolerances
from bench.cli import app
from tests.report_records import write_record

runner = CliRunner()

ARC_KEY = "synthface/shallow/small/1000/arcface"
COS_KEY = "synthface/shallow/small/1000/cosface"
#: The baseline runs: arcface 80 % / TAR 0.5 / 1000 img/s / 500 MiB; cosface 78 % / TAR 0.6 / 900 img/s / 480 MiB.
ARC = {"accuracy": 0.80, "tar": 0.5, "img_s": 1000.0, "peak_mib": 500.0}
COS = {"accuracy": 0.78, "tar": 0.6, "img_s": 900.0, "peak_mib": 480.0}


def _arc(results: Path, stamp: str, **changes: float) -> None:
    """An arcface seed-0 record (same configuration as the baseline's; a later stamp replaces the earlier)."""
    values = {**ARC, **changes}
    write_record(results, f"20260101-{stamp}-arcface-s0-aaaa", "arcface", 0, values["accuracy"], values["tar"],
                 values["img_s"], values["peak_mib"])


@pytest.fixture
def results(tmp_path: Path) -> Path:
    directory = tmp_path / "results"
    _arc(directory, "000000")
    write_record(directory, "20260101-000001-cosface-s0-bbbb", "cosface", 0, COS["accuracy"], COS["tar"],
                 COS["img_s"], COS["peak_mib"])
    return directory


@pytest.fixture
def baseline(results: Path, tmp_path: Path) -> Path:
    out = tmp_path / "baselines" / "base.json"
    saved = runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out)])
    assert saved.exit_code == 0, saved.output
    assert f"wrote {out}" in saved.stderr
    return out


def _check(baseline: Path, results: Path, *extra: str) -> Result:
    return runner.invoke(app, ["check", "--baseline", str(baseline), "--results", str(results), *extra])


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _row(table: str, key: str, metric: str) -> list[str]:
    """The cells of the table row of (configuration, metric)."""
    for line in table.splitlines():
        cells = _cells(line)
        if cells[:2] == [key, metric]:
            return cells
    raise AssertionError(f"no row {key} / {metric} in\n{table}")


def test_baseline_file_holds_the_newest_rows(baseline: Path) -> None:
    document = json.loads(baseline.read_text())
    assert document["format"] == 1 and "tolerances" not in document  # none given: the defaults apply
    entries = {entry["key"]["method"]: entry for entry in document["entries"]}
    assert set(entries) == {"arcface", "cosface"}
    assert entries["arcface"]["key"] == {"dataset": "synthface", "split": "shallow", "backbone": "small",
                                         "budget": 1000, "method": "arcface"}
    # write_record stores TAR@FAR=0.001 as tar / 2
    assert entries["arcface"]["metrics"] == {"synth-lfw acc": 0.80, "synth-lfw TAR@FAR=0.001": 0.25,
                                             "synth-lfw TAR@FAR=0.01": 0.5, "img/s": 1000.0, "peak MiB": 500.0}
    assert entries["cosface"]["metrics"]["synth-lfw acc"] == pytest.approx(0.78)
    assert entries["arcface"]["run_ids"] == ["20260101-000000-arcface-s0-aaaa"]


def test_unchanged_results_pass_with_a_table(baseline: Path, results: Path) -> None:
    result = _check(baseline, results)
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert _cells(table.splitlines()[0]) == ["configuration", "metric", "baseline", "current", "change", "allowed",
                                             "status"]
    # 2 configurations x 5 values, all unchanged
    assert [_cells(line)[6] for line in table.splitlines()[2:]] == 10 * ["ok"]
    assert _row(table, ARC_KEY, "synth-lfw acc") == [ARC_KEY, "synth-lfw acc", "80.00%", "80.00%", "+0.00 pp",
                                                     "drop <= 0.5 pp", "ok"]
    assert _row(table, COS_KEY, "img/s") == [COS_KEY, "img/s", "900", "900", "+0.0%", ">= 90% of baseline", "ok"]
    assert _row(table, COS_KEY, "peak MiB")[5] == "<= 110% of baseline"
    assert "OK: 10 values within tolerance" in result.stderr


@pytest.mark.parametrize(("change", "metric", "cells"), [
    # 80.00 % -> 79.40 %: a 0.60 pp drop > 0.5 pp
    ({"accuracy": 0.794}, "synth-lfw acc", ["80.00%", "79.40%", "-0.60 pp"]),
    # 1000 -> 899 img/s: 10.1 % slower > 10 % (the limit is 900)
    ({"img_s": 899.0}, "img/s", ["1000", "899", "-10.1%"]),
    # 500 -> 551 MiB: 10.2 % more > 10 % (the limit is 550)
    ({"peak_mib": 551.0}, "peak MiB", ["500", "551", "+10.2%"]),
    # TAR 0.5 -> 0.49: 1 pp drop; its TAR@FAR=0.001 (tar / 2) drops 0.25 -> 0.245, 0.5 pp: exactly allowed
    ({"tar": 0.49}, "synth-lfw TAR@FAR=0.01", ["50.00%", "49.00%", "-1.00 pp"]),
])
def test_worse_beyond_tolerance_fails_naming_the_value(baseline: Path, results: Path, change: dict[str, float],
                                                       metric: str, cells: list[str]) -> None:
    _arc(results, "000002", **change)
    result = _check(baseline, results)
    assert result.exit_code == 1, result.output
    row = _row(result.stdout, ARC_KEY, metric)
    assert row[2:5] == cells and row[6] == "REGRESSED"
    assert result.stdout.count("REGRESSED") == 1  # nothing else moved
    assert "FAIL: 1 of 10 values regressed against" in result.stderr and str(baseline) in result.stderr
    # --regressions-only shows the failing row and nothing else
    only = _check(baseline, results, "--regressions-only")
    assert only.exit_code == 1
    assert [_cells(line) for line in only.stdout.splitlines()[2:]] == [row]


@pytest.mark.parametrize("change", [
    {"accuracy": 0.795},   # 80.0 % -> 79.5 %: a drop of exactly 0.5 pp (100 * (0.8 - 0.795) = 0.5000000000000004)
    {"img_s": 900.0},      # 1000 -> 900 img/s: exactly 10 % slower
    {"peak_mib": 550.0},   # 500 -> 550 MiB: exactly 10 % more
])
def test_exactly_at_tolerance_passes(baseline: Path, results: Path, change: dict[str, float]) -> None:
    _arc(results, "000002", **change)
    result = _check(baseline, results)
    assert result.exit_code == 0, result.output
    assert "REGRESSED" not in result.stdout


def test_exactly_at_throughput_tolerance_despite_float_rounding(tmp_path: Path) -> None:
    """13 img/s * (1 - 0.1) is 11.700000000000001 in floating point: 11.7 img/s is still exactly 10 % slower."""
    results = tmp_path / "results"
    _arc(results, "000000", img_s=13.0, peak_mib=7.0)
    out = tmp_path / "b.json"
    assert runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out)]).exit_code == 0
    _arc(results, "000001", img_s=11.7, peak_mib=7.7)  # -10 % and +10 % exactly
    result = _check(out, results)
    assert result.exit_code == 0, result.stdout
    _arc(results, "000002", img_s=11.69, peak_mib=7.7)
    assert _check(out, results).exit_code == 1


def test_better_values_are_marked_and_pass(baseline: Path, results: Path) -> None:
    _arc(results, "000002", accuracy=0.85, img_s=2000.0, peak_mib=250.0)
    result = _check(baseline, results)
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, ARC_KEY, "synth-lfw acc")[4:] == ["+5.00 pp", "drop <= 0.5 pp", "better"]
    assert _row(result.stdout, ARC_KEY, "img/s")[4] == "+100.0%"
    assert _row(result.stdout, ARC_KEY, "peak MiB")[4:7:2] == ["-50.0%", "better"]


def test_command_line_tolerance_turns_a_fail_into_a_pass(baseline: Path, results: Path) -> None:
    _arc(results, "000002", accuracy=0.77)  # a 3 pp drop
    assert _check(baseline, results).exit_code == 1
    result = _check(baseline, results, "--max-accuracy-drop", "5")
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, ARC_KEY, "synth-lfw acc")[4:] == ["-3.00 pp", "drop <= 5 pp", "ok"]
    assert "accuracy drop <= 5 pp" in result.stderr
    # throughput 1000 -> 700 (30 % slower) passes with --max-throughput-drop 0.3, fails with 0.29
    _arc(results, "000003", img_s=700.0, peak_mib=640.0)  # and 28 % more memory
    assert _check(baseline, results, "--max-throughput-drop", "0.3", "--max-memory-growth", "0.28").exit_code == 0
    assert _check(baseline, results, "--max-throughput-drop", "0.29", "--max-memory-growth", "0.28").exit_code == 1
    assert _check(baseline, results, "--max-throughput-drop", "0.3", "--max-memory-growth", "0.27").exit_code == 1


def test_baseline_files_own_tolerances_apply_and_the_command_line_wins(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "loose.json"
    saved = runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out),
                                "--max-accuracy-drop", "2", "--max-throughput-drop", "0.5"])
    assert saved.exit_code == 0, saved.output
    assert json.loads(out.read_text())["tolerances"] == {"max_accuracy_drop": 2.0, "max_throughput_drop": 0.5,
                                                         "max_memory_growth": 0.1}
    _arc(results, "000002", accuracy=0.785, img_s=600.0)  # 1.5 pp and 40 %: within the file's tolerances
    result = _check(out, results)
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, ARC_KEY, "img/s")[5] == ">= 50% of baseline"
    # the command line overrides the file: 1 pp is tighter than 1.5 pp
    tight = _check(out, results, "--max-accuracy-drop", "1")
    assert tight.exit_code == 1
    assert _row(tight.stdout, ARC_KEY, "synth-lfw acc")[5:] == ["drop <= 1 pp", "REGRESSED"]
    assert _row(tight.stdout, ARC_KEY, "img/s")[6] == "ok"  # the file's throughput tolerance still applies


def test_tolerance_precedence_in_library_code() -> None:
    file_level = Tolerances().updated({"max_accuracy_drop": 2.0, "max_memory_growth": None})
    assert file_level == Tolerances(max_accuracy_drop=2.0, max_throughput_drop=0.10, max_memory_growth=0.10)
    assert file_level.updated({"max_accuracy_drop": 5, "max_throughput_drop": None}).max_accuracy_drop == 5.0


def test_baseline_configuration_without_a_current_run_is_missing(baseline: Path, tmp_path: Path) -> None:
    only_arcface = tmp_path / "now"
    _arc(only_arcface, "000005")
    result = _check(baseline, only_arcface)
    assert result.exit_code == 1, result.output
    for metric in ("synth-lfw acc", "synth-lfw TAR@FAR=0.001", "synth-lfw TAR@FAR=0.01", "img/s", "peak MiB"):
        row = _row(result.stdout, COS_KEY, metric)
        assert row[3:5] == ["-", "-"] and row[6] == "missing"
    assert _row(result.stdout, COS_KEY, "synth-lfw acc")[2] == "78.00%"
    assert "FAIL: 5 of 10 values regressed" in result.stderr  # cosface's 5 values; arcface's 5 are fine


def test_metric_missing_from_the_current_run_fails(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_record(results, "20260101-000000-arcface-s0-aaaa", "arcface", 0, 0.8, 0.5,
                 extra_metrics={"synth-tail": {"rank1": 0.4, "summary": {"rank-1 tail": 0.4}}})
    out = tmp_path / "b.json"
    assert runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["entries"][0]["metrics"]["synth-tail rank-1 tail"] == 0.4
    write_record(results, "20260101-000001-arcface-s0-aaaa", "arcface", 0, 0.8, 0.5)  # no synth-tail any more
    result = _check(out, results)
    assert result.exit_code == 1
    assert _row(result.stdout, ARC_KEY, "synth-tail rank-1 tail") == [
        ARC_KEY, "synth-tail rank-1 tail", "40.00%", "-", "-", "drop <= 0.5 pp", "missing"]
    assert "FAIL: 1 of 6 values regressed" in result.stderr


def test_metric_patterns_keep_only_chosen_columns(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    saved = runner.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(out),
                                "--metric", "synth-lfw acc", "--metric", "img/s"])
    assert saved.exit_code == 0, saved.output
    assert all(set(e["metrics"]) == {"synth-lfw acc", "img/s"} for e in json.loads(out.read_text())["entries"])
    _arc(results, "000002", peak_mib=5000.0)  # memory is not gated by this baseline
    assert _check(out, results).exit_code == 0


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    return lines[0]


def test_missing_baseline_file_is_one_line_error(results: Path, tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    line = _one_line_error(_check(path, results))
    assert line == (f"error: {path}: baseline file not found (create one with `bench baseline save --out {path}`)")


def test_non_json_baseline_is_one_line_error(results: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    line = _one_line_error(_check(path, results))
    assert line.startswith(f"error: {path}: not a readable baseline JSON (")


@pytest.mark.parametrize("content", [
    [1, 2, 3],                                                    # not an object
    {"format": 2, "entries": []},                                 # unknown format
    {"format": 1},                                                # no entries
])
def test_wrong_format_baseline_is_one_line_error(results: Path, tmp_path: Path, content: object) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content))
    line = _one_line_error(_check(path, results))
    assert line.startswith(f"error: {path}: not a FaceBench baseline (format 1 with 'entries')")


def test_entry_without_a_full_key_is_one_line_error(results: Path, tmp_path: Path) -> None:
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"format": 1, "entries": [{"key": {"method": "arcface"}, "metrics": {}}]}))
    line = _one_line_error(_check(path, results))
    assert line == (f"error: {path}: every entry needs 'key' (dataset, split, backbone, budget, method) "
                    f"and 'metrics'")


def test_bad_tolerance_and_missing_results_are_one_line_errors(baseline: Path, tmp_path: Path, results: Path) -> None:
    line = _one_line_error(_check(baseline, results, "--max-accuracy-drop", "-1"))
    assert line == "error: tolerance max_accuracy_drop must be a finite number >= 0, got -1.0"
    line = _one_line_error(_check(baseline, results, "--max-throughput-drop", "1.5"))
    assert "max_throughput_drop is a fraction of the baseline in [0, 1], got 1.5" in line
    line = _one_line_error(_check(baseline, tmp_path / "absent"))
    assert line == f"error: results directory {tmp_path / 'absent'} does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(runner.invoke(app, ["baseline", "save", "--results", str(empty),
                                               "--out", str(tmp_path / "x.json")]))
    assert line == f"error: no complete runs under {empty}: run `bench run` first"
    assert not (tmp_path / "x.json").exists()
