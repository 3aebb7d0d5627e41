"""``bench run``: for each method, train -> evaluate -> write the run record; ``bench run --resume``.

Every name and value is validated, and the results directory proven writable, before any work starts,
so a typo costs nothing and never leaves a partial record. The data split and the evaluation protocols
are prepared once and shared by all methods of the run; every method gets the same backbone, batch
size, budget (samples seen, all views counted), optimizer, schedule, seed and evaluation.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape

from bench.backbones import BACKBONES, build_backbone
from bench.checkpoint import Checkpointer, read_manifest, rng_state, set_rng_state
from bench.config import RunConfig, load_config
from bench.data.catalog import DATASETS, build_trainset
from bench.curation import Curation, curate_trainset
from bench.data.datasets import TrainData, TrainSet
from bench.data.loader import BatchLoader
from bench.data.sampler import (ClassBalancedBatchSampler, CuratedSampler, HardClassBatchSampler, RandomBatchSampler,
                                RankSlice)
from bench.data.splits import SPLITS
from bench.eval import PROTOCOLS, build_protocol, check_available, model_input_size
from bench.distributed import barrier, broadcast_object, check_batch_divides, init_from_environment
from bench.errors import BenchError, ResultsDirError
from bench.progress import training_progress
from bench.records import RunLock, RunRecord, complete_runs_by_fingerprint, ensure_writable_dir, environment
from bench.train import NonFiniteLossError, Trainer, seed_everything
from methods.base import METHODS, Method, MethodContext, build_method
from methods.distributed import DistContext
from methods.registry import ConfigError


@dataclass
class MethodRun:
    method: str
    run_dir: Path
    metrics: dict[str, Any]
    perf: dict[str, Any]


def check_names(cfg: RunConfig) -> None:
    """Every registry name in ``cfg`` exists (raises ConfigError); method names and parameters were checked
    when the configuration was loaded."""
    for name in cfg.methods:
        METHODS.canonical(name)
    BACKBONES.canonical(cfg.train.backbone)
    DATASETS.canonical(cfg.data.dataset)
    SPLITS.canonical(cfg.data.split.name)
    for protocol in cfg.eval.protocols:
        PROTOCOLS.canonical(protocol)


def method_context(cfg: RunConfig, num_classes: int, dist: DistContext) -> MethodContext:
    """The shape of a run of ``cfg`` on ``num_classes`` classes, as its methods receive it (built here only)."""
    t = cfg.train
    return MethodContext(num_classes=num_classes, embedding_size=t.embedding_size, global_batch_size=t.batch_size,
                         total_steps=t.budget // t.batch_size, dist=dist)


def check_methods(cfg: RunConfig, dist: DistContext) -> None:
    """Every method of ``cfg`` builds with its parameters, and the global batch splits into whole identities
    of its ``batch_spec.views_per_class`` on each of ``dist.world_size`` ranks (raises ConfigError).

    ours: so that a bad value of the last method fails before the first one writes a record, or any data is
    read. Each method is built through the same contract as for training (``from_config``: resolve, check,
    construct), in one process on an identity backbone, with the run's context but a stand-in class count,
    since the real count is known only once the training set is built; it is built again on it before
    training.
    """
    for name in cfg.methods:
        params = cfg.method_params.get(name)
        classes = _stand_in_classes(METHODS.get(name).resolve_params(params), cfg.train.batch_size)
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            method = build_method(name, torch.nn.Identity(), method_context(cfg, classes, DistContext()), params)
        try:
            check_batch_divides(cfg.train.batch_size, method.batch_spec.views_per_class, dist)
        except ConfigError as exc:
            raise ConfigError(f"method '{name}': {exc}") from None


def _stand_in_classes(params: dict[str, Any], batch_size: int) -> int:
    """A class count above the batch and every integer parameter of a method (ours): a check that compares
    the class count with a parameter (SST: ``queue_size`` < identities) or with the batch (SST's queue holds
    a batch of identities) cannot fail on the stand-in, only on the real count. It is small for the default
    parameters, so the stand-in's class centers cost nothing."""
    integers = [value for value in params.values() if isinstance(value, int) and not isinstance(value, bool)]
    return max([2, batch_size, *integers]) + 1


def check_protocols(cfg: RunConfig) -> None:
    """The files of every real benchmark in ``eval.protocols`` are present (DataError naming what to set)."""
    for name in cfg.eval.protocols:
        check_available(name, cfg.data)


