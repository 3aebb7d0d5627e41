"""torch.distributed for the harness: process-group start-up from torchrun's environment, gradient
averaging of replicated parameters, and small collectives for logging and checkpoints.

Launch (one node, N processes; the same command line as a single-process run):

    torchrun --nproc_per_node=N -m bench run --methods pfc --split full

Several nodes: the same on every node, with ``--nnodes=M --node_rank=K --master_addr=HOST
--master_port=PORT`` (or ``--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT``). NCCL is used on GPUs, gloo
on CPUs. ``train.batch_size`` is the *global* batch (all ranks together), so a run means the same
thing on any number of processes; each rank trains on its contiguous slice of every global batch.

Data parallelism of the backbone is done here rather than with DDP: after the backward pass the
gradients of every replicated parameter group are averaged over ranks (bucketed all-reduce). Groups a
method marks ``"sharded"`` (model-parallel class centers) are left alone: their gradients are already
exact (see :mod:`methods.distributed`). Keeping this explicit lets momentum encoders, queues and sharded
heads see the plain backbone, and keeps checkpoints free of DDP's ``module.`` prefixes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as torch_dist

from bench.config import DEVICE_PATTERN
from methods.distributed import DistContext
from methods.registry import ConfigError

#: Gradients are all-reduced in flat buckets of about this many bytes.
BUCKET_BYTES = 32 * 2**20


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` must exist on this machine.

    A malformed name (``cuda:x``, ``gpu``) or a CUDA device this machine lacks is a one-line ConfigError;
    it touches nothing, so callers resolve the device before they create any file.
    """
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N (N a device index), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {name!r} but CUDA is not available on this machine; use --device cpu")
        if device.index is not None:
            _require_cuda_index(device.index, f"train.device {name!r}")
    return device


def _require_cuda_index(index: int, origin: str) -> None:
    """CUDA device ``index`` exists here; else a ConfigError that starts with ``origin`` (where it came from)."""
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{origin}: CUDA device {index} does not exist; this machine has {count} "
                          f"(cuda:0 .. cuda:{count - 1})")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device_setting: str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return DistContext(), resolve_device(device_setting)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        _require_cuda_index(device.index, f"train.device {device_setting!r} with LOCAL_RANK={local_rank}")
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank=rank, world_size=world_size), device


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter], dist: DistContext) -> None:
    """Replace each gradient by its mean over ranks (parameters without a gradient are skipped)."""
    if not dist.is_distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket, dist)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, dist)


def _reduce_bucket(bucket: list[torch.Tensor], dist: DistContext) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    torch_dist.all_reduce(flat, group=dist.group)
    flat.div_(dist.world_size)
    offset = 0
    for grad in bucket:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def mean_over_ranks(value: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """The mean of a tensor over ranks (itself with one process)."""
    if not dist.is_distributed:
        return value
    value = value.clone()
    torch_dist.all_reduce(value, group=dist.group)
    return value / dist.world_size


def all_gather_objects(obj: Any, dist: DistContext) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not dist.is_distributed:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj, group=dist.group)
    return out


def broadcast_object(obj: Any, dist: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_distributed:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src, group=dist.group)
    return holder[0]


def barrier(dist: DistContext) -> None:
    if dist.is_distributed:
        torch_dist.barrier(group=dist.group)


def check_batch_divides(batch_size: int, views_per_class: int, dist: DistContext) -> int:
    """This rank's share of a global batch; it must split into whole identities of ``views_per_class``."""
    if batch_size % (dist.world_size * views_per_class):
        raise ConfigError(f"train.batch_size ({batch_size}) must be a multiple of world size x views per class "
                          f"({dist.world_size} x {views_per_class})")
    return batch_size // dist.world_size
