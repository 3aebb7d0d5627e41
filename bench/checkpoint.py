"""Checkpoints that resume exactly, survive failed writes, load no code, and re-shard to another number of ranks.

Layout, under ``results/<run-id>/checkpoints/``: one file per rank and step,
``step<NNNNNNNN>-rank<R>.pt``, and a manifest ``checkpoint.json`` naming the step, world size and files of
the newest complete checkpoint and, under ``"previous"``, of the complete checkpoint before it. Each rank
writes its file atomically (temporary file + rename); only when every rank succeeded does rank 0 replace
the manifest, and only then are files of steps the manifest no longer names removed. A crash or a failed
write (disk full, permission denied: ``torch.save`` reports a full disk as a RuntimeError whose context is
the ``OSError``) therefore always leaves the previous checkpoint intact and named by the manifest; the
failure is one warning line and the run goes on.

A rank's file holds only what ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings,
plain containers): the method's ``state_dict`` (backbone, class-center shard, queues, memories,
momentum encoders, sampling generators as byte tensors), the trainer's state (optimizer, LR schedule, AMP
scaler, step, the open logging window), and the RNG states (torch CPU and CUDA; NumPy's as a tensor and
numbers; Python's as a tuple of ints). Files are read with ``weights_only=True`` only, so a crafted file
cannot run code on resume: one whose pickle asks for anything else is refused with one line naming it
(ours: issue 12). The sampler's position is the step: batch ``b`` is a pure function of (seed, b).

Resume reads the newest checkpoint. If one of its files is missing, truncated or otherwise unreadable
(a crash of the disk rather than of the run), it falls back to the previous complete checkpoint with a
warning naming both steps, and fails with one line naming the file when there is none (ours: issue 13; an
automatic fallback rather than a ``--from-step`` flag, since the previous checkpoint is by construction
the newest one that can be read). A refused file (not plain data) is never skipped silently: it stops the
resume with one line; deleting it makes the next resume fall back.

Re-sharding. ``Method.sharded_state_keys()`` names the entries split along dim 0 in contiguous class
shards (:func:`methods.distributed.class_shard`). Resuming on another number of ranks concatenates every
old rank's rows of those entries (and of the optimizer state of parameters in groups marked
``"sharded"``) and keeps this rank's new rows; replicated entries come from old rank 0, and the open
logging window's loss sum is the mean of the old ranks' (the logged loss is a mean over ranks). insightface
cannot resume on another GPU count (issue #1811); this can. What cannot carry over exactly is a per-rank
random stream (Partial FC's sampling generator): after a change of world size each rank continues from old
rank 0's stream.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.distributed import all_gather_objects, broadcast_object
from bench.errors import BenchError, DataError
from bench.records import atomic_write_json, atomic_write_with
from methods.distributed import DistContext, class_shard

MANIFEST = "checkpoint.json"
#: 2: weights-only payloads and a manifest naming the previous checkpoint too (1: pickled NumPy state).
FORMAT_VERSION = 2
#: What every checkpoint file holds; a file without one of them is not a FaceBench checkpoint.
PAYLOAD_KEYS = ("format", "step", "rank", "world_size", "method", "trainer", "rng")


def rng_state() -> dict[str, Any]:
    """The global RNG states in forms ``weights_only`` loading accepts (NumPy's key array as an int64
    tensor: its values are below 2**32, so the round trip is exact)."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"bit_generator": str(bit_generator), "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])


