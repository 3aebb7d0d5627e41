"""Shared pieces of the standing fault suite (``tests/faults/``).

Every fault test names the fault, the single line the user must see, and proves that nothing written
before the fault was lost or changed: :func:`snapshot` hashes every file under a directory before the
fault and :func:`assert_preserved` checks each of them afterwards (new files may appear; none may change
or vanish).

A real full disk: :func:`run_on_small_fs` runs a command in a private mount namespace (``unshare -m``)
with a tmpfs of a given size mounted on a directory, so a write really fails with ``ENOSPC`` (errno 28)
and nothing outside the test is touched. Where that is impossible (no ``unshare``, not root, a sandbox
without mount namespaces) :func:`small_fs_available` is False and the tests fall back to an injected
failure at the write call, saying so in their skip/xfail reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``root`` (empty if it does not exist)."""
    root = Path(root)
    digests = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def assert_preserved(before: dict[str, str], root: Path, ignore: tuple[str, ...] = ()) -> None:
    """Every file recorded by :func:`snapshot` still exists under ``root`` with the same bytes.

    ``ignore``: relative paths (or directory prefixes ending in ``/``) allowed to change, e.g. a lock.
    """
    after = snapshot(root)
    for name, digest in before.items():
        if name in ignore or any(name.startswith(prefix) for prefix in ignore if prefix.endswith("/")):
            continue
        assert name in after, f"{name} was deleted by the fault"
        assert after[name] == digest, f"{name} was changed by the fault"


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines of a command's output (there must be exactly one, and no traceback)."""
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error_line(text: str, *fragments: str) -> str:
    """``text`` holds exactly one ``error:`` line, no traceback, and the line contains every fragment."""
    assert "Traceback" not in text, text
    lines = error_lines(text)
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m bench`` subprocess of this checkout (one thread: CI's size)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@functools.lru_cache(maxsize=1)
def small_fs_available() -> bool:
    """Whether a tmpfs can be mounted in a private mount namespace here (root with ``unshare``)."""
    if shutil.which("unshare") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs \"$d\" && umount \"$d\"; "
                            "rc=$?; rmdir \"$d\" 2>/dev/null; exit $rc"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def run_on_small_fs(mount_dir: Path, size_kib: int, argv: list[str], *, seed_from: Path | None = None,
                    timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` with a ``size_kib`` KiB tmpfs mounted on ``mount_dir`` in a private mount namespace.

    ``seed_from``: a directory whose contents are copied onto the tmpfs first (e.g. an existing results
    directory, so the fault hits a directory with records in it). When the command ends, the tmpfs's
    contents are copied back over ``mount_dir`` on the real disk (``cp -a``), so the test can inspect what
    the command left behind; the mount disappears with the namespace.
    """
    mount_dir = Path(mount_dir)
    mount_dir.mkdir(parents=True, exist_ok=True)
    stash = mount_dir.parent / f".{mount_dir.name}.stash"
    seed = f"cp -a {shlex.quote(str(seed_from))}/. {shlex.quote(str(mount_dir))}/ && " if seed_from else ""
    script = (f"mkdir -p {shlex.quote(str(stash))} && "
              f"mount -t tmpfs -o size={int(size_kib)}k tmpfs {shlex.quote(str(mount_dir))} && {seed}"
              f"{{ {shlex.join(argv)}; rc=$?; }}; "
              f"cp -a {shlex.quote(str(mount_dir))}/. {shlex.quote(str(stash))}/; exit $rc")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=timeout, env=env or python_env())
    # Back on the real disk: replace the (empty) mount point's contents with what the command left there.
    shutil.rmtree(mount_dir, ignore_errors=True)
    stash.rename(mount_dir)
    return result


def bench_argv(*args: str) -> list[str]:
    """``python -m bench ARGS`` with this interpreter."""
    return [sys.executable, "-m", "bench", *args]


def assert_one_warning_line(text: str, *fragments: str) -> str:
    """``text`` holds exactly one ``warning:`` line, no traceback, and the line contains every fragment."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree(root: Path) -> list[str] | None:
    """Every path under ``root``, directories included, relative and sorted; None if ``root`` does not exist.

    Equal before and after a fault means nothing new was created, not even an empty directory (which
    :func:`snapshot`, hashing files only, cannot see).
    """
    root = Path(root)
    if not root.exists():
        return None
    return sorted(str(path.relative_to(root)) + ("/" if path.is_dir() else "") for path in root.rglob("*"))


#: The environment variable that carries :func:`hooked_main`'s hooks (JSON) into a subprocess.
HOOKS_ENV = "FACEBENCH_FAULT_HOOKS"


def hooked_bench_argv(*args: str) -> list[str]:
    """``bench ARGS`` in a new interpreter with the fault hooks of :func:`hooked_env` installed first."""
    return [sys.executable, "-c", "from tests.faults.fault_helpers import hooked_main; hooked_main()", *args]


def hooked_env(**hooks: object) -> dict[str, str]:
    """:func:`python_env` carrying ``hooks`` for :func:`hooked_main` (see there for the names)."""
    import json

    return python_env(**{HOOKS_ENV: json.dumps(hooks)})


def hooked_main() -> None:
    """Install the hooks named in ``$FACEBENCH_FAULT_HOOKS``, then run the ``bench`` CLI on ``sys.argv[1:]``.

    The hooks put a fault at a known point of a real process, with no polling and no test code in the
    package:

    - ``tiny_eval: true``: the synthetic protocols at the toy sizes of the ``tiny_eval`` fixture (conftest);
    - ``kill_at_step: N``: SIGKILL this process right after optimizer step N (every rank that reaches it);
    - ``run_name_stamp: "YYYYmmdd-HHMMSS"``: run directories get this timestamp and the suffixes 0000,
      0001, ... in order of attempts, so two processes propose the same names and only exclusive
      creation keeps their runs apart;
    - ``fill_disk_before: NAME``: fill the file system of the results directory just before the run record
      file NAME is written, so that write meets a real ENOSPC; with ``snapshot_to: PATH``, the run
      directory's :func:`snapshot` at that moment is written to PATH (JSON) first, for
      :func:`assert_preserved`;
    - ``linear_backbone: true``: register :func:`linear_backbone` as the backbone :data:`LINEAR_BACKBONE`.
    """
    import json

    hooks = json.loads(os.environ.get(HOOKS_ENV, "{}"))
    if hooks.get("tiny_eval"):
        import pytest

        from tests import conftest

        conftest.tiny_eval.__wrapped__(pytest.MonkeyPatch())  # the fixture's body, not a copy of its sizes
    if "kill_at_step" in hooks:
        _kill_after_step(int(hooks["kill_at_step"]))
    if "run_name_stamp" in hooks:
        _fix_run_names(hooks["run_name_stamp"])
    if "fill_disk_before" in hooks:
        _fill_disk_before(hooks["fill_disk_before"], hooks.get("snapshot_to"))
    if hooks.get("linear_backbone"):
        from bench.backbones import BACKBONES

        BACKBONES.register(LINEAR_BACKBONE, linear_backbone)
    from bench.cli import main

    sys.argv = ["bench", *sys.argv[1:]]
    main()


def _kill_after_step(step: int) -> None:
    import signal

    from bench.train import Trainer

    update = Trainer.update

    def update_then_die(self: Trainer) -> None:
        update(self)
        if self.steps_done == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.update = update_then_die


def _fix_run_names(stamp: str) -> None:
    import datetime as dt
    import itertools
    import secrets
    import types

    from bench import records

    class Stamped(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:
            return dt.datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=tz)

    suffixes = (f"{n:04d}" for n in itertools.count())
    records.dt = types.SimpleNamespace(datetime=Stamped)
    records.secrets = types.SimpleNamespace(
        token_hex=lambda nbytes=None: next(suffixes) if nbytes == 2 else secrets.token_hex(nbytes))


def _fill_disk_before(name: str, snapshot_to: str | None) -> None:
    import json

    from bench.records import RunRecord

    write_json = RunRecord.write_json

    def fill_then_write(self: RunRecord, file_name: str, obj: object) -> None:
        if file_name == name:
            if snapshot_to:
                Path(snapshot_to).write_text(json.dumps(snapshot(self.directory)))
            fill_file_system(self.directory.parent / ".filler")
        write_json(self, file_name, obj)

    RunRecord.write_json = fill_then_write


def fill_file_system(path: Path) -> None:
    """Append zeros to ``path`` until its file system is full: ENOSPC at chunks down to one byte."""
    import errno

    with open(path, "ab", buffering=0) as handle:
        chunk = 1 << 20
        while chunk:
            try:
                handle.write(bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2


#: The name of :func:`linear_backbone` where a test registers it (never in the package's registry).
LINEAR_BACKBONE = "fault-linear"


def linear_backbone(embedding_size: int = 32, input_size: int = 32):
    """A backbone without BatchNorm, whose batch statistics are per rank by design: with it, 2 ranks x b
    images train as 1 process x 2b (the layout of tests/test_distributed_training.py's network)."""
    from torch import nn

    hidden = 64
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, hidden), nn.PReLU(hidden),
                         nn.Linear(hidden, embedding_size))


#: Name of the earlier run record that fault tests seed and then check is left untouched.
EARLIER_RUN = "20200101-000000-arcface-s0-earlier"


def seed_earlier_record(results: Path, metrics: dict) -> Path:
    """An earlier, complete-looking run record under ``results`` (``config.yaml`` + ``metrics.json``)
    for a fault test to prove unchanged; returns its directory."""
    import json

    earlier = Path(results) / EARLIER_RUN
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("method: arcface\n")
    (earlier / "metrics.json").write_text(json.dumps(metrics))
    return earlier
