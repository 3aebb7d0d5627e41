"""Run records: atomic writes, exclusive run directories, round trip through the reader."""

from __future__ import annotations

import json

import pytest

from bench.errors import ResultsDirError
from bench.records import RunRecord, atomic_write_json, ensure_writable_dir, iter_records, read_record


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_failure_keeps_previous_content(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_run_directories_are_unique(tmp_path):
    dirs = {RunRecord.create(tmp_path, "arcface", "synthface").directory for _ in range(20)}
    assert len(dirs) == 20 and all(d.is_dir() for d in dirs)


def test_record_round_trip_and_incomplete_runs_are_skipped(tmp_path):
    record = RunRecord.create(tmp_path, "arcface")
    record.write_yaml("config.yaml", {"method": "arcface", "train": {"seed": 3}})
    record.write_json("env.json", {"torch": "x"})
    record.write_json("data.json", {"split": {"images": 10}})
    record.append_jsonl("train.jsonl", {"step": 1, "loss": 2.5})
    record.append_jsonl("train.jsonl", {"step": 2, "loss": 2.0})
    record.write_json("perf.json", {"throughput_img_s": 100.0})
    assert read_record(record.directory) is None  # no metrics.json yet: incomplete
    record.write_json("metrics.json", {"synth-lfw": {"accuracy": 0.9}})
    loaded = read_record(record.directory)
    assert loaded["config"] == {"method": "arcface", "train": {"seed": 3}}
    assert loaded["train"] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert loaded["metrics"]["synth-lfw"]["accuracy"] == 0.9
    other = RunRecord.create(tmp_path, "cosface")  # incomplete run
    other.write_yaml("config.yaml", {"method": "cosface"})
    assert [r["run_id"] for r in iter_records(tmp_path)] == [record.run_id]


def test_unwritable_results_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(ResultsDirError, match=r"results directory .*file/results is not writable"):
        ensure_writable_dir(blocker / "results")
    assert blocker.read_text() == "I am a file"
