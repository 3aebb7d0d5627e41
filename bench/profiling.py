"""Meters for throughput, the step-time breakdown and peak memory.

Peak memory is CUDA's ``max_memory_allocated`` on a GPU. On CPU it is the process's peak resident set
size (``VmHWM``), reset at the start of each measured phase through ``/proc/self/clear_refs`` (Linux >= 4.0)
so that one method's peak does not carry over to the next; where that reset is unavailable the
lifetime peak from ``getrusage`` is reported and the record says so.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of the current phase on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        status = Path("/proc/self/status")
        if status.is_file():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return self.method
        return self.method + ("" if self.rss_reset else " (lifetime peak: reset unavailable)")


def resident_bytes() -> int:
    """The process's current resident set size (VmRSS), or 0 where /proc is unavailable."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class StepTimer:
    """Accumulates wall time per named phase of a training step.

    On CUDA the device is synchronised at phase boundaries, so the split is real; on CPU this is free.
    """

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self._sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def breakdown_ms(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per step of each phase."""
        return {phase: 1000.0 * total / max(steps, 1) for phase, total in self.totals.items()}