def os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or one in its ``__cause__``/``__context__`` chain.

    ``torch.save`` to a full disk raises a RuntimeError (``unexpected pos ...``) whose context is the
    ``OSError(ENOSPC)`` of the file write; any other RuntimeError is a bug, not a failed write."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class UnreadableCheckpoint(BenchError):
    """A checkpoint file is missing, truncated or corrupt (``refused``: it is not plain data)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def load_weights_only(path: Path) -> dict[str, Any]:
    """One checkpoint file, read with ``torch.load(weights_only=True)`` on the CPU.

    A pickle that asks for anything but tensors and plain data (a class, a function: code) is refused by
    torch's weights-only unpickler before anything runs; that, or a file that cannot be read at all
    (missing, truncated, not a checkpoint), raises :class:`UnreadableCheckpoint` naming the file.
    """
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol would otherwise print two lines
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported (?:global: )?GLOBAL \S+|Unsupported operand \d+", str(exc), re.IGNORECASE)
        reason = found.group(0) if found else "not plain data"
        raise UnreadableCheckpoint(f"{path}: refused by weights-only loading ({reason}): it holds more than tensors "
                                   "and plain data, which FaceBench never writes, and none of it was run",
                                   refused=True) from None
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{path}: checkpoint file named by {MANIFEST} is missing") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file means: unreadable
        first_sentence = " ".join(str(exc).split()).split(". ")[0][:160]
        detail = f"{type(exc).__name__}: {first_sentence}" if first_sentence else type(exc).__name__
        raise UnreadableCheckpoint(f"{path}: truncated or corrupt checkpoint ({detail})") from None
    missing = [key for key in PAYLOAD_KEYS if key not in payload] if isinstance(payload, dict) else ["format"]
    if missing:
        raise UnreadableCheckpoint(f"{path}: not a FaceBench checkpoint (no '{missing[0]}')")
    return payload


def bare_state_dict(payload: Any, path: Path) -> dict[str, Any]:
    """The model state dict inside a weights file that is not a FaceBench checkpoint: unwrapped from a
    ``state_dict`` / ``backbone`` / ``model`` entry, ``module.`` (DataParallel / DDP) prefixes dropped."""
    for key in ("state_dict", "backbone", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected a state dict, got {type(payload).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in payload.items()}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    atomic_write_with(path, lambda handle: torch.save(obj, handle))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest under ``directory``, or None: ``step``, ``world_size`` and ``files`` of the newest
    complete checkpoint, and ``previous`` (the same keys, or None) of the complete checkpoint before it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: unreadable checkpoint manifest ({exc})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version == 1:
        raise BenchError(f"{path}: checkpoint format 1 (an older FaceBench, whose files can only be loaded "
                         f"unsafely) cannot be resumed; this version writes and reads format {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise BenchError(f"{path}: checkpoint format {version} is not {FORMAT_VERSION}")
    return manifest


def _entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """The step, world size and files of one checkpoint named by a manifest."""
    return {"step": int(manifest["step"]), "world_size": int(manifest["world_size"]),
            "files": list(manifest["files"])}


class Checkpointer:
    """Writes and reads the checkpoints of one run directory (all ranks call every method)."""

    def __init__(self, directory: Path, dist: DistContext) -> None:
        self.directory, self.dist = Path(directory), dist
        #: One line per failed write, for the caller to report (rank 0).
        self.failures: list[str] = []
        #: One line per checkpoint that could not be read and was passed over by :meth:`load`.
        self.warnings: list[str] = []
        #: The newest checkpoint known complete and readable: the last one committed or loaded.
        self.last_good: dict[str, Any] | None = None

    def _file(self, step: int, rank: int) -> Path:
        return self.directory / f"step{step:08d}-rank{rank}.pt"

    def save(self, step: int, payload: dict[str, Any]) -> bool:
        """Write this rank's ``payload`` for ``step``; True when the whole checkpoint was committed.

        A failed write (on any rank) removes this step's files and adds a line to :attr:`failures`; the
        previous checkpoint stays named by the manifest."""
        path = self._file(step, self.dist.rank)
        error = self._write(path, {"format": FORMAT_VERSION, "step": step, "rank": self.dist.rank,
                                   "world_size": self.dist.world_size, **payload})
        errors = [e for e in all_gather_objects(error, self.dist) if e]
        entry = {"step": step, "world_size": self.dist.world_size,
                 "files": [self._file(step, r).name for r in range(self.dist.world_size)]}
        committed = False
        if not errors and self.dist.is_main:
            try:
                atomic_write_json(self.directory / MANIFEST, {"format": FORMAT_VERSION, **entry,
                                                              "previous": self.last_good})
                committed = True
            except OSError as exc:
                errors.append(f"{self.directory / MANIFEST}: {exc.strerror or exc}")
        committed = broadcast_object(committed, self.dist)
        if committed:
            self._remove_unnamed(keep={*entry["files"], *(self.last_good or {}).get("files", [])})
            self.last_good = entry
        else:
            path.unlink(missing_ok=True)
            kept = (f"the previous checkpoint (step {self.last_good['step']}) is intact" if self.last_good
                    else "there is no earlier checkpoint")
            reason = errors[0] if errors else f"{self.directory / MANIFEST} not written on rank 0"
            self.failures.append(f"checkpoint at step {step} was not written ({reason}); {kept}")
        return committed

    def _write(self, path: Path, payload: dict[str, Any]) -> str:
        """Write one rank's file; "" on success, else the file and the reason (a failed write, not a bug)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(payload, path)
        except (OSError, RuntimeError) as exc:
            cause = os_error_of(exc)
            if cause is None:
                raise
            return f"{path}: {cause.strerror or cause}"
        return ""

    def _remove_unnamed(self, keep: set[str]) -> None:
        """Remove this rank's files of steps the manifest no longer names (rank 0 also those of ranks that
        exist no more, after a resume on fewer ranks)."""
        for old in self.directory.glob("step*-rank*.pt"):
            digits = old.stem.rpartition("-rank")[2]
            rank = int(digits) if digits.isdigit() else -1
            mine = rank == self.dist.rank or (self.dist.is_main and rank >= self.dist.world_size)
            if mine and old.name not in keep:
                old.unlink(missing_ok=True)

    def load(self, sharded_keys: list[str], num_classes: int) -> dict[str, Any]:
        """This rank's payload of the newest readable checkpoint, re-sharded if the number of ranks changed.

        When a file of the newest checkpoint is missing, truncated or corrupt on any rank, every rank
        falls back to the previous checkpoint and :attr:`warnings` says so, naming the file and both steps.
        A refused file (not plain data), or no readable checkpoint at all, raises a one-line BenchError.
        """
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise BenchError(f"{self.directory}: no checkpoint to resume from")
        entries = [_entry(manifest)] + ([_entry(manifest["previous"])] if manifest.get("previous") else [])
        for entry, earlier in zip(entries, [*entries[1:], None]):
            payload, problem = self._try_load(entry, sharded_keys, num_classes)
            problems = [p for p in all_gather_objects(problem, self.dist) if p]
            if not problems:
                self.last_good = entry
                return payload
            message, refused = problems[0]
            if refused:
                raise BenchError(message + (f"; delete it to resume from the previous checkpoint (step "
                                            f"{earlier['step']})" if earlier else ""))
            if earlier is None:
                raise BenchError(message + ("; the newer checkpoint is unreadable too" if entry is not entries[0]
                                            else "; there is no earlier complete checkpoint to resume from"))
            self.warnings.append(f"{message}: the checkpoint at step {entry['step']} cannot be resumed; "
                                 f"resuming from the previous complete checkpoint (step {earlier['step']})")
        raise AssertionError("unreachable: the oldest entry returns or raises")  # pragma: no cover

    def _try_load(self, entry: dict[str, Any], sharded_keys: list[str], num_classes: int
                  ) -> tuple[dict[str, Any] | None, tuple[str, bool] | None]:
        """(payload, None), or (None, (message, refused)) when a file of ``entry`` cannot be read."""
        files = [self.directory / name for name in entry["files"]]
        try:
            if entry["world_size"] == self.dist.world_size:
                return _read(files[self.dist.rank], entry["step"]), None
            old = [_read(f, entry["step"]) for f in files]
        except UnreadableCheckpoint as exc:
            return None, (str(exc), exc.refused)
        return reshard(old, sharded_keys, num_classes, self.dist), None


