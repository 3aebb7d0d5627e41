"""``bench report``, ``bench profile``, ``bench check`` and ``bench baseline save``.

Thin commands: parse, call :mod:`bench.report`, :mod:`bench.profile` or :mod:`bench.check`. Tables go to
stdout, messages to stderr; ``bench check`` exits 1 on a regression, every command 2 on a usage error or
when what it must read cannot be read (a baseline file; every run record broken: one broken record among
readable ones is skipped with a warning line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import DeviceOption, ResultsOption, RunsOutOption, err, one_line_errors


@one_line_errors
def report_command(
    results: ResultsOption = Path("results"),
    out: Path = typer.Option(Path("reports"), "--out", help="Where results.md, results.tex and figures/ are written."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Also draw the figures (PNG and PDF)."),
) -> None:
    """Regenerate reports/results.md, reports/results.tex and reports/figures/ from the run records, and
    reports/claims.md (.tex, figures/claims.*) from the claims' runs under RESULTS/claims when there are any."""
    from bench.errors import BenchError
    from bench.report.writer import write_report

    if not results.is_dir():
        raise BenchError(f"results directory {results} does not exist")
    claims, provenance = None, ""
    if (results / "claims").is_dir():
        from bench.repro.claims import load_claims
        from bench.repro.judge import judge, seeds_in
        from bench.repro.reproduce import load_options

        options, seeds = load_options(results / "claims"), seeds_in(results / "claims")
        claims = judge(load_claims(), seeds, results / "claims", options["budget"], options["overrides"])
        provenance = (f"Runs under `{results / 'claims'}` (`bench reproduce`), seeds {', '.join(map(str, seeds))}"
                      + (f", budget {options['budget']}" if options["budget"] else "") + ".")
    for path in write_report(results, out, figures=figures, claims=claims, claims_provenance=provenance):
        err.print(f"wrote {path}", soft_wrap=True, highlight=False)


@one_line_errors
def profile_command(
    classes: str = typer.Option("10k,100k,300k,1M,2M", "--classes", help="Class counts, e.g. 10k,100k,1M."),
    methods: str = typer.Option(",".join(("arcface", "pfc-0.1", "pfc-0.2", "dcq", "pm", "sst")), "--methods",
                                help="Cases, each a registered method built as `bench run` does: arcface, cosface (full FC), "
                                     "pfc-R (Partial FC at sample_rate R, e.g. pfc-0.1), dcq, pm, sst, masst."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per step (two views per identity for dcq, pm, sst)."),
    embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding size."),
    steps: int = typer.Option(3, "--steps", help="Timed steps per case (after one warm-up step); the median is kept."),
    memory_budget_gb: float = typer.Option(16.0, "--memory-budget-gb",
                                           help="Cases whose estimated memory (GiB) exceeds this are not run "
                                                "and are reported 'over budget'."),
    device: DeviceOption = "auto",
    threads: int = typer.Option(0, "--threads", help="Intra-op CPU threads (0: torch's default)."),
    out: RunsOutOption = Path("results"),
) -> None:
    """Time and memory of each method's head vs the number of classes, on fixed random embeddings."""
    from bench.profile import ProfileSettings, format_rows, parse_counts, run_profile

    settings = ProfileSettings(classes=parse_counts(classes), cases=[m.strip() for m in methods.split(",") if m.strip()],
                               batch_size=batch_size, embedding_size=embedding_size, steps=steps,
                               memory_budget_gib=memory_budget_gb, device=device, out=str(out), threads=threads)

    def show(row: dict) -> None:
        detail = (f"{row['step_ms']:.1f} ms/step, {row['peak_bytes'] / 2**30:.2f} GiB peak"
                  if row["status"] == "ok" else f"{row['status']} (estimate {row['estimate_bytes'] / 2**30:.1f} GiB)")
        err.print(f"  {row['method']:>8} {row['classes']:>10,} classes: {detail}")

    directory, rows = run_profile(settings, on_row=show)
    err.print(f"record {directory}", soft_wrap=True, highlight=False)
    typer.echo(format_rows(rows))


@one_line_errors
def check_command(
    baseline: Path = typer.Option(..., "--baseline", help="Baseline JSON (from `bench baseline save`)."),
    results: ResultsOption = Path("results"),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop",
                                                      help="Percentage points a quality metric may drop "
                                                           "(default 0.5, or the baseline's own)."),
    max_throughput_drop: Optional[float] = typer.Option(None, "--max-throughput-drop",
                                                        help="Fraction of throughput that may be lost "
                                                             "(default 0.10, or the baseline's own)."),
    max_memory_growth: Optional[float] = typer.Option(None, "--max-memory-growth",
                                                      help="Fraction by which peak memory may grow "
                                                           "(default 0.10, or the baseline's own)."),
    all_rows: bool = typer.Option(True, "--all/--regressions-only", help="Show every comparison, or only failures."),
) -> None:
    """Compare the newest records with a baseline; exit 1 on a regression beyond tolerance, 0 otherwise
    (2: the baseline or the records cannot be read)."""
    from bench.check import check, comparison_table

    comparisons, notes, tolerances = check(results, baseline, {
        "max_accuracy_drop": max_accuracy_drop, "max_throughput_drop": max_throughput_drop,
        "max_memory_growth": max_memory_growth})
    regressions = [c for c in comparisons if c.regressed]
    typer.echo(comparison_table(comparisons, only_regressions=not all_rows))
    for note in notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    summary = (f"tolerances: accuracy drop <= {tolerances.max_accuracy_drop:g} pp, throughput drop <= "
               f"{100 * tolerances.max_throughput_drop:g}%, memory growth <= {100 * tolerances.max_memory_growth:g}%")
    if regressions:
        err.print(f"[red]FAIL[/]: {len(regressions)} of {len(comparisons)} values regressed against {baseline} "
                  f"({summary})", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(f"[green]OK[/]: {len(comparisons)} values within tolerance of {baseline} ({summary})",
              highlight=False, soft_wrap=True)


baseline_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="Save the newest records as a regression baseline.")


@baseline_app.command("save")
@one_line_errors
def baseline_save(
    out: Path = typer.Option(Path("results/baselines/baseline.json"), "--out", help="Baseline JSON to write."),
    results: ResultsOption = Path("results"),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop",
                                                      help="Store this accuracy tolerance (pp) in the baseline."),
    max_throughput_drop: Optional[float] = typer.Option(None, "--max-throughput-drop",
                                                        help="Store this throughput tolerance (fraction)."),
    max_memory_growth: Optional[float] = typer.Option(None, "--max-memory-growth",
                                                      help="Store this memory tolerance (fraction)."),
    metric: list[str] = typer.Option([], "--metric", help="Keep only these columns (shell patterns, repeatable), "
                                                          "e.g. --metric 'synth-lfw acc' --metric 'img/s'. "
                                                          "Default: every metric, img/s and peak MiB."),
    note: str = typer.Option("", "--note", help="Free text stored in the baseline (how it was made)."),
) -> None:
    """Write the newest records' metrics, throughput and memory as a baseline for `bench check`."""
    from bench.check import save_baseline

    tolerances = {"max_accuracy_drop": max_accuracy_drop, "max_throughput_drop": max_throughput_drop,
                  "max_memory_growth": max_memory_growth}
    path = save_baseline(results, out, {k: v for k, v in tolerances.items() if v is not None}, note, metric or None)
    err.print(f"wrote {path}", soft_wrap=True, highlight=False)
