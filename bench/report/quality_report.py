"""The report's low-resolution and face-quality sections (``synth-lowres``, ``synth-quality``).

Both read the runs the main table shows (:func:`bench.report.runs.select_runs`: per configuration key the
newest configuration, the newest run per seed) whose metrics hold the protocol, and give per (dataset,
split) one table whose rows are the configuration keys (backbone, budget, method) with their seed count
``n``; every cell is the mean over the seeds ± their sample std and, with two seeds or more, the 95 %
Student-t interval of the mean (:func:`bench.stats.t_interval`), as the main table
(:mod:`bench.report.tables`). A missing value (a method without quality estimation has no ``ri`` score)
shows as ``–``.

- **Low-resolution recognition** (``synth-lowres``): rank-1 (%) of the LR probes against the HR gallery per
  probe resolution, TAR (%) at FAR 1e-3 of HR-vs-LR pairs per resolution (``per_resolution[r]
  ["tar_at_far"]``; ``lr_tar_at_far`` is LR-vs-LR and not shown), and rank-1 of the same probes at full
  resolution. Bold: the highest mean among rows that differ only in the method.
- **Face quality (EDC)** (``synth-quality``): the pAUC of each quality score's FNM-EDC
  (:mod:`bench.eval.quality_metrics`: FNMR of the genuine comparisons kept after discarding the lowest
  pairwise quality, at a threshold fixed at the protocol's FMR; the area over the protocol's discard range),
  lower is better, bold: the best score of each row; and Spearman's rho between each quality score and the
  degradation strength, over all images and per nuisance (more negative: the score falls more consistently
  as the degradation grows).

:func:`edc_runs` gives :mod:`bench.report.figures` the curves of its ``edc-<slug>`` figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.report.latex import latex_escape
from bench.report.runs import KEY_COLUMNS, finite_number, provenance, selected_values
from bench.report.tables import best_mask, metric_cell, lower_is_better
from bench.stats import t_interval

LOWRES, QUALITY = "synth-lowres", "synth-quality"
#: The FAR of the low-resolution table's 1:1 columns.
LOWRES_FAR = 1e-3
#: Display order of the quality scores (others follow, sorted).
SCORE_ORDER = ("ri", "ers", "norm", "random")
#: A cell without a value.
MISSING = "–"
ROW_COLUMNS = ["backbone", "budget", "method"]
TABLE_COLUMNS = ["dataset", "split"]

LOWRES_NOTE = ("Per probe resolution (px, long side): rank-1 of the low-resolution (LR) probes against the "
               "high-resolution (HR) gallery with distractors, and TAR at FAR 1e-3 of HR-vs-LR pairs; HR rank-1: "
               "the same probes at full resolution. n = seeds; mean ± std over seeds [95 % Student-t interval of "
               "the mean, n >= 2]. Bold: best mean among rows that differ only in the method. –: not reported.")
QUALITY_NOTE = ("pAUC: area under the FNMR-versus-fraction-discarded curve (EDC) of each quality score, the "
                "pairwise quality being the lower of the two images', at a threshold fixed on all impostor "
                "comparisons at the FMR shown, over the discard range shown (bench/eval/quality_metrics.py); "
                "lower is better, bold: the best score of the row; `random` is the no-information baseline. "
                "Spearman rho: rank correlation of the quality score with the degradation strength, over all "
                "images and per nuisance (negative: quality falls as the degradation grows). n = seeds; mean ± "
                "std over seeds [95 % Student-t interval of the mean, n >= 2]. –: not reported (e.g. `ri` for a "
                "method that estimates no quality).")


# ----------------------------------------------------------------------------------------------------
# Records -> values
# ----------------------------------------------------------------------------------------------------




def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else ``{}`` (a hand-edited or partial record)."""
    return value if isinstance(value, dict) else {}


def _protocol(record: dict[str, Any], protocol: str) -> dict[str, Any] | None:
    values = (record.get("metrics") or {}).get(protocol)
    return values if isinstance(values, dict) else None


def _far_value(tars: Any, far: float) -> float | None:
    """The value of ``tars`` (``{"0.001": tar, ...}``) at ``far``, whatever the key's spelling."""
    if not isinstance(tars, dict):
        return None
    for key, value in tars.items():
        if finite_number(key) is not None and math.isclose(float(key), far, rel_tol=1e-9):
            return finite_number(value)
    return None


