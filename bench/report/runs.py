"""Which records a report shows, as rows: the leaf the report's tables and figures share.

Run records become one row each (:func:`record_row`); per configuration key (dataset, split, backbone,
budget, method) the newest configuration wins and the newest run per seed is kept (:func:`select_runs`);
rows are averaged over seeds, each metric with its 95 % interval (:func:`aggregate`: Student's t over the
seeds, or with one seed a bootstrap over the 10 folds of an accuracy; ours, issue 15); :func:`provenance` is
the one-line provenance of rows, :func:`provenance_line` that of one ``bench profile`` record, and
:func:`profile_records` picks the newest profile record per device. Read by :mod:`bench.report.tables`,
:mod:`bench.report.figures`, :mod:`bench.report.profile_table` and :mod:`bench.check` (ours: it used to live in ``tables.py``, which the
figures imported while it imported them, an import circle).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import DataError
from bench.records import iter_records, warn_broken_record
from bench.stats import bootstrap_interval, t_interval

#: Columns identifying a comparable configuration; rows differing only in ``method`` compare methods.
KEY_COLUMNS = ["dataset", "split", "backbone", "budget", "method"]
#: Rows sharing these columns are compared with each other (best value bold).
GROUP_COLUMNS = KEY_COLUMNS[:-1]
COST_COLUMNS = ["img/s", "peak MiB", "train s"]
#: Suffixes of the columns derived from a metric column (its spread, fold accuracies and interval): never
#: metrics themselves.
DERIVED_SUFFIXES = (" sd", " acc std", " acc folds", " ci low", " ci high", " ci kind")
#: ``<column> ci kind``: the interval is Student's t over the seeds, or a bootstrap over one seed's folds.
CI_OVER_SEEDS, CI_OVER_FOLDS = "t", "folds"
#: Configuration entries that do not change a row's results: the seed (aggregated over), the run's identity,
#: the other methods of its run, where files are, devices and thread counts, logging.
_NOT_CONFIGURATION = {"run_id", "group", "config_fingerprint", "out", "steps", "methods"}
_NOT_CONFIGURATION_TRAIN = {"seed", "device", "log_every", "threads"}
_NOT_CONFIGURATION_DATA = {"root", "path", "workers"}


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a run's configuration without its seed and execution details (8 hex digits)."""
    payload = {k: v for k, v in config.items() if k not in _NOT_CONFIGURATION}
    nested = payload.get("method_params")
    if isinstance(nested, dict) and isinstance(nested.get(config.get("method")), dict):
        # Since issue 14 a record nests its method's parameters under the method's name (it is a preset);
        # hash them as older records, which stored them flat, so that both kinds hash alike.
        payload["method_params"] = nested[config["method"]]
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


def finite_number(value: Any) -> float | None:
    """A number of a record as float, None when it is missing, not a number or NaN."""
    number = _float(value)
    return None if number is None or math.isnan(number) else number


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run record into a table row; a verification protocol's fold accuracies stay a list in
    ``<protocol> acc folds``, for the interval of a single seed (:func:`aggregate`)."""
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
            row[f"{protocol} acc folds"] = values.get("fold_accuracies")
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


def selected_values(records: list[dict[str, Any]],
                    values: Callable[[dict[str, Any]], dict[str, Any] | None]) -> pd.DataFrame:
    """The runs the main table shows (:func:`select_runs`) for which ``values(record)`` is not None, one row
    each: the run's key and provenance columns and those values (the report's per-protocol sections)."""
    frame = runs_frame(records)
    if frame.empty:
        return frame
    by_id = {r["run_id"]: r for r in records}
    rows = []
    for _, row in select_runs(frame).iterrows():
        extra = values(by_id[row["run_id"]])
        if extra is not None:
            rows.append({**row[KEY_COLUMNS + ["seed", "run_id", "config", "commit", "device", "date"]].to_dict(),
                         **extra})
    return pd.DataFrame(rows)


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
            if (" acc" in c or "TAR@" in c or " rank-" in c) and not c.endswith(DERIVED_SUFFIXES)]


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


def _fold_accuracies(value: Any) -> list[float] | None:
    """A run's ``<protocol> acc folds`` as floats, None when the record has none (older records) or they
    are not numbers."""
    if not isinstance(value, (list, tuple)):
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _metric_interval(values: pd.Series, runs: pd.DataFrame, column: str) -> tuple[float, float, str]:
    """The 95 % interval of metric ``column`` over ``values`` (its per-seed values, indexed like ``runs``)
    and its kind (ours: issue 15, so that no number is shown without its uncertainty):

    - two seeds or more: Student's t interval of the mean over the seeds (:func:`bench.stats.t_interval`);
    - one seed, an accuracy whose record holds its fold accuracies: the percentile bootstrap interval of the
      mean over the folds (:func:`bench.stats.bootstrap_interval`);
    - else NaN and kind ``""``.
    """
    if len(values) >= 2:
        interval = t_interval(values.to_numpy())
        return interval.low, interval.high, CI_OVER_SEEDS
    folds_column = f"{column} folds"
    if len(values) == 1 and column.endswith(" acc") and folds_column in runs:
        folds = _fold_accuracies(runs.at[values.index[0], folds_column])
        if folds is not None and len(folds) >= 2:
            low, high = bootstrap_interval(folds)
            return low, high, CI_OVER_FOLDS
    return np.nan, np.nan, ""


def aggregate(selected: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration key: mean over seeds, ``<column> sd`` (std over seeds, NaN for one seed),
    for each metric its 95 % interval ``<column> ci low`` / ``<column> ci high`` and ``<column> ci kind``
    (:func:`_metric_interval`), ``seeds`` (n), and the provenance of the runs (run ids, commits, configs,
    devices, dates)."""
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
            if column in metrics:
                row[f"{column} ci low"], row[f"{column} ci high"], row[f"{column} ci kind"] = \
                    _metric_interval(values, runs, column)
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


def profile_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest complete ``bench profile`` record per device among ``records`` (sorted by run id, as
    :func:`bench.records.iter_records` returns them; oldest device first)."""
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        config = record.get("config") or {}
        profile = (record.get("metrics") or {}).get("head-profile")
        if config.get("kind") == "profile" and isinstance(profile, dict) and isinstance(profile.get("rows"), list):
            newest[str(config.get("device"))] = record  # iter_records is sorted by run id: the last wins
    return list(newest.values())


def provenance_line(record: dict[str, Any]) -> str:
    env, config = record.get("env") or {}, record.get("config") or {}
    commit = str(env.get("git_commit") or "unknown")
    commit = commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
    detail = env.get("gpu") or env.get("cpu") or ""
    return (f"Provenance: git commit {commit}; record {record['run_id']}; device {config.get('device')}"
            f"{f' ({detail})' if detail else ''}, threads {config.get('threads', '?')}; "
            f"date {str(env.get('date', 'unknown'))[:16].replace('T', ' ')}.")
