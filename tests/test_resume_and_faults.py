"""Checkpoints, exact resume, re-sharding, and fault handling (issue: scale out and survive faults).

- A run killed with SIGKILL mid-training and resumed ends with the same metrics and training curve as an
  uninterrupted run (CPU, deterministic algorithms).
- A checkpoint written by 2 ranks (torchrun, gloo) resumes on 1 process, re-sharding the class centers.
- A NaN loss stops the run with one line naming the step, keeping the last good checkpoint.
- A failed checkpoint write leaves the previous checkpoint intact and says so; the run goes on.
- Two runs on one results directory do not touch each other's records; a run being resumed is locked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.checkpoint import read_manifest
from bench.cli import app
from bench.records import RunLock, iter_records
from methods.distributed import DistContext, class_shard

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

#: A small deterministic run: 24 identities x 4 images, 200 steps of 16 images, checkpoint every 10.
RUN_ARGS = ["--methods", "arcface", "--budget", "3200", "--batch-size", "16", "--device", "cpu", "--no-progress",
            "--eval", "synth-lfw", "--ckpt-every", "10",
            "--set", "data.synthface.num_identities=24", "--set", "data.synthface.images_per_identity=4",
            "--set", "train.embedding_size=32", "--set", "train.log_every=10", "--set", "train.deterministic=true",
            "--set", "train.threads=1"]


def _args(tmp_path: Path, out: str) -> list[str]:
    return [*RUN_ARGS, "--out", str(tmp_path / out), "--data-root", str(tmp_path / "data")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(c) for c in children)
        frontier.extend(int(c) for c in children)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, workers first stopped so none outlives the kill."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after_checkpoint(command: list[str], results: Path, tmp_path: Path) -> Path:
    """Start ``command``, SIGKILL it and all its processes once a checkpoint is committed."""
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            manifests = list(results.glob("*/checkpoints/checkpoint.json"))
            if manifests and json.loads(manifests[0].read_text())["step"] >= 10:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        _kill_tree(proc)
        proc.wait()
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    assert not (run_dir / "metrics.json").exists(), "killed after completion: the test proves nothing"
    return run_dir


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path, tiny_eval):
    # The uninterrupted reference.
    assert runner.invoke(app, ["run", *_args(tmp_path, "plain")], catch_exceptions=False).exit_code == 0
    (plain,) = iter_records(tmp_path / "plain")
    # The same run, killed after a checkpoint, then resumed in this process (same tiny evaluation).
    command = [sys.executable, "-m", "bench", "run", *_args(tmp_path, "killed")]
    run_dir = _kill_after_checkpoint(command, tmp_path / "killed", tmp_path)
    step = read_manifest(run_dir / "checkpoints")["step"]
    assert 10 <= step < 200
    result = runner.invoke(app, ["run", "--resume", run_dir.name, "--out", str(tmp_path / "killed"),
                                 "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (resumed,) = iter_records(tmp_path / "killed")
    assert resumed["perf"]["resumed_from_step"] == step
    assert [e["loss"] for e in resumed["train"]] == [e["loss"] for e in plain["train"]]
    assert [e["step"] for e in resumed["train"]] == list(range(10, 201, 10))
    assert resumed["metrics"]["synth-lfw"]["fold_accuracies"] == plain["metrics"]["synth-lfw"]["fold_accuracies"]
    assert resumed["metrics"]["synth-lfw"]["tar_at_far"] == plain["metrics"]["synth-lfw"]["tar_at_far"]


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_process(tmp_path, tiny_eval):
    results = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bench", "run", *_args(tmp_path, "torchrun")]
    run_dir = _kill_after_checkpoint(command, results, tmp_path)
    manifest = read_manifest(run_dir / "checkpoints")
    assert manifest["world_size"] == 2
    shards = [torch.load(run_dir / "checkpoints" / name, weights_only=False) for name in manifest["files"]]
    classes = 24
    for rank, shard in enumerate(shards):  # each rank held its own contiguous shard of the centers
        rows = class_shard(classes, 2, rank)
        assert shard["method"]["head.weight"].shape[0] == rows.size
    from bench.checkpoint import Checkpointer

    single = Checkpointer(run_dir / "checkpoints", DistContext()).load(["head.weight"], classes)
    full = torch.cat([s["method"]["head.weight"] for s in shards])
    assert torch.equal(single["method"]["head.weight"], full)
    state = single["trainer"]["optimizer"]["state"]
    head_group = next(g for g in single["trainer"]["optimizer"]["param_groups"] if g.get("sharded"))
    (index,) = head_group["params"]
    momentum = torch.cat([s["trainer"]["optimizer"]["state"][index]["momentum_buffer"] for s in shards])
    assert torch.equal(state[index]["momentum_buffer"], momentum)
    # ... and the run completes on one process from there.
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (record,) = iter_records(results)
    assert record["perf"]["resumed_from_step"] == manifest["step"] and record["perf"]["world_size"] == 1
    assert 0.0 <= record["metrics"]["synth-lfw"]["accuracy"] <= 1.0


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_eval, monkeypatch):
    from methods import arcface

    calls = {"n": 0}
    real_forward = arcface.MarginHead.forward

    def poisoned(self, embeddings, labels):
        calls["n"] += 1
        loss = real_forward(self, embeddings, labels)
        return loss * float("nan") if calls["n"] == 25 else loss

    monkeypatch.setattr(arcface.MarginHead, "forward", poisoned)
    result = runner.invoke(app, ["run", *_args(tmp_path, "nan")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0]  # the header lines, then one error line
    assert lines[-1].startswith("error: training failed: the loss became NaN or infinite at step 25 (arcface, ")
    assert "the last good checkpoint (step 20) is in" in lines[-1]
    (run_dir,) = (tmp_path / "nan").iterdir()
    assert read_manifest(run_dir / "checkpoints")["step"] == 20
    assert not (run_dir / "metrics.json").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_eval, monkeypatch):
    from bench import checkpoint

    real_save = checkpoint.atomic_torch_save
    calls = {"n": 0}

    def disk_full_on_second(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", disk_full_on_second)
    args = [arg.replace("3200", "480") for arg in _args(tmp_path, "full")]  # 30 steps: checkpoints 10, 20, 30
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    assert ("warning: checkpoint at step 20 was not written" in result.stderr
            and "No space left on device); the previous checkpoint (step 10) is intact" in result.stderr)
    (record,) = iter_records(tmp_path / "full")
    assert record["perf"]["checkpoint_failures"][0].startswith("checkpoint at step 20 was not written")
    checkpoints = Path(record["path"]) / "checkpoints"
    assert read_manifest(checkpoints)["step"] == 30  # later writes succeed again
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint.json", "step00000030-rank0.pt"]


@contextlib.contextmanager
def _without_write_permission(directory: Path):
    """``directory`` made read-only (mode 0555) for the code inside; as root, which ignores modes, that code
    runs with the effective uid of ``nobody`` (the saved uid stays 0, so it is restored afterwards)."""
    directory.chmod(0o555)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        if root:
            os.seteuid(65534)
        yield
    finally:
        if root:
            os.seteuid(0)
        directory.chmod(0o755)


def test_checkpoint_into_read_only_directory(tmp_path, tiny_eval):
    from bench.checkpoint import Checkpointer

    base = Path(tempfile.mkdtemp(prefix="facebench-ro-"))  # outside tmp_path, whose parents are private to root
    try:
        base.chmod(0o755)
        directory = base / "ckpt"
        writer = Checkpointer(directory, DistContext())
        assert writer.save(10, {"x": torch.zeros(2)})
        with _without_write_permission(directory):
            assert not writer.save(20, {"x": torch.ones(2)})
        assert read_manifest(directory)["step"] == 10
        assert torch.equal(torch.load(directory / "step00000010-rank0.pt", weights_only=False)["x"], torch.zeros(2))
        assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "step00000010-rank0.pt"]
        assert "Permission denied" in writer.failures[0]
        assert "previous checkpoint (step 10) is intact" in writer.failures[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_concurrent_runs_keep_their_own_records(tmp_path):
    args = [*_args(tmp_path, "shared")]
    args[args.index("3200")] = "320"
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", *args, "--set", f"train.seed={seed}"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in (1, 2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    records = iter_records(tmp_path / "shared")
    assert sorted(r["config"]["train"]["seed"] for r in records) == [1, 2]
    assert all(r["metrics"]["synth-lfw"]["num_pairs"] > 0 and r["train"][-1]["step"] == 20 for r in records)


def test_a_run_being_resumed_is_locked(tmp_path):
    run_dir = tmp_path / "results" / "20260101-000000-arcface-x"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: arcface\n")
    (run_dir / "checkpoints" / "checkpoint.json").write_text(json.dumps(
        {"format": 1, "step": 10, "world_size": 1, "files": []}))
    with RunLock(run_dir):
        result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 2
    assert f"{run_dir}: in use by process {os.getpid()}" in result.stderr


@pytest.mark.parametrize("prepare, message", [
    (lambda d: None, "not a run directory (no config.yaml)"),
    (lambda d: ((d / "config.yaml").write_text("method: arcface\n"), (d / "metrics.json").write_text("{}")),
     "the run is complete; there is nothing to resume"),
    (lambda d: (d / "config.yaml").write_text("method: arcface\n"), "the run has no checkpoint to resume from"),
])
def test_resume_errors_are_one_line(tmp_path, prepare, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare(run_dir)
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {run_dir}: {message}"