def _resolution_label(resolution: str) -> str:
    return f"{resolution}px"


def lowres_values(values: dict[str, Any]) -> dict[str, float | None]:
    """One run's ``synth-lowres`` metrics as columns: ``rank-1 <r>px``, ``TAR@FAR=1e-3 <r>px`` (HR-vs-LR)
    and ``HR rank-1``."""
    out: dict[str, float | None] = {}
    for resolution, entry in _mapping(values.get("per_resolution")).items():
        entry = _mapping(entry)
        out[f"rank-1 {_resolution_label(resolution)}"] = finite_number(entry.get("rank1"))
        out[f"TAR@FAR=1e-3 {_resolution_label(resolution)}"] = _far_value(entry.get("tar_at_far"), LOWRES_FAR)
    out["HR rank-1"] = finite_number(_mapping(values.get("hr")).get("rank1"))
    return out


def quality_values(values: dict[str, Any]) -> dict[str, float | None]:
    """One run's ``synth-quality`` metrics as columns: ``pAUC <score>`` and ``rho <score> <nuisance>``."""
    out: dict[str, float | None] = {}
    for score, pauc in _mapping(values.get("pauc")).items():
        out[f"pAUC {score}"] = finite_number(pauc)
    for score, correlations in _mapping(values.get("spearman")).items():
        for nuisance, rho in _mapping(correlations).items():
            out[f"rho {score} {nuisance}"] = finite_number(rho)
    return out


def _selected(records: list[dict[str, Any]], protocol: str,
              extract: Callable[[dict[str, Any]], dict[str, float | None]]) -> pd.DataFrame:
    """The runs the main table shows whose metrics hold ``protocol``, one row each, with ``extract``'s
    columns."""
    def values(record: dict[str, Any]) -> dict[str, float | None] | None:
        metrics = _protocol(record, protocol)
        return None if metrics is None else extract(metrics)

    return selected_values(records, values)


