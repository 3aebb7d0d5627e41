"""Results tables from run records: pandas for shaping, tabulate for Markdown and LaTeX (booktabs).

One row per (dataset, split, backbone, budget, method): the newest complete run of that combination.
Columns: each protocol's headline metrics (synth-lfw / LFW-family accuracy and TAR@FAR; for IJB and
MegaFace the entries of their ``summary``: TAR@FAR 1e-4 and 1e-5, 1:N rank-1, MegaFace rank-1 at the largest
distractor size), throughput and peak memory, all traceable to the records.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.records import atomic_write_text, iter_records

#: Columns identifying a comparable configuration; rows differing only in ``method`` compare methods.
KEY_COLUMNS = ["dataset", "split", "backbone", "budget", "method"]


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run record into a table row."""
    config, perf, metrics = record["config"] or {}, record["perf"] or {}, record["metrics"] or {}
    row: dict[str, Any] = {
        "run_id": record["run_id"],
        "dataset": config.get("data", {}).get("dataset"),
        "split": config.get("data", {}).get("split", {}).get("name"),
        "backbone": config.get("train", {}).get("backbone"),
        "budget": config.get("train", {}).get("budget"),
        "method": config.get("method"),
        "seed": config.get("train", {}).get("seed"),
        "img/s": perf.get("throughput_img_s"),
        "peak MiB": (perf.get("peak_memory_bytes") or 0) / 2**20,
        "train s": perf.get("train_wall_time_s"),
    }
    for protocol, values in metrics.items():
        if not isinstance(values, dict):
            continue
        if isinstance(values.get("summary"), dict):
            # protocols with many numbers (IJB, MegaFace) name their headline metrics in "summary"
            for name, value in values["summary"].items():
                row[f"{protocol} {name}"] = value
            continue
        if "accuracy" in values:
            row[f"{protocol} acc"] = values["accuracy"]
            row[f"{protocol} acc std"] = values.get("accuracy_std")
        for far, tar in (values.get("tar_at_far") or {}).items():
            row[f"{protocol} TAR@FAR={far}"] = tar
    return row


def results_frame(results_dir: Path) -> pd.DataFrame:
    """Every complete run under ``results_dir``, one row each, oldest first."""
    rows = [record_row(r) for r in iter_records(results_dir)]
    return pd.DataFrame(rows)


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest run per configuration key (run ids sort by start time)."""
    if frame.empty:
        return frame
    latest = frame.sort_values("run_id").groupby(KEY_COLUMNS, dropna=False, sort=False).tail(1)
    return latest.sort_values(KEY_COLUMNS).reset_index(drop=True)


def _header(column: str) -> str:
    """Display name: ``synth-lfw acc`` -> ``synth-lfw acc (%)``, ``TAR@FAR=1e-4`` -> ``TAR (%) @FAR=1e-4``,
    ``rank-1`` -> ``rank-1 (%)``."""
    column = column.replace(" acc", " acc (%)").replace("TAR@", "TAR (%) @")
    return re.sub(r" (rank-\d+)", r" \1 (%)", column)


def _display(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells: accuracies as mean +- std in percent, TARs in percent."""
    metric_columns = [c for c in frame.columns
                      if " acc" in c and not c.endswith(" acc std") or "TAR@" in c or " rank-" in c]
    headers = KEY_COLUMNS + [_header(c) for c in metric_columns]
    headers += ["img/s", "peak MiB", "train s"]
    cells = []
    for _, row in frame.iterrows():
        line = [str(row[c]) for c in KEY_COLUMNS]
        for column in metric_columns:
            value = row[column]
            if pd.isna(value):
                line.append("")
            elif column.endswith(" acc"):
                line.append(f"{100 * value:.2f} ± {100 * row[column + ' std']:.2f}")
            else:
                line.append(f"{100 * value:.2f}")
        line += [f"{row['img/s']:.0f}", f"{row['peak MiB']:.0f}", f"{row['train s']:.0f}"]
        cells.append(line)
    return headers, cells


def to_markdown(frame: pd.DataFrame) -> str:
    headers, cells = _display(frame)
    return tabulate(cells, headers=headers, tablefmt="pipe", disable_numparse=True)


def to_latex(frame: pd.DataFrame) -> str:
    headers, cells = _display(frame)
    return tabulate(cells, headers=headers, tablefmt="latex_booktabs", disable_numparse=True)


def write_report(results_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``results.md`` and ``results.tex`` under ``out_dir``; returns their paths."""
    summary = summary_frame(results_frame(results_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, tex = out_dir / "results.md", out_dir / "results.tex"
    if summary.empty:
        body = f"No complete runs under `{results_dir}` yet: run `bench run` first.\n"
        atomic_write_text(md, "# FaceBench results\n\n" + body)
        atomic_write_text(tex, "% " + body)
        return [md, tex]
    note = (f"Newest complete run per configuration from `{results_dir}` ({len(summary)} rows). "
            "Accuracy: mean ± population std over 10 folds (insightface protocol). "
            "Peak memory: CUDA max allocated, or process peak RSS on CPU.\n")
    atomic_write_text(md, "# FaceBench results\n\n" + note + "\n" + to_markdown(summary) + "\n")
    atomic_write_text(tex, "% FaceBench results, generated by `bench report`; needs \\usepackage{booktabs}\n"
                      + to_latex(summary) + "\n")
    return [md, tex]
