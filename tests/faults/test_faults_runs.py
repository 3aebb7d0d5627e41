"""Faults of a training run: a crash, a full disk, a bad checkpoint, a second process on one run (issues 12, 13).

Every test puts one fault at a known point, checks the one line the user sees (``error:`` or ``warning:``,
and no traceback), and proves with :func:`snapshot` / :func:`assert_preserved` that nothing written before
the fault was lost or changed. A resume may change only what README "Faults" says it changes
(:data:`RESUME_CHANGES`): it rewrites ``train.jsonl`` without the lines after its checkpoint, rotates
``checkpoints/``, and takes and drops the ``.lock``; the lines it keeps stay byte for byte.

The runs: arcface on 24 SynthFace identities x 4 images, 40 steps of 16 images, a log entry every 10 steps
and a checkpoint every 15, so checkpoints fall inside logging windows; deterministic CPU algorithms, one
thread; the synthetic protocols at the conftest's toy sizes. ``plain`` is the uninterrupted reference,
with the loss of every step (a spy on the trainer, a second code path next to ``train.jsonl``). A crash is
made in process by an exception raised after an optimizer step (:class:`Crash`), or in a real process by
SIGKILL at that step (``kill_at_step``, :func:`hooked_main`): no polling, so the kill point is exact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from bench.backbones import BACKBONES
from bench.checkpoint import Checkpointer, load_weights_only, read_manifest
from bench.cli import app
from bench.records import RunLock, RunRecord, iter_records
from bench.train import Trainer
from methods.distributed import DistContext, class_shard
from tests import conftest
from tests.faults.fault_helpers import (
    LINEAR_BACKBONE,
    assert_one_error_line,
    assert_one_warning_line,
    assert_preserved,
    hooked_bench_argv,
    hooked_env,
    linear_backbone,
    run_on_small_fs,
    small_fs_available,
    snapshot,
    tree,
)

runner = CliRunner()

STEPS, BATCH, CLASSES = 40, 16, 24
RUN_ARGS = ["--methods", "arcface", "--budget", str(STEPS * BATCH), "--batch-size", str(BATCH), "--device", "cpu",
            "--no-progress", "--eval", "synth-lfw", "--ckpt-every", "15",
            "--set", f"data.synthface.num_identities={CLASSES}", "--set", "data.synthface.images_per_identity=4",
            "--set", "train.embedding_size=32", "--set", "train.log_every=10", "--set", "train.deterministic=true",
            "--set", "train.threads=1"]
#: What a resume may change in a run directory (README, "Faults"); every other file must stay byte for byte.
RESUME_CHANGES = ("train.jsonl", "checkpoints/", ".lock")
#: The windows of the plain run's train.jsonl entries: (from_step, window_steps).
WINDOWS = [(1, 10), (11, 10), (21, 10), (31, 10)]
NO_SPACE = "No space left on device"


class Crash(BaseException):
    """A crash in process: not an ``Exception``, so nothing in ``bench`` handles it, as with SIGKILL."""


@dataclass
class Reference:
    record: dict[str, Any]
    step_losses: dict[int, float]


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the module's rendered data (in-process runs and subprocesses share it), with the
    conftest ``tiny_eval`` sizes applied for the whole module (the fixture's body, not a copy)."""
    with pytest.MonkeyPatch.context() as patch:
        conftest.tiny_eval.__wrapped__(patch)
        yield tmp_path_factory.mktemp("runs")


def _args(shared: Path, out: Path, *extra: str) -> list[str]:
    return [*RUN_ARGS, *extra, "--out", str(out), "--data-root", str(shared / "data")]


@contextlib.contextmanager
def _step_losses() -> Iterator[dict[int, float]]:
    """The loss of every optimizer step run inside the block, by step (a spy on the trainer)."""
    losses: dict[int, float] = {}
    forward_backward = Trainer.forward_backward

    def spy(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, logs = forward_backward(self, images, labels)
        losses[self.steps_done + 1] = float(loss)
        return loss, logs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "forward_backward", spy)
        yield losses


@contextlib.contextmanager
def _after_step(step: int, action) -> Iterator[None]:
    """Call ``action(trainer)`` right after optimizer step ``step`` of runs inside the block."""
    update = Trainer.update

    def hooked(self: Trainer) -> None:
        update(self)
        if self.steps_done == step:
            action(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "update", hooked)
        yield


