"""Helpers for tests that run several processes with torch.distributed (gloo, CPU).

``run_ranks(fn, world_size, tmp_path, *args)`` starts ``world_size`` processes, initialises a gloo group
through a file in ``tmp_path``, calls ``fn(rank, world_size, *args)`` in each, and returns what each rank
returned (torch.save'd to ``tmp_path``), in rank order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path: Path, *args):
    init_file = tmp_path / "dist-init"
    out_dir = tmp_path / "dist-out"
    out_dir.mkdir(exist_ok=True)
    mp.spawn(_entry, args=(world_size, str(init_file), str(out_dir), fn, args), nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
