"""The report's "Representation geometry" section (``synth-geometry``, :mod:`bench.eval.synth_geometry`).

The results table keeps only accuracy, TAR@FAR and rank-N columns (:func:`bench.report.runs.metric_columns`),
so the geometry diagnostics get their own table, beside the synth-lfw accuracy of the same runs. It reads the
runs the main table shows (:func:`bench.report.runs.select_runs`: per configuration key the newest
configuration, the newest run per seed) whose metrics hold ``synth-geometry``, and gives per (dataset, split)
one table whose rows are the configuration keys (backbone, budget, method) with their seed count ``n``. Each
cell is the mean over the seeds ± their sample std and, with two seeds or more, the 95 % Student-t interval
of the mean (:func:`bench.report.quality_report.seed_summary`), as the other tables. Columns: synth-lfw
accuracy (%), then the protocol's ``summary`` numbers as they are (alignment of views and of an identity's
images, mean and max cosine of identity centres, the (sigma, delta) concentration estimates, uniformity).
Nothing is bold: the diagnostics have no better direction on their own (a collapsed embedding aligns
perfectly), they are read against the accuracy.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.report.latex import latex_escape
from bench.report.quality_report import seed_summary
from bench.report.runs import KEY_COLUMNS, finite_number, provenance, selected_values
from bench.report.tables import metric_cell

GEOMETRY = "synth-geometry"
#: The accuracy shown beside the diagnostics (a column of :func:`bench.report.runs.record_row`).
ACCURACY = "synth-lfw acc"
#: Display order of the summary numbers (others follow in their first order).
SUMMARY_ORDER = ("align views", "align identity", "centre cos mean", "centre cos max",
                 "concentration sigma@0.8", "concentration delta@0.9", "uniformity")
ROW_COLUMNS = ["backbone", "budget", "method"]
MISSING = "–"
NOTE = ("Representation geometry of held-out SynthFace identities (synth-geometry, bench/eval/synth_geometry.py): "
        "align views / align identity = mean squared distance of the unit embeddings of two augmented views of an "
        "image / of two images of one identity (Wang & Isola 2020, alpha = 2); centre cos mean / max = cosine "
        "between identity centres; concentration sigma@0.8 = largest share of an identity's images pairwise within "
        "augmented distance 0.8, delta@0.9 = smallest augmented-distance diameter of 90 % of its images (estimates "
        "of Huang et al. 2023's (sigma, delta)-measure, means over identities); uniformity = log mean exp(-2 d^2) "
        "over image pairs (Wang & Isola). Beside the synth-lfw accuracy (%) of the same runs. n = seeds; mean ± std "
        "over seeds [95 % Student-t interval of the mean, n >= 2]. Nothing bold: read the diagnostics against the "
        "accuracy. –: not reported.")




def geometry_values(record: dict[str, Any]) -> dict[str, float | None] | None:
    """One run's ``synth-geometry`` summary numbers and its synth-lfw accuracy, None without the protocol."""
    metrics = record.get("metrics") or {}
    values = metrics.get(GEOMETRY)
    if not isinstance(values, dict) or not isinstance(values.get("summary"), dict):
        return None
    lfw = metrics.get("synth-lfw")
    out: dict[str, float | None] = {ACCURACY: finite_number(lfw.get("accuracy")) if isinstance(lfw, dict) else None}
    out.update({str(name): finite_number(value) for name, value in values["summary"].items()})
    return out


def _plain(row: pd.Series, column: str) -> str:
    """``mean ± std [low, high]`` of a column shown as it is (3 decimals), ``–`` when missing."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return MISSING
    sd, low, high = row.get(f"{column} sd"), row.get(f"{column} ci low"), row.get(f"{column} ci high")
    text = f"{value:.3f}" + ("" if sd is None or pd.isna(sd) else f" ± {sd:.3f}")
    return text + ("" if low is None or pd.isna(low) else f" [{low:.3f}, {high:.3f}]")


def _table(runs: pd.DataFrame) -> tuple[str, str]:
    present = [c for c in runs.columns if c not in KEY_COLUMNS + ["seed", "run_id", "config", "commit", "device",
                                                                   "date", ACCURACY]]
    columns = [c for c in SUMMARY_ORDER if c in present] + [c for c in present if c not in SUMMARY_ORDER]
    summary = seed_summary(runs, [ACCURACY] + columns)
    headers = ROW_COLUMNS + ["n", "synth-lfw acc (%)"] + columns
    cells = []
    for _, row in summary.iterrows():
        text, interval, _ = metric_cell(row, ACCURACY)
        accuracy = f"{text} {interval}" if text and interval else (text or MISSING)
        cells.append([str(row[c]) for c in ROW_COLUMNS] + [str(row["seeds"]), accuracy]
                     + [_plain(row, c) for c in columns])
    markdown = tabulate(cells, headers=headers, tablefmt="pipe", disable_numparse=True)
    align = "lll" + "r" * (len(headers) - 3)
    latex = "\n".join([f"% {latex_escape(provenance(runs))}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
                       " & ".join(latex_escape(h) for h in headers) + " \\\\", "\\midrule",
                       *(" & ".join("--" if c == MISSING else latex_escape(c) for c in line) + " \\\\"
                         for line in cells),
                       "\\bottomrule", "\\end{tabular}"]) + "\n"
    return markdown, latex


def geometry_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the representation-geometry tables ("" when no shown run has ``synth-geometry``)."""
    runs = selected_values(records, geometry_values)
    if runs.empty:
        return "", ""
    md, tex = ["## Representation geometry\n", NOTE + "\n"], ["% Representation geometry (synth-geometry)\n"]
    for (dataset, split), group in runs.groupby(["dataset", "split"], dropna=False, sort=True):
        title = f"{dataset}, {split} split"
        table_md, table_tex = _table(group)
        md += [f"### {title}\n", provenance(group) + "\n", table_md + "\n"]
        tex += [f"% {latex_escape(title)}\n", table_tex]
    return "\n".join(md), "".join(tex)