def make_sampler(method: Method, trainset: TrainData, batch_size: int, seed: int,
                 curation: Curation | None = None):
    """The sampler serving ``method.batch_spec`` over ``trainset`` (over its kept images after ``curation``,
    numbering batches on from the curation's step)."""
    spec = method.batch_spec
    labels = trainset.labels.numpy()
    if curation is not None:
        labels = labels[curation.kept_indices]
    if spec.views_per_class == 1:
        sampler = RandomBatchSampler(len(labels), batch_size, seed)
    elif spec.hard_class_neighbours:
        sampler = HardClassBatchSampler(labels, batch_size, spec.views_per_class, seed, spec.hard_class_neighbours,
                                        nearest=lambda classes, count: method.nearest_classes(
                                            torch.as_tensor(classes), count).cpu().numpy(),
                                        views_with_replacement=spec.views_with_replacement)
    else:
        sampler = ClassBalancedBatchSampler(labels, batch_size, spec.views_per_class, seed,
                                            views_with_replacement=spec.views_with_replacement,
                                            identity_reuse_gap=spec.identity_reuse_gap)
    return sampler if curation is None else CuratedSampler(sampler, curation.kept_indices, curation.step)


class _BatchStream:
    """The batches ``Trainer.fit`` reads, from a loader that can be rebuilt on another sampler mid-run (after
    a curation step: the next batch comes from the kept images; batches a loader prepared ahead are
    discarded with it)."""

    def __init__(self, build: Callable[[Any], BatchLoader], sampler: Any) -> None:
        self._build = build
        self._loader = build(sampler)

    def use(self, sampler: Any) -> None:
        self._loader.close()
        self._loader = self._build(sampler)

    def __iter__(self) -> _BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._loader)

    def close(self) -> None:
        self._loader.close()


def _open_record(results_dir: Path, method_name: str, cfg: RunConfig, dist: DistContext,
                 resume_dir: Path | None) -> RunRecord:
    """Rank 0 creates the run directory (or reopens it to resume); every rank learns its path."""
    if resume_dir is not None:
        return RunRecord(resume_dir)
    directory = None
    if dist.is_main:
        directory = RunRecord.create(results_dir, method_name, cfg.data.dataset, cfg.data.split.name,
                                     f"s{cfg.train.seed}").directory
    return RunRecord(Path(broadcast_object(str(directory) if directory else None, dist)))