def _crash(trainer: Trainer) -> None:
    raise Crash


def _invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def _resume(run_dir: Path) -> Result:
    return _invoke("run", "--resume", str(run_dir), "--no-progress")


def _only_run(results: Path) -> Path:
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return run_dir


def _comparable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log entries without img/s, the one field that measures time."""
    return [{key: value for key, value in entry.items() if key != "img_s"} for entry in entries]


def _assert_same_run(record: dict[str, Any], reference: dict[str, Any]) -> None:
    """Every train.jsonl entry (loss to the last bit, lr, window) and every metric equal the reference's."""
    assert _comparable(record["train"]) == _comparable(reference["train"])
    assert [(e["from_step"], e["window_steps"]) for e in record["train"]] == WINDOWS
    assert record["metrics"] == reference["metrics"]


def _kept_lines_unchanged(before: bytes, run_dir: Path, resumed_from: int) -> None:
    """The train.jsonl lines up to the checkpoint are kept byte for byte by the resume."""
    kept = [line for line in before.splitlines(keepends=True) if json.loads(line)["step"] <= resumed_from]
    assert (run_dir / "train.jsonl").read_bytes().startswith(b"".join(kept))


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def plain(shared: Path) -> Reference:
    """The uninterrupted reference run."""
    with _step_losses() as losses:
        result = _invoke("run", *_args(shared, shared / "plain"))
    assert result.exit_code == 0, result.output
    (record,) = iter_records(shared / "plain")
    return Reference(record, dict(losses))


def _crashed_run(shared: Path, name: str, step: int) -> Path:
    results = shared / name
    with _after_step(step, _crash), pytest.raises(Crash):
        _invoke("run", *_args(shared, results))
    return _only_run(results)


@pytest.fixture(scope="module")
def crashed_at_17(shared: Path, plain: Reference) -> Path:
    """A run that crashed after step 17: one checkpoint (step 15, inside the log window 11-20), entry 10."""
    return _crashed_run(shared, "crashed17", 17)


@pytest.fixture(scope="module")
def crashed_at_32(shared: Path, plain: Reference) -> Path:
    """A run that crashed after step 32: checkpoints 30 (newest) and 15 (previous), entries 10-30."""
    return _crashed_run(shared, "crashed32", 32)


def _copy(template: Path, tmp_path: Path) -> Path:
    """A private copy of a crashed run (under ``tmp_path/results``)."""
    shutil.copytree(template.parent, tmp_path / "results")
    return tmp_path / "results" / template.name


def _newest_file(run_dir: Path) -> Path:
    manifest = read_manifest(run_dir / "checkpoints")
    return run_dir / "checkpoints" / manifest["files"][0]


# ------------------------------------------------------------------------------------ crash and resume


