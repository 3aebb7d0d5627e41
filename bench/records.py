"""Run records: one directory per method run under ``results/``, written atomically, and the results index.

Layout of ``results/<run-id>/`` (``bench report`` reads only these files):

- ``config.yaml``: the resolved configuration of this method run (method parameters with defaults);
- ``env.json``: versions, device, git commit, host;
- ``data.json``: the dataset and split: recipe, identities, images, images-per-identity histogram, Gini;
- ``train.jsonl``: one line per logging interval (step, samples seen, loss, lr, img/s, method logs, and
  ``from_step`` / ``window_steps``: the steps the interval's means cover);
- ``perf.json``: throughput, step-time breakdown, peak memory, wall times;
- ``metrics.json``: per protocol; written last, so a run without it is incomplete and is ignored.

Every file except ``train.jsonl`` is written to a temporary file and renamed into place, so a crash
never leaves a half-written one; ``train.jsonl`` is appended a line at a time (a failed append is cut back
to its last whole line) and rewritten atomically, without the lines logged after the checkpoint, when a
run is resumed. Run directories are created exclusively, so two ``bench run`` processes on one results
directory never write into each other's runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from bench.errors import DataError, ResultsDirError

RECORD_FILES = ("config.yaml", "env.json", "data.json", "train.jsonl", "perf.json", "metrics.json")


def atomic_write_with(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s directory, fsync, then rename it over
    ``path``: readers see the old file or the whole new one, never a part (the temporary file is removed
    if anything fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_with`)."""
    atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_npy(path: Path, array: Any) -> None:
    """Write a numpy array in ``.npy`` format atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    atomic_write_bytes(path, buffer.getvalue())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise one clear :class:`ResultsDirError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ResultsDirError(f"results directory {path} is not writable: {exc.strerror or exc}") from None
    return path


class RunRecord:
    """The writer of one run directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.run_id = self.directory.name

    @classmethod
    def create(cls, results_dir: Path, *parts: str) -> RunRecord:
        """A new, exclusively created ``<results_dir>/<timestamp>-<parts>-<random>/``."""
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = "-".join([stamp, *(p.replace("/", "_") for p in parts if p)])
        for _ in range(100):
            directory = Path(results_dir) / f"{stem}-{secrets.token_hex(2)}"
            try:
                directory.mkdir(parents=False, exist_ok=False)
                return cls(directory)
            except FileExistsError:
                continue
            except OSError as exc:
                raise ResultsDirError(f"cannot create run directory {directory}: {exc.strerror or exc}") from None
        raise ResultsDirError(f"cannot find a free run directory name under {results_dir}")  # pragma: no cover

    def write_yaml(self, name: str, obj: Any) -> None:
        atomic_write_text(self.directory / name, yaml.safe_dump(obj, sort_keys=False))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.directory / name, obj)

    def append_jsonl(self, name: str, obj: Any) -> None:
        """Append ``obj`` to ``name`` as one JSON line.

        A failed write (disk full) cuts the file back to its length before, so it never ends in part of
        a line, and raises :class:`ResultsDirError` naming the file (ours: issue 12)."""
        path = self.directory / name
        line = (json.dumps(obj, default=_json_default) + "\n").encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ResultsDirError(f"{path}: cannot append a line ({exc.strerror or exc})") from None
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
            except OSError as exc:
                os.ftruncate(fd, size)
                raise ResultsDirError(f"{path}: cannot append a line ({exc.strerror or exc}); the lines before it "
                                      "are intact") from None
        finally:
            os.close(fd)

    def truncate_jsonl(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite ``name`` (atomically) with only the lines ``keep`` accepts: a resumed run drops the lines
        logged after its checkpoint, which it is about to log again.

        A last line without its newline was torn by a crash while it was appended (after the checkpoint,
        which is written after the step's line) and is dropped too; any other unparsable line raises
        :class:`ResultsDirError` naming it, and the file is left as it was."""
        path = self.directory / name
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultsDirError(f"{path}: line {number} is not valid JSON ({exc.msg}); cannot rewrite it "
                                      "for the resumed run") from None
            if keep(entry):
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunLock:
    """Exclusive use of a run directory by one process, for as long as it works in it: ``bench run`` takes
    it right after creating the directory and keeps it until ``metrics.json`` is written; ``bench run
    --resume`` takes it before reading anything of the run.

    The lock is an ``fcntl.flock`` on ``<run>/.lock``, which also holds the holder's pid for messages. The
    kernel grants the flock to one open file at a time and drops it when its process ends, however it
    ends (SIGKILL included): a lock left behind by a dead process is free, and of several processes taking
    it over at once exactly one succeeds (ours: issue 13; the earlier unlink-then-create takeover let two
    resumers both win, and only ``--resume`` took the lock). What a dead holder left in the file, a pid or
    bytes that are no pid at all, is overwritten with one warning.
    """

    def __init__(self, directory: Path, enabled: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.path, self.enabled = Path(directory) / ".lock", enabled
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        import fcntl  # POSIX only: imported where used

        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_content(fd)
                os.close(fd)
                who = f"process {holder.decode()}" if holder.isdigit() else "another process"
                raise ResultsDirError(f"{self.path.parent}: in use by {who} (a run, or a resume of it, holds "
                                      f"{self.path})") from None
            if _same_file(fd, self.path):
                self._take_over(fd)
                return self
            os.close(fd)  # its holder released and removed it between our open and flock: try the new file
        raise ResultsDirError(f"{self.path.parent}: could not take the run lock {self.path}")  # pragma: no cover

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ResultsDirError(f"{self.path.parent}: cannot take the run lock {self.path} "
                                  f"({exc.strerror or exc})") from None

    def _take_over(self, fd: int) -> None:
        """Write our pid into the locked file, warning about what a dead holder left there."""
        left = _lock_content(fd)
        if left.isdigit():
            self.warn(f"{self.path}: taking over the lock of process {left.decode()}, which no longer holds it")
        elif left:
            self.warn(f"{self.path}: holds no process id (unreadable content); taking it over as stale")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before releasing: a process that opened it sees it is gone
            os.close(self._fd)
            self._fd = None


def _lock_content(fd: int) -> bytes:
    """The stripped content of an open lock file (at most 64 bytes: a pid, or whatever else is there)."""
    return os.pread(fd, 64, 0).strip()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def read_record(directory: Path) -> dict[str, Any] | None:
    """The files of one complete run directory as a dict, or None when the run is incomplete (no
    ``metrics.json``: still running, or stopped before its end).

    A file of a complete record that cannot be read or parsed, or holds the wrong kind of value (every
    file a mapping, ``train.jsonl`` one object per line), raises :class:`DataError` naming the file and
    why, so that :func:`iter_records` can skip that one run.
    """
    directory = Path(directory)
    if not (directory / "metrics.json").is_file():
        return None
    record: dict[str, Any] = {"run_id": directory.name, "path": str(directory)}
    for name in RECORD_FILES:
        path = directory / name
        record[name.split(".")[0]] = _read_record_file(path) if path.is_file() else None
    return record


def complete_runs_by_fingerprint(results_dir: Path) -> dict[str, Path]:
    """Config fingerprint -> directory of the newest complete run record with it, under ``results_dir``.

    What ``bench run`` and ``bench reproduce`` reuse instead of training again (issue 15, item 3). Only
    ``config.yaml`` is read, and only of complete runs (``metrics.json`` present); a record whose
    ``config.yaml`` cannot be read or has no fingerprint is not reused (``bench report`` warns about it).
    """
    found: dict[str, Path] = {}
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return found
    for directory in sorted(results_dir.iterdir()):  # run ids sort by start time: the newest wins
        if not directory.is_dir() or not (directory / "metrics.json").is_file():
            continue
        try:
            config = _read_record_file(directory / "config.yaml")
        except DataError:
            continue
        fingerprint = config.get("config_fingerprint") if isinstance(config, dict) else None
        if isinstance(fingerprint, str):
            found[fingerprint] = directory
    return found


def _read_record_file(path: Path) -> dict[str, Any] | list[dict[str, Any]]:
    """One record file parsed: a mapping (``.yaml``, ``.json``) or a list of mappings (``.jsonl``), else
    :class:`DataError` with the file and the reason in one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".jsonl":
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [_mapping(path, _parse_json(path, line, f"line {number}: "), f"line {number} ")
                for number, line in lines]
    if path.suffix == ".yaml":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        value = _parse_json(path, text)
    return _mapping(path, value)


def _parse_json(path: Path, text: str, where: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {where}not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _mapping(path: Path, value: Any, where: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        found = "nothing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{path}: {where}holds {found}, expected a mapping of names to values")
    return value


def warn_broken_record(error: DataError) -> None:
    """Report a skipped record as one ``warning:`` line on stderr (the message names the file and why)."""
    print(f"warning: skipped a broken run record: {error}", file=sys.stderr)


def iter_records(results_dir: Path, on_broken: Callable[[DataError], None] | None = warn_broken_record
                 ) -> list[dict[str, Any]]:
    """Every complete, readable run record under ``results_dir`` (sorted by run id, i.e. by start time).

    A broken record (:func:`read_record` raises) is left out and handed to ``on_broken`` (default: one
    warning line on stderr), so one bad file costs its own run, not every report and check (ours: issue 13).
    ``on_broken=None`` raises instead.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    records = []
    for directory in sorted(results_dir.iterdir()):
        if not directory.is_dir() or directory.name == "baselines":
            continue
        try:
            record = read_record(directory)
        except DataError as error:
            if on_broken is None:
                raise
            on_broken(error)
            continue
        if record is not None:
            records.append(record)
    return records


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the FaceBench checkout (with ``+dirty`` when it has uncommitted changes), if any."""
    here = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware and provenance for ``env.json``."""
    import numpy
    import torch

    import bench

    info: dict[str, Any] = {
        "facebench": bench.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(index),
                    gpu_memory_bytes=torch.cuda.get_device_properties(index).total_memory)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info
