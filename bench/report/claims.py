"""The claims report: one row per judged comparison, as Markdown, LaTeX and a forest plot.

Rows are made by :func:`bench.repro.judge.judge` (this module renders them and reads no record, so the
report stays a reader). Table columns: paper, claim, setting, arms (A vs B), metric, mean difference
A - B with its 95 % t-interval over seeds (in points of the metric, i.e. percent), n (paired seeds), the
verdict, and the seeds that would decide an inconclusive one. The forest plot has one row per comparison:
the mean difference and its interval, the zero line (a "better" claim) or the equivalence band
``+/- eps`` (an equivalence), coloured by verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from bench.report.latex import latex_escape

#: Verdict colours of the forest plot and their legend order.
VERDICT_COLOURS = {"reproduced": "#1b9e77", "contradicted": "#d95f02", "inconclusive": "#7570b3"}
CLAIMS_NOTE = ("Each row compares arm A with arm B on the same setting, seed by seed (seed k of both arms shares "
               "the split and the data order). Difference: mean of A - B over the paired seeds, in points, with "
               "its 95 % t-interval (scipy.stats.t). Verdict, for \"A better than B\": reproduced when the interval "
               "lies above 0, contradicted when below 0; for \"A equivalent to B within ± eps\": reproduced when it "
               "lies inside ± eps (TOST at 2.5 % per side), contradicted when it lies entirely outside; otherwise "
               "inconclusive, with the number of seeds that would decide at the observed spread. Runs: run ids "
               "and config fingerprints of every seed.")


@dataclass
class ClaimRow:
    """One judged comparison (all numbers as fractions of the metric; the tables show points)."""

    id: str
    paper: str
    paper_key: str
    claim: str
    where: str
    setting: str
    arm_a: str
    arm_b: str
    metric: str
    relation: str
    eps: float | None
    eps_reason: str
    n: int
    mean_difference: float
    sd: float
    ci_low: float
    ci_high: float
    mean_a: float
    mean_b: float
    verdict: str
    status: str
    seeds_needed: int | None = None
    tost_p: float | None = None
    seeds_requested: int = 0
    missing: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    #: ``commit``, ``device``, ``date``: the distinct values among the runs behind the row.
    origins: dict[str, list[str]] = field(default_factory=dict)
    #: A trend claim's x column (then ``mean_difference`` and the interval are Spearman's rho, not points).
    trend_x: str = ""

    @property
    def judged(self) -> bool:
        return self.status == "judged"

    def relation_text(self) -> str:
        # no "|": it would split a Markdown table cell
        if self.trend_x:
            return f"increases with {self.trend_x}: Spearman rho > 0"
        return "A > B" if self.relation == "better" else f"A ≈ B within ±{100 * (self.eps or 0):.2g}"


def _points(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:+.2f}"


def difference_text(row: ClaimRow) -> str:
    """``+1.23 [+0.40, +2.06]`` (points), or the mean alone with one seed, or empty; for a trend claim
    ``rho -0.740 [-0.995, -0.195]``."""
    if not row.judged:
        return ""
    if row.trend_x:
        return f"rho {row.mean_difference:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
    if math.isnan(row.ci_low):
        return _points(row.mean_difference)
    return f"{_points(row.mean_difference)} [{_points(row.ci_low)}, {_points(row.ci_high)}]"


def verdict_text(row: ClaimRow) -> str:
    """The verdict, with the seeds that would decide an inconclusive one and the seeds missing."""
    text = row.verdict
    if row.verdict == "inconclusive":
        text += f" (about {row.seeds_needed} seeds would decide)" if row.seeds_needed else " (no seed count decides)"
    if row.missing:
        text += f"; missing: {', '.join(row.missing)}"
    return text


def _cells(row: ClaimRow) -> list[str]:
    arms = row.arm_a if row.trend_x else f"A: {row.arm_a}; B: {row.arm_b}"
    return [row.id, row.paper, row.claim, row.setting or "defaults", arms,
            f"{row.metric} ({row.relation_text()})", difference_text(row), str(row.n), verdict_text(row)]


HEADERS = ["id", "paper", "claim", "setting", "arms", "metric", "A - B (points) [95% CI]", "n", "verdict"]
#: Under the table: how a trend claim's row reads (shown only when one is listed).
TREND_NOTE = ("A trend claim (relation \"increases with ...\") lists its levels as arms; its difference column "
              "holds Spearman's rho between the two columns over every (level, seed) run, with a 95 % percentile "
              "bootstrap interval over runs, and n counts the runs.")


def runs_provenance(rows: list[ClaimRow]) -> str:
    """One line: the git commits, devices and dates of every run behind ``rows``."""
    def distinct(key: str) -> list[str]:
        return sorted({value for row in rows for value in row.origins.get(key, [])})

    dates = distinct("date")
    when = "unknown" if not dates else dates[0][:16].replace("T", " ") + (
        f" to {dates[-1][:16].replace('T', ' ')}" if dates[-1][:16] != dates[0][:16] else "")
    commits = [c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in distinct("commit")]
    return (f"Provenance of the runs: git commit {', '.join(commits) or 'unknown'}; device "
            f"{', '.join(distinct('device')) or 'unknown'}; date {when}.")


def claims_markdown(rows: list[ClaimRow], provenance: str = "") -> str:
    """``reports/claims.md``: the verdict table, the note, and each comparison's runs."""
    parts = ["# FaceBench claims\n", CLAIMS_NOTE + "\n"]
    if provenance:
        parts.append(provenance + "\n")
    if any(row.runs for row in rows):
        parts.append(runs_provenance(rows) + "\n")
    if not rows:
        parts.append("(no claims selected)\n")
        return "\n".join(parts)
    parts.append(tabulate([_cells(r) for r in rows], headers=HEADERS, tablefmt="pipe", disable_numparse=True) + "\n")
    if any(r.trend_x for r in rows):
        parts.append(TREND_NOTE + "\n")
    parts.append("## Equivalence margins\n")
    parts += [f"- `{r.id}`: eps = {100 * r.eps:.2g} points: {r.eps_reason}" for r in rows
              if r.relation == "equivalent" and r.eps is not None]
    parts.append("\n## Runs behind each verdict\n")
    for row in rows:
        means = (f" Means: A {100 * row.mean_a:.2f}, B {100 * row.mean_b:.2f}." if row.judged and not row.trend_x
                 else "")
        tost = f" TOST p = {row.tost_p:.3g}." if row.tost_p is not None and not math.isnan(row.tost_p) else ""
        parts.append(f"- `{row.id}` ({row.where}).{means}{tost} " + ("; ".join(row.runs) if row.runs else "no runs"))
    return "\n".join(parts) + "\n"