def test_faults_crash_inside_a_log_window_resumes_to_the_same_record(crashed_at_17, plain, tmp_path):
    """Fault: a crash after step 17, between the checkpoint (15) and the next log step (20).

    The resumed record equals the uninterrupted one: every train.jsonl entry (loss to the last bit, its
    window from_step/window_steps) and every metric. Catches a log window that restarts at the checkpoint
    (issue 13: entry 20 averaged steps 16-20 only), any state missing from the checkpoint (not exact), and
    a resume that touches config.yaml, env.json or data.json or the kept train.jsonl lines."""
    run_dir = _copy(crashed_at_17, tmp_path)
    before, log_before = snapshot(run_dir), (run_dir / "train.jsonl").read_bytes()
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr and "error:" not in result.stderr, result.stderr
    assert_preserved(before, run_dir, ignore=RESUME_CHANGES)
    _kept_lines_unchanged(log_before, run_dir, 15)
    (record,) = iter_records(run_dir.parent)
    assert record["perf"]["resumed_from_step"] == 15
    _assert_same_run(record, plain.record)
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_faults_sigkilled_run_resumes_to_the_same_record(shared, plain, tmp_path):
    """Fault: SIGKILL of a real `bench run` right after step 17 (a hook, so the kill point is exact).

    The resume takes over the dead process's lock with one warning line naming its pid and ends with the
    uninterrupted run's train.jsonl entries and metrics. Catches what the in-process crash cannot: state
    that only lived in the killed process, a lock a dead process still "holds", a torn record."""
    results = tmp_path / "killed"
    proc = subprocess.run(hooked_bench_argv("run", *_args(shared, results)), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=hooked_env(kill_at_step=17, tiny_eval=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_dir = _only_run(results)
    assert read_manifest(run_dir / "checkpoints")["step"] == 15
    holder = (run_dir / ".lock").read_text()  # the killed run held its run lock
    assert holder.isdigit()
    before, log_before = snapshot(run_dir), (run_dir / "train.jsonl").read_bytes()
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, f"taking over the lock of process {holder}")
    assert_preserved(before, run_dir, ignore=RESUME_CHANGES)
    _kept_lines_unchanged(log_before, run_dir, 15)
    (record,) = iter_records(results)
    assert record["perf"]["resumed_from_step"] == 15
    _assert_same_run(record, plain.record)


@pytest.mark.slow
def test_faults_two_rank_checkpoint_resumes_on_one_process(shared, tmp_path, monkeypatch):
    """Fault: both ranks of a torchrun launch (gloo) SIGKILLed after step 17; resumed on one process.

    The re-sharded class centers and their SGD momentum equal the two ranks' shards concatenated; the
    loss of the first resumed step (16), of every later step and of the logged entries equal an
    uninterrupted one-process run's within float tolerance. That reference is exact in principle: with a
    backbone without BatchNorm (:func:`linear_backbone`) 2 ranks x 8 images compute the global batch of
    1 x 16, and ArcFace's full FC has no per-rank sampling stream. Catches shards concatenated in the
    wrong order or sliced wrongly, optimizer state left behind, a sampler or log window that does not
    continue where the checkpoint was taken."""
    monkeypatch.setitem(BACKBONES._entries, LINEAR_BACKBONE, linear_backbone)  # this test only
    args = ["--backbone", LINEAR_BACKBONE]
    with _step_losses() as plain_losses:
        result = _invoke("run", *_args(shared, tmp_path / "plain", *args))
    assert result.exit_code == 0, result.output
    (plain,) = iter_records(tmp_path / "plain")

    results = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               *hooked_bench_argv("run", *_args(shared, results, *args))]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=hooked_env(kill_at_step=17, tiny_eval=True, linear_backbone=True))
    assert proc.returncode != 0, "the launch ended without being killed"
    run_dir = _only_run(results)
    manifest = read_manifest(run_dir / "checkpoints")
    assert (manifest["step"], manifest["world_size"]) == (15, 2), proc.stderr[-3000:]
    shards = [load_weights_only(run_dir / "checkpoints" / name) for name in manifest["files"]]
    for rank, shard in enumerate(shards):  # each rank held its own contiguous shard of the centers
        assert shard["method"]["head.weight"].shape[0] == class_shard(CLASSES, 2, rank).size
    single = Checkpointer(run_dir / "checkpoints", DistContext()).load(["head.weight"], CLASSES)
    assert torch.equal(single["method"]["head.weight"], torch.cat([s["method"]["head.weight"] for s in shards]))
    head_group = next(g for g in single["trainer"]["optimizer"]["param_groups"] if g.get("sharded"))
    (index,) = head_group["params"]
    momentum = torch.cat([s["trainer"]["optimizer"]["state"][index]["momentum_buffer"] for s in shards])
    assert torch.equal(single["trainer"]["optimizer"]["state"][index]["momentum_buffer"], momentum)

    before = snapshot(run_dir)
    with _step_losses() as losses:
        result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, "taking over the lock of process")
    assert_preserved(before, run_dir, ignore=RESUME_CHANGES)
    assert min(losses) == 16
    assert losses[16] == pytest.approx(plain_losses[16], rel=1e-5)
    resumed_steps = range(16, STEPS + 1)
    assert [losses[s] for s in resumed_steps] == pytest.approx([plain_losses[s] for s in resumed_steps], rel=1e-4)
    (record,) = iter_records(results)
    assert record["perf"]["resumed_from_step"] == 15 and record["perf"]["world_size"] == 1
    assert [(e["from_step"], e["window_steps"]) for e in record["train"]] == WINDOWS
    assert [e["loss"] for e in record["train"]] == pytest.approx([e["loss"] for e in plain["train"]], rel=1e-5)


