"""``bench profile``: the cost of each method's head as the number of classes grows.

The backbone is replaced by fixed random embeddings, so one *step* is what a method adds on top of its
backbone: its logits, the loss, the backward pass and the update of what it keeps (the class centers' SGD
step, a queue's enqueue, a memory's write, momentum encoders). The same shape as the Partial FC paper's
speed / memory table (CVPR 2022, Tab. 1 and Fig. 6): classes on x, images/s and memory on y.

``bench profile`` is a client of the Method contract (issue 14, item 2): each case is a ``(method,
params)`` pair (:class:`ProfileCase`; ``--methods pfc-0.1`` is ``("pfc", {"sample_rate": 0.1})``), built
through the registry (:func:`methods.base.build_method`) with the same kind of context as ``bench run``
(class count, embedding size, global batch, total steps, one process), on an ``nn.Identity`` backbone fed
a fixed ``[B, D]`` tensor of random embeddings, and timed through :meth:`bench.train.Trainer.step`, the
step training uses (SGD, LR schedule, gradient clip, the method's ``on_step_end``). Labels follow the
harness's sampler layout: ``B / k`` distinct identities per batch, their ``k`` views adjacent
(identity-major), ``k`` the built method's ``batch_spec.views_per_class``; identities are served in the
order of one fixed random permutation, so one identity comes back only after ``C / (B / k)`` batches.
No step code is per method; only the sizes are (:data:`COSTS`, keyed by method name): the rows the logits
are computed against, the memory estimate, the matrix products a step cannot avoid, and how many steps
fill the method's kept state (Prototype Memory starts empty; its steady state is a full memory).

Per case: the fill steps, a warm-up step, then ``steps`` timed steps; the median step time. Peak memory is
the process's peak RSS, reset before the case (``bench.profiling.PeakMemory``; the figure includes the
Python process itself, about 0.5-0.7 GiB), or CUDA's max allocated on a GPU. Before allocating, each case's
memory is estimated: what the process already holds (RSS; CUDA: allocated) plus the case's tensors
(:meth:`HeadCost.estimate_bytes`); a case whose estimate exceeds ``--memory-budget-gb`` is not built and is
reported ``over budget``. The *floor* is the time of the bare matrix products the step cannot avoid
(:meth:`HeadCost.gemms`), timed on random matrices of the same shapes right after the case; ``step /
floor`` is how far the implementation is from it.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.config import TrainSettings
from bench.profiling import PeakMemory, resident_bytes
from bench.records import RunRecord, ensure_writable_dir, environment
from bench.errors import ConfigError

FLOAT = 4  # bytes per float32
INDEX = 8  # bytes per int64
DEFAULT_CLASSES = (10_000, 100_000, 300_000, 1_000_000, 2_000_000)
DEFAULT_CASES = ("arcface", "pfc-0.1", "pfc-0.2", "dcq", "pm", "sst")
#: Default memory budget: leaves room for the OS and the Python process on a 24 GiB machine (or GPU).
DEFAULT_BUDGET_GIB = 16.0
#: The cap of SST's derived queue (methods/sst.py).
QUEUE_CAP = 16_384
Gemm = tuple[int, int, int]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Cases and their sizes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileCase:
    """One profiled method: ``label`` (the row's ``method``), the registered ``method`` and its ``params``."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_case(text: str) -> ProfileCase:
    """``"pfc-0.1"`` -> ``("pfc", {"sample_rate": 0.1})``; any other name is a registered method (or alias)
    with its defaults. ConfigError for a name with no cost model in :data:`COSTS`."""
    from methods.base import METHODS

    match = re.fullmatch(r"pfc-(\d*\.?\d+)", text)
    if match:
        return ProfileCase(text, "pfc", {"sample_rate": float(match.group(1))})
    names = sorted({*COSTS, "pfc-<rate>", "pm"} - {"pfc", "prototype_memory"})
    name = METHODS.canonical(text) if text in METHODS else text
    if name not in COSTS:
        raise ConfigError(f"unknown profile case '{text}'; valid: {', '.join(names)}")
    return ProfileCase(text, name, {})


@dataclass(frozen=True)
class Shape:
    """One case at one size: ``C`` classes, batch ``B`` (all views), embedding ``D``, ``G`` identities."""

    classes: int
    batch_size: int
    embedding_size: int
    identities: int


@dataclass(frozen=True)
class HeadCost:
    """What ``bench profile`` knows of a method besides its registry entry: sizes only, no step code.

    ``views(p)``: images per identity in a batch; ``rows(shape, p)``: rows the logits are computed against
    (class centers, sampled centers, queue or memory rows); ``bytes_(shape, rows)``: the case's tensors;
    ``gemms(shape, rows)``: the ``(m, k, n)`` products ``[m, k] @ [k, n]`` one step must do; ``fill``:
    whether the kept state starts empty and takes ``ceil(rows / G)`` steps to fill.
    """

    views: Callable[[dict[str, Any]], int]
    rows: Callable[[Shape, dict[str, Any]], int]
    bytes_: Callable[[Shape, int], int]
    gemms: Callable[[Shape, int], list[Gemm]]
    fill: bool = False

    def estimate_bytes(self, shape: Shape, params: dict[str, Any]) -> int:
        return self.bytes_(shape, self.rows(shape, params))


def _center_gemms(s: Shape, k: int) -> list[Gemm]:
    """Logits ``[B, D] @ [D, K]``, the gradient w.r.t. the embeddings and w.r.t. the ``K`` centers."""
    return [(s.batch_size, s.embedding_size, k), (s.batch_size, k, s.embedding_size),
            (k, s.batch_size, s.embedding_size)]


def _queue_gemms(s: Shape, q: int) -> list[Gemm]:
    """``G`` queries against ``Q`` constant queue rows: logits and the gradient w.r.t. the queries."""
    return [(s.identities, s.embedding_size, q), (s.identities, q, s.embedding_size)]


def _whole_batches(rows: int, step: int) -> int:
    """``rows`` rounded down to whole batches of ``step`` (at least one): the queues' derived sizes."""
    return max(step, rows // step * step)


# Full FC: the centers, their gradient, SGD momentum, SGD's weight-decay temporary; the [B, C] softmax
# buffer, its gradient and a scratch copy.
_FULL_FC = HeadCost(views=lambda p: 1, rows=lambda s, p: s.classes,
                    bytes_=lambda s, c: 4 * c * s.embedding_size * FLOAT + 3 * s.batch_size * c * FLOAT,
                    gemms=_center_gemms)

#: Sizes per registered method name (Partial FC: methods/partial_fc.py; DCQ, SST, Prototype Memory: the
#: derived queue / memory sizes of their module docstrings).
COSTS: dict[str, HeadCost] = {
    "arcface": _FULL_FC,
    "cosface": _FULL_FC,
    # All centers and their momentum rows; the sampled rows, their gradient, momentum and a temporary; the
    # [B, K] buffer, its gradient and a scratch copy; the sampling scores and indices (3 C int64).
    "pfc": HeadCost(
        views=lambda p: 1,
        rows=lambda s, p: max(math.ceil(p["sample_rate"] * s.classes), min(s.batch_size, s.classes)),
        bytes_=lambda s, k: (2 * s.classes * s.embedding_size * FLOAT + 4 * k * s.embedding_size * FLOAT
                             + 3 * s.batch_size * k * FLOAT + 3 * s.classes * INDEX),
        gemms=_center_gemms),
    # The queue and its labels; per query [G, Q] cosines, logits, gradient and scratch.
    "dcq": HeadCost(
        views=lambda p: 1 + p["shots"],
        rows=lambda s, p: p["queue_size"] or _whole_batches(int(p["queue_fraction"] * s.classes), s.identities),
        bytes_=lambda s, q: q * s.embedding_size * FLOAT + 4 * s.identities * q * FLOAT + q * INDEX,
        gemms=_queue_gemms),
    # Memory rows and the gathered copy of the rows used as negatives; [B, M] logits, gradient, scratch; the
    # batch prototypes (their logits and gradients).
    "prototype_memory": HeadCost(
        views=lambda p: p["views_per_class"],
        rows=lambda s, p: p["memory_size"] or max(s.identities, round(p["memory_fraction"] * s.classes)),
        bytes_=lambda s, m: 2 * m * s.embedding_size * FLOAT + 4 * s.batch_size * m * FLOAT + 4 * m * INDEX,
        gemms=lambda s, m: [(s.batch_size, s.embedding_size, m), (s.batch_size, m, s.embedding_size),
                            (s.batch_size, s.embedding_size, s.identities),
                            (s.batch_size, s.identities, s.embedding_size),
                            (s.identities, s.batch_size, s.embedding_size)],
        fill=True),
}
# SST and MASST: both directions against the prototype queue: the queue, two out-of-place copies with the
# batch written in; per direction [G, Q] cosines, logits, gradient and scratch. MASST's agents are
# backbones (identities here), so its head costs what SST's does.
COSTS["sst"] = COSTS["masst"] = HeadCost(
    views=lambda p: 2,
    rows=lambda s, p: p["queue_size"] or _whole_batches(min(QUEUE_CAP, s.classes // 2), s.identities),
    bytes_=lambda s, q: 3 * q * s.embedding_size * FLOAT + 8 * s.identities * q * FLOAT + q * INDEX,
    gemms=lambda s, q: 2 * _queue_gemms(s, q))


def resolved_params(case: ProfileCase) -> dict[str, Any]:
    """The case's parameters over its method's defaults, read as ``bench run`` reads them (an unknown key or a
    value of the wrong type is a ConfigError; the method checks the values when it is built)."""
    from methods.base import METHODS

    return METHODS.get(case.method).resolve_params(case.params)


def case_shape(case: ProfileCase, classes: int, batch_size: int, embedding_size: int) -> Shape:
    views = COSTS[case.method].views(resolved_params(case))
    return Shape(classes, batch_size, embedding_size, batch_size // views)


# ----------------------------------------------------------------------------------------------------
# Building and stepping: the registry and the Trainer, as `bench run`
# ----------------------------------------------------------------------------------------------------


def train_settings(batch_size: int, embedding_size: int, total_steps: int) -> TrainSettings:
    """``bench run``'s training settings (SGD, schedule, clip: TrainSettings defaults) at this shape."""
    return TrainSettings(batch_size=batch_size, embedding_size=embedding_size, budget=batch_size * total_steps)


def _build(case: ProfileCase, classes: int, settings: TrainSettings, total_steps: int) -> nn.Module:
    """The case's method on an identity backbone, through the registry, with the context the runner builds
    for ``bench run`` (:func:`bench.runner.method_context`: class count, embedding size, global batch, total
    steps) for one process: the one call of the Method contract (issue 14, item 1)."""
    from bench.config import RunConfig
    from bench.runner import method_context
    from methods.base import build_method
    from methods.distributed import DistContext

    context = method_context(RunConfig(train=settings), classes, DistContext())
    assert context.total_steps == total_steps, "TrainSettings.budget sets the run's steps"
    return build_method(case.method, nn.Identity(), context, case.params)


def label_batches(classes: int, identities: int, views: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Batches of ``identities`` distinct classes x ``views`` adjacent views (the sampler's identity-major
    layout), classes served in the order of one random permutation, cycled (ours: every class comes back
    only after ``C / identities`` batches, as an epoch of the harness's sampler)."""
    order = torch.randperm(classes, generator=torch.Generator().manual_seed(seed))
    start = 0
    while True:
        index = (start + torch.arange(identities)) % classes
        start = (start + identities) % classes
        yield order[index].repeat_interleave(views)


class CaseRun:
    """One case at one size, built and stepped as training does: :meth:`step` is one ``Trainer.step``."""

    def __init__(self, case: ProfileCase, shape: Shape, total_steps: int, device: torch.device) -> None:
        from bench.train import Trainer

        settings = train_settings(shape.batch_size, shape.embedding_size, total_steps)
        torch.manual_seed(0)
        self.method = _build(case, shape.classes, settings, total_steps).to(device)
        self.trainer = Trainer(self.method, settings, device, total_steps)
        generator = torch.Generator().manual_seed(1)
        # A leaf that requires grad, as a backbone's output does: the backward pass computes the gradient
        # w.r.t. the embeddings (a queue method's only gradient, the identity backbone having no parameters).
        self.embeddings = torch.randn(shape.batch_size, shape.embedding_size, generator=generator).to(device)
        self.embeddings.requires_grad_(True)
        views = self.method.batch_spec.views_per_class
        self.labels = label_batches(shape.classes, shape.batch_size // views, views)
        self.device = device

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed embeddings (their gradient cleared: the backbone's backward would consume it) and the
        next batch's labels."""
        self.embeddings.grad = None
        return self.embeddings, next(self.labels).to(self.device)

    def step(self) -> None:
        self.trainer.step(*self.batch())


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


def floor_ms(gemms: list[Gemm], device: torch.device, repeats: int = 3) -> float:
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


def _held_bytes(device: torch.device) -> int:
    """What the process already holds: RSS on CPU, allocated memory on CUDA."""
    return resident_bytes() if device.type == "cpu" else int(torch.cuda.memory_allocated(device))


def profile_case(case: ProfileCase, shape: Shape, steps: int, budget_bytes: int,
                 device: torch.device) -> dict[str, Any]:
    """One row: the case's cost, or ``over budget`` when its estimated memory exceeds ``budget_bytes``."""
    cost, params = COSTS[case.method], resolved_params(case)
    rows = cost.rows(shape, params)
    gemms = cost.gemms(shape, rows)
    gc.collect()
    held = _held_bytes(device)
    estimate = cost.bytes_(shape, rows) + held
    row: dict[str, Any] = {"method": case.label, "params": params, "classes": shape.classes,
                           "logit_columns": rows, "estimate_bytes": estimate,
                           "gemm_flop": 2 * sum(m * k * n for m, k, n in gemms)}
    if estimate > budget_bytes:
        return {**row, "status": "over budget"}
    fill_steps = math.ceil(rows / shape.identities) if cost.fill else 0
    memory = PeakMemory(device)  # resets the peak (RSS high-water mark, or CUDA's)
    run = None
    try:
        run = CaseRun(case, shape, fill_steps + 1 + steps, device)
        for _ in range(fill_steps + 1):  # fill the kept state, then warm up (first-touch allocation)
            run.step()
        step_ms = _median_ms(run.step, steps, device)
        peak = memory.peak_bytes()
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        return {**row, "status": f"out of memory ({type(exc).__name__})"}
    finally:
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    floor = floor_ms(gemms, device)
    return {**row, "status": "ok", "fill_steps": fill_steps, "step_ms": step_ms,
            "img_s": 1000.0 * shape.batch_size / step_ms, "peak_bytes": peak,
            "peak_above_start_bytes": max(peak - held, 0), "peak_memory_method": memory.describe(),
            "floor_ms": floor, "step_over_floor": step_ms / floor}


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

    def validate(self) -> list[ProfileCase]:
        """The parsed cases (ConfigError on a bad name, parameter or size)."""
        cases = [parse_case(name) for name in self.cases]
        for case in cases:
            resolved_params(case)
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
        return cases


def run_profile(settings: ProfileSettings, on_row: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[Path, list[dict[str, Any]]]:
    """Profile every (case, classes) and write the record; returns its directory and the rows."""
    from bench.distributed import resolve_device

    cases = settings.validate()
    device = resolve_device(settings.device)
    results_dir = ensure_writable_dir(Path(settings.out))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    budget = int(settings.memory_budget_gib * 2**30)
    train = train_settings(settings.batch_size, settings.embedding_size, 1)
    record = RunRecord.create(results_dir, "profile", device.type)
    config = {"kind": "profile", "run_id": record.run_id, "classes": settings.classes, "cases": settings.cases,
              "case_params": {case.label: [case.method, case.params] for case in cases},
              "batch_size": settings.batch_size, "embedding_size": settings.embedding_size,
              "steps": settings.steps, "memory_budget_gib": settings.memory_budget_gib, "device": str(device),
              "threads": torch.get_num_threads(), "dtype": "float32",
              "sgd": {"lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay},
              "grad_clip_norm": train.grad_clip_norm}
    record.write_yaml("config.yaml", config)
    record.write_json("env.json", environment(str(device)))
    start = time.perf_counter()
    rows = []
    for case in cases:
        for classes in settings.classes:
            shape = case_shape(case, classes, settings.batch_size, settings.embedding_size)
            row = profile_case(case, shape, settings.steps, budget, device)
            rows.append(row)
            if on_row:
                on_row(row)
    record.write_json("perf.json", {"wall_time_s": time.perf_counter() - start,
                                    "peak_memory_method": PeakMemory(device).describe()})
    conventions = {
        "step": "one bench.train.Trainer.step of the method built through the registry on an identity backbone "
                "over fixed random embeddings: forward, loss, backward, SGD step, the method's on_step_end",
        "time": f"median of {settings.steps} steps after one warm-up step (and, for a method whose kept state "
                "starts empty, fill_steps steps that fill it)",
        "memory": "process peak RSS (VmHWM) reset per case, whole process" if device.type == "cpu"
                  else "torch.cuda.max_memory_allocated, reset per case",
        "floor": "median time of the step's bare matrix products on random float32 matrices of the same shapes",
        "over_budget": f"estimated memory above {settings.memory_budget_gib} GiB: not run",
    }
    record.write_json("metrics.json", {"head-profile": {"rows": rows, "conventions": conventions}})
    return record.directory, rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the report's profile table, :mod:`bench.report.profile_table`)."""
    from bench.report.profile_table import profile_markdown

    return profile_markdown(rows)
