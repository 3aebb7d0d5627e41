"""The regression gate: compare the newest run records with a saved baseline (``bench check``).

A baseline (``bench baseline save``) is a JSON file with one entry per configuration key (dataset, split,
backbone, budget, method): the row ``bench report`` would show for it (mean over the newest runs' seeds,
see :mod:`bench.report.runs`), i.e. every quality metric (accuracies, TAR@FAR, rank-N; fractions in
[0, 1]), throughput (img/s) and peak memory (MiB), plus the configuration hash, the commit and the device.

``bench check`` builds the same rows from the results directory and compares each baseline value:

- quality metric: a regression when it drops by more than ``max_accuracy_drop`` *percentage points*
  (absolute: 0.5 means 78.5 % -> 77.9 % fails);
- ``img/s``: a regression when it drops by more than the fraction ``max_throughput_drop`` of the baseline;
- ``peak MiB``: a regression when it grows by more than the fraction ``max_memory_growth``;
- a baseline key or metric without a current value: a regression (``missing``), so a gate whose runs did
  not happen cannot pass.

Tolerances: the defaults below, overridden by the baseline file's own ``tolerances`` (the CI baseline
carries loose throughput and memory tolerances for a shared CPU), overridden by the command line.
A configuration hash that differs from the baseline's is reported as a note, not a failure (new config
keys change the hash without changing the results).

What cannot be read is not a regression: a baseline file that is not a readable baseline, or a results
directory whose every record is broken, raises :class:`BenchError` (exit 2); a broken record among
readable ones is skipped with a warning line (:func:`bench.report.runs.load_records`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.errors import BenchError
from bench.records import atomic_write_json
from bench.report.runs import KEY_COLUMNS, metric_columns, results_frame, summary_frame

BASELINE_FORMAT = 1
#: Cost metrics compared besides the quality metrics.
THROUGHPUT, MEMORY = "img/s", "peak MiB"
#: Slack in every comparison, so that a change of exactly the tolerance passes despite float rounding.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Tolerances:
    #: Percentage points a quality metric may drop.
    max_accuracy_drop: float = 0.5
    #: Fraction of the baseline throughput that may be lost (0.1: 10 % slower is still fine).
    max_throughput_drop: float = 0.10
    #: Fraction by which peak memory may grow.
    max_memory_growth: float = 0.10

    def updated(self, values: dict[str, Any] | None) -> Tolerances:
        """These tolerances with ``values`` (None entries ignored) applied, validated."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = set(values) - set(asdict(self))
        if unknown:
            raise BenchError(f"unknown tolerance '{sorted(unknown)[0]}'; valid: {', '.join(asdict(self))}")
        try:
            out = replace(self, **{k: float(v) for k, v in values.items()})
        except (TypeError, ValueError):  # a hand-edited baseline file: "tolerances": {"...": "two"}
            raise BenchError(f"tolerances must be numbers, got {values}") from None
        for name, value in asdict(out).items():
            if not value >= 0 or math.isinf(value):
                raise BenchError(f"tolerance {name} must be a finite number >= 0, got {value}")
        if out.max_throughput_drop > 1:
            raise BenchError(f"max_throughput_drop is a fraction of the baseline in [0, 1], got {out.max_throughput_drop}")
        return out


@dataclass
class Comparison:
    key: str
    metric: str
    baseline: float | None
    current: float | None
    allowed: str
    status: str  # "ok", "better", "REGRESSED", "missing"

    @property
    def regressed(self) -> bool:
        return self.status in ("REGRESSED", "missing")


def _key_text(key: dict[str, Any]) -> str:
    return "/".join(str(key[c]) for c in KEY_COLUMNS)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def current_rows(results_dir: Path) -> pd.DataFrame:
    """The rows ``bench report`` shows for ``results_dir`` (newest configuration per key, mean over seeds)."""
    if not Path(results_dir).is_dir():
        raise BenchError(f"results directory {results_dir} does not exist")
    return summary_frame(results_frame(Path(results_dir)))


def select_metrics(available: list[str], patterns: list[str] | None) -> list[str]:
    """The columns matching any of the shell-style ``patterns`` (all when none are given)."""
    if not patterns:
        return available
    chosen = [m for m in available if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in available)]
    if unmatched:
        raise BenchError(f"--metric {unmatched[0]!r} matches no metric; available: {', '.join(available)}")
    return chosen


def baseline_from_results(results_dir: Path, tolerances: dict[str, Any] | None = None, note: str = "",
                          metrics: list[str] | None = None) -> dict[str, Any]:
    """A baseline document from the newest records under ``results_dir`` (``metrics``: shell-style patterns
    of the columns to keep, e.g. ``"synth-lfw acc"``, ``"*TAR@FAR=0.01"``, ``"img/s"``; default all)."""
    rows = current_rows(results_dir)
    if rows.empty:
        raise BenchError(f"no complete runs under {results_dir}: run `bench run` first")
    columns = select_metrics([*metric_columns(rows), THROUGHPUT, MEMORY], metrics)
    entries = []
    for _, row in rows.iterrows():
        values = {m: _number(row.get(m)) for m in columns}
        entries.append({"key": {c: (int(row[c]) if c == "budget" else row[c]) for c in KEY_COLUMNS},
                        "seeds": int(row["seeds"]), "config": row["config"], "commit": row["commit"],
                        "device": row["device"], "run_ids": str(row["run_id"]).split(", "),
                        "metrics": {k: v for k, v in values.items() if v is not None}})
    document: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "source": str(results_dir), "note": note,
        "units": {"quality": "fraction in [0, 1]; tolerance in percentage points", THROUGHPUT: "images per second",
                  MEMORY: "MiB (CUDA max allocated, or process peak RSS on CPU)"},
        "entries": entries,
    }
    if tolerances:
        document["tolerances"] = asdict(Tolerances().updated(tolerances))
    return document