# ------------------------------------------------------------------------------- bad checkpoint files


def test_faults_truncated_newest_checkpoint_falls_back_to_the_previous(crashed_at_32, plain, tmp_path):
    """Fault: the newest checkpoint file (step 30) cut in half, as a disk failure or a bad copy leaves it.

    The resume says so in one warning line naming the file and both steps, continues from the previous
    checkpoint (15) and still ends with the uninterrupted record. Catches the PytorchStreamReader
    traceback (issue 13), a missing fallback, and a previous checkpoint that is not kept or not exact."""
    run_dir = _copy(crashed_at_32, tmp_path)
    newest = _newest_file(run_dir)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    before = snapshot(run_dir)
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(newest), "truncated or corrupt", "step 30",
                            "previous complete checkpoint (step 15)")
    assert_preserved(before, run_dir, ignore=RESUME_CHANGES)
    (record,) = iter_records(run_dir.parent)
    assert record["perf"]["resumed_from_step"] == 15
    _assert_same_run(record, plain.record)


def test_faults_truncated_only_checkpoint_is_one_error_line(crashed_at_17, tmp_path):
    """Fault: the only checkpoint (step 15) truncated; there is nothing to fall back to.

    One error line names the file and says so; nothing in the run directory changes, not even a lock
    file is left. Catches the traceback and a resume that rewrites train.jsonl before it has a state."""
    run_dir = _copy(crashed_at_17, tmp_path)
    newest = _newest_file(run_dir)
    newest.write_bytes(newest.read_bytes()[:1000])
    before, paths = snapshot(run_dir), tree(run_dir)
    result = _resume(run_dir)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, str(newest), "truncated or corrupt",
                          "no earlier complete checkpoint to resume from")
    assert_preserved(before, run_dir)
    assert tree(run_dir) == paths


