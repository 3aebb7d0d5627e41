"""The ``bench`` command line (typer). Commands stay thin: parse, build the config, call library code.

Progress and messages go to stderr (rich); stdout carries only results (tables, listings), so it can be
piped. Exit codes: 0 success, 1 a failed run (e.g. a non-finite loss), 2 a usage or configuration error,
printed as one line without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from bench.cli_common import OneLineUsageErrors, err, one_line_errors, parse_sets

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FaceBench: train and evaluate face-recognition methods on equal terms.")


@app.command()
@one_line_errors
def run(
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
    device: Optional[str] = typer.Option(None, help="auto (CUDA if available), cpu, cuda or cuda:N. Default: auto."),
    eval: Optional[str] = typer.Option(None, "--eval", help="Comma-separated evaluation protocols. Default: synth-lfw,synth-ijbc,synth-megaface."),
    out: Optional[Path] = typer.Option(None, help="Results directory; each method run writes OUT/<run-id>/. Default: results."),
    data_root: Optional[Path] = typer.Option(None, "--data-root",
                                             help="Where generated data and split files are cached. Default: "
                                                  "$FACEBENCH_DATA_ROOT or ./datasets."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset; flags override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key, e.g. --set train.lr=0.05 "
                                                     "--set method_params.arcface.m=0.45 (repeatable)."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Steps between checkpoints (one is also "
                                                                       "written at the end; 0: only then). "
                                                                       "Default: 1000."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the interrupted run RUN_ID (a directory "
                                                                "under --out, or a path) from its newest "
                                                                "checkpoint; other flags are taken from the run."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Train each method on the same data, backbone and budget, evaluate it, and print the results table.

    Several processes: ``torchrun --nproc_per_node=N -m bench run ...`` (README, "Scaling out").
    """
    from bench.config import load_config
    from bench.distributed import shutdown
    from bench.report.tables import results_frame, to_markdown
    from bench.runner import resume as resume_run
    from bench.runner import run as run_benchmark

    try:
        if resume is not None:
            run_dir = Path(resume) if Path(resume).is_dir() else Path(out or "results") / resume
            result = resume_run(run_dir, console=err, progress=progress)
            runs, results_dir = ([result] if result else []), run_dir.parent
        else:
            flags = dict(methods=methods, split=split, dataset=dataset, backbone=backbone, ids=ids, budget=budget,
                         batch_size=batch_size, seed=seed, device=device, eval=eval, out=out, data_root=data_root,
                         ckpt_every=ckpt_every)
            cfg = load_config(config, _run_overrides(flags, set_))
            runs, results_dir = run_benchmark(cfg, console=err, progress=progress, seeds=seeds), Path(cfg.out)
    finally:
        shutdown()
    if runs:  # rank 0 (the only process, or rank 0 of a torchrun launch)
        frame = results_frame(results_dir)
        typer.echo(to_markdown(frame[frame["run_id"].isin([r.run_dir.name for r in runs])]))


def _run_overrides(flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Configuration overrides from ``bench run``'s flags (those given) and ``--set`` pairs."""
    mapping = {"methods": "methods", "split": "data.split.name", "dataset": "data.dataset",
               "backbone": "train.backbone", "ids": "data.split.max_identities", "budget": "train.budget",
               "batch_size": "train.batch_size", "seed": "train.seed", "device": "train.device",
               "eval": "eval.protocols", "out": "out", "data_root": "data.root", "ckpt_every": "train.ckpt_every"}
    overrides = {key: str(flags[name]) if isinstance(flags[name], Path) else flags[name]
                 for name, key in mapping.items() if flags[name] is not None}
    overrides.update(parse_sets(sets))
    return overrides


@app.command("list")
@one_line_errors
def list_(
    what: Optional[str] = typer.Argument(None, help="methods, backbones, datasets, splits or protocols (default: all)."),
) -> None:
    """Print the registered methods (with their default hyperparameters), backbones, datasets, splits and protocols."""
    from bench.backbones import BACKBONES
    from bench.data.datasets import DATASETS
    from bench.data.splits import SPLITS
    from bench.eval import PROTOCOLS
    from methods.base import METHODS
    from methods.registry import ConfigError

    sections = {"methods": METHODS, "backbones": BACKBONES, "datasets": DATASETS, "splits": SPLITS,
                "protocols": PROTOCOLS}
    if what is not None and what not in sections:
        raise ConfigError(f"unknown listing '{what}'; valid: {', '.join(sections)}")
    for name, registry in sections.items():
        if what is not None and name != what:
            continue
        typer.echo(f"{name}:")
        for entry in registry.names():
            detail = ""
            if registry is METHODS:
                defaults = METHODS.get(entry).defaults()
                detail = "  " + ", ".join(f"{k}={v}" for k, v in defaults.items())
            aliases = registry.aliases_of(entry)
            alias_text = f" (alias: {', '.join(aliases)})" if aliases else ""
            typer.echo(f"  {entry}{alias_text}{detail}")


def _register_subcommands() -> None:
    from bench.cli_data import app as data_app
    from bench.cli_eval import eval_command
    from bench.cli_report import baseline_app, check_command, profile_command, report_command

    app.add_typer(data_app, name="data")
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("profile")(profile_command)
    app.command("check")(check_command)
    app.add_typer(baseline_app, name="baseline")


_register_subcommands()


def main() -> None:
    app(prog_name="bench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