def save_baseline(results_dir: Path, out: Path, tolerances: dict[str, Any] | None = None, note: str = "",
                  metrics: list[str] | None = None) -> Path:
    """Write the baseline of ``results_dir`` to ``out`` atomically (an existing file stays whole if it fails)."""
    document = baseline_from_results(results_dir, tolerances, note, metrics)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, document)
    except OSError as exc:
        raise BenchError(f"cannot write the baseline {out}: {exc.strerror or exc}") from None
    return out


def load_baseline(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: baseline file not found (create one with `bench baseline save --out {path}`)") from None
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON, or bytes that are not UTF-8 text
        raise BenchError(f"{path}: not a readable baseline JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT \
            or not isinstance(document.get("entries"), list):
        raise BenchError(f"{path}: not a FaceBench baseline (format {BASELINE_FORMAT} with 'entries'); "
                         f"create one with `bench baseline save`")
    for entry in document["entries"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict) \
                or set(entry["key"]) != set(KEY_COLUMNS) or not isinstance(entry.get("metrics"), dict):
            raise BenchError(f"{path}: every entry needs 'key' ({', '.join(KEY_COLUMNS)}) and 'metrics'")
    if not isinstance(document.get("tolerances", {}), dict):
        raise BenchError(f"{path}: 'tolerances' must map tolerance names to numbers")
    try:
        Tolerances().updated(document.get("tolerances"))
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    return document


def compare(document: dict[str, Any], rows: pd.DataFrame, tolerances: Tolerances) -> tuple[list[Comparison], list[str]]:
    """Every baseline value against the current rows; returns the comparisons and notes."""
    comparisons, notes = [], []
    for entry in document["entries"]:
        key = entry["key"]
        text = _key_text(key)
        match = rows
        for column in KEY_COLUMNS:
            if match.empty:
                break
            match = match[match[column].astype(str) == str(key[column])]
        row = None if match.empty else match.iloc[-1]
        if row is not None and entry.get("config") and row["config"] != entry["config"]:
            notes.append(f"{text}: configuration hash {row['config']} differs from the baseline's {entry['config']}")
        for metric, base in entry["metrics"].items():
            base = _number(base)
            current = None if row is None else _number(row.get(metric))
            comparisons.append(_compare_one(text, metric, base, current, tolerances))
    return comparisons, notes


def _compare_one(key: str, metric: str, base: float | None, current: float | None, tol: Tolerances) -> Comparison:
    if metric == THROUGHPUT:
        allowed = f">= {100 * (1 - tol.max_throughput_drop):.0f}% of baseline"
        limit = None if base is None else base * (1 - tol.max_throughput_drop)
        # a relative epsilon so that a drop of exactly the tolerance passes despite float rounding
        # (13 img/s * (1 - 0.1) is 11.700000000000001, above 11.7)
        worse = current is not None and limit is not None and current < limit - _EPSILON * abs(base)
        better = current is not None and base is not None and current > base
    elif metric == MEMORY:
        allowed = f"<= {100 * (1 + tol.max_memory_growth):.0f}% of baseline"
        limit = None if base is None else base * (1 + tol.max_memory_growth)
        worse = current is not None and limit is not None and current > limit + _EPSILON * abs(base)
        better = current is not None and base is not None and current < base
    else:
        allowed = f"drop <= {tol.max_accuracy_drop:g} pp"
        # a tiny epsilon so that a drop of exactly the tolerance passes despite float rounding
        worse = current is not None and base is not None and 100 * (base - current) > tol.max_accuracy_drop + _EPSILON
        better = current is not None and base is not None and current > base
    if current is None or base is None:
        status = "missing"
    else:
        status = "REGRESSED" if worse else "better" if better else "ok"
    return Comparison(key, metric, base, current, allowed, status)


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in (THROUGHPUT, MEMORY):
        return f"{value:.0f}"
    return f"{100 * value:.2f}%"


def _change(comparison: Comparison) -> str:
    base, current = comparison.baseline, comparison.current
    if base is None or current is None:
        return "-"
    if comparison.metric in (THROUGHPUT, MEMORY):
        return f"{100 * (current - base) / base:+.1f}%" if base else "-"
    return f"{100 * (current - base):+.2f} pp"


def comparison_table(comparisons: list[Comparison], only_regressions: bool = False) -> str:
    shown = [c for c in comparisons if c.regressed or not only_regressions]
    lines = [[c.key, c.metric, _format(c.metric, c.baseline), _format(c.metric, c.current), _change(c), c.allowed,
              c.status] for c in shown]
    return tabulate(lines, headers=["configuration", "metric", "baseline", "current", "change", "allowed", "status"],
                    tablefmt="github", disable_numparse=True)


def check(results_dir: Path, baseline: Path, overrides: dict[str, Any] | None = None
          ) -> tuple[list[Comparison], list[str], Tolerances]:
    """Compare the newest records under ``results_dir`` with ``baseline`` (tolerances: defaults < file < overrides)."""
    document = load_baseline(baseline)
    tolerances = Tolerances().updated(document.get("tolerances")).updated(overrides)
    comparisons, notes = compare(document, current_rows(results_dir), tolerances)
    return comparisons, notes, tolerances