def train_and_evaluate(cfg: RunConfig, method_name: str, trainset: TrainSet, protocols: list[Any],
                       device: torch.device, results_dir: Path, group: str, console: Console,
                       progress: bool = True, dist: DistContext | None = None,
                       resume_dir: Path | None = None) -> MethodRun:
    """Train one method under ``cfg`` and evaluate it; writes ``<results_dir>/<run-id>/`` (rank 0).

    With ``resume_dir`` the run continues from that directory's newest readable checkpoint instead of step
    0. Rank 0 of a fresh run holds the directory's :class:`RunLock` from creating it to writing
    ``metrics.json`` (:func:`resume` holds it for a resumed run). A full disk under a record file stops the
    run with one line naming the file and the last good checkpoint (README, "Faults").
    """
    dist = dist or DistContext()
    t = cfg.train
    seed_everything(t.seed, t.deterministic)
    backbone = build_backbone(t.backbone, embedding_size=t.embedding_size, input_size=trainset.image_size)
    ctx = method_context(cfg, trainset.num_classes, dist)
    method: Method = build_method(method_name, backbone, ctx, cfg.method_params.get(method_name))
    method.to(device)
    steps = ctx.total_steps
    check_batch_divides(t.batch_size, method.batch_spec.views_per_class, dist)

    record = _open_record(results_dir, method_name, cfg, dist, resume_dir)
    checkpoints = Checkpointer(record.directory / "checkpoints", dist)
    # A fresh run holds its directory's lock from its creation to metrics.json (a resumed one: resume()).
    with RunLock(record.directory, enabled=dist.is_main and resume_dir is None, warn=_warner(console)):
        if dist.is_main and resume_dir is None:
            # A preset (bench.config.RECORD_KEYS are ignored when it is loaded): this method's run, resolved.
            run_cfg = cfg.for_method(method_name).resolved()
            config = {**run_cfg.to_dict(), "run_id": record.run_id, "group": group, "method": method_name,
                      "config_fingerprint": run_cfg.fingerprint(), "steps": steps,
                      "num_classes": trainset.num_classes, "world_size": dist.world_size}
            _write_record_files(record, {"config.yaml": config, "env.json": environment(str(device)),
                                         "data.json": trainset.info}, "the run had not started")

        trainer = Trainer(method, t, device, total_steps=steps, dist=dist)
        resumed_from, curation = 0, None
        if resume_dir is not None:
            resumed_from, curation = _restore(checkpoints, method, trainer, trainset.num_classes)
            if dist.is_main:
                for warning in checkpoints.warnings:
                    _warner(console)(warning)
                record.truncate_jsonl("train.jsonl", lambda entry: entry.get("step", 0) <= resumed_from)
                console.print(f"  resuming {record.run_id} at step {resumed_from} of {steps} "
                              f"(checkpoint written by {checkpoints.last_good['world_size']} rank(s), "
                              f"now {dist.world_size})")
        sampler = make_sampler(method, trainset, t.batch_size, t.seed, curation)
        sampler.load_state_dict({**sampler.state_dict(), "batches_served": trainer.steps_done})
        batches = _BatchStream(lambda served: BatchLoader(trainset, RankSlice(served, dist.rank, dist.world_size),
                                                          device, seed=t.seed, rank=dist.rank,
                                                          world_size=dist.world_size), sampler)
        curated: list[Curation] = [curation] if curation is not None else []

        def after_step(step: int) -> None:
            if curated or method.curation_step != step:
                return
            curated.append(curate_trainset(method, trainset, device, step))
            if dist.is_main:
                _write_record_files(record, {"curation.json": curated[0].report}, "the run continues")
                _say_curation(console, method_name, curated[0].report)
            kept = make_sampler(method, trainset, t.batch_size, t.seed, curated[0])
            kept.load_state_dict({**kept.state_dict(), "batches_served": step})
            batches.use(kept)

        def on_checkpoint(step: int) -> None:
            payload = {"method": method.state_dict(), "trainer": trainer.state_dict(), "rng": rng_state(),
                       "curation": curated[0].state() if curated else None}
            if not checkpoints.save(step, payload) and dist.is_main:
                _warner(console)(checkpoints.failures[-1])

        show = progress and dist.is_main
        try:
            with training_progress(console, show, t.batch_size) as bar:
                task = bar.add_task(f"{method_name:>10}", total=steps, completed=trainer.steps_done, loss="-",
                                    speed="-")

                def on_log(entry: dict[str, Any]) -> None:
                    if dist.is_main:
                        record.append_jsonl("train.jsonl", entry)
                    bar.update(task, loss=f"{entry['loss']:.3f}", speed=f"{entry['img_s']:.0f}")

                def on_step(step: int, _loss: float | None) -> None:
                    bar.update(task, completed=step)
                    after_step(step)

                result = trainer.fit(batches, on_log=on_log, on_step=on_step, on_checkpoint=on_checkpoint)
        except (NonFiniteLossError, ResultsDirError) as exc:  # the run stops; say what is kept
            kept = _kept(checkpoints, resumable=isinstance(exc, ResultsDirError))  # a NaN would come back
            raise type(exc)(f"{exc} ({method_name}, {record.run_id}); {kept}") from None
        finally:
            batches.close()

        metrics: dict[str, Any] = {}
        perf: dict[str, Any] = {}
        if dist.is_main:
            eval_start = time.perf_counter()
            encoder = method.encoder(cfg.eval.encoder or None)
            metrics = {p.name: p.evaluate(encoder, device, cfg.eval.batch_size,
                                          **({"quality": method.quality} if getattr(p, "needs_quality", False)
                                             else {}))
                       for p in protocols}
            perf = {**result.perf(), "eval_wall_time_s": time.perf_counter() - eval_start, "device": str(device),
                    "world_size": dist.world_size, "batch_size": t.batch_size,
                    "views_per_class": method.batch_spec.views_per_class, "resumed_from_step": resumed_from,
                    "checkpoint_failures": checkpoints.failures,
                    "curation": curated[0].report if curated else None,
                    "parameters": {"backbone": _count(backbone.parameters()),
                                   "method_total": _count(method.parameters())}}
            # metrics.json last: its presence marks the record complete.
            _write_record_files(record, {"perf.json": perf, "metrics.json": metrics},
                                f"the run is incomplete ({method_name}); {_kept(checkpoints)}")
    barrier(dist)
    return MethodRun(method_name, record.directory, metrics, perf)