def seed_summary(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per configuration key: ``seeds`` (runs), and per column its mean, ``<column> sd`` (sample std,
    NaN for fewer than two values) and ``<column> ci low`` / ``ci high`` (Student-t, n >= 2), the names
    :func:`bench.report.tables.metric_cell` reads."""
    rows = []
    for key, group in runs.groupby(KEY_COLUMNS, dropna=False, sort=True):
        row: dict[str, Any] = dict(zip(KEY_COLUMNS, key))
        row["seeds"] = len(group)
        for column in columns:
            values = pd.to_numeric(group[column], errors="coerce").dropna() if column in group else pd.Series([])
            interval = t_interval(values.to_numpy())
            row[column], row[f"{column} sd"] = interval.mean, interval.sd
            row[f"{column} ci low"], row[f"{column} ci high"] = interval.low, interval.high
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _plain_cell(row: pd.Series, column: str, digits: int) -> tuple[str, str]:
    """``mean ± std`` and ``[low, high]`` of a column shown as it is (pAUC, rho), ``("–", "")`` if missing."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return MISSING, ""
    sd, low, high = row.get(f"{column} sd"), row.get(f"{column} ci low"), row.get(f"{column} ci high")
    text = f"{value:.{digits}f}" + ("" if sd is None or pd.isna(sd) else f" ± {sd:.{digits}f}")
    interval = "" if low is None or pd.isna(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"
    return text, interval


Cell = tuple[str, str, bool]  # text, interval, bold


def _render(headers: list[str], cells: list[list[Cell]], align: str, caption: str) -> tuple[str, str]:
    """A Markdown pipe table and a booktabs tabular (escaped; ``–`` as ``--``) of the same cells."""
    def md(cell: Cell) -> str:
        text, interval, bold = cell
        text = f"**{text}**" if bold else text
        return f"{text} {interval}" if interval else text

    def tex(cell: Cell) -> str:
        text, interval, bold = cell
        text = "--" if text == MISSING else latex_escape(text)
        text = f"\\textbf{{{text}}}" if bold else text
        return f"{text} {latex_escape(interval)}" if interval else text

    markdown = tabulate([[md(c) for c in line] for line in cells], headers=headers, tablefmt="pipe",
                        disable_numparse=True)
    latex = "\n".join([f"% {latex_escape(caption)}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
                       " & ".join(latex_escape(h) for h in headers) + " \\\\", "\\midrule",
                       *(" & ".join(tex(c) for c in line) + " \\\\" for line in cells),
                       "\\bottomrule", "\\end{tabular}"]) + "\n"
    return markdown, latex


def _key_cells(row: pd.Series) -> list[Cell]:
    return [(str(row[c]), "", False) for c in ROW_COLUMNS] + [(str(row["seeds"]), "", False)]


def _ordered(names: Iterable[str], first: tuple[str, ...] = ()) -> list[str]:
    """``names`` without repeats: those in ``first`` in that order, then the rest in their first order."""
    seen = list(dict.fromkeys(names))
    return [n for n in first if n in seen] + [n for n in seen if n not in first]


def _by_resolution(columns: list[str], prefix: str) -> list[str]:
    """The ``<prefix> <r>px`` columns, by increasing resolution."""
    chosen = [c for c in columns if c.startswith(prefix + " ") and c.endswith("px")]
    return sorted(chosen, key=lambda c: float(c[len(prefix) + 1:-2]) if finite_number(c[len(prefix) + 1:-2]) is not None
                  else math.inf)


def _groups(runs: pd.DataFrame) -> Iterable[tuple[tuple, pd.DataFrame]]:
    return runs.groupby(TABLE_COLUMNS, dropna=False, sort=True)


def _title(key: tuple) -> str:
    dataset, split = key
    return f"{dataset}, {split} split"


def _lowres_table(runs: pd.DataFrame) -> tuple[str, str]:
    value_columns = [c for c in runs.columns if c.startswith(("rank-1 ", "TAR@FAR=1e-3 ", "HR rank-1"))]
    columns = (_by_resolution(value_columns, "rank-1") + _by_resolution(value_columns, "TAR@FAR=1e-3")
               + ["HR rank-1"])
    summary = seed_summary(runs, columns)
    headers = ROW_COLUMNS + ["n"] + [
        c.replace("rank-1 ", "rank-1 (%) ").replace("TAR@FAR=1e-3 ", "TAR (%) @FAR=1e-3 HR-LR ")
        if c != "HR rank-1" else "HR rank-1 (%)" for c in columns]
    cells = [_key_cells(row) for _, row in summary.iterrows()]
    for column in columns:
        shown = [metric_cell(row, column) for _, row in summary.iterrows()]
        best = best_mask(summary, column, [value for _, _, value in shown])
        for line, (text, interval, _), bold in zip(cells, shown, best):
            line.append((text or MISSING, interval, bold))
    return _render(headers, cells, "llr" + "r" * (len(headers) - 3), provenance(runs))


def _best_in_row(values: list[float | None], column: str) -> list[bool]:
    """Which of a row's values is the best (lowest for pAUC); nothing on a tie of all or with one value."""
    present = [v for v in values if v is not None]
    if len(present) < 2 or len(set(present)) == 1:
        return [False] * len(values)
    target = min(present) if lower_is_better(column) else max(present)
    return [v == target for v in values]


def _pauc_table(runs: pd.DataFrame, scores: list[str]) -> tuple[str, str]:
    columns = [f"pAUC {s}" for s in scores]
    summary = seed_summary(runs, columns)
    cells = []
    for _, row in summary.iterrows():
        shown = [_plain_cell(row, c, 4) for c in columns]
        rounded = [None if pd.isna(row[c]) else round(float(row[c]), 4) for c in columns]
        best = _best_in_row(rounded, columns[0])
        cells.append(_key_cells(row) + [(t, i, b) for (t, i), b in zip(shown, best)])
    headers = ROW_COLUMNS + ["n"] + columns
    return _render(headers, cells, "llr" + "r" * (len(headers) - 3), provenance(runs))


def _spearman_table(runs: pd.DataFrame, scores: list[str], nuisances: list[str]) -> tuple[str, str]:
    columns = [f"rho {s} {n}" for s in scores for n in nuisances]
    summary = seed_summary(runs, columns)
    cells = []
    for _, row in summary.iterrows():
        for score in scores:
            shown = [_plain_cell(row, f"rho {score} {n}", 3) for n in nuisances]
            if all(text == MISSING for text, _ in shown):
                continue
            cells.append(_key_cells(row)[:3] + [(score, "", False), (str(row["seeds"]), "", False)]
                         + [(t, i, False) for t, i in shown])
    headers = ROW_COLUMNS + ["quality score", "n"] + [f"rho {n}" for n in nuisances]
    return _render(headers, cells, "lllr" + "r" * (len(headers) - 4), provenance(runs))


def _protocol_settings(records: list[dict[str, Any]], runs: pd.DataFrame) -> str:
    """``FMR ...; discard range [0, ...]`` of the quality runs (each distinct value listed)."""
    by_id = {r["run_id"]: r for r in records}
    def text(value: Any) -> str:
        number = finite_number(value)
        return "?" if number is None else f"{number:g}"

    fmrs, limits = set(), set()
    for run_id in runs["run_id"]:
        values = _mapping(_protocol(by_id[run_id], QUALITY))
        fmrs.add(text(values.get("fmr")))
        limits.add(text(values.get("pauc_max_discard")))
    return f"FMR {', '.join(sorted(fmrs))}; pAUC over discarded fractions [0, {', '.join(sorted(limits))}]"


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def lowres_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the low-resolution tables ("" when no shown run has ``synth-lowres``)."""
    runs = _selected(records, LOWRES, lowres_values)
    if runs.empty:
        return "", ""
    md, tex = ["## Low-resolution recognition\n", LOWRES_NOTE + "\n"], ["% Low-resolution recognition (synth-lowres)\n"]
    for key, group in _groups(runs):
        table_md, table_tex = _lowres_table(group)
        md += [f"### {_title(key)}\n", provenance(group) + "\n", table_md + "\n"]
        tex += [f"% {latex_escape(_title(key))}\n", table_tex]
    return "\n".join(md), "".join(tex)


def quality_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the face-quality tables ("" when no shown run has ``synth-quality``)."""
    runs = _selected(records, QUALITY, quality_values)
    if runs.empty:
        return "", ""
    md, tex = ["## Face quality (EDC)\n", QUALITY_NOTE + "\n"], ["% Face quality (synth-quality)\n"]
    for key, group in _groups(runs):
        present = [c for c in group.columns if group[c].notna().any()]
        scores = _ordered([c.split(" ", 1)[1] for c in present if c.startswith("pAUC ")]
                          + [c.split(" ")[1] for c in present if c.startswith("rho ")], SCORE_ORDER)
        nuisances = _ordered([c.split(" ", 2)[2] for c in present if c.startswith("rho ")], ("all",))
        settings = _protocol_settings(records, group)
        md += [f"### {_title(key)}\n", f"{settings}. {provenance(group)}\n"]
        tex += [f"% {latex_escape(_title(key))}: {latex_escape(settings)}\n"]
        if scores:
            pauc_md, pauc_tex = _pauc_table(group, scores)
            md += ["pAUC of the EDC (lower is better):\n", pauc_md + "\n"]
            tex.append(pauc_tex)
        if nuisances:
            rho_md, rho_tex = _spearman_table(group, scores, nuisances)
            md += ["Spearman rho of quality and degradation strength:\n", rho_md + "\n"]
            tex.append(rho_tex)
    return "\n".join(md), "".join(tex)


# ----------------------------------------------------------------------------------------------------
# Figure data
# ----------------------------------------------------------------------------------------------------


def edc_runs(records: list[dict[str, Any]]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """The EDC curves of ``records`` (one configuration's seeds) per quality score, in display order:
    ``{score: [(discard, fnmr) per run]}``; empty when none holds ``synth-quality`` curves."""
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    for record in records:
        for score, curve in _mapping(_mapping(_protocol(record, QUALITY)).get("edc")).items():
            if isinstance(curve, dict) and all(isinstance(curve.get(k), list) for k in ("discard", "fnmr")):
                curves.setdefault(score, []).append(([float(d) for d in curve["discard"]],
                                                     [float(f) for f in curve["fnmr"]]))
    return {score: curves[score] for score in _ordered(curves, SCORE_ORDER)}


def pauc_limit(records: list[dict[str, Any]]) -> float | None:
    """The protocol's pAUC discard limit (the largest among ``records``), None when none says."""
    limits = [finite_number(_mapping(_protocol(r, QUALITY)).get("pauc_max_discard")) for r in records]
    limits = [limit for limit in limits if limit is not None]
    return max(limits) if limits else None
