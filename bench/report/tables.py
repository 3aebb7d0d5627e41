"""Results tables from run records: pandas for shaping, Markdown (tabulate) and LaTeX (booktabs).

Which runs a table shows. A *configuration key* is (dataset, split, backbone, budget, method). For each
key the newest complete run decides the configuration (its hash over everything in ``config.yaml`` except
the seed and where or how the run was executed); every run of that key with that configuration hash is
kept, the newest one per seed; the row is their mean over seeds, with the standard deviation over seeds
(sample std, ``ddof=1``) and the number of seeds ``n``. With one seed, the ``±`` of an accuracy is the
population std over its 10 folds (the insightface protocol) instead.

Every metric cell with an interval shows it in brackets after the value (issue 15):
``87.15 ± 0.40 [86.65, 87.65]``. With ``n >= 2`` the brackets are the 95 % Student-t confidence interval of
the mean over the seeds; with ``n = 1`` and an accuracy whose record holds its 10 fold accuracies, they are
the 95 % percentile bootstrap interval of the mean over the folds (9999 resamples, seed 0); a single-seed
metric without folds (TAR@FAR, the ``summary`` metrics) has none. The intervals come from
:func:`bench.report.runs.aggregate` (:mod:`bench.stats`).

Columns: each protocol's headline metrics (synth-lfw / LFW-family accuracy and TAR@FAR; IJB, MegaFace
and synth-tail give theirs in ``summary``: TAR@FAR 1e-4 and 1e-5, 1:N rank-1, MegaFace rank-1, long-tail
rank-1 per bucket), throughput, peak memory and training time. Within each group of rows that differ only
in the method, the best value of every column is bold (higher is better, except memory, time and pAUC: see
:func:`lower_is_better`): the mean
decides, and only ``mean ± std`` is bold, not the interval after it.
Every table carries a provenance line: git commit, configuration hash, device and date of its runs.
The rows come from :mod:`bench.report.runs`; :mod:`bench.report.writer` writes the report.
"""

from __future__ import annotations

import re

import pandas as pd
from tabulate import tabulate

from bench.report.latex import latex_escape
from bench.report.runs import COST_COLUMNS, GROUP_COLUMNS, KEY_COLUMNS, metric_columns, summary_frame

#: Columns where smaller is better.
LOWER_IS_BETTER = {"peak MiB", "train s"}
#: Words that make a column smaller-is-better wherever they stand in its name: the partial area under a
#: quality score's error-versus-discard curve (``synth-quality pAUC <score>``).
LOWER_IS_BETTER_WORDS = {"pAUC"}


def lower_is_better(column: str) -> bool:
    """Whether a smaller value of ``column`` is better (:data:`LOWER_IS_BETTER`, :data:`LOWER_IS_BETTER_WORDS`)."""
    return column in LOWER_IS_BETTER or not LOWER_IS_BETTER_WORDS.isdisjoint(column.split())


# ----------------------------------------------------------------------------------------------------
# Display
# ----------------------------------------------------------------------------------------------------


def _header(column: str) -> str:
    """Display name: ``synth-lfw acc`` -> ``synth-lfw acc (%)``, ``TAR@FAR=1e-4`` -> ``TAR (%) @FAR=1e-4``,
    ``rank-1`` -> ``rank-1 (%)``."""
    column = column.replace(" acc", " acc (%)").replace("TAR@", "TAR (%) @")
    return re.sub(r" (rank-\d+)", r" \1 (%)", column)


def _interval_text(row: pd.Series, column: str) -> str:
    """``[low, high]`` of a metric's 95 % interval in percent (``<column> ci low`` / ``ci high`` of
    :func:`bench.report.runs.aggregate`), or ``""`` when it has none."""
    low, high = row.get(f"{column} ci low"), row.get(f"{column} ci high")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"[{100 * float(low):.2f}, {100 * float(high):.2f}]"


