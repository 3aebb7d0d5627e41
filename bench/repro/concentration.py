"""The concentration experiment of Huang et al. (ICLR 2023, arXiv:2111.00743): does downstream verification
accuracy increase with the concentration of augmented data?

The claim is the registry's trend claim ``ssl-concentration``
(``bench/repro/claims/contrastive_generalization.yaml``): ``infonce`` at several augmentation strengths,
each run evaluated on ``synth-lfw`` and on ``synth-geometry`` with the views drawn at the run's own training
strength (``eval.geometry_strength``), so that the concentration measured is that of the augmentation the
run learned from; judged by Spearman's rho between concentration (sigma at delta = 0.8) and synth-lfw
accuracy over every run, with a 95 % percentile bootstrap interval (:func:`bench.repro.judge.judge_trend`).
``bench reproduce --claims ssl-concentration --seeds 3`` trains and judges it like every claim;
``python -m bench.repro.concentration`` trains (or reuses: the same configurations, the same fingerprints)
the same runs for :data:`SEEDS` seeds and writes the experiment's own page: ``concentration.md`` and
``concentration.json`` (the verdict, a table per level, every run) and ``figures/concentration.png``
(accuracy against concentration, one colour per level).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import typer

from bench.report.claims import ClaimRow, difference_text

#: The registry's claim this experiment runs.
CLAIM_ID = "ssl-concentration"
#: Seeds per level (ours: the issue asks for at least 3; 4 levels x 3 seeds at 12,800 samples fit in about
#: 20 minutes on the 2-core CPU).
SEEDS = 3
OUT = "results/concentration"


def per_level(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level (in the claim's order): its label, the runs, the mean and sd of y and the mean of x."""
    summary = []
    for level in sorted({p["level"] for p in points}):
        chosen = [p for p in points if p["level"] == level]
        ys = [p["y"] for p in chosen]
        summary.append({"level": level, "label": chosen[0]["label"], "runs": len(chosen),
                        "y_mean": float(np.mean(ys)), "y_sd": float(np.std(ys, ddof=1)) if len(ys) > 1 else None,
                        "x_mean": float(np.mean([p["x"] for p in chosen]))})
    return summary


def markdown(row: ClaimRow, points: list[dict[str, Any]]) -> str:
    """The report page: the verdict line, the per-level table and every run."""
    lines = ["# Concentration of augmented data and downstream accuracy (Huang et al., ICLR 2023)", "",
             f"Claim `{row.id}`: {row.claim} Spearman's rho between {row.trend_x} and {row.metric} over "
             f"{row.n} runs: **{difference_text(row) or 'not judged'}** (95 % bootstrap interval): "
             f"**{row.verdict}**.", "",
             f"| level | runs | {row.metric} (%) mean ± sd | {row.trend_x} (mean) |", "|:--|--:|--:|--:|"]
    for entry in per_level(points):
        sd = f" ± {100 * entry['y_sd']:.2f}" if entry["y_sd"] is not None else ""
        lines.append(f"| {entry['label']} | {entry['runs']} | {100 * entry['y_mean']:.2f}{sd} | {entry['x_mean']:.3f} |")
    if row.missing:
        lines += ["", "Missing: " + "; ".join(row.missing)]
    lines += ["", "Runs: " + "; ".join(f"{p['label']} seed {p['seed']}: {100 * p['y']:.2f} %, x {p['x']:.3f} "
                                       f"({p['run']})" for p in points), ""]
    return "\n".join(lines)


def figure(row: ClaimRow, points: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against concentration, one colour per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    levels = per_level(points)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, max(len(levels), 1)))
    for entry, colour in zip(levels, colours):
        chosen = [p for p in points if p["level"] == entry["level"]]
        ax.scatter([p["x"] for p in chosen], [100 * p["y"] for p in chosen], color=colour, label=entry["label"])
    ax.set_xlabel(row.trend_x)
    ax.set_ylabel(f"{row.metric} (%)")
    title = f"{row.id}: Spearman rho {row.mean_difference:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}]" \
        if not math.isnan(row.mean_difference) else f"{row.id}: {row.verdict}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(reports: Path = typer.Option(Path("reports"), help="Where concentration.md/.json and the figure go."),
         budget: int | None = typer.Option(None, help="Samples per run (default: the claim's, 12,800)."),
         out: str = typer.Option(OUT, help="Where the runs are written and reused."),
         progress: bool = typer.Option(False, "--progress/--no-progress")) -> None:
    """Train (or reuse) every run of the claim, judge the trend, write the report."""
    from bench.records import complete_runs_by_fingerprint
    from bench.repro.claims import load_claims, select_claims, trend_config
    from bench.repro.judge import judge_trend
    from bench.runner import run

    (claim,) = select_claims(load_claims(), [CLAIM_ID])
    assert claim.trend is not None
    for level in range(len(claim.trend.levels)):
        for seed in range(SEEDS):
            run(trend_config(claim, level, seed, budget, out), progress=progress)
    row, points = judge_trend(claim, SEEDS, complete_runs_by_fingerprint(Path(out)), out, budget)
    reports.mkdir(parents=True, exist_ok=True)
    record = {"claim": claim.id, "rho": row.mean_difference, "ci": [row.ci_low, row.ci_high], "verdict": row.verdict,
              "x": row.trend_x, "y": row.metric, "levels": per_level(points), "runs": points}
    (reports / "concentration.json").write_text(json.dumps(record, indent=2) + "\n")
    (reports / "concentration.md").write_text(markdown(row, points))
    figure(row, points, reports / "figures" / "concentration.png")
    typer.echo(markdown(row, points))


if __name__ == "__main__":
    typer.run(main)