def _warner(console: Console) -> Callable[[str], None]:
    """Print one ``warning:`` line on ``console``."""
    return lambda message: console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def _write_record_files(record: RunRecord, files: dict[str, Any], state: str) -> None:
    """Write ``files`` (name: content) into the run directory in order, each atomically.

    A failed write (a full disk) raises one ResultsDirError line naming the file, the reason and the run's
    ``state``; every file written before it, and the previous content of this one, stay as they were."""
    for name, content in files.items():
        try:
            (record.write_yaml if name.endswith(".yaml") else record.write_json)(name, content)
        except OSError as exc:
            raise ResultsDirError(f"{record.directory / name}: not written ({exc.strerror or exc}); {state}") from None


def _kept(checkpoints: Checkpointer, resumable: bool = True) -> str:
    """What a stopped run keeps: its last good checkpoint (and, if ``resumable``, how to continue from it)."""
    if checkpoints.last_good is None:
        return "no checkpoint was written before it"
    kept = f"the last good checkpoint (step {checkpoints.last_good['step']}) is in {checkpoints.directory}"
    return f"{kept}, and `bench run --resume {checkpoints.directory.parent.name}` continues from it" if resumable \
        else kept


def _say_curation(console: Console, method_name: str, report: dict[str, Any]) -> None:
    """One console line on a curation: what was dropped and, with known label noise, how well."""
    line = (f"  {method_name}: curated the training data after step {report['step']}: dropped {report['dropped']} "
            f"of {report['images']} images, {report['classes_removed']} classes emptied")
    noise = report.get("label_noise")
    if noise and noise["precision"] is not None and noise["recall"] is not None:
        line += (f"; against the {noise['flipped']} flipped labels: precision {noise['precision']:.3f}, "
                 f"recall {noise['recall']:.3f}")
    console.print(line, soft_wrap=True, highlight=False)


def _restore(checkpoints: Checkpointer, method: Method, trainer: Trainer,
             num_classes: int) -> tuple[int, Curation | None]:
    """Load the newest readable checkpoint into ``method``, ``trainer`` and the global RNGs; the step it was
    written at and the curation done by then (None: none). A payload that does not fit this run's method is
    one BenchError line."""
    payload = checkpoints.load(method.sharded_state_keys(), num_classes)
    try:
        method.load_state_dict(payload["method"])
        trainer.load_state_dict(payload["trainer"])
        set_rng_state(payload["rng"])
        curation = Curation.from_state(payload["curation"]) if payload.get("curation") else None
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise BenchError(f"{checkpoints.directory}: the checkpoint at step {checkpoints.last_good['step']} does "
                         f"not fit this run ({type(exc).__name__}: {detail})") from None
    return trainer.steps_done, curation


def _count(params) -> int:
    return int(sum(p.numel() for p in params))


def _prepare(cfg: RunConfig, dist: DistContext, progress: bool) -> tuple[TrainSet, list[Any]]:
    """The training set (every rank) and the protocols (rank 0, which alone evaluates).

    Rank 0 renders or indexes first and the others then read its caches, rather than all at once.
    """
    trainset = None
    if dist.is_main:
        trainset = build_trainset(cfg.data, progress)
    barrier(dist)
    if trainset is None:
        trainset = build_trainset(cfg.data, False)
    # Every protocol evaluates at the size the backbone is built for (the training images'); checked first.
    input_size = model_input_size(cfg.train.backbone, cfg.train.embedding_size, trainset, cfg.data.dataset)
    protocols = ([build_protocol(name, cfg.data, progress, cfg.eval, trainset, input_size)
                  for name in cfg.eval.protocols] if dist.is_main else [])
    return trainset, protocols