def metric_cell(row: pd.Series, column: str) -> tuple[str, str, float | None]:
    """The displayed text of one metric or cost cell (``mean ± std``), its interval text (``[low, high]``,
    or ``""``), and the rounded value used to find the best."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return "", "", None
    seed_sd = row.get(f"{column} sd")
    if column in COST_COLUMNS:
        return f"{value:.0f}", "", round(float(value))
    shown = round(100 * float(value), 2)
    interval = _interval_text(row, column)
    if seed_sd is not None and not pd.isna(seed_sd):
        return f"{shown:.2f} ± {100 * seed_sd:.2f}", interval, shown
    fold_sd = row.get(f"{column} std") if column.endswith(" acc") else None
    if fold_sd is not None and not pd.isna(fold_sd):
        return f"{shown:.2f} ± {100 * fold_sd:.2f}", interval, shown
    return f"{shown:.2f}", interval, shown


def _with_interval(text: str, interval: str) -> str:
    """A cell's text followed by its interval, if any."""
    return f"{text} {interval}" if interval else text


def best_mask(frame: pd.DataFrame, column: str, values: list[float | None]) -> list[bool]:
    """Which rows hold the best value of ``column`` within their group (only groups of 2 rows or more)."""
    best = [False] * len(values)
    positions = {index: i for i, index in enumerate(frame.index)}
    for _, group in frame.groupby(GROUP_COLUMNS, dropna=False, sort=False):
        members = [positions[i] for i in group.index if values[positions[i]] is not None]
        if len(group) < 2 or not members:
            continue
        pick = min if lower_is_better(column) else max
        target = pick(values[i] for i in members)
        if all(values[i] == target for i in members):
            continue  # a tie of every row marks nothing
        for i in members:
            best[i] = values[i] == target
    return best


def display_table(frame: pd.DataFrame) -> tuple[list[str], list[list[tuple[str, str, bool]]], list[str]]:
    """Headers, cells as (text, interval text, is_best), and the internal column name of each displayed
    column; a writer bolds the text of a best cell, not its interval."""
    metrics = metric_columns(frame)
    columns = KEY_COLUMNS + ["seeds"] + metrics + COST_COLUMNS
    headers = KEY_COLUMNS + ["n"] + [_header(c) for c in metrics] + COST_COLUMNS
    cells: list[list[tuple[str, str, bool]]] = [
        [(str(row[c]), "", False) for c in KEY_COLUMNS] + [(str(row["seeds"]), "", False)]
        for _, row in frame.iterrows()]
    for column in metrics + COST_COLUMNS:
        shown = [metric_cell(row, column) for _, row in frame.iterrows()]
        best = best_mask(frame, column, [value for _, _, value in shown])
        for line, (text, interval, _), is_best in zip(cells, shown, best):
            line.append((text, interval, is_best))
    return headers, cells, columns


def _as_summary(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if "seeds" in frame.columns or frame.empty else summary_frame(frame)


def to_markdown(frame: pd.DataFrame) -> str:
    """A Markdown (pipe) table of :func:`summary_frame` rows (raw runs are aggregated first)."""
    frame = _as_summary(frame)
    if frame.empty:
        return "(no complete runs)"
    headers, cells, _ = display_table(frame)
    text = [[_with_interval(f"**{t}**" if best and t else t, interval) for t, interval, best in line]
            for line in cells]
    return tabulate(text, headers=headers, tablefmt="pipe", disable_numparse=True)


def to_latex(frame: pd.DataFrame, caption_line: str | None = None) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); best values in ``\\textbf``."""
    frame = _as_summary(frame)
    if frame.empty:
        return "% no complete runs\n"
    headers, cells, _ = display_table(frame)
    align = "l" * (len(KEY_COLUMNS)) + "r" * (len(headers) - len(KEY_COLUMNS))
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in headers) + " \\\\", "\\midrule"]
    for line in cells:
        lines.append(" & ".join(_with_interval(f"\\textbf{{{latex_escape(t)}}}" if best and t else latex_escape(t),
                                               latex_escape(interval))
                                for t, interval, best in line) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption_line:
        lines.insert(0, "% " + caption_line)
    return "\n".join(lines) + "\n"


TABLE_NOTE = ("Newest configuration per (dataset, split, backbone, budget, method); n = seeds. Metrics: mean ± std "
              "over seeds (sample std) [95 % confidence interval of the mean: Student's t over the n seeds]; with "
              "n = 1, the ± of an accuracy is the population std over its 10 folds (insightface protocol) and the "
              "brackets are the 95 % percentile bootstrap interval of the mean over those folds (9999 resamples); "
              "a single-seed metric without folds (TAR@FAR, rank-N) has no brackets. Bold: best mean in its group "
              "of rows that differ only in the method. Peak memory: CUDA max allocated, or process peak RSS on CPU.")


