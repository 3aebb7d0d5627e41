"""``bench run``: for each method, train -> evaluate -> write the run record.

Every name and value is validated, and the results directory proven writable, before any work starts,
so a typo costs nothing and never leaves a partial record. The data split and the evaluation protocols
are prepared once and shared by all methods of the run; every method gets the same backbone, batch
size, budget (samples seen, all views counted), optimizer, schedule, seed and evaluation.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench.backbones import BACKBONES, build_backbone
from bench.config import RunConfig
from bench.data.datasets import DATASETS, TrainSet, build_trainset
from bench.data.loader import BatchLoader
from bench.data.sampler import ClassBalancedBatchSampler, RandomBatchSampler
from bench.data.splits import SPLITS
from bench.eval import PROTOCOLS
from bench.records import RunRecord, ensure_writable_dir, environment
from bench.train import Trainer, resolve_device, seed_everything
from methods.base import METHODS, BatchSpec, Method, build_method


@dataclass
class MethodRun:
    method: str
    run_dir: Path
    metrics: dict[str, Any]
    perf: dict[str, Any]


def check_names(cfg: RunConfig) -> None:
    """Every registry name in ``cfg`` exists, and every method parameter is valid (raises ConfigError)."""
    for name in cfg.methods:
        METHODS.canonical(name)
    BACKBONES.canonical(cfg.train.backbone)
    DATASETS.canonical(cfg.data.dataset)
    SPLITS.canonical(cfg.data.split.name)
    for protocol in cfg.eval.protocols:
        PROTOCOLS.canonical(protocol)
    for name, params in cfg.method_params.items():
        resolved_method_params(name, params)


def resolved_method_params(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The method's defaults with ``overrides`` applied (validated against the method's parameters)."""
    return METHODS.get(name).resolve_params(overrides)


def make_sampler(spec: BatchSpec, trainset: TrainSet, batch_size: int, seed: int):
    if spec.views_per_class == 1:
        return RandomBatchSampler(len(trainset), batch_size, seed)
    return ClassBalancedBatchSampler(trainset.labels.numpy(), batch_size, spec.views_per_class, seed,
                                     views_with_replacement=spec.views_with_replacement,
                                     identity_reuse_gap=spec.identity_reuse_gap)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=False)


def train_and_evaluate(cfg: RunConfig, method_name: str, trainset: TrainSet, protocols: list[Any],
                       device: torch.device, results_dir: Path, group: str, console: Console,
                       progress: bool = True) -> MethodRun:
    """Train one method under ``cfg`` and evaluate it; writes ``<results_dir>/<run-id>/``."""
    t = cfg.train
    params = resolved_method_params(method_name, cfg.method_params.get(method_name))
    seed_everything(t.seed, t.deterministic)
    backbone = build_backbone(t.backbone, embedding_size=t.embedding_size, input_size=trainset.image_size)
    method: Method = build_method(method_name, backbone, trainset.num_classes, t.embedding_size,
                                  cfg.method_params.get(method_name))
    method.to(device)
    steps = t.budget // t.batch_size

    record = RunRecord.create(results_dir, method_name, cfg.data.dataset, cfg.data.split.name, f"s{t.seed}")
    config = {**cfg.to_dict(), "run_id": record.run_id, "group": group,
              "method": METHODS.canonical(method_name), "method_params": params,
              "config_fingerprint": cfg.fingerprint(), "steps": steps, "num_classes": trainset.num_classes}
    record.write_yaml("config.yaml", config)
    record.write_json("env.json", environment(str(device)))
    record.write_json("data.json", trainset.info)

    sampler = make_sampler(method.batch_spec, trainset, t.batch_size, t.seed)
    batches = BatchLoader(trainset, sampler, device, seed=t.seed)
    trainer = Trainer(method, t, device, total_steps=steps)
    with (_progress(console) if progress else _NoProgress()) as bar:
        task = bar.add_task(f"{method_name:>10}", total=steps, loss="-", speed="-")

        def on_log(entry: dict[str, Any]) -> None:
            record.append_jsonl("train.jsonl", entry)
            bar.update(task, loss=f"{entry['loss']:.3f}", speed=f"{entry['img_s']:.0f}")

        result = trainer.fit(batches, on_log=on_log, on_step=lambda step, _: bar.update(task, completed=step))

    eval_start = time.perf_counter()
    encoder = method.encoder(cfg.eval.encoder or None)
    metrics = {p.name: p.evaluate(encoder, device, cfg.eval.batch_size) for p in protocols}
    perf = {**result.perf(), "eval_wall_time_s": time.perf_counter() - eval_start, "device": str(device),
            "batch_size": t.batch_size, "views_per_class": method.batch_spec.views_per_class,
            "parameters": {"backbone": _count(backbone.parameters()),
                           "method_total": _count(method.parameters())}}
    record.write_json("perf.json", perf)
    record.write_json("metrics.json", metrics)  # last: its presence marks the record complete
    return MethodRun(method_name, record.directory, metrics, perf)


def _count(params) -> int:
    return int(sum(p.numel() for p in params))


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def run(cfg: RunConfig, console: Console | None = None, progress: bool = True) -> list[MethodRun]:
    """Run every method of ``cfg``; returns one :class:`MethodRun` per method, in order."""
    console = console or Console(stderr=True)
    check_names(cfg)
    results_dir = ensure_writable_dir(Path(cfg.out))
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    trainset = build_trainset(cfg.data, progress)
    protocols = [PROTOCOLS.get(name)(cfg.data, progress, options=cfg.eval) for name in cfg.eval.protocols]
    group = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    split = trainset.info.get("split", {})
    console.print(f"[bold]bench run[/] {group}: {cfg.data.dataset}/{cfg.data.split.name} "
                  f"({split.get('identities')} identities, {split.get('images')} images), "
                  f"backbone {cfg.train.backbone}, budget {cfg.train.budget} samples, device {device}")
    runs = []
    for name in cfg.methods:
        runs.append(train_and_evaluate(cfg, name, trainset, protocols, device, results_dir, group, console,
                                       progress))
        console.print(f"  {name}: record {runs[-1].run_dir}")
    return runs

