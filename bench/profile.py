"""``bench profile``: the cost of each method's head as the number of classes grows.

The backbone is replaced by fixed random embeddings, so one *step* is what a method adds on top of its
backbone: the head's or queue's logits, the loss, its backward pass, and the update of what it keeps
(the class centers' SGD step; a queue's enqueue; a memory's write). The same shape as the Partial FC
paper's speed / memory table (CVPR 2022, Tab. 1 and Fig. 6): classes on x, images/s and memory on y.

Cases (batch ``B`` images, embedding ``D``, ``C`` classes; ``G = B / 2`` identities for the methods
that take two views per identity), each built from the methods' public pieces:

- ``arcface``: full FC, :class:`methods.arcface.ArcFace`, then SGD (momentum 0.9, weight decay 5e-4, as
  the harness) on its ``[C, D]`` centers;
- ``pfc-0.1``, ``pfc-0.2``: :class:`methods.partial_fc.PartialFC` (sparse update, sample rate ``r``),
  SGD attached as the harness does (only the ``ceil(r C)`` sampled rows and their momentum move);
- ``dcq``: :meth:`methods.dcq.DCQ.logits` of ``G`` queries against its queue of ``10 %`` of the classes
  (the derived size: rounded down to a multiple of ``G``), cross-entropy, backward, enqueue of ``G``
  generated weights (random unit rows here; the weight generator is a backbone and not measured);
- ``pm``: :meth:`methods.prototype_memory.PrototypeMemory.logits` of ``B`` embeddings (``G`` classes x 2)
  against a full memory (derived size ``min(C, 16384)``), backward, write of the ``G`` prototypes;
- ``sst``: :meth:`methods.sst.SST.direction_loss` both ways against the prototype queue (derived size
  ``min(16384, C / 2)`` rounded to ``G``), backward, enqueue. MASST's head is the same queue (its extra
  cost is the momentum update of its gallery agents, which are backbones), so ``sst`` stands for both.

Per case: a warm-up step, then ``steps`` timed steps; the median step time. Peak memory is the
process's peak RSS, reset before the case (``bench.profiling.PeakMemory``; the figure includes the
Python process itself, about 0.5-0.7 GiB), or CUDA's max allocated on a GPU. Before allocating, each
case's memory is estimated: what the process already holds (RSS; CUDA: allocated) plus the case's tensors
(:meth:`Case.estimate_bytes`, from their sizes); a case whose estimate exceeds ``--memory-budget-gb`` is
not run and is reported ``over budget``. The *floor* is the time of the bare matrix products the step
cannot avoid (:meth:`Case.gemms`: full FC and PFC three ``B x K x D`` products, logits and both
gradients; the queue methods their logits and the gradient w.r.t. the embeddings, queue rows being
constants), timed on random matrices of the same shapes right after the case; ``step / floor`` is how
far the implementation is from it.

The record (``results/<stamp>-profile-<device>-<rand>/``) has ``config.yaml`` (``kind: profile`` and the
settings), ``env.json``, ``perf.json`` and ``metrics.json`` (``head-profile``: one row per case), so
``bench report`` draws the profile figure and table from it.
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.profiling import PeakMemory, resident_bytes
from bench.records import RunRecord, ensure_writable_dir, environment
from methods.registry import ConfigError, Registry

FLOAT = 4  # bytes per float32
#: SGD of the harness (bench.config.TrainSettings defaults).
SGD_ARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
DEFAULT_CLASSES = (10_000, 100_000, 300_000, 1_000_000, 2_000_000)
DEFAULT_CASES = ("arcface", "pfc-0.1", "pfc-0.2", "dcq", "pm", "sst")
#: Default memory budget: leaves room for the OS and the Python process on a 24 GiB machine (or GPU).
DEFAULT_BUDGET_GIB = 16.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One method's head at one size: :meth:`setup` allocates, :meth:`step` is one training step."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, num_classes: int, batch_size: int, embedding_size: int, device: torch.device) -> None:
        self.C, self.B, self.D, self.device = num_classes, batch_size, embedding_size, device
        self.G = batch_size // 2
        self.generator = torch.Generator(device="cpu").manual_seed(0)

    # sizes
    def rows(self) -> int:
        """Class centers, queue or memory rows the logits are computed against."""
        raise NotImplementedError

    def estimate_bytes(self) -> int:
        raise NotImplementedError

    def gemms(self) -> list[tuple[int, int, int]]:
        """The ``(m, k, n)`` matrix products (``[m, k] @ [k, n]``) one step must do."""
        raise NotImplementedError

    # work
    def setup(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def _random(self, *shape: int, unit: bool = False, grad: bool = False) -> torch.Tensor:
        values = torch.randn(*shape, generator=self.generator).to(self.device)
        if unit:
            values = F.normalize(values, dim=1)
        return values.requires_grad_(grad)

    def _labels(self, count: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, (count,), generator=self.generator).to(self.device)


CASES: Registry[type[Case]] = Registry("profile case")


class _CenterCase(Case):
    def _step_with(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        embeddings = self.embeddings.detach().requires_grad_(True)
        head(embeddings, self._labels(self.B, self.C)).backward()
        optimizer.step()


@CASES.register("arcface")
class FullFC(_CenterCase):
    name = "arcface"
    description = "full FC (ArcFace) + SGD on all C x D centers"

    def rows(self) -> int:
        return self.C

    def estimate_bytes(self) -> int:
        # centers, their gradient, SGD momentum, SGD's weight-decay temporary; the [B, C] softmax buffer,
        # its gradient and a scratch copy.
        return 4 * self.C * self.D * FLOAT + 3 * self.B * self.C * FLOAT

    def gemms(self) -> list[tuple[int, int, int]]:
        return [(self.B, self.D, self.C), (self.B, self.C, self.D), (self.C, self.B, self.D)]

    def setup(self) -> None:
        from methods.arcface import ArcFace

        torch.manual_seed(0)
        self.head = ArcFace(self.D, self.C).to(self.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), **SGD_ARGS)
        self.embeddings = self._random(self.B, self.D)

    def step(self) -> None:
        self._step_with(self.head, self.optimizer)


class _PartialFCCase(_CenterCase):
    sample_rate: ClassVar[float]

    def rows(self) -> int:
        return max(math.ceil(self.sample_rate * self.C), min(self.B, self.C))

    def estimate_bytes(self) -> int:
        # all centers and their momentum rows; the sampled rows, their gradient, momentum and a temporary;
        # the [B, K] buffer, its gradient and a scratch copy; the sampling scores and indices.
        k = self.rows()
        return 2 * self.C * self.D * FLOAT + 4 * k * self.D * FLOAT + 3 * self.B * k * FLOAT + 3 * self.C * 8

    def gemms(self) -> list[tuple[int, int, int]]:
        k = self.rows()
        return [(self.B, self.D, k), (self.B, k, self.D), (k, self.B, self.D)]

    def setup(self) -> None:
        from methods.partial_fc import PartialFC

        torch.manual_seed(0)
        self.head = PartialFC(self.D, self.C, sample_rate=self.sample_rate).to(self.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), **SGD_ARGS)
        self.head.attach_optimizer(self.optimizer)  # sampled rows' momentum swapped in and out, as the harness
        self.embeddings = self._random(self.B, self.D)

    def step(self) -> None:
        self._step_with(self.head, self.optimizer)


@CASES.register("pfc-0.1")
class PartialFC01(_PartialFCCase):
    name, sample_rate = "pfc-0.1", 0.1
    description = "Partial FC r=0.1 (sparse update)"


@CASES.register("pfc-0.2")
class PartialFC02(_PartialFCCase):
    name, sample_rate = "pfc-0.2", 0.2
    description = "Partial FC r=0.2 (sparse update)"


@CASES.register("dcq")
class DCQCase(Case):
    name = "dcq"
    description = "DCQ: queries vs a class-weight queue of 10% of the classes, enqueue"

    def setup_method(self) -> Any:
        from methods.dcq import DCQ

        torch.manual_seed(0)
        return DCQ.from_config(nn.Identity(), self.C, self.D, {"queue_fraction": 0.1})

    def rows(self) -> int:
        step = self.G
        return max(step, int(0.1 * self.C) // step * step)  # DCQ.derived_queue_size with shots = 1

    def estimate_bytes(self) -> int:
        q = self.rows()
        return q * self.D * FLOAT + 4 * self.G * q * FLOAT + q * 8

    def gemms(self) -> list[tuple[int, int, int]]:
        q = self.rows()
        return [(self.G, self.D, q), (self.G, q, self.D)]

    def setup(self) -> None:
        from methods.queues import random_unit_rows

        self.method = self.setup_method().to(self.device)
        capacity = self.method.derived_queue_size(self.B)
        self.method.queue.allocate(capacity, random_unit_rows(capacity, self.D, self.generator))
        self.queries = self._random(self.G, self.D)
        self.weights = self._random(self.G, self.D, unit=True)

    def step(self) -> None:
        labels = self._labels(self.G, self.C)
        queries = self.queries.detach().requires_grad_(True)
        logits = self.method.logits(queries, self.weights, labels)
        F.cross_entropy(logits, torch.zeros_like(labels)).backward()
        self.method.queue.enqueue(self.weights, labels)


@CASES.register("pm")
class PrototypeMemoryCase(Case):
    name = "pm"
    description = "Prototype Memory: batch prototypes + full memory of min(C, 16384), write"

    def rows(self) -> int:
        from methods.prototype_memory import DEFAULT_MEMORY_CAP

        return min(self.C, DEFAULT_MEMORY_CAP)

    def estimate_bytes(self) -> int:
        m = self.rows()
        # memory rows and the gathered copy of the rows used as negatives; [B, M] logits, gradient, scratch
        return 2 * m * self.D * FLOAT + 4 * self.B * m * FLOAT + 4 * m * 8

    def gemms(self) -> list[tuple[int, int, int]]:
        m = self.rows()
        return [(self.B, self.D, m), (self.B, m, self.D), (self.B, self.D, self.G), (self.B, self.G, self.D),
                (self.G, self.B, self.D)]

    def setup(self) -> None:
        from methods.prototype_memory import PrototypeMemory

        torch.manual_seed(0)
        self.method = PrototypeMemory.from_config(nn.Identity(), self.C, self.D).to(self.device)
        memory = self.method.memory
        # Steady state: a full memory (classes 0 .. M-1), written in batch-sized chunks.
        for start in range(0, memory.capacity, self.G):
            stop = min(start + self.G, memory.capacity)
            memory.write(self._random(stop - start, self.D, unit=True),
                         torch.arange(start, stop, device=self.device))
        self.embeddings = self._random(self.B, self.D)
        self.next_class = memory.capacity

    def step(self) -> None:
        # G classes x 2 views; mostly classes not in memory (evictions), as on large data.
        classes = (self.next_class + torch.arange(self.G, device=self.device)) % self.C
        self.next_class += self.G
        labels = classes.repeat_interleave(2)
        embeddings = self.embeddings.detach().requires_grad_(True)
        logits, targets, batch_classes, prototypes = self.method.logits(embeddings, labels)
        F.cross_entropy(logits, targets).backward()
        self.method.memory.write(prototypes.detach(), batch_classes)


@CASES.register("sst")
class SSTCase(Case):
    name = "sst"
    description = "SST / MASST: both directions vs the prototype queue of min(16384, C/2), enqueue"

    def rows(self) -> int:
        from methods.sst import PAPER_QUEUE_SIZE

        return max(self.G, min(PAPER_QUEUE_SIZE, self.C // 2) // self.G * self.G)

    def estimate_bytes(self) -> int:
        q = self.rows()
        # queue, two out-of-place copies with the batch written in; per direction [G, Q] cosines, logits,
        # gradient and scratch
        return 3 * q * self.D * FLOAT + 8 * self.G * q * FLOAT + q * 8

    def gemms(self) -> list[tuple[int, int, int]]:
        q = self.rows()
        return 2 * [(self.G, self.D, q), (self.G, q, self.D)]

    def setup(self) -> None:
        from methods.queues import random_unit_rows
        from methods.sst import SST

        torch.manual_seed(0)
        self.method = SST.from_config(nn.Identity(), self.C, self.D).to(self.device)
        capacity = self.method.derived_queue_size(self.B)
        self.method.queue.allocate(capacity, random_unit_rows(capacity, self.D, self.generator, "uniform"))
        self.probes = [self._random(self.G, self.D) for _ in range(2)]
        self.galleries = [self._random(self.G, self.D, unit=True) for _ in range(2)]

    def step(self) -> None:
        labels = self._labels(self.G, self.C)
        targets = self.method.queue.positions(self.G)
        p1, p2 = (p.detach().requires_grad_(True) for p in self.probes)
        g1, g2 = self.galleries
        loss = 0.5 * (self.method.direction_loss(p1, g2, targets) + self.method.direction_loss(p2, g1, targets))
        loss.backward()
        self.method.queue.enqueue(g1, labels)


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def floor_ms(gemms: list[tuple[int, int, int]], device: torch.device, repeats: int = 3) -> float:
    """Median time of the bare matrix products ``[m, k] @ [k, n]`` (random float32 operands)."""
    total = 0.0
    generator = torch.Generator(device="cpu").manual_seed(1)
    for m, k, n in gemms:
        a = torch.randn(m, k, generator=generator).to(device)
        b = torch.randn(k, n, generator=generator).to(device)
        out = torch.empty(m, n, device=device)
        torch.mm(a, b, out=out)  # warm-up
        total += _median_ms(lambda: torch.mm(a, b, out=out), repeats, device)
        del a, b, out
    return total


def profile_case(case: Case, steps: int, budget_bytes: int) -> dict[str, Any]:
    """One row: the case's cost, or ``over budget`` when its estimated memory exceeds ``budget_bytes``."""
    gc.collect()
    # What the process already holds (RSS on CPU, allocated on CUDA) plus what the case will allocate.
    held = resident_bytes() if case.device.type == "cpu" else int(torch.cuda.memory_allocated(case.device))
    estimate = case.estimate_bytes() + held
    row: dict[str, Any] = {"method": case.name, "description": case.description, "classes": case.C,
                           "logit_columns": case.rows(), "estimate_bytes": estimate,
                           "gemm_flop": 2 * sum(m * k * n for m, k, n in case.gemms())}
    if estimate > budget_bytes:
        return {**row, "status": "over budget"}
    memory = PeakMemory(case.device)  # resets the peak (RSS high-water mark, or CUDA's)
    start_bytes = held
    try:
        case.setup()
        case.step()  # warm-up: first-touch allocation, lazy state
        step_ms = _median_ms(case.step, steps, case.device)
        peak = memory.peak_bytes()
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        return {**row, "status": f"out of memory ({type(exc).__name__})"}
    finally:
        for attribute in list(vars(case)):
            if attribute not in ("C", "B", "D", "G", "device", "generator"):
                delattr(case, attribute)
        gc.collect()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    floor = floor_ms(case.gemms(), case.device)
    return {**row, "status": "ok", "step_ms": step_ms, "img_s": 1000.0 * case.B / step_ms,
            "peak_bytes": peak, "peak_above_start_bytes": max(peak - start_bytes, 0),
            "peak_memory_method": memory.describe(), "floor_ms": floor, "step_over_floor": step_ms / floor}


