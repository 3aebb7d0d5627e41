"""The training loop shared by every method: device, AMP, optimizer, warm-up + polynomial LR, meters.

Recipe (insightface arcface_torch train_v2.py, with the choices recorded in every run record): one
optimizer over all parameter groups, ``train.optimizer``: SGD with momentum 0.9 and weight decay 5e-4
(default), or AdamW with lr 1e-3, weight decay 0.1 and torch's betas and eps (insightface's ViT configs;
defaults and sources in :data:`bench.config.OPTIMIZER_DEFAULTS`); the LR warms up linearly and then
decays as ``(1 - progress) ** power``, stepped every iteration; the backbone's gradient norm is clipped
(5.0); on CUDA, float16 autocast with a GradScaler. The step is split into three timed phases: ``data``
(fetching and moving the batch), ``forward_backward``, ``optimizer`` (clip, step, the method's
``on_step_end``) and ``logging`` (meters, log lines, the progress bar).

Every ``log_every`` steps (and after the last) an entry for ``train.jsonl`` averages the losses and method
logs of the steps since the previous entry and names that window (``from_step``, ``window_steps``); the
open window is checkpointed with the trainer, so a resumed run logs the same windows and values as an
uninterrupted one (:class:`LogWindow`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.config import TrainSettings
from bench.profiling import PeakMemory, StepTimer
from methods.base import Method
from bench.distributed import all_gather_objects, average_gradients, mean_over_ranks
from methods.distributed import DistContext


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices) and set torch's deterministic-algorithms switch to
    ``deterministic``, both ways: the switch is process-global, so a run with ``deterministic=False`` after
    one with ``True`` in the same process (``bench run --seeds``, tests) must turn it off again, or it
    trains with other kernels (other rounding) than the same run alone."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if deterministic:
        torch.backends.cudnn.benchmark = False


def lr_factor(step: int, warmup_steps: int, total_steps: int, power: float) -> float:
    """Multiplier of the base LR at 0-based ``step``: linear warm-up, then ``(1 - progress) ** power``.

    Warm-up reaches the base LR at the end of step ``warmup_steps - 1`` (the first step uses
    ``1 / warmup_steps`` rather than insightface's 0, which wastes a step); the decay reaches 0 after the
    last step, as insightface's PolynomialLRWarmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    return max(0.0, 1.0 - (step - warmup_steps) / decay_steps) ** power


def _sgd(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _adamw(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
    beta1, beta2 = settings.betas
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(beta1, beta2), eps=settings.eps,
                             weight_decay=settings.weight_decay)


#: Builders by ``train.optimizer`` name (the names and defaults: bench.config.OPTIMIZER_DEFAULTS).
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], TrainSettings], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adamw": _adamw}


