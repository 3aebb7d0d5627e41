"""The 95 % intervals of the results tables (issue 15), on hand-written records (no training).

Shows: with n >= 2 seeds a metric cell reads ``mean ± sd [low, high]``, the brackets the Student-t interval of
the mean over the seeds (computed here from ``scipy.stats.t.ppf``, not by ``bench.stats``); with one seed an
accuracy whose record holds its 10 fold accuracies reads ``mean ± fold std [low, high]``, the brackets the
percentile bootstrap interval over the folds (``scipy.stats.bootstrap`` called here); a single-seed TAR, or an
older record without fold accuracies, has no brackets; bold covers ``mean ± sd`` only (Markdown and LaTeX);
:func:`bench.report.runs.metric_columns` never takes the new columns for metrics.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bench.report.runs import metric_columns, results_frame, summary_frame
from bench.report.tables import TABLE_NOTE, to_latex, to_markdown
from tests.report_records import write_record

#: arcface: three seeds; cosface: two seeds (best accuracy: arcface, best TAR@FAR=0.01: cosface).
ARC = [(0, 0.80, 0.20), (1, 0.83, 0.30), (2, 0.85, 0.40)]
COS = [(0, 0.78, 0.50), (1, 0.80, 0.60)]
#: One seed's 10 fold accuracies (mean 0.872, population std 0.0146969...).
FOLDS = [0.86, 0.88, 0.87, 0.89, 0.85, 0.88, 0.87, 0.86, 0.90, 0.86]


def add_folds(directory: Path, folds: list[float]) -> None:
    """Write ``folds`` as synth-lfw's ``fold_accuracies`` into a record of :func:`write_record`, as
    :func:`bench.eval.verification.verification_metrics` does."""
    path = directory / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["synth-lfw"]["fold_accuracies"] = folds
    path.write_text(json.dumps(metrics))


def t_bracket(values: list[float]) -> str:
    """``[low, high]`` in percent of the 95 % Student-t interval of the mean, written out by hand."""
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return f"[{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"


def fold_bracket(folds: list[float]) -> str:
    """``[low, high]`` in percent of the percentile bootstrap interval of the mean of ``folds``."""
    result = stats.bootstrap((np.array(folds),), np.mean, method="percentile", confidence_level=0.95,
                             n_resamples=9999, random_state=np.random.default_rng(0))
    return f"[{100 * result.confidence_interval.low:.2f}, {100 * result.confidence_interval.high:.2f}]"


def table_line(table: str, method: str) -> list[str]:
    """The cells of ``method``'s row of a Markdown table."""
    line = next(line for line in table.splitlines() if f" {method} " in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def cell(table: str, method: str, header: str) -> str:
    """The text of one cell of a Markdown table."""
    headers = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    return table_line(table, method)[headers.index(header)]


@pytest.fixture
def seeds(tmp_path):
    """arcface over three seeds (the first with fold accuracies), cosface over two."""
    directory = tmp_path / "results"
    for seed, accuracy, tar in ARC:
        run = write_record(directory, f"20260101-00000{seed}-arcface-s{seed}-aaaa", "arcface", seed, accuracy, tar)
        if seed == 0:
            add_folds(run, FOLDS)
    for seed, accuracy, tar in COS:
        write_record(directory, f"20260101-00001{seed}-cosface-s{seed}-bbbb", "cosface", seed, accuracy, tar)
    return directory


@pytest.fixture
def one_seed(tmp_path):
    """One seed of arcface with its fold accuracies (accuracy and std as the protocol computes them from
    the folds), one of cosface from an older record without them."""
    directory = tmp_path / "results"
    run = write_record(directory, "20260101-000000-arcface-s0-aaaa", "arcface", 0, float(np.mean(FOLDS)), 0.40,
                       fold_std=float(np.std(FOLDS)))
    add_folds(run, FOLDS)
    write_record(directory, "20260101-000001-cosface-s0-bbbb", "cosface", 0, 0.90, 0.50, fold_std=0.0125)
    return directory


def test_seeds_give_mean_sd_and_the_t_interval(seeds):
    """Catches: an interval over the wrong values (folds instead of seeds), a z instead of a t quantile, the
    sd instead of the standard error, a missing bracket, or bold that swallows the interval."""
    table = to_markdown(summary_frame(results_frame(seeds)))
    arc = [a for _, a, _ in ARC]
    assert cell(table, "arcface", "synth-lfw acc (%)") == f"**82.67 ± 2.52** {t_bracket(arc)}"
    assert t_bracket(arc) == "[76.42, 88.92]"  # 82.67 -/+ 4.303 * 2.517 / sqrt(3)
    assert cell(table, "cosface", "synth-lfw acc (%)") == f"79.00 ± 1.41 {t_bracket([0.78, 0.80])}"
    cos_tar = [t for _, _, t in COS]
    assert cell(table, "cosface", "synth-lfw TAR (%) @FAR=0.01") == f"**55.00 ± 7.07** {t_bracket(cos_tar)}"
    summary = summary_frame(results_frame(seeds)).set_index("method")
    assert summary.loc["arcface", "synth-lfw acc ci kind"] == "t"  # several seeds: the folds do not count


def test_latex_shows_the_same_interval_outside_the_bold(seeds):
    """Catches: LaTeX cells differing from the Markdown ones, or the interval inside ``\\textbf``."""
    tex = to_latex(summary_frame(results_frame(seeds)))
    assert f"\\textbf{{82.67 $\\pm$ 2.52}} {t_bracket([a for _, a, _ in ARC])} &" in tex


def test_one_seed_accuracy_gives_the_bootstrap_over_its_folds(one_seed):
    """Catches: a single-seed accuracy shown without its uncertainty, a bootstrap over the wrong values, level
    or seed (a report that changes from run to run), or the fold std replaced."""
    summary = summary_frame(results_frame(one_seed))
    table = to_markdown(summary)
    assert cell(table, "arcface", "synth-lfw acc (%)") == f"87.20 ± 1.47 {fold_bracket(FOLDS)}"
    assert fold_bracket(FOLDS) == "[86.30, 88.10]"
    assert summary.set_index("method").loc["arcface", "synth-lfw acc ci kind"] == "folds"


def test_one_seed_without_folds_has_no_bracket(one_seed):
    """Catches: an interval invented where there is none: a single-seed TAR (no folds), or an accuracy from
    an older record without fold accuracies; both must read as before issue 15."""
    summary = summary_frame(results_frame(one_seed))
    table = to_markdown(summary)
    assert cell(table, "arcface", "synth-lfw TAR (%) @FAR=0.01") == "40.00"
    assert cell(table, "cosface", "synth-lfw TAR (%) @FAR=0.01") == "**50.00**"
    assert cell(table, "cosface", "synth-lfw acc (%)") == "**90.00 ± 1.25**"  # best mean: 90.00 > 87.20
    assert "[" not in to_latex(summary).split("cosface")[1].split("\\\\")[0]
    rows = summary.set_index("method")
    assert math.isnan(rows.loc["cosface", "synth-lfw acc ci low"])
    assert rows.loc["arcface", "synth-lfw TAR@FAR=0.01 ci kind"] == ""


def test_metric_columns_exclude_folds_and_interval_columns(one_seed, tmp_path):
    """Catches: the new columns (``acc folds``, ``ci low/high/kind``) taken for metrics, which would add table
    columns, baseline entries of `bench check` and intervals of intervals."""
    write_record(tmp_path / "more", "20260101-000000-arcface-s0-cccc", "arcface", 0, 0.8, 0.4,
                 extra_metrics={"ijb-c": {"summary": {"TAR@FAR=1e-4": 0.5, "rank-1": 0.7}}})
    expected = ["synth-lfw acc", "synth-lfw TAR@FAR=0.001", "synth-lfw TAR@FAR=0.01"]
    runs = results_frame(one_seed)
    assert "synth-lfw acc folds" in runs.columns and metric_columns(runs) == expected
    summary = summary_frame(runs)
    assert "synth-lfw acc ci high" in summary.columns and metric_columns(summary) == expected
    with_summary = summary_frame(results_frame(tmp_path / "more"))
    assert metric_columns(with_summary) == [*expected, "ijb-c TAR@FAR=1e-4", "ijb-c rank-1"]
    assert "ijb-c rank-1 ci kind" in with_summary.columns


def test_table_note_says_what_the_brackets_are():
    """Catches: a table whose note still describes cells without brackets."""
    assert "[95 % confidence interval of the mean: Student's t over the n seeds]" in TABLE_NOTE
    assert "percentile bootstrap interval of the mean over those folds" in TABLE_NOTE
