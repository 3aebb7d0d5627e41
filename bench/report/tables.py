"""Results tables from run records: pandas for shaping, Markdown (tabulate) and LaTeX (booktabs).

Which runs a table shows. A *configuration key* is (dataset, split, backbone, budget, method). For each
key the newest complete run decides the configuration (its hash over everything in ``config.yaml`` except
the seed and where or how the run was executed); every run of that key with that configuration hash is
kept, the newest one per seed; the row is their mean over seeds, with the standard deviation over seeds
(sample std, ``ddof=1``) and the number of seeds ``n``. With one seed, the ``±`` of an accuracy is the
population std over its 10 folds (the insightface protocol) instead.

Columns: each protocol's headline metrics (synth-lfw / LFW-family accuracy and TAR@FAR; IJB, MegaFace
and synth-tail give theirs in ``summary``: TAR@FAR 1e-4 and 1e-5, 1:N rank-1, MegaFace rank-1, long-tail
rank-1 per bucket), throughput, peak memory and training time. Within each group of rows that differ only
in the method, the best value of every column is bold (higher is better, except memory and time).
Every table carries a provenance line: git commit, configuration hash, device and date of its runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.errors import DataError
from bench.records import iter_records, warn_broken_record
from bench.report.staging import StagedFiles

#: Columns identifying a comparable configuration; rows differing only in ``method`` compare methods.
KEY_COLUMNS = ["dataset", "split", "backbone", "budget", "method"]
#: Rows sharing these columns are compared with each other (best value bold).
GROUP_COLUMNS = KEY_COLUMNS[:-1]
COST_COLUMNS = ["img/s", "peak MiB", "train s"]
#: Columns where smaller is better.
LOWER_IS_BETTER = {"peak MiB", "train s"}
#: Configuration entries that do not change a row's results: the seed (aggregated over), the run's identity,
#: the other methods of its run, where files are, devices and thread counts, logging.
_NOT_CONFIGURATION = {"run_id", "group", "config_fingerprint", "out", "steps", "methods"}
_NOT_CONFIGURATION_TRAIN = {"seed", "device", "log_every", "threads"}
_NOT_CONFIGURATION_DATA = {"root", "path", "workers"}


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a run's configuration without its seed and execution details (8 hex digits)."""
    payload = {k: v for k, v in config.items() if k not in _NOT_CONFIGURATION}
    if isinstance(payload.get("train"), dict):
        payload["train"] = {k: v for k, v in payload["train"].items() if k not in _NOT_CONFIGURATION_TRAIN}
    if isinstance(payload.get("data"), dict):
        payload["data"] = {k: v for k, v in payload["data"].items() if k not in _NOT_CONFIGURATION_DATA}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _device_text(env: dict[str, Any]) -> str | None:
    device = env.get("device")
    if device is None:
        return None
    detail = env.get("gpu") or env.get("cpu")
    return f"{device} ({detail})" if detail else str(device)


