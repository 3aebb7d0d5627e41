"""Checkpoint and resume building blocks; the faults themselves (a crash, SIGKILL, a full disk, a bad
checkpoint, run locks, NaN) are tested end to end in ``tests/faults/test_faults_runs.py``.

- The RNG states round-trip through ``torch.load(weights_only=True)`` exactly.
- A committed checkpoint keeps the previous complete one and removes anything older.
- Re-sharding hands each new rank its rows of the old ranks' shards (and of their optimizer state) and
  carries the open logging window.
- ``train.jsonl`` is rewritten for a resume without a torn last line; resume errors are one line.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.checkpoint import Checkpointer, read_manifest, reshard, rng_state, set_rng_state
from bench.cli import app
from bench.errors import ResultsDirError
from bench.records import RunRecord
from methods.distributed import DistContext, class_shard

runner = CliRunner()


def _draws() -> list[float]:
    """Numbers from every generator a checkpoint restores (NumPy's Gaussian uses its cached half-pair)."""
    return [*torch.rand(3).tolist(), float(np.random.standard_normal()), *np.random.rand(2).tolist(),
            random.random()]


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    """The torch, NumPy and Python RNG states saved by a checkpoint, read back with weights-only loading,
    continue with exactly the numbers they would have drawn. Catches NumPy's state stored as an ndarray
    (weights-only loading refuses it, issue 12), a lossy conversion of its uint32 keys, and a lost cached
    Gaussian or Python state."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # an odd number of Gaussians: the legacy generator caches the second
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _payload(step: int) -> dict:
    return {"method": {"w": torch.full((2,), float(step))}, "trainer": {}, "rng": {}}


def test_checkpointer_keeps_the_newest_and_the_previous_checkpoint(tmp_path):
    """After commits at 10, 20, 30 the directory holds 20 and 30 and the manifest names both; a resumed
    writer (which learns the last good checkpoint by loading) keeps 30 as the previous of 40. Catches a
    commit that deletes the previous checkpoint (no fallback for a corrupt newest one) or keeps everything."""
    writer = Checkpointer(tmp_path, DistContext())
    for step in (10, 20, 30):
        assert writer.save(step, _payload(step))
    manifest = read_manifest(tmp_path)
    assert (manifest["step"], manifest["previous"]["step"]) == (30, 20)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step00000020-rank0.pt", "step00000030-rank0.pt"]
    resumed = Checkpointer(tmp_path, DistContext())
    assert torch.equal(resumed.load([], 4)["method"]["w"], torch.full((2,), 30.0))
    assert resumed.save(40, _payload(40))
    assert read_manifest(tmp_path)["previous"]["step"] == 30
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step00000030-rank0.pt", "step00000040-rank0.pt"]


def _rank_payload(rank: int, world_size: int, classes: int) -> dict:
    """Old rank ``rank``'s payload: its center rows and momentum hold their class ids (an independent
    reference for which rows a new rank must get), its log window a loss sum of ``rank + 1``."""
    rows = torch.arange(class_shard(classes, world_size, rank).start, class_shard(classes, world_size, rank).stop)
    return {"step": 7, "rank": rank, "world_size": world_size, "rng": {"from_rank": rank},
            "method": {"head.weight": rows.float()[:, None].repeat(1, 2), "backbone.w": torch.tensor([rank])},
            "trainer": {"steps_done": 7,
                        "optimizer": {"state": {0: {"momentum_buffer": -rows.float()[:, None]}, 1: {"step": 3}},
                                      "param_groups": [{"params": [0], "sharded": True}, {"params": [1]}]},
                        "log_window": {"from_step": 6, "steps": 2, "loss_sum": torch.tensor(rank + 1.0),
                                       "logs_sum": {"x": float(rank)}}}}


@pytest.mark.parametrize("old_ranks, new_ranks", [(3, 2), (2, 3), (2, 1)])
def test_reshard_gives_each_new_rank_its_rows(old_ranks, new_ranks):
    """Resuming W old ranks on W' new ones: new rank r gets exactly the centers (and their momentum) of its
    class shard, the replicated state of old rank 0, the RNG of old rank min(r, W-1), and the mean of the
    old ranks' open-window loss sums (the logged loss is a mean over ranks). Catches shards concatenated
    out of order, rows sliced for the wrong rank, and optimizer or window state taken from one rank only."""
    classes = 10
    old = [_rank_payload(rank, old_ranks, classes) for rank in range(old_ranks)]
    for rank in range(new_ranks):
        new = reshard(old, ["head.weight"], classes, DistContext(rank, new_ranks))
        shard = class_shard(classes, new_ranks, rank)
        ids = torch.arange(shard.start, shard.stop).float()[:, None]
        assert torch.equal(new["method"]["head.weight"], ids.repeat(1, 2))
        assert torch.equal(new["trainer"]["optimizer"]["state"][0]["momentum_buffer"], -ids)
        assert new["trainer"]["optimizer"]["state"][1] == {"step": 3}
        assert torch.equal(new["method"]["backbone.w"], torch.tensor([0]))
        assert new["rng"] == {"from_rank": min(rank, old_ranks - 1)}
        assert float(new["trainer"]["log_window"]["loss_sum"]) == pytest.approx((old_ranks + 1) / 2)
        assert (new["rank"], new["world_size"]) == (rank, new_ranks)


def test_train_log_rewrite_for_a_resume_drops_a_torn_last_line(tmp_path):
    """A resume keeps the train.jsonl lines up to its checkpoint byte for byte and drops a last line torn
    by a crash mid-append (no newline); a broken line in the middle is one ResultsDirError line and leaves
    the file as it was. Catches the JSONDecodeError traceback on resume after such a crash."""
    record = RunRecord(tmp_path)
    for step in (10, 20, 30):
        record.append_jsonl("train.jsonl", {"step": step, "loss": 1.0 / step})
    path = tmp_path / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines) + b'{"step": 40, "lo')
    record.truncate_jsonl("train.jsonl", lambda entry: entry["step"] <= 20)
    assert path.read_bytes() == b"".join(lines[:2])
    broken = b"".join([lines[0], b"{not json\n", lines[1]])
    path.write_bytes(broken)
    with pytest.raises(ResultsDirError, match=r"train\.jsonl: line 2 is not valid JSON"):
        record.truncate_jsonl("train.jsonl", lambda entry: True)
    assert path.read_bytes() == broken


@pytest.mark.parametrize("prepare, message", [
    (lambda d: None, "not a run directory (no config.yaml)"),
    (lambda d: ((d / "config.yaml").write_text("method: arcface\n"), (d / "metrics.json").write_text("{}")),
     "the run is complete; there is nothing to resume"),
    (lambda d: (d / "config.yaml").write_text("method: arcface\n"), "the run has no checkpoint to resume from"),
])
def test_resume_errors_are_one_line(tmp_path, prepare, message):
    """A directory that cannot be resumed is one error line naming it and why. Catches tracebacks and a
    resume that starts on a complete run or one without a checkpoint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare(run_dir)
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {run_dir}: {message}"


def test_resume_of_a_format_1_checkpoint_is_one_line(tmp_path):
    """A checkpoint written by an older FaceBench (format 1: pickled NumPy state, loadable only unsafely) is
    refused with one line naming the manifest, before anything is loaded. Catches a fallback to unsafe
    loading for old files, and a KeyError on the format-1 manifest (no "previous")."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: arcface\n")
    manifest = run_dir / "checkpoints" / "checkpoint.json"
    manifest.write_text('{"format": 1, "step": 10, "world_size": 1, "files": ["step00000010-rank0.pt"]}')
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {manifest}: checkpoint format 1 (an older FaceBench")
    assert len(result.stderr.strip().splitlines()) == 1
