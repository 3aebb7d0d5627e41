"""``bench reproduce``: train the arms of the registered claims over seeds, judge them, write the claims report.

Thin: parse, call :func:`bench.repro.reproduce.reproduce`, write ``claims.md``, ``claims.tex`` and
``figures/claims.png|pdf`` (all or none), print the verdict table on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import DeviceOption, ProgressOption, err, one_line_errors, parse_sets


@one_line_errors
def reproduce_command(
    claims: Optional[str] = typer.Option(None, "--claims", help="Comma-separated claim ids (`bench reproduce --list`). "
                                                              "Default: every registered claim."),
    seeds: int = typer.Option(5, "--seeds", help="Seeds per arm (0 .. N-1), paired across arms."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Samples seen per run, replacing every claim's budget. "
                                                               "Default: each claim's (the registry's 40000 unless "
                                                               "the claim sets train.budget)."),
    out: Path = typer.Option(Path("results/claims"), "--out", help="Where the claims' runs are written and reused."),
    reports: Path = typer.Option(Path("reports"), "--reports", help="Where claims.md, claims.tex and figures/ go."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key in every run, e.g. --set train.lr=0.05."),
    device: DeviceOption = None,
    force: bool = typer.Option(False, "--force", help="Retrain every run, even when a complete one exists."),
    list_: bool = typer.Option(False, "--list", help="List the registered claims and exit."),
    progress: ProgressOption = True,
) -> None:
    """Judge the papers' claims on SynthFace: each arm over seeds, the paired difference, its 95 % CI, a verdict."""
    from bench.report.claims import claims_markdown, write_claims_files
    from bench.report.staging import StagedFiles
    from bench.repro.claims import load_claims, missing_requirements, select_claims
    from bench.repro.reproduce import reproduce

    registry = load_claims()
    if list_:
        for claim in registry:
            missing = missing_requirements(claim)
            state = f"  [not yet runnable: needs {', '.join(missing)}]" if missing else ""
            typer.echo(f"{claim.id}: {claim.claim}{state}")
        return
    selected = select_claims(registry, [c.strip() for c in claims.split(",") if c.strip()] if claims else None)
    overrides = parse_sets(set_)
    if device is not None:
        overrides["train.device"] = device
    rows = reproduce(selected, seeds=seeds, budget=budget, out=str(out), overrides=overrides, force=force,
                     console=err, progress=progress)
    with StagedFiles(reports) as files:
        written = write_claims_files(rows, reports, files, provenance=f"Runs under `{out}`, {seeds} seed(s) per arm.")
    for path in written:
        err.print(f"wrote {path}", soft_wrap=True, highlight=False)
    typer.echo(claims_markdown(rows).split("\n## Equivalence margins")[0])