def run(cfg: RunConfig, console: Console | None = None, progress: bool = True, seeds: int = 1,
        force: bool = False) -> list[MethodRun]:
    """Run every method of ``cfg`` with seeds ``train.seed .. train.seed + seeds - 1`` (one run group);
    returns one :class:`MethodRun` per (seed, method), seed by seed, methods in order (on rank 0; other
    ranks of a torchrun launch return an empty list).

    A (method, seed) whose complete record with the same configuration fingerprint already exists under
    ``cfg.out`` is not trained again: its record is returned, and the console says so (issue 15, item 3);
    ``force`` trains it anyway. When every one exists, no data is read either.
    """
    console = console or Console(stderr=True)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    # Everything that can be checked is checked before the results directory is created or data is read.
    check_names(cfg)
    dist, device = init_from_environment(cfg.train.device)  # the device exists; joining torchrun writes nothing
    check_methods(cfg, dist)
    jobs = [(replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + offset)), name)
            for offset in range(seeds) for name in cfg.methods]
    # Rank 0 decides what is reused (one reading of the results directory) and every rank follows it.
    reused = broadcast_object(_reusable(jobs, Path(cfg.out)) if dist.is_main and not force else {}, dist)
    if dist.is_main and len(reused) < len(jobs):  # rank 0 alone evaluates: only it needs the benchmark files
        check_protocols(cfg)
    results_dir = ensure_writable_dir(Path(cfg.out))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    trainset, protocols = _prepare(cfg, dist, progress) if len(reused) < len(jobs) else (None, [])
    group = broadcast_object(f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", dist)
    if dist.is_main and trainset is not None:
        split = trainset.info.get("split", {})
        console.print(f"[bold]bench run[/] {group}: {cfg.data.dataset}/{cfg.data.split.name} "
                      f"({split.get('identities')} identities, {split.get('images')} images), "
                      f"backbone {cfg.train.backbone}, budget {cfg.train.budget} samples, device {device}"
                      + (f", {dist.world_size} ranks" if dist.is_distributed else ""))
    runs = []
    for index, (seeded, name) in enumerate(jobs):
        if index in reused:
            runs.append(_reused_run(name, Path(reused[index])))
            if dist.is_main:
                console.print(f"  {name} (seed {seeded.train.seed}): reusing the complete record {runs[-1].run_dir} "
                              f"(same config fingerprint; --force retrains)", soft_wrap=True, highlight=False)
            continue
        runs.append(train_and_evaluate(seeded, name, trainset, protocols, device, results_dir, group, console,
                                       progress, dist=dist))
        if dist.is_main:
            console.print(f"  {name} (seed {seeded.train.seed}): record {runs[-1].run_dir}")
    return runs if dist.is_main else []


def _reusable(jobs: list[tuple[RunConfig, str]], results_dir: Path) -> dict[int, str]:
    """Job index -> directory of a complete record with the job's configuration fingerprint."""
    existing = complete_runs_by_fingerprint(results_dir)
    found = {}
    for index, (seeded, name) in enumerate(jobs):
        directory = existing.get(seeded.for_method(name).resolved().fingerprint())
        if directory is not None:
            found[index] = str(directory)
    return found


def _reused_run(method_name: str, run_dir: Path) -> MethodRun:
    """A reused record as :class:`MethodRun` (its metrics and perf as written)."""
    loaded = {}
    for name in ("metrics.json", "perf.json"):
        try:
            loaded[name] = json.loads((run_dir / name).read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{run_dir / name}: cannot be read to reuse the run ({exc}); "
                             f"--force retrains it") from None
    return MethodRun(method_name, run_dir, loaded["metrics.json"], loaded["perf.json"])


def resume(run_dir: Path, console: Console | None = None, progress: bool = True) -> MethodRun | None:
    """Continue the interrupted run in ``run_dir`` from its newest checkpoint, then evaluate it.

    The configuration is the run's own ``config.yaml``; the number of ranks may differ from the one that
    wrote the checkpoint (the class centers are re-sharded). Rank 0 holds the run's lock before it reads
    anything of the run, so a run still going (which holds the lock itself) is refused with one line.
    Returns the run on rank 0, else None.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise BenchError(f"{run_dir}: not a run directory (no config.yaml)")
    _refuse_complete(run_dir)
    with RunLock(run_dir, enabled=int(os.environ.get("RANK", "0")) == 0, warn=_warner(console)):
        _refuse_complete(run_dir)  # again: it may have finished while we waited for the lock
        if read_manifest(run_dir / "checkpoints") is None:
            raise BenchError(f"{run_dir}: the run has no checkpoint to resume from")
        stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        missing = [key for key in ("method", "methods", "method_params", "data", "train", "eval", "out")
                   if not isinstance(stored, dict) or key not in stored]
        if missing:
            raise BenchError(f"{run_dir / 'config.yaml'}: not a FaceBench run config (no '{missing[0]}')")
        cfg = load_config(run_dir / "config.yaml")  # the record is a preset of this one method's run
        method_name = cfg.methods[0]
        check_names(cfg)
        dist, device = init_from_environment(cfg.train.device)
        trainset, protocols = _prepare(cfg, dist, progress)
        result = train_and_evaluate(cfg, method_name, trainset, protocols, device, run_dir.parent,
                                    stored.get("group", ""), console, progress, dist=dist, resume_dir=run_dir)
    return result if dist.is_main else None


def _refuse_complete(run_dir: Path) -> None:
    if (run_dir / "metrics.json").is_file():
        raise BenchError(f"{run_dir}: the run is complete; there is nothing to resume")
