"""``bench run``: train each method on the same data, backbone and budget, evaluate it, print the table.

A thin command: the flags (and ``--set`` pairs) become configuration overrides (:func:`run_overrides`),
:func:`bench.config.load_config` resolves them against a preset, and :func:`bench.runner.run` does the work.
Torch and the harness are imported inside the command, so ``bench run --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from bench.cli.common import (DataRootOption, DeviceOption, ProgressOption, RunsOutOption, err, one_line_errors,
                              parse_sets)


@one_line_errors
def run_command(
    methods: Optional[str] = typer.Option(None, "--methods", "-m",
                                          help="Comma-separated method names (see `bench list`). Default: arcface,cosface."),
    split: Optional[str] = typer.Option(None, help="Training split: full, shallow or longtail. Default: full."),
    dataset: Optional[str] = typer.Option(None, help="Training dataset. Default: synthface (built in, offline)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone name (see `bench list`). Default: small."),
    ids: Optional[int] = typer.Option(None, "--ids", help="Train on this many identities of the split, chosen "
                                                         "at random with the split seed (0: all). Default: all."),
    budget: Optional[int] = typer.Option(None, help="Samples seen per method, all views counted. Default: 120000."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step. Default: 128."),
    seed: Optional[int] = typer.Option(None, help="Training seed (initialisation, sampling, flips). Default: 0."),
    seeds: int = typer.Option(1, "--seeds", help="Repeat each method with seeds SEED, SEED+1, ..., SEED+N-1 "
                                                 "(tables show mean ± std over them)."),
    device: DeviceOption = None,
    eval: Optional[str] = typer.Option(None, "--eval", help="Comma-separated evaluation protocols. Default: synth-lfw,synth-ijbc,synth-megaface."),
    out: RunsOutOption = None,
    data_root: DataRootOption = None,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset; flags override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key, e.g. --set train.lr=0.05 "
                                                     "--set method_params.arcface.m=0.45 (repeatable)."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Steps between checkpoints (one is also "
                                                                       "written at the end; 0: only then). "
                                                                       "Default: 1000."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the interrupted run RUN_ID (a directory "
                                                                "under --out, or a path) from its newest "
                                                                "checkpoint; other flags are taken from the run."),
    force: bool = typer.Option(False, "--force", help="Train every (method, seed) again, even when a complete "
                                                      "record with the same config fingerprint exists under "
                                                      "--out (by default it is reused, not retrained)."),
    progress: ProgressOption = True,
) -> None:
    """Train each method on the same data, backbone and budget, evaluate it, and print the results table.

    A (method, seed) whose complete record with the same configuration fingerprint exists under --out is
    reused, not retrained (--force retrains).

    Progress: a bar on a terminal, else plain lines (each tenth of the run, or FACEBENCH_PROGRESS_INTERVAL_S=30 s).

    Several processes: ``torchrun --nproc_per_node=N -m bench run ...`` (README, "Scaling out").
    """
    from bench.config import load_config
    from bench.distributed import shutdown
    from bench.progress import interval_s
    from bench.report.runs import results_frame
    from bench.report.tables import to_markdown
    from bench.runner import resume as resume_run
    from bench.runner import run as run_benchmark

    if progress:
        interval_s()  # a bad FACEBENCH_PROGRESS_INTERVAL_S fails here, before anything is written
    try:
        if resume is not None:
            run_dir = Path(resume) if Path(resume).is_dir() else Path(out or "results") / resume
            result = resume_run(run_dir, console=err, progress=progress)
            runs, results_dir = ([result] if result else []), run_dir.parent
        else:
            flags = dict(methods=methods, split=split, dataset=dataset, backbone=backbone, ids=ids, budget=budget,
                         batch_size=batch_size, seed=seed, device=device, eval=eval, out=out, data_root=data_root,
                         ckpt_every=ckpt_every)
            cfg = load_config(config, run_overrides(flags, set_))
            runs, results_dir = run_benchmark(cfg, console=err, progress=progress, seeds=seeds, force=force), Path(cfg.out)
    finally:
        shutdown()
    if runs:  # rank 0 (the only process, or rank 0 of a torchrun launch)
        frame = results_frame(results_dir)
        typer.echo(to_markdown(frame[frame["run_id"].isin([r.run_dir.name for r in runs])]))


def run_overrides(flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Configuration overrides from ``bench run``'s flags (those given) and ``--set`` pairs."""
    mapping = {"methods": "methods", "split": "data.split.name", "dataset": "data.dataset",
               "backbone": "train.backbone", "ids": "data.split.max_identities", "budget": "train.budget",
               "batch_size": "train.batch_size", "seed": "train.seed", "device": "train.device",
               "eval": "eval.protocols", "out": "out", "data_root": "data.root", "ckpt_every": "train.ckpt_every"}
    overrides = {key: str(flags[name]) if isinstance(flags[name], Path) else flags[name]
                 for name, key in mapping.items() if flags[name] is not None}
    overrides.update(parse_sets(sets))
    return overrides