_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000}


def parse_counts(text: str) -> list[int]:
    """``"10k,100k,1M"`` -> ``[10000, 100000, 1000000]`` (ConfigError on anything else)."""
    counts = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", item)
        if not match:
            raise ConfigError(f"--classes: expected numbers like 10k,100k,1M, got {item!r}")
        value = int(round(float(match.group(1)) * _SUFFIX[match.group(2).lower()]))
        if value < 2:
            raise ConfigError(f"--classes: need at least 2 classes, got {item!r}")
        counts.append(value)
    if not counts:
        raise ConfigError("--classes: give at least one class count")
    return counts


@dataclass
class ProfileSettings:
    classes: list[int]
    cases: list[str]
    batch_size: int = 128
    embedding_size: int = 512
    steps: int = 3
    memory_budget_gib: float = DEFAULT_BUDGET_GIB
    device: str = "auto"
    out: str = "results"
    #: Intra-op CPU threads (0: torch's default).
    threads: int = 0

    def validate(self) -> None:
        for name in self.cases:
            CASES.canonical(name)
        if self.batch_size < 4 or self.batch_size % 2:
            raise ConfigError(f"--batch-size must be even and >= 4 (two views per identity), got {self.batch_size}")
        if self.embedding_size < 2:
            raise ConfigError(f"--embedding-size must be >= 2, got {self.embedding_size}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if not self.memory_budget_gib > 0:
            raise ConfigError(f"--memory-budget-gb must be > 0, got {self.memory_budget_gib}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")


def run_profile(settings: ProfileSettings, on_row: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[Path, list[dict[str, Any]]]:
    """Profile every (case, classes) and write the record; returns its directory and the rows."""
    from bench.distributed import resolve_device

    settings.validate()
    device = resolve_device(settings.device)
    results_dir = ensure_writable_dir(Path(settings.out))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    budget = int(settings.memory_budget_gib * 2**30)
    record = RunRecord.create(results_dir, "profile", device.type)
    config = {"kind": "profile", "run_id": record.run_id, "classes": settings.classes, "cases": settings.cases,
              "batch_size": settings.batch_size, "embedding_size": settings.embedding_size,
              "steps": settings.steps, "memory_budget_gib": settings.memory_budget_gib, "device": str(device),
              "threads": torch.get_num_threads(), "dtype": "float32", "sgd": SGD_ARGS}
    record.write_yaml("config.yaml", config)
    record.write_json("env.json", environment(str(device)))
    start = time.perf_counter()
    rows = []
    for name in settings.cases:
        cls = CASES.get(name)
        for classes in settings.classes:
            row = profile_case(cls(classes, settings.batch_size, settings.embedding_size, device), settings.steps,
                               budget)
            rows.append(row)
            if on_row:
                on_row(row)
    record.write_json("perf.json", {"wall_time_s": time.perf_counter() - start,
                                    "peak_memory_method": PeakMemory(device).describe()})
    conventions = {
        "step": "head or queue forward + loss + backward + update of kept state, on fixed random embeddings",
        "time": f"median of {settings.steps} steps after one warm-up step",
        "memory": "process peak RSS (VmHWM) reset per case, whole process" if device.type == "cpu"
                  else "torch.cuda.max_memory_allocated, reset per case",
        "floor": "median time of the step's bare matrix products on random float32 matrices of the same shapes",
        "over_budget": f"estimated memory above {settings.memory_budget_gib} GiB: not run",
    }
    record.write_json("metrics.json", {"head-profile": {"rows": rows, "conventions": conventions}})
    return record.directory, rows


#: Columns of the profile table (``bench profile`` output and ``bench report``'s profile section).
TABLE_HEADERS = ["method", "classes", "logit columns", "step ms", "img/s", "peak GiB", "estimate GiB", "floor ms",
                 "step / floor", "status"]


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as text cells under :data:`TABLE_HEADERS` (timing cells empty for cases not run)."""
    lines = []
    for row in rows:
        ok = row["status"] == "ok"
        lines.append([row["method"], f"{row['classes']:,}", f"{row['logit_columns']:,}",
                      f"{row['step_ms']:.1f}" if ok else "", f"{row['img_s']:,.0f}" if ok else "",
                      f"{row['peak_bytes'] / 2**30:.2f}" if ok else "",
                      f"{row['estimate_bytes'] / 2**30:.2f}", f"{row['floor_ms']:.1f}" if ok else "",
                      f"{row['step_over_floor']:.2f}" if ok else "", row["status"]])
    return lines


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    from tabulate import tabulate

    return tabulate(table_cells(rows), headers=TABLE_HEADERS, tablefmt="pipe", disable_numparse=True)
