"""The ``bench`` command line (typer). Commands stay thin: parse, build the config, call library code.

Progress and messages go to stderr (rich); stdout carries only results (tables, listings), so it can be
piped. Exit codes: 0 success, 1 a failed run (e.g. a non-finite loss), 2 a usage or configuration error,
printed as one line without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from bench.cli_common import err, one_line_errors, parse_sets

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    device: Optional[str] = typer.Option(None, help="auto (CUDA if available), cpu, cuda or cuda:N. Default: auto."),
    eval: Optional[str] = typer.Option(None, "--eval", help="Comma-separated evaluation protocols. Default: synth-lfw."),
    out: Optional[Path] = typer.Option(None, help="Results directory; each method run writes OUT/<run-id>/. Default: results."),
    data_root: Optional[Path] = typer.Option(None, "--data-root",
                                             help="Where generated data and split files are cached. Default: "
                                                  "$FACEBENCH_DATA_ROOT or ./datasets."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset; flags override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key, e.g. --set train.lr=0.05 "
                                                     "--set method_params.arcface.m=0.45 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Train each method on the same data, backbone and budget, evaluate it, and print the results table."""
    from bench.config import load_config
    from bench.report.tables import results_frame, to_markdown
    from bench.runner import run as run_benchmark

    flags = {"methods": methods, "data.split.name": split, "data.dataset": dataset, "train.backbone": backbone,
             "data.split.max_identities": ids, "train.budget": budget, "train.batch_size": batch_size,
             "train.seed": seed, "train.device": device, "eval.protocols": eval, "out": str(out) if out is not None else None,
             "data.root": str(data_root) if data_root is not None else None}
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_sets(set_))
    cfg = load_config(config, overrides)
    runs = run_benchmark(cfg, console=err, progress=progress)
    frame = results_frame(Path(cfg.out))
    frame = frame[frame["run_id"].isin([r.run_dir.name for r in runs])]
    typer.echo(to_markdown(frame))


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


@app.command()
@one_line_errors
def report(
    results: Path = typer.Option(Path("results"), "--results", help="Directory of run records."),
    out: Path = typer.Option(Path("reports"), "--out", help="Where results.md and results.tex are written."),
) -> None:
    """Regenerate reports/results.md and reports/results.tex from the run records."""
    from bench.errors import BenchError
    from bench.report.tables import write_report

    if not results.is_dir():
        raise BenchError(f"results directory {results} does not exist")
    for path in write_report(results, out):
        err.print(f"wrote {path}")


def _register_subcommands() -> None:
    from bench.cli_data import app as data_app
    from bench.cli_eval import eval_command

    app.add_typer(data_app, name="data")
    app.command("eval")(eval_command)


_register_subcommands()


def main() -> None:
    app(prog_name="bench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