def claims_latex(rows: list[ClaimRow]) -> str:
    """The verdict table as a booktabs ``tabular`` (``reports/claims.tex``)."""
    lines = ["% FaceBench claims, generated by `bench report` / `bench reproduce`; needs \\usepackage{booktabs}",
             "\\begin{tabular}{lllllllrl}", "\\toprule", " & ".join(latex_escape(h) for h in HEADERS) + " \\\\",
             "\\midrule"]
    lines += [" & ".join(latex_escape(cell) for cell in _cells(row)) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def forest_plot(rows: list[ClaimRow]):  # noqa: ANN201 (a matplotlib Figure; matplotlib imported here only)
    """One row per comparison: the mean difference (points) and its 95 % interval, coloured by verdict;
    the zero line, and the shaded band ``+/- eps`` of an equivalence. Rows without a verdict are listed
    with their status and no interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from bench.report.figures import apply_style

    apply_style()
    height = 0.45 * max(len(rows), 1) + 1.2
    fig, ax = plt.subplots(figsize=(8.0, height))
    for y, row in enumerate(reversed(rows)):
        if row.relation == "equivalent" and row.eps is not None:
            ax.add_patch(Rectangle((-100 * row.eps, y - 0.35), 200 * row.eps, 0.7, color="0.85", zorder=0))
        if not row.judged or row.trend_x:
            # A trend's rho is not in points: its verdict is written, not drawn on this axis.
            text = f"  {row.verdict}" + (f": {difference_text(row)}" if row.judged else "")
            ax.text(0.0, y, text, va="center", ha="left", fontsize=7, color="0.4")
            continue
        colour = VERDICT_COLOURS.get(row.verdict, "0.3")
        if not math.isnan(row.ci_low):
            ax.plot([100 * row.ci_low, 100 * row.ci_high], [y, y], color=colour, linewidth=2.2, zorder=2)
        ax.plot([100 * row.mean_difference], [y], marker="o", color=colour, markersize=6, zorder=3)
    ax.axvline(0.0, color="0.2", linewidth=0.8, zorder=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r.id} (n={r.n}, {r.metric})" for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("A - B (points of the claim's metric), 95 % CI over paired seeds")
    ax.set_title("FaceBench claims: paired differences and verdicts")
    handles = [Patch(color=colour, label=verdict) for verdict, colour in VERDICT_COLOURS.items()]
    handles.append(Patch(color="0.85", label="equivalence band ± eps"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return fig


def write_claims_files(rows: list[ClaimRow], out_dir: Path, files, provenance: str = "",  # noqa: ANN001
                       figure: bool = True) -> list[Path]:
    """Stage ``claims.md``, ``claims.tex`` and ``figures/claims.png|pdf`` under ``out_dir`` in ``files``
    (a :class:`bench.report.staging.StagedFiles`); returns their paths."""
    out_dir = Path(out_dir)
    md, tex = out_dir / "claims.md", out_dir / "claims.tex"
    text = claims_markdown(rows, provenance)
    written = [md, tex]
    if figure:
        import matplotlib.pyplot as plt

        fig = forest_plot(rows)
        try:
            for kind in ("png", "pdf"):
                path = out_dir / "figures" / f"claims.{kind}"
                files.write(path, lambda handle, kind=kind: fig.savefig(handle, format=kind))
                written.append(path)
        finally:
            plt.close(fig)
        text += "\n![claims](figures/claims.png)\n\n*Forest plot of the verdicts* ([PDF](figures/claims.pdf))\n"
    files.write_text(md, text)
    files.write_text(tex, claims_latex(rows))
    return written
