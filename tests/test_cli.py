"""The command line: a tiny end-to-end run, the report, and every error path (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from bench.cli import app
from bench.records import iter_records
from methods.base import METHODS

runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def test_run_writes_complete_records_and_prints_the_table(tmp_path, tiny_args):
    result = _invoke(["run", "--methods", "arcface,cosface", "--split", "shallow", *tiny_args])
    assert result.exit_code == 0, result.output
    records = iter_records(tmp_path / "results")
    assert [r["config"]["method"] for r in records] == ["arcface", "cosface"]
    for record in records:
        assert set(record) >= {"config", "env", "data", "train", "perf", "metrics"}
        assert record["config"]["method_params"]["s"] == 64.0
        assert record["data"]["split"]["recipe"]["name"] == "shallow"
        assert record["data"]["split"]["images_per_identity"]["histogram"] == {"2": 24}
        assert 0.0 <= record["metrics"]["synth-lfw"]["accuracy"] <= 1.0
        assert record["perf"]["samples_seen"] == 128 and record["perf"]["steps"] == 4
        assert record["train"][-1]["step"] == 4
    table = result.stdout
    assert "| synthface | shallow | small      | 128      | arcface" in table
    assert "cosface" in table and "synth-lfw acc (%)" in table

    report_dir = tmp_path / "reports"
    result = _invoke(["report", "--results", str(tmp_path / "results"), "--out", str(report_dir)])
    assert result.exit_code == 0
    md = (report_dir / "results.md").read_text()
    tex = (report_dir / "results.tex").read_text()
    assert "arcface" in md and "cosface" in md
    assert "\\toprule" in tex and "\\bottomrule" in tex


def test_same_seed_gives_identical_numbers(tmp_path, tiny_args):
    for _ in range(2):
        assert _invoke(["run", "--methods", "cosface", *tiny_args]).exit_code == 0
    first, second = iter_records(tmp_path / "results")
    assert [e["loss"] for e in first["train"]] == [e["loss"] for e in second["train"]]
    assert first["metrics"]["synth-lfw"]["fold_accuracies"] == second["metrics"]["synth-lfw"]["fold_accuracies"]


def test_method_params_reach_the_record(tmp_path, tiny_args):
    result = _invoke(["run", "--methods", "arcface", "--set", "method_params.arcface.m=0.3", *tiny_args])
    assert result.exit_code == 0
    (record,) = iter_records(tmp_path / "results")
    assert record["config"]["method_params"]["m"] == 0.3


@pytest.mark.parametrize("extra, message", [
    (["--methods", "arcface,sphereface"], "error: unknown method 'sphereface'; valid: " + ", ".join(METHODS.names())),
    (["--backbone", "r9000"], "error: unknown backbone 'r9000'; valid:"),
    (["--split", "deep"], "error: unknown split 'deep'; valid: full, longtail, shallow"),
    (["--eval", "lfw2"], "error: unknown protocol 'lfw2'; valid: agedb_30, calfw, cfp_ff, cfp_fp, cplfw, ijbb, "
                         "ijbc, lfw, megaface, synth-ijbc, synth-lfw, synth-megaface"),
    (["--dataset", "ms1m"], "error: unknown dataset 'ms1m'; valid: casia, custom, glint360k, ms1mv2, ms1mv3, "
                            "synthface, webface12m, webface42m, webface4m"),
    (["--budget", "-5"], "error: train.budget (-5) must be >= train.batch_size (32)"),
    (["--set", "train.lr=fast"], "error: command line: 'train.lr' must be float, got 'fast'"),
    (["--set", "method_params.arcface.q=1"], "error: method 'arcface': unknown parameter 'q'; valid: s, m"),
    (["--set", "method_params.arcface.m=big"], "error: method 'arcface': parameter 'm' must be float, got 'big'"),
    (["--set", "nonsense"], "error: --set expects KEY=VALUE"),
    (["--set", "data.synthface.label_noise=1.5"], "error: data.synthface.label_noise must be in [0, 1), got 1.5"),
])
def test_bad_input_is_one_line_with_exit_code_2_and_nothing_lost(tmp_path, tiny_args, extra, message):
    results = tmp_path / "results"
    earlier = results / "20200101-000000-earlier-run"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text(json.dumps({"synth-lfw": {"accuracy": 0.5}}))
    result = runner.invoke(app, ["run", *tiny_args, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert sorted(p.name for p in results.iterdir()) == ["20200101-000000-earlier-run"]
    assert json.loads((earlier / "metrics.json").read_text()) == {"synth-lfw": {"accuracy": 0.5}}
    assert not (tmp_path / "data").exists()  # rejected before any data was generated


def test_unwritable_results_dir(tmp_path, tiny_args):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    result = runner.invoke(app, ["run", *tiny_args, "--out", str(blocker / "results")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: results directory")
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "a file, not a directory"


def test_bad_preset_file(tmp_path, tiny_args):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"train": {"budgett": 10}}))
    result = runner.invoke(app, ["run", *tiny_args, "--config", str(preset)])
    assert result.exit_code == 2
    assert f"{preset}: unknown key 'train.budgett'" in result.stderr


def test_list_shows_every_registry():
    result = _invoke(["list"])
    assert result.exit_code == 0
    for expected in ("methods:", "  arcface  s=64.0, m=0.5", "  cosface  s=64.0, m=0.4", "backbones:", "  r50",
                     "  small", "  mbf", "splits:", "  longtail", "protocols:", "  synth-lfw", "datasets:"):
        assert expected in result.stdout
    assert runner.invoke(app, ["list", "widgets"]).exit_code == 2


def test_report_on_missing_results_dir(tmp_path):
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_console_script_reports_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "nope", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown method 'nope'; valid: " + ", ".join(METHODS.names())
    assert "arcface, combined, cosface, dcq" in proc.stderr
    assert proc.stdout == ""


def test_errors_name_their_rank_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, ["run", "--methods", "nope", "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: rank 1 of 2: unknown method 'nope'; valid: " + ", ".join(METHODS.names())


def test_help_documents_every_run_flag():
    result = _invoke(["run", "--help"])
    for flag in ("--methods", "--split", "--dataset", "--backbone", "--budget", "--batch-size", "--seed",
                 "--device", "--eval", "--out", "--config", "--set", "--data-root"):
        assert flag in result.stdout
