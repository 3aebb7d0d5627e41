"""Checkpoints that resume exactly, survive failed writes, and re-shard to another number of ranks.

Layout, under ``results/<run-id>/checkpoints/``: one file per rank and step,
``step<NNNNNNNN>-rank<R>.pt``, and a manifest ``checkpoint.json`` naming the step and files of the
newest complete checkpoint. Each rank writes its file atomically (temporary file + rename); only when
every rank succeeded does rank 0 replace the manifest, and only then are the older files removed. A
crash or a failed write (disk full, permission denied) therefore always leaves the previous checkpoint
intact and named by the manifest.

A rank's file holds the method's ``state_dict`` (backbone, class-center shard, queues, memories,
momentum encoders, sampling generators), the trainer's state (optimizer, LR schedule, AMP scaler, step),
and the RNG states (torch CPU and CUDA, NumPy, Python). The sampler's position is the step: batch ``b``
is a pure function of (seed, b).

Re-sharding. ``Method.sharded_state_keys()`` names the entries split along dim 0 in contiguous class
shards (:func:`methods.distributed.class_shard`). Resuming on another number of ranks concatenates every
old rank's rows of those entries (and of the optimizer state of parameters in groups marked
``"sharded"``) and keeps this rank's new rows; replicated entries come from old rank 0. insightface
cannot resume on another GPU count (issue #1811); this can. What cannot carry over exactly is a
per-rank random stream (Partial FC's sampling generator): after a change of world size each rank
continues from old rank 0's stream.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.distributed import all_gather_objects, broadcast_object
from bench.errors import BenchError
from bench.records import atomic_write_json, atomic_write_with
from methods.distributed import DistContext, class_shard

MANIFEST = "checkpoint.json"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    atomic_write_with(path, lambda handle: torch.save(obj, handle))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of the newest complete checkpoint under ``directory``, or None."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: unreadable checkpoint manifest ({exc})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise BenchError(f"{path}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}")
    return manifest


class Checkpointer:
    """Writes and reads the checkpoints of one run directory (all ranks call every method)."""

    def __init__(self, directory: Path, dist: DistContext) -> None:
        self.directory, self.dist = Path(directory), dist
        #: One line per failed write, for the caller to report (rank 0).
        self.failures: list[str] = []

    def _file(self, step: int, rank: int) -> Path:
        return self.directory / f"step{step:08d}-rank{rank}.pt"

    def save(self, step: int, payload: dict[str, Any]) -> bool:
        """Write this rank's ``payload`` for ``step``; True when the whole checkpoint was committed."""
        path = self._file(step, self.dist.rank)
        error = ""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"format": FORMAT_VERSION, "step": step, "rank": self.dist.rank,
                               "world_size": self.dist.world_size, **payload}, path)
        except OSError as exc:
            error = f"{path}: {exc.strerror or exc}"
        errors = [e for e in all_gather_objects(error, self.dist) if e]
        committed = False
        if not errors and self.dist.is_main:
            try:
                atomic_write_json(self.directory / MANIFEST, {
                    "format": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                    "files": [self._file(step, r).name for r in range(self.dist.world_size)]})
                committed = True
            except OSError as exc:
                errors.append(f"{self.directory / MANIFEST}: {exc.strerror or exc}")
        committed = broadcast_object(committed, self.dist)
        if committed:
            self._remove_other_steps(keep=step)
        else:
            path.unlink(missing_ok=True)
            previous = self._previous_step()
            kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None else \
                "there is no earlier checkpoint"
            self.failures.append(f"checkpoint at step {step} was not written ({errors[0] if errors else 'manifest'});"
                                 f" {kept}")
        return committed

    def _previous_step(self) -> int | None:
        try:
            manifest = read_manifest(self.directory)
        except BenchError:
            return None
        return None if manifest is None else int(manifest["step"])

    def _remove_other_steps(self, keep: int) -> None:
        suffix = f"-rank{self.dist.rank}.pt"
        for old in self.directory.glob(f"step*{suffix}"):
            if old.name != self._file(keep, self.dist.rank).name:
                old.unlink(missing_ok=True)

    def load(self, sharded_keys: list[str], num_classes: int) -> dict[str, Any]:
        """This rank's payload of the newest checkpoint, re-sharded if the number of ranks changed."""
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise BenchError(f"{self.directory}: no checkpoint to resume from")
        files = [self.directory / name for name in manifest["files"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BenchError(f"{missing[0]}: checkpoint file named by {MANIFEST} is missing")
        if manifest["world_size"] == self.dist.world_size:
            return torch.load(files[self.dist.rank], map_location="cpu", weights_only=False)
        old = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
        return reshard(old, sharded_keys, num_classes, self.dist)


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
    return trainer