def build_optimizer(method: Method, settings: TrainSettings) -> torch.optim.Optimizer:
    """The ``settings.optimizer`` over the method's parameter groups, one set of hyperparameters for all
    (insightface train_v2.py: the backbone and Partial FC groups share lr and weight decay)."""
    return OPTIMIZERS[settings.optimizer](method.param_groups(), settings)  # the name was validated with the config


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the first such step."""


@dataclass
class LogWindow:
    """The steps since the last ``train.jsonl`` entry, whose losses and method logs the next entry averages.

    It is part of the trainer's checkpointed state (ours: issue 13): a run resumed from a checkpoint taken
    between two logging steps continues the open window, so its next entry averages the same steps
    (``from_step`` .. ``step``, ``window_steps`` of them) as the uninterrupted run's, with the same sum.
    ``timed_steps`` and ``started`` cover only the steps this process ran (for img/s) and are not saved.
    """

    from_step: int
    loss_sum: torch.Tensor
    steps: int = 0
    logs_sum: dict[str, float] = field(default_factory=dict)
    timed_steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def opened_after(cls, step: int, device: torch.device) -> LogWindow:
        """An empty window whose first step is ``step + 1``."""
        return cls(from_step=step + 1, loss_sum=torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        self.loss_sum += loss  # on the device: the loop does not wait for it
        for key, value in logs.items():
            self.logs_sum[key] = self.logs_sum.get(key, 0.0) + float(value)
        self.steps += 1
        self.timed_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"from_step": self.from_step, "steps": self.steps, "loss_sum": self.loss_sum.detach().clone(),
                "logs_sum": dict(self.logs_sum)}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LogWindow:
        return cls(from_step=int(state["from_step"]), steps=int(state["steps"]),
                   loss_sum=state["loss_sum"].to(device), logs_sum=dict(state["logs_sum"]))


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    wall_time_s: float
    throughput_img_s: float
    step_time_ms: dict[str, float]
    peak_memory_bytes: int
    peak_memory_method: str
    final_loss: float
    first_step: int = 0
    amp_skipped_steps: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)

    def perf(self) -> dict[str, Any]:
        total = sum(self.step_time_ms.values())
        return {
            "steps": self.steps, "samples_seen": self.samples_seen, "train_wall_time_s": self.wall_time_s,
            "throughput_img_s": self.throughput_img_s, "step_time_ms": self.step_time_ms,
            "data_fraction_of_step": self.step_time_ms.get("data", 0.0) / total if total else 0.0,
            "peak_memory_bytes": self.peak_memory_bytes, "peak_memory_method": self.peak_memory_method,
            "measured_from_step": self.first_step, "amp_skipped_steps": self.amp_skipped_steps,
        }


class Trainer:
    """Owns the optimizer, LR schedule and AMP scaler of one method; ``step`` runs one iteration.

    With several ranks, the gradients of replicated parameter groups are averaged after the backward
    pass (groups marked ``"sharded"`` are exact already; see :mod:`bench.distributed`), and logged losses
    are averaged over ranks.
    """

    def __init__(self, method: Method, settings: TrainSettings, device: torch.device, total_steps: int,
                 dist: DistContext | None = None) -> None:
        self.method, self.settings, self.device, self.total_steps = method, settings, device, total_steps
        self.dist = dist or DistContext()
        self.optimizer = build_optimizer(method, settings)
        method.attach_optimizer(self.optimizer)
        warmup = int(settings.warmup_fraction * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total_steps, settings.lr_power))
        self.amp = settings.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.backbone_params = [p for g in self.optimizer.param_groups if g.get("name") == "backbone"
                                for p in g["params"]]
        self.replicated_params = [p for g in self.optimizer.param_groups if not g.get("sharded")
                                  for p in g["params"]]
        self.steps_done = 0
        self.amp_skipped_steps = 0
        self.window = LogWindow.opened_after(0, device)
        # First step whose loss was not finite (-1: none); kept on the device, read at log/checkpoint time.
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else nullcontext()

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.method(images, labels)
        self.scaler.scale(out.loss).backward()
        average_gradients(self.replicated_params, self.dist)
        loss = out.loss.detach()
        step = torch.full((), self.steps_done + 1, dtype=torch.long, device=self.device)
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & ~torch.isfinite(loss), step,
                                            self._first_nonfinite)
        return loss, out.logs

    def update(self) -> None:
        if self.settings.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.backbone_params, self.settings.grad_clip_norm)
        scale_before = self.scaler.get_scale() if self.amp else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.amp and self.scaler.get_scale() < scale_before:  # the scaler skipped this step (inf/NaN grads)
            self.amp_skipped_steps += 1
        self.scheduler.step()
        self.method.on_step_end()
        self.steps_done += 1

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One full iteration (forward, backward, update); returns the detached loss."""
        loss, _ = self.forward_backward(images, labels)
        self.update()
        return loss

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a NaN or infinite loss (on any rank)."""
        first = int(self._first_nonfinite)
        flags = all_gather_objects(first, self.dist)
        bad = [f for f in flags if f >= 0]
        if bad:
            raise NonFiniteLossError(f"the loss became NaN or infinite at step {min(bad)}")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule, AMP scaler, counters and the open logging window (the method's own state is
        saved separately)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "steps_done": self.steps_done,
                "amp_skipped_steps": self.amp_skipped_steps, "log_window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps_done, self.amp_skipped_steps = int(state["steps_done"]), int(state["amp_skipped_steps"])
        self.window = LogWindow.from_state(state["log_window"], self.device)

    def _log_entry(self, lr: float) -> dict[str, Any]:
        """The ``train.jsonl`` entry closing the current window: means over its steps (the loss also over
        ranks), the window itself, and the img/s of the window's steps run by this process."""
        window = self.window
        elapsed = time.perf_counter() - window.started
        entry = {"step": self.steps_done, "samples": self.steps_done * self.settings.batch_size,
                 "from_step": window.from_step, "window_steps": window.steps,
                 "loss": float(mean_over_ranks(window.loss_sum, self.dist)) / window.steps, "lr": lr,
                 "img_s": window.timed_steps * self.settings.batch_size / elapsed if elapsed > 0 else 0.0,
                 **{k: v / window.steps for k, v in window.logs_sum.items()}}
        if self.amp:
            entry["amp_skipped_steps"] = self.amp_skipped_steps
        return entry

    def fit(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
            on_log: Callable[[dict[str, Any]], None] | None = None,
            on_step: Callable[[int, float | None], None] | None = None,
            on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
        """Train for the remaining steps, logging every ``log_every`` steps via ``on_log``.

        ``on_step(step, loss_or_None)`` is called after every step (for progress bars); the loss is only
        materialised at logging steps so that the loop never waits on the device needlessly.
        ``on_checkpoint(step)`` is called every ``ckpt_every`` steps and after the last one, once the
        losses so far are known to be finite, so a checkpoint never holds a diverged model.
        """
        self.method.train()
        timer, memory = StepTimer(self.device), PeakMemory(self.device)
        # img/s counts this process's steps only: a resumed window's earlier steps ran in another process.
        self.window.timed_steps, self.window.started = 0, time.perf_counter()
        curve: list[dict[str, Any]] = []
        first_step = self.steps_done
        start, last_loss = time.perf_counter(), math.nan
        ckpt_every = self.settings.ckpt_every
        timer.start()
        while self.steps_done < self.total_steps:
            images, labels = next(batches)
            timer.lap("data")
            loss, logs = self.forward_backward(images, labels)
            timer.lap("forward_backward")
            lr = self.lr
            self.update()
            timer.lap("optimizer")
            self.window.add(loss, logs)
            reported = None
            last = self.steps_done == self.total_steps
            if self.steps_done % self.settings.log_every == 0 or last:
                self.check_finite()
                entry = self._log_entry(lr)
                last_loss = reported = entry["loss"]
                curve.append(entry)
                if on_log:
                    on_log(entry)
                self.window = LogWindow.opened_after(self.steps_done, self.device)
            if on_step:
                on_step(self.steps_done, reported)
            timer.lap("logging")
            if on_checkpoint and ((ckpt_every and self.steps_done % ckpt_every == 0) or last):
                self.check_finite()
                on_checkpoint(self.steps_done)
                timer.lap("checkpoint")
        wall = time.perf_counter() - start
        steps = self.total_steps - first_step
        samples = steps * self.settings.batch_size
        return TrainResult(steps=self.total_steps, samples_seen=self.total_steps * self.settings.batch_size,
                           wall_time_s=wall, throughput_img_s=samples / wall if wall > 0 else 0.0,
                           step_time_ms=timer.breakdown_ms(steps), peak_memory_bytes=memory.peak_bytes(),
                           peak_memory_method=memory.describe(), final_loss=last_loss, first_step=first_step,
                           amp_skipped_steps=self.amp_skipped_steps, curve=curve)
