"""Run records: one directory per method run under ``results/``, written atomically, and the results index.

Layout of ``results/<run-id>/`` (``bench report`` reads only these files):

- ``config.yaml``: the resolved configuration of this method run (method parameters with defaults);
- ``env.json``: versions, device, git commit, host;
- ``data.json``: the dataset and split: recipe, identities, images, images-per-identity histogram, Gini;
- ``train.jsonl``: one line per logging interval (step, samples seen, loss, lr, img/s, method logs);
- ``perf.json``: throughput, step-time breakdown, peak memory, wall times;
- ``metrics.json``: per protocol; written last, so a run without it is incomplete and is ignored.

Every file except the append-only ``train.jsonl`` is written to a temporary file and renamed into place,
so a crash never leaves a half-written record, and run directories are created exclusively, so two
``bench run`` processes on one results directory never write into each other's runs.
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

from bench.errors import ResultsDirError

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
        with open(self.directory / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(obj, default=_json_default) + "\n")

    def truncate_jsonl(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite ``name`` (atomically) with only the lines ``keep`` accepts (a resumed run drops the
        lines logged after its checkpoint, which it is about to log again)."""
        path = self.directory / name
        if not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


class RunLock:
    """Exclusive use of a run directory by one process (a ``.lock`` file holding its pid).

    Fresh run directories are created exclusively, so two ``bench run`` processes never share one; this
    guards ``--resume``, where two processes could otherwise continue the same run at once. A lock left
    by a process that no longer exists is taken over.
    """

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(directory) / ".lock", enabled

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.path.read_text().strip() if self.path.is_file() else ""
                if holder.isdigit() and _process_alive(int(holder)):
                    raise ResultsDirError(f"{self.path.parent}: in use by process {holder} (remove {self.path} "
                                          "if that process is gone)") from None
                self.path.unlink(missing_ok=True)  # stale: its process has exited
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise ResultsDirError(f"{self.path.parent}: could not take the run lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_record(directory: Path) -> dict[str, Any] | None:
    """The files of one complete run directory as a dict, or None when the run is incomplete."""
    directory = Path(directory)
    if not (directory / "metrics.json").is_file():
        return None
    record: dict[str, Any] = {"run_id": directory.name, "path": str(directory)}
    for name in RECORD_FILES:
        path = directory / name
        key = name.split(".")[0]
        if not path.is_file():
            record[key] = None
        elif name.endswith(".yaml"):
            record[key] = yaml.safe_load(path.read_text())
        elif name.endswith(".jsonl"):
            record[key] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            record[key] = json.loads(path.read_text())
    return record


def iter_records(results_dir: Path) -> list[dict[str, Any]]:
    """Every complete run record under ``results_dir`` (sorted by run id, i.e. by start time)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    records = (read_record(d) for d in sorted(results_dir.iterdir()) if d.is_dir() and d.name != "baselines")
    return [r for r in records if r is not None]


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