class _Payload:
    """A pickle that creates ``marker`` when it is unpickled unsafely (``__reduce__`` runs ``open``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


#: kind -> (write a malicious checkpoint to path, load it unsafely: the control that it does run code)
MALICIOUS = {
    "torch.save": (lambda path, marker: torch.save({"format": 2, "method": _Payload(marker)}, path),
                   lambda path: torch.load(path, weights_only=False)),  # noqa: S614 - the control
    "raw-pickle": (lambda path, marker: path.write_bytes(pickle.dumps({"method": _Payload(marker)})),
                   lambda path: pickle.loads(path.read_bytes())),  # noqa: S301 - the control
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_faults_malicious_checkpoint_is_refused_and_runs_nothing(crashed_at_32, plain, tmp_path, kind):
    """Fault: the newest checkpoint replaced by a pickle whose ``__reduce__`` would create a file (issue 12,
    remote code execution on ``--resume``).

    The resume refuses it with one error line naming the .pt, the file is never created, nothing in the
    run changes; deleting the file, as the line says, resumes from the previous checkpoint (15) to the
    uninterrupted record. Catches ``weights_only=False`` (the file would exist), a traceback instead of
    the line, and a hint that is not true."""
    write, load_unsafely = MALICIOUS[kind]
    control, control_marker = tmp_path / "control.pt", tmp_path / "control-code-ran"
    write(control, control_marker)
    load_unsafely(control)
    assert control_marker.exists(), "the payload would not run code: the test proves nothing"
    run_dir = _copy(crashed_at_32, tmp_path)
    marker = tmp_path / "code-ran"
    newest = _newest_file(run_dir)
    write(newest, marker)
    before, paths = snapshot(run_dir), tree(run_dir)
    result = _resume(run_dir)
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, str(newest), "refused",
                          "delete it to resume from the previous checkpoint (step 15)")
    assert not marker.exists()
    assert_preserved(before, run_dir)
    assert tree(run_dir) == paths

    newest.unlink()
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, str(newest), "is missing", "(step 15)")
    (record,) = iter_records(run_dir.parent)
    _assert_same_run(record, plain.record)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- run locks


def test_faults_resuming_a_live_run_is_refused(shared, plain, tmp_path):
    """Fault: `bench run --resume` on a run that is still training (a fresh run, at step 17, after its
    first checkpoint), from another process's point of view (another open file description of the lock).

    The resume is refused with one error line naming the run's pid, writes nothing, and the live run goes
    on to the uninterrupted record. Catches the lock held only by ``--resume`` (issue 13: a fresh run held
    none, so the second process resumed a live run)."""
    results = tmp_path / "results"
    seen: dict[str, Any] = {}

    def resume_meanwhile(trainer: Trainer) -> None:
        run_dir = _only_run(results)
        before, paths = snapshot(run_dir), tree(run_dir)
        seen["result"] = _resume(run_dir)
        assert_preserved(before, run_dir)
        assert tree(run_dir) == paths

    with _after_step(17, resume_meanwhile):
        result = _invoke("run", *_args(shared, results))
    assert result.exit_code == 0, result.output
    assert seen["result"].exit_code == 2
    assert_one_error_line(seen["result"].stderr, f"{_only_run(results)}: in use by process {os.getpid()}")
    (record,) = iter_records(results)
    _assert_same_run(record, plain.record)


@pytest.mark.parametrize("content, fragment", [
    (None, "taking over the lock of process"),
    (b"\x80\xfe\xff\x00 not a pid", "holds no process id"),
], ids=["dead-pid", "binary"])
def test_faults_stale_lock_is_taken_over_with_one_warning(crashed_at_17, plain, tmp_path, content, fragment):
    """Fault: a ``.lock`` left behind by a process that died: holding its pid, or binary junk.

    The resume takes it over with one warning line and ends with the uninterrupted record. Catches the
    UnicodeDecodeError traceback on a binary lock (issue 13) and a stale lock that blocks forever."""
    run_dir = _copy(crashed_at_17, tmp_path)
    pid = _dead_pid()
    (run_dir / ".lock").write_bytes(str(pid).encode() if content is None else content)
    before = snapshot(run_dir)
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    line = assert_one_warning_line(result.stderr, str(run_dir / ".lock"), fragment)
    assert content is not None or f"process {pid}" in line
    assert_preserved(before, run_dir, ignore=RESUME_CHANGES)
    (record,) = iter_records(run_dir.parent)
    _assert_same_run(record, plain.record)
    assert not (run_dir / ".lock").exists()


def test_faults_concurrent_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    """Fault: a stale lock (its process died) and eight resumers taking it over at the same moment, 20 times.

    Exactly one may hold it each time; the others get the "in use" error. Catches the unlink-then-create
    takeover (issue 13): a second taker read the winner's new lock file before the pid was written (or
    after), removed it as stale and created its own, so two resumers held the run."""
    contenders, stale = 8, str(_dead_pid())
    for _ in range(20):
        (tmp_path / ".lock").write_text(stale)
        start, held = threading.Barrier(contenders), threading.Barrier(contenders)
        outcomes: list[str] = []

        def take() -> None:
            start.wait(timeout=30)
            try:
                with RunLock(tmp_path, warn=lambda message: None):
                    outcomes.append("won")
                    _wait(held)  # keep it until every contender has tried
            except Exception as exc:  # noqa: BLE001 - the "in use" error, or whatever a broken lock raises
                outcomes.append(f"{type(exc).__name__}: {exc}")
                _wait(held)

        threads = [threading.Thread(target=take, daemon=True) for _ in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert outcomes.count("won") == 1, outcomes
        assert all(outcome.startswith("ResultsDirError: ") and "in use by" in outcome
                   for outcome in outcomes if outcome != "won"), outcomes
        assert not (tmp_path / ".lock").exists()


def _wait(barrier: threading.Barrier) -> None:
    """Wait at ``barrier``, for at most 30 s (a contender that failed oddly must not hang the others)."""
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=30)


@pytest.mark.slow
def test_faults_concurrent_runs_with_equal_names_keep_their_own_records(shared, plain, tmp_path):
    """Fault: two `bench run` processes at once, same configuration and seed, on one results directory,
    with the timestamp and random suffix forced equal (hook ``run_name_stamp``), so both propose the same
    run directory names and only exclusive creation keeps them apart.

    Both succeed, in the directories ``...-0000`` and ``...-0001``, each with the uninterrupted record
    (train.jsonl entries, metrics) and its own run id; an earlier record in the directory is unchanged.
    Catches a non-exclusive ``mkdir`` (both would write into ``...-0000``: doubled log lines, one record)."""
    results = tmp_path / "shared"
    shutil.copytree(Path(plain.record["path"]), results / Path(plain.record["path"]).name)
    before = snapshot(results)
    env = hooked_env(run_name_stamp="20260101-000000", tiny_eval=True)
    # --force: the earlier record in the directory has this configuration and seed, and would be reused
    procs = [subprocess.Popen(hooked_bench_argv("run", *_args(shared, results, "--force")), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert "error:" not in stderr and "warning:" not in stderr, stderr
    assert_preserved(before, results)
    records = [r for r in iter_records(results) if r["run_id"].startswith("20260101-000000")]
    assert sorted(r["run_id"][-4:] for r in records) == ["0000", "0001"]
    for record in records:
        assert record["config"]["run_id"] == record["run_id"]
        _assert_same_run(record, plain.record)


# ------------------------------------------------------------------------------------------ full disk


def _fail_second_save(kind: str):
    """A stand-in for ``atomic_torch_save`` that fails the second checkpoint as a full disk does:
    ``OSError(ENOSPC)``, or (what ``torch.save`` really raises) a RuntimeError whose context is it."""
    from bench import checkpoint

    real_save, calls = checkpoint.atomic_torch_save, {"n": 0}

    def save(obj: Any, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] != 2:
            return real_save(obj, path)
        try:
            raise OSError(errno.ENOSPC, NO_SPACE)
        except OSError:
            if kind == "OSError":
                raise
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


@pytest.mark.parametrize("kind", ["OSError", "RuntimeError"])
def test_faults_failed_checkpoint_write_keeps_the_previous_one(shared, plain, tmp_path, monkeypatch, kind):
    """Fault: the checkpoint at step 30 fails as on a full disk (injected at the write call).

    One warning line says so and that step 15 is intact; the run goes on to the uninterrupted record, the
    next checkpoint (40) is committed with 15 as its previous one, and perf.json lists the failure.
    Catches the traceback for torch's RuntimeError (issue 12: only OSError was caught), a failed write
    that loses the previous checkpoint, and a run that stops."""
    from bench import checkpoint

    monkeypatch.setattr(checkpoint, "atomic_torch_save", _fail_second_save(kind))
    result = _invoke("run", *_args(shared, tmp_path / "results"))
    assert result.exit_code == 0, result.output
    assert_one_warning_line(result.stderr, "checkpoint at step 30 was not written (",
                            f"{NO_SPACE}); the previous checkpoint (step 15) is intact")
    (record,) = iter_records(tmp_path / "results")
    _assert_same_run(record, plain.record)
    (failure,) = record["perf"]["checkpoint_failures"]
    assert failure.startswith("checkpoint at step 30 was not written (")
    manifest = read_manifest(Path(record["path"]) / "checkpoints")
    assert (manifest["step"], manifest["previous"]["step"]) == (40, 15)
    assert sorted(p.name for p in (Path(record["path"]) / "checkpoints").iterdir()) == [
        "checkpoint.json", "step00000015-rank0.pt", "step00000040-rank0.pt"]


def _checkpoint_kib(plain: Reference) -> int:
    return max(p.stat().st_size for p in (Path(plain.record["path"]) / "checkpoints").glob("*.pt")) // 1024


def _kib(directory: Path) -> int:
    return sum(p.stat().st_size // 1024 + 4 for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.skipif(not small_fs_available(), reason="needs root and `unshare -m` to mount a small tmpfs")
def test_faults_disk_full_during_checkpoints_warns_and_the_run_goes_on(shared, plain, tmp_path):
    """Fault: a real full disk (tmpfs) with room for the run's small files and one checkpoint, in a results
    directory that already holds a complete record; a 45-step run checkpoints at 15, 30 and 45.

    Step 15 fits; 30 and 45 meet ENOSPC inside ``torch.save``: one warning line each, naming the step and
    that step 15 is intact; the run still evaluates and completes its record, listing both failures; the
    earlier record is unchanged and no temporary file is left. Catches the RuntimeError traceback of issue
    12 on a real file system, where the injected test could miss how torch reports it."""
    seed = tmp_path / "seed"
    shutil.copytree(Path(plain.record["path"]), seed / Path(plain.record["path"]).name)
    before = snapshot(seed)
    size = _kib(seed) + _checkpoint_kib(plain) * 3 // 2 + 512
    results = tmp_path / "results"
    argv = hooked_bench_argv("run", *_args(shared, results, "--budget", str(45 * BATCH)))
    done = run_on_small_fs(results, size, argv, seed_from=seed, env=hooked_env(tiny_eval=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, done.stderr
    for step, line in zip((30, 45), warnings):
        assert f"checkpoint at step {step} was not written (" in line
        assert f"{NO_SPACE}); the previous checkpoint (step 15) is intact" in line
    assert_preserved(before, results)
    (record,) = [r for r in iter_records(results) if r["run_id"] not in before_ids(before)]
    assert len(record["perf"]["checkpoint_failures"]) == 2
    checkpoints = Path(record["path"]) / "checkpoints"
    assert read_manifest(checkpoints)["step"] == 15
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint.json", "step00000015-rank0.pt"]


def before_ids(before: dict[str, str]) -> set[str]:
    """The run ids of a results-directory snapshot."""
    return {name.split("/")[0] for name in before}


def _assert_metrics_fault(output: str, run_dir: Path, before: dict[str, str]) -> None:
    """One error line naming metrics.json, the full disk and the checkpoint kept; nothing written before
    lost; no metrics.json, so the run is incomplete and ignored."""
    assert_one_error_line(output, str(run_dir / "metrics.json"), NO_SPACE, "the run is incomplete",
                          f"the last good checkpoint (step {STEPS}) is in",
                          f"`bench run --resume {run_dir.name}` continues from it")
    assert_preserved(before, run_dir, ignore=(".lock",))
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".metrics.json*")), "a temporary file was left behind"


@pytest.mark.slow
@pytest.mark.skipif(not small_fs_available(), reason="needs root and `unshare -m` to mount a small tmpfs")
def test_faults_disk_full_writing_metrics_is_one_line_and_resumable(shared, plain, tmp_path):
    """Fault: a real full disk (tmpfs filled by the hook ``fill_disk_before``) just as metrics.json is
    written at the end of a run, next to a complete record.

    One error line; everything the run wrote before (snapshot taken by the hook at the fault) and the
    earlier record are unchanged; once space is freed, `bench run --resume` evaluates the final checkpoint
    and completes the record with the uninterrupted metrics, as the line promises. Catches the OSError
    traceback and a record made complete or corrupt by a partial metrics.json."""
    seed = tmp_path / "seed"
    shutil.copytree(Path(plain.record["path"]), seed / Path(plain.record["path"]).name)
    before_seed = snapshot(seed)
    results, at_fault = tmp_path / "results", tmp_path / "at-fault.json"
    argv = hooked_bench_argv("run", *_args(shared, results, "--force"))  # the seeded record would be reused
    done = run_on_small_fs(results, _kib(seed) + _checkpoint_kib(plain) * 4 + 1024, argv, seed_from=seed,
                           env=hooked_env(tiny_eval=True, fill_disk_before="metrics.json",
                                          snapshot_to=str(at_fault)))
    assert done.returncode == 2, done.stderr[-3000:]
    assert_preserved(before_seed, results)
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name not in before_ids(before_seed)]
    _assert_metrics_fault(done.stderr, run_dir, json.loads(at_fault.read_text()))
    (results / ".filler").unlink()
    result = _resume(run_dir)
    assert result.exit_code == 0, result.output
    (record,) = [r for r in iter_records(results) if r["run_id"] == run_dir.name]
    assert record["perf"]["resumed_from_step"] == STEPS
    assert record["metrics"] == plain.record["metrics"]


def test_faults_failed_metrics_write_is_one_line(shared, tmp_path, monkeypatch):
    """Fault: metrics.json fails as on a full disk (injected at the write; the real disk is the slow twin).

    Same promises as the real one: one error line, nothing written before changed, no metrics.json.
    Catches the OSError traceback where a tmpfs cannot be mounted."""
    write_json, seen = RunRecord.write_json, {}

    def full_at_metrics(self: RunRecord, name: str, obj: Any) -> None:
        if name == "metrics.json":
            seen["before"] = snapshot(self.directory)
            raise OSError(errno.ENOSPC, NO_SPACE)
        write_json(self, name, obj)

    monkeypatch.setattr(RunRecord, "write_json", full_at_metrics)
    result = _invoke("run", *_args(shared, tmp_path / "results"))
    assert result.exit_code == 2
    _assert_metrics_fault(result.stderr, _only_run(tmp_path / "results"), seen["before"])


def test_faults_disk_full_appending_train_log_stops_with_one_line(shared, tmp_path, monkeypatch):
    """Fault: the disk fills in the middle of appending train.jsonl's line for step 30 (the first write
    call writes half the line, the next one meets ENOSPC).

    The run stops with one error line naming train.jsonl and the checkpoint kept (15); the file is cut
    back to its lines before, so it never ends in half a line. Catches the OSError traceback and a torn
    line that would break every later read of the record."""
    write, state = os.write, {}

    def half_then_full(fd: int, data: bytes) -> int:
        if fd == state.get("fd"):  # the rest of the line
            raise OSError(errno.ENOSPC, NO_SPACE)
        if bytes(data).startswith(b'{"step": 30'):
            run_dir = _only_run(tmp_path / "results")
            state.update(fd=fd, log=(run_dir / "train.jsonl").read_bytes(), before=snapshot(run_dir))
            return write(fd, bytes(data)[: len(data) // 2])
        return write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    result = _invoke("run", *_args(shared, tmp_path / "results"))
    monkeypatch.undo()
    assert result.exit_code == 2
    run_dir = _only_run(tmp_path / "results")
    assert_one_error_line(result.stderr, str(run_dir / "train.jsonl"), NO_SPACE,
                          "the last good checkpoint (step 15) is in")
    assert (run_dir / "train.jsonl").read_bytes() == state["log"]
    assert_preserved(state["before"], run_dir, ignore=(".lock",))


# ------------------------------------------------------------------------- NaN, read-only directory


def test_faults_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(shared, tmp_path, monkeypatch):
    """Fault: the loss of step 25 becomes NaN.

    The run stops at the next log step with one line naming step 25 and the last good checkpoint (15),
    writes no checkpoint of the diverged model, and changes nothing written before the NaN. Catches a
    checkpoint of a diverged model, a traceback, and a run that carries on."""
    from methods import arcface

    calls, state = {"n": 0}, {}
    real_forward = arcface.MarginHead.forward
    results = tmp_path / "results"

    def poisoned(self, embeddings, labels):
        calls["n"] += 1
        loss = real_forward(self, embeddings, labels)
        if calls["n"] != 25:
            return loss
        state["before"] = snapshot(_only_run(results))
        return loss * float("nan")

    monkeypatch.setattr(arcface.MarginHead, "forward", poisoned)
    result = _invoke("run", *_args(shared, results))
    assert result.exit_code == 1
    run_dir = _only_run(results)
    line = assert_one_error_line(result.stderr, "training failed: the loss became NaN or infinite at step 25 "
                                 f"(arcface, {run_dir.name}); the last good checkpoint (step 15) is in")
    assert result.stderr.strip().splitlines()[-1] == line  # the header lines, then the error line last
    assert read_manifest(run_dir / "checkpoints")["step"] == 15
    assert_preserved(state["before"], run_dir, ignore=(".lock",))
    assert not (run_dir / "metrics.json").exists()


@contextlib.contextmanager
def _without_write_permission(directory: Path) -> Iterator[None]:
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


def test_faults_checkpoint_into_read_only_directory(tmp_path):
    """Fault: the checkpoint directory becomes read-only between two checkpoints.

    The second write fails with "Permission denied" in the failure line, says step 10 is intact, and
    leaves every file of step 10 as it was. Catches a failed write that removes or damages the previous
    checkpoint, or raises instead of reporting."""
    base = Path(tempfile.mkdtemp(prefix="facebench-ro-"))  # outside tmp_path, whose parents are private to root
    try:
        base.chmod(0o755)
        directory = base / "ckpt"
        writer = Checkpointer(directory, DistContext())
        assert writer.save(10, {"x": torch.zeros(2)})
        before = snapshot(directory)
        with _without_write_permission(directory):
            assert not writer.save(20, {"x": torch.ones(2)})
        assert_preserved(before, directory)
        assert read_manifest(directory)["step"] == 10
        assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "step00000010-rank0.pt"]
        assert len(writer.failures) == 1
        assert "Permission denied" in writer.failures[0]
        assert "previous checkpoint (step 10) is intact" in writer.failures[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)