def _field(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or None where a level is missing or not a mapping (a hand-edited record)."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _float(value: Any) -> float | None:
    """A number of a record as float, None when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run record into a table row."""
    config, perf, metrics = record["config"] or {}, record["perf"] or {}, record["metrics"] or {}
    env = record.get("env") or {}
    row: dict[str, Any] = {
        "run_id": record["run_id"],
        "dataset": _field(config, "data", "dataset"),
        "split": _field(config, "data", "split", "name"),
        "backbone": _field(config, "train", "backbone"),
        "budget": _field(config, "train", "budget"),
        "method": config.get("method"),
        "seed": _field(config, "train", "seed"),
        "config": config_hash(config),
        "group": config.get("group"),
        "commit": env.get("git_commit"),
        "device": _device_text(env),
        "date": env.get("date"),
        "img/s": _float(perf.get("throughput_img_s")),
        "peak MiB": (_float(perf.get("peak_memory_bytes")) or 0) / 2**20,
        "train s": _float(perf.get("train_wall_time_s")),
    }
    for protocol, values in metrics.items():
        if not isinstance(values, dict):
            continue
        if isinstance(values.get("summary"), dict):
            # protocols with many numbers (IJB, MegaFace, synth-tail) name their headline metrics in "summary"
            for name, value in values["summary"].items():
                row[f"{protocol} {name}"] = value
            continue
        if "accuracy" in values:
            row[f"{protocol} acc"] = values["accuracy"]
            row[f"{protocol} acc std"] = values.get("accuracy_std")
        for far, tar in (values.get("tar_at_far") or {}).items():
            row[f"{protocol} TAR@FAR={far}"] = tar
    return row


def is_run_record(record: dict[str, Any]) -> bool:
    """Training runs (``bench run``); ``bench profile`` records say ``kind: profile`` in their config."""
    return (record.get("config") or {}).get("kind", "run") == "run"


def load_records(results_dir: Path) -> list[dict[str, Any]]:
    """The readable records under ``results_dir``; each broken one is skipped with one warning line.

    When there are records and every one is broken, a :class:`DataError` instead (one line: how many,
    and the first file and why): a check must not pass or fail on records it cannot read, and a report
    must not replace the previous one by an empty one (ours: issue 13).
    """
    broken: list[DataError] = []
    records = iter_records(results_dir, on_broken=broken.append)
    if broken and not records:
        raise DataError(f"no readable run record under {results_dir}: all {len(broken)} are broken "
                        f"(first: {broken[0]})")
    for error in broken:
        warn_broken_record(error)
    return records


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The training runs (not profile records) among ``records``, one row each, in the records' order."""
    return pd.DataFrame([record_row(r) for r in records if is_run_record(r)])


def results_frame(results_dir: Path) -> pd.DataFrame:
    """Every complete training run under ``results_dir``, one row each, oldest first (see
    :func:`load_records` for broken records)."""
    return runs_frame(load_records(results_dir))


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The quality metrics among ``frame``'s columns (accuracies, TAR@FAR, rank-N), in column order."""
    return [c for c in frame.columns
            if (" acc" in c and not c.endswith((" acc std", " sd"))) or ("TAR@" in c and not c.endswith(" sd"))
            or (" rank-" in c and not c.endswith(" sd"))]


def select_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs a table aggregates: per key, the newest run's configuration, newest run per seed."""
    if frame.empty:
        return frame
    frame = frame.sort_values("run_id")
    newest = frame.groupby(KEY_COLUMNS, dropna=False, sort=False)["config"].transform("last")
    kept = frame[frame["config"] == newest]
    kept = kept.drop_duplicates(subset=KEY_COLUMNS + ["seed"], keep="last")
    return kept.reset_index(drop=True)


def _join(values: pd.Series) -> str:
    unique = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    return ", ".join(unique)


def aggregate(selected: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration key: mean over seeds, ``<column> sd`` (std over seeds, NaN for one seed),
    ``seeds`` (n), and the provenance of the runs (run ids, commits, configs, devices, dates)."""
    if selected.empty:
        return selected
    metrics = metric_columns(selected)
    numeric = metrics + [c for c in selected.columns if c.endswith(" acc std")] + COST_COLUMNS
    rows = []
    for key, runs in selected.groupby(KEY_COLUMNS, dropna=False, sort=True):
        row: dict[str, Any] = dict(zip(KEY_COLUMNS, key))
        row["seeds"] = len(runs)
        row["seed list"] = ",".join(str(s) for s in sorted(runs["seed"].dropna().astype(int)))
        for column in numeric:
            values = pd.to_numeric(runs[column], errors="coerce").dropna() if column in runs else pd.Series([], dtype=float)
            row[column] = float(values.mean()) if len(values) else np.nan
            if column in metrics or column in COST_COLUMNS:
                row[f"{column} sd"] = float(values.std(ddof=1)) if len(values) >= 2 else np.nan
        for column in ("run_id", "commit", "config", "device", "group"):
            row[column] = _join(runs[column]) if column in runs else ""
        dates = sorted(d for d in runs.get("date", pd.Series([], dtype=object)) if isinstance(d, str))
        row["date"] = dates[-1] if dates else ""
        row["date first"] = dates[0] if dates else ""
        rows.append(row)
    return pd.DataFrame(rows)


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table's rows: :func:`aggregate` of :func:`select_runs`."""
    return aggregate(select_runs(frame))


# ----------------------------------------------------------------------------------------------------
# Display
# ----------------------------------------------------------------------------------------------------


def _header(column: str) -> str:
    """Display name: ``synth-lfw acc`` -> ``synth-lfw acc (%)``, ``TAR@FAR=1e-4`` -> ``TAR (%) @FAR=1e-4``,
    ``rank-1`` -> ``rank-1 (%)``."""
    column = column.replace(" acc", " acc (%)").replace("TAR@", "TAR (%) @")
    return re.sub(r" (rank-\d+)", r" \1 (%)", column)


def _cell(row: pd.Series, column: str) -> tuple[str, float | None]:
    """The displayed text of one metric or cost cell, and the rounded value used to find the best."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return "", None
    seed_sd = row.get(f"{column} sd")
    if column in COST_COLUMNS:
        return f"{value:.0f}", round(float(value))
    shown = round(100 * float(value), 2)
    if seed_sd is not None and not pd.isna(seed_sd):
        return f"{shown:.2f} ± {100 * seed_sd:.2f}", shown
    fold_sd = row.get(f"{column} std") if column.endswith(" acc") else None
    if fold_sd is not None and not pd.isna(fold_sd):
        return f"{shown:.2f} ± {100 * fold_sd:.2f}", shown
    return f"{shown:.2f}", shown


def _best_mask(frame: pd.DataFrame, column: str, values: list[float | None]) -> list[bool]:
    """Which rows hold the best value of ``column`` within their group (only groups of 2 rows or more)."""
    best = [False] * len(values)
    positions = {index: i for i, index in enumerate(frame.index)}
    for _, group in frame.groupby(GROUP_COLUMNS, dropna=False, sort=False):
        members = [positions[i] for i in group.index if values[positions[i]] is not None]
        if len(group) < 2 or not members:
            continue
        pick = min if column in LOWER_IS_BETTER else max
        target = pick(values[i] for i in members)
        if all(values[i] == target for i in members):
            continue  # a tie of every row marks nothing
        for i in members:
            best[i] = values[i] == target
    return best


def display_table(frame: pd.DataFrame) -> tuple[list[str], list[list[tuple[str, bool]]], list[str]]:
    """Headers, cells as (text, is_best), and the internal column name of each displayed column."""
    metrics = metric_columns(frame)
    columns = KEY_COLUMNS + ["seeds"] + metrics + COST_COLUMNS
    headers = KEY_COLUMNS + ["n"] + [_header(c) for c in metrics] + COST_COLUMNS
    cells: list[list[tuple[str, bool]]] = [[(str(row[c]), False) for c in KEY_COLUMNS] + [(str(row["seeds"]), False)]
                                           for _, row in frame.iterrows()]
    for column in metrics + COST_COLUMNS:
        shown = [_cell(row, column) for _, row in frame.iterrows()]
        best = _best_mask(frame, column, [value for _, value in shown])
        for line, (text, _), is_best in zip(cells, shown, best):
            line.append((text, is_best))
    return headers, cells, columns


def _short_commit(commit: str) -> str:
    dirty = commit.endswith("+dirty")
    return commit[:12] + ("+dirty" if dirty else "")


def provenance(frame: pd.DataFrame) -> str:
    """One line: git commit(s), configuration hash(es), device(s) and the dates of the runs behind ``frame``."""
    if frame.empty:
        return "Provenance: no runs."

    def distinct(column: str) -> list[str]:
        items: set[str] = set()
        for value in frame.get(column, pd.Series([], dtype=object)):
            items.update(part.strip() for part in str(value).split(", ") if part.strip() and part != "nan")
        return sorted(items)

    commits = [_short_commit(c) for c in distinct("commit")] or ["unknown"]
    dates = sorted(d for column in ("date first", "date") for d in frame.get(column, []) if isinstance(d, str) and d)
    when = dates[0][:16].replace("T", " ") if dates else "unknown"
    if dates and dates[-1][:16] != dates[0][:16]:
        when += f" to {dates[-1][:16].replace('T', ' ')}"
    return (f"Provenance: git commit {', '.join(commits)}; config hash {', '.join(distinct('config')) or 'unknown'}; "
            f"device {', '.join(distinct('device')) or 'unknown'}; date {when}.")


def _as_summary(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if "seeds" in frame.columns or frame.empty else summary_frame(frame)


def to_markdown(frame: pd.DataFrame) -> str:
    """A Markdown (pipe) table of :func:`summary_frame` rows (raw runs are aggregated first)."""
    frame = _as_summary(frame)
    if frame.empty:
        return "(no complete runs)"
    headers, cells, _ = display_table(frame)
    text = [[f"**{t}**" if best and t else t for t, best in line] for line in cells]
    return tabulate(text, headers=headers, tablefmt="pipe", disable_numparse=True)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$")


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
        lines.append(" & ".join(f"\\textbf{{{latex_escape(t)}}}" if best and t else latex_escape(t)
                                for t, best in line) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption_line:
        lines.insert(0, "% " + caption_line)
    return "\n".join(lines) + "\n"


TABLE_NOTE = ("Newest configuration per (dataset, split, backbone, budget, method); n = seeds. Metrics: mean ± std "
              "over seeds (sample std); with n = 1, the ± of an accuracy is the population std over its 10 folds "
              "(insightface protocol). Bold: best in its group of rows that differ only in the method. Peak "
              "memory: CUDA max allocated, or process peak RSS on CPU.")


def write_report(results_dir: Path, out_dir: Path, figures: bool = True) -> list[Path]:
    """Write ``results.md`` and ``results.tex`` (and the figures under ``figures/``); returns their paths.

    All files or none replace the previous report (:class:`bench.report.staging.StagedFiles`).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    records = load_records(results_dir)
    with StagedFiles(out_dir) as files:
        return _write_report_files(records, results_dir, out_dir, figures, files)


def _write_report_files(records: list[dict[str, Any]], results_dir: Path, out_dir: Path, figures: bool,
                        files: StagedFiles) -> list[Path]:
    from bench.report.profile_table import profile_section

    summary = summary_frame(runs_frame(records))
    md, tex = out_dir / "results.md", out_dir / "results.tex"
    drawn = []
    if figures:
        from bench.report.figures import write_figures

        drawn = write_figures(records, out_dir / "figures", files)
    profile_md, profile_tex = profile_section(records)
    if summary.empty and not profile_md:
        body = f"No complete runs under `{results_dir}` yet: run `bench run` first.\n"
        files.write_text(md, "# FaceBench results\n\n" + body)
        files.write_text(tex, "% " + body)
        return [md, tex]
    parts = ["# FaceBench results\n", f"Generated by `bench report` from `{results_dir}`.\n"]
    tex_parts = ["% FaceBench results, generated by `bench report`; needs \\usepackage{booktabs}\n"]
    if not summary.empty:
        parts += ["## Results\n", TABLE_NOTE + "\n", provenance(summary) + "\n", to_markdown(summary) + "\n"]
        tex_parts.append(to_latex(summary, provenance(summary)))
    if profile_md:
        parts.append(profile_md)
        tex_parts.append("\n" + profile_tex)
    if drawn:
        parts.append("## Figures\n")
        for figure in drawn:
            parts.append(f"![{figure.name}](figures/{figure.png.name})\n\n*{figure.caption}* "
                         f"([PDF](figures/{figure.pdf.name}))\n")
    files.write_text(md, "\n".join(parts))
    files.write_text(tex, "".join(tex_parts))
    return [md, tex, *(path for figure in drawn for path in (figure.png, figure.pdf))]