def _read(path: Path, step: int) -> dict[str, Any]:
    """:func:`load_weights_only`, checking that the file holds the step the manifest names."""
    payload = load_weights_only(path)
    if payload["step"] != step:
        raise UnreadableCheckpoint(f"{path}: holds step {payload['step']}, but {MANIFEST} names step {step}")
    return payload


def _rows(num_classes: int, total_rows: int, dist: DistContext) -> slice:
    per_class = total_rows // num_classes
    shard = class_shard(num_classes, dist.world_size, dist.rank)
    return slice(shard.start * per_class, shard.stop * per_class)


def reshard(old: list[dict[str, Any]], sharded_keys: list[str], num_classes: int,
            dist: DistContext) -> dict[str, Any]:
    """Combine old ranks' payloads into this rank's payload for ``dist.world_size`` ranks."""
    base = dict(old[0])
    method_state = dict(base["method"])
    for key in sharded_keys:
        full = torch.cat([payload["method"][key] for payload in old])
        method_state[key] = full[_rows(num_classes, full.shape[0], dist)].clone()
    base["method"] = method_state
    base["trainer"] = _reshard_trainer([payload["trainer"] for payload in old], num_classes, dist)
    base["rng"] = old[min(dist.rank, len(old) - 1)]["rng"]
    base["rank"], base["world_size"] = dist.rank, dist.world_size
    return base


def _reshard_trainer(old: list[dict[str, Any]], num_classes: int, dist: DistContext) -> dict[str, Any]:
    trainer = dict(old[0])
    optimizer = {"state": dict(old[0]["optimizer"]["state"]), "param_groups": old[0]["optimizer"]["param_groups"]}
    for group in optimizer["param_groups"]:
        if not group.get("sharded"):
            continue
        for index in group["params"]:
            if index not in optimizer["state"]:
                continue
            merged = {}
            for name, value in optimizer["state"][index].items():
                if torch.is_tensor(value) and value.ndim >= 1:
                    full = torch.cat([payload["optimizer"]["state"][index][name] for payload in old])
                    merged[name] = full[_rows(num_classes, full.shape[0], dist)].clone()
                else:
                    merged[name] = value
            optimizer["state"][index] = merged
    trainer["optimizer"] = optimizer
    # The open logging window: its loss sum enters a mean over ranks when logged, so carry the old ranks' mean.
    trainer["log_window"] = {**old[0]["log_window"],
                             "loss_sum": torch.stack([payload["log_window"]["loss_sum"] for payload in old]).mean()}
    return trainer
