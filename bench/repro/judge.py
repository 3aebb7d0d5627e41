"""Judging the claims: each comparison's paired differences over seeds, their interval and the verdict.

For a comparison (:class:`bench.repro.claims.Comparison`) and seeds ``0 .. n-1``, the runs are found by the
configuration fingerprint of each (arm, seed) (:func:`bench.repro.claims.arm_config`), among the complete
records of the results directory; nothing is trained here. Seed ``k`` contributes the difference
``metric(A, k) - metric(B, k)`` when both arms have it; an arm missing a seed is listed as missing. The
interval, verdict and seeds needed come from :mod:`bench.stats`. A claim that needs a parameter no method
has yet is "not yet runnable" and is never given a verdict.

A trend claim (:class:`bench.repro.claims.Trend`) is judged over every (level, seed) run found: Spearman's
rho between its ``x`` column and the claim's metric, with a percentile bootstrap interval over runs
(:func:`bench.stats.spearman_interval`); reproduced when the interval lies above 0, contradicted when below,
inconclusive otherwise or with fewer than three runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.records import complete_runs_by_fingerprint, read_record
from bench.report.claims import ClaimRow
from bench.report.runs import record_row
from bench.repro.claims import (CLAIMS_RESULTS, Arm, Claim, Comparison, arm_fingerprint, missing_requirements,
                                run_fingerprint, settings_text, trend_config)
from bench.stats import seeds_needed, spearman_interval, t_interval, tost_p_value, verdict


def seeds_in(results_dir: Path | str) -> list[int]:
    """The training seeds of the complete runs under ``results_dir`` (what ``bench report`` judges over)."""
    seeds = set()
    for directory in complete_runs_by_fingerprint(Path(results_dir)).values():
        record = read_record(directory)
        seed = ((record or {}).get("config") or {}).get("train", {}).get("seed")
        if isinstance(seed, int):
            seeds.add(seed)
    return sorted(seeds)


def judge(claims: list[Claim], seeds: int | Sequence[int], results_dir: Path | str = CLAIMS_RESULTS,
          budget: int | None = None, overrides: dict[str, Any] | None = None) -> list[ClaimRow]:
    """One :class:`ClaimRow` per comparison of ``claims``, judged on the records under ``results_dir`` for
    seeds ``0 .. seeds - 1`` (or the given seeds). With a list of seeds (``bench report``: the seeds found),
    a seed that neither arm of a comparison has is not counted as missing."""
    existing = complete_runs_by_fingerprint(Path(results_dir))
    rows = []
    for claim in claims:
        missing = missing_requirements(claim)
        if claim.trend is not None:
            rows.append(judge_trend(claim, seeds, existing, str(results_dir), budget, overrides)[0])
            continue
        for comparison in claim.comparisons:
            if missing:
                rows.append(_row(comparison, status=f"not yet runnable: needs {', '.join(missing)}"))
                continue
            rows.append(_judge_comparison(comparison, seeds, existing, str(results_dir), budget, overrides))
    return rows


def _metric(run_dir: Path, metric: str) -> tuple[float | None, dict[str, Any]]:
    """The value of results column ``metric`` of the record in ``run_dir`` (None when absent), and the
    record's provenance (commit, device, date)."""
    record = read_record(run_dir)
    row = record_row(record) if record is not None else {}
    origin = {key: row.get(key) for key in ("commit", "device", "date")}
    try:
        number = float(row.get(metric))
    except (TypeError, ValueError):
        return None, origin
    return (None if math.isnan(number) else number), origin


def _lookup(comparison: Comparison, arm: Arm, seed: int, existing: dict[str, Path], out: str,
            budget: int | None, overrides: dict[str, Any] | None) -> tuple[str, Path | None]:
    _, fingerprint = arm_fingerprint(comparison, arm, seed, budget, out, overrides)
    return fingerprint, existing.get(fingerprint)


def _judge_comparison(comparison: Comparison, seeds: int | Sequence[int], existing: dict[str, Path], out: str, budget: int | None,
                      overrides: dict[str, Any] | None) -> ClaimRow:
    claim = comparison.claim
    differences, runs, values = [], [], {"a": [], "b": []}
    missing: list[str] = []
    origins: dict[str, set[str]] = {}
    requested = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for seed in requested:
        found, absent = {}, []
        for side, arm in (("a", comparison.a), ("b", comparison.b)):
            fingerprint, directory = _lookup(comparison, arm, seed, existing, out, budget, overrides)
            metric = arm.metric or claim.metric
            value, origin = _metric(directory, metric) if directory is not None else (None, {})
            for key, item in origin.items():
                if item:
                    origins.setdefault(key, set()).add(str(item))
            if value is None:
                absent.append(f"{side.upper()} seed {seed}" + ("" if directory is None else
                                                                f" ({directory.name} has no '{metric}')"))
            else:
                found[side] = value
                runs.append(f"{side.upper()}{seed}: {directory.name} ({fingerprint})")
        if found or isinstance(seeds, int):
            missing += absent
        if len(found) == 2:
            differences.append(found["b"] - found["a"] if claim.lower_is_better else found["a"] - found["b"])
            values["a"].append(found["a"])
            values["b"].append(found["b"])
    interval = t_interval(differences)
    if not differences:
        return _row(comparison, status="no paired seeds" if runs else "no runs", missing=missing, runs=runs,
                    seeds_requested=len(requested), origins=origins)
    return _row(comparison, status="judged", interval=interval, missing=missing, runs=runs,
                seeds_requested=len(requested), origins=origins,
                verdict=verdict(interval, claim.relation, claim.eps),
                needed=seeds_needed(interval.mean, interval.sd, claim.relation, claim.eps),
                tost=tost_p_value(differences, claim.eps) if claim.relation == "equivalent" else None,
                mean_a=t_interval(values["a"]).mean, mean_b=t_interval(values["b"]).mean)


def trend_verdict(low: float, high: float) -> str:
    """A rank correlation's verdict for "increases": its interval above 0, below 0, or neither."""
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    return "reproduced" if low > 0 else "contradicted" if high < 0 else "inconclusive"


def judge_trend(claim: Claim, seeds: int | Sequence[int], existing: dict[str, Path], out: str,
                budget: int | None = None, overrides: dict[str, Any] | None = None
                ) -> tuple[ClaimRow, list[dict[str, Any]]]:
    """The row of trend claim ``claim`` and its points (one per run found: level index, level label, seed,
    x, y, run directory), judged on the records ``existing`` (fingerprint -> directory) for the seeds."""
    trend = claim.trend
    assert trend is not None
    requested = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    points, runs, missing = [], [], []
    origins: dict[str, set[str]] = {}
    for index in range(len(trend.levels)):
        for seed in requested:
            fingerprint = run_fingerprint(trend_config(claim, index, seed, budget, out, overrides))
            directory = existing.get(fingerprint)
            if directory is None:
                if isinstance(seeds, int):
                    missing.append(f"{trend.level_label(index)} seed {seed}")
                continue
            x, origin = _metric(directory, trend.x)
            y, _ = _metric(directory, claim.metric)
            for key, item in origin.items():
                if item:
                    origins.setdefault(key, set()).add(str(item))
            if x is None or y is None:
                missing.append(f"{trend.level_label(index)} seed {seed} ({directory.name} lacks a column)")
                continue
            points.append({"level": index, "label": trend.level_label(index), "seed": seed, "x": x, "y": y,
                           "run": directory.name})
            runs.append(f"{trend.level_label(index)} seed {seed}: {directory.name} ({fingerprint})")
    rho, low, high = spearman_interval([p["x"] for p in points], [p["y"] for p in points]) if len(points) >= 3 \
        else (math.nan, math.nan, math.nan)
    status = "judged" if not math.isnan(rho) else ("no runs" if not points else "too few runs to rank")
    row = ClaimRow(
        id=claim.id, paper=claim.citation, paper_key=claim.paper_key, claim=claim.claim, where=claim.where,
        setting=settings_text(trend.set), arm_a=f"{trend.method} at {len(trend.levels)} levels: "
                                + "; ".join(trend.level_label(i) for i in range(len(trend.levels))),
        arm_b="", metric=claim.metric, relation=claim.relation, eps=None, eps_reason="", n=len(points),
        mean_difference=rho, sd=math.nan, ci_low=low, ci_high=high, mean_a=math.nan, mean_b=math.nan,
        verdict=trend_verdict(low, high) if status == "judged" else status, status=status,
        seeds_requested=len(requested), missing=missing, runs=runs, trend_x=trend.x,
        origins={key: sorted(values) for key, values in origins.items()})
    return row, points


def _row(comparison: Comparison, status: str, interval=None, missing=(), runs=(), seeds_requested: int = 0,  # noqa: ANN001
         verdict: str | None = None, needed: int | None = None, tost: float | None = None,
         mean_a: float | None = None, mean_b: float | None = None,
         origins: dict[str, set[str]] | None = None) -> ClaimRow:
    claim = comparison.claim
    return ClaimRow(
        id=comparison.row_id, paper=claim.citation, paper_key=claim.paper_key, claim=claim.claim, where=claim.where,
        setting=comparison.setting_text(), arm_a=comparison.a.label(), arm_b=comparison.b.label(),
        metric=claim.metric + (" (lower is better: the difference is B - A)" if claim.lower_is_better else ""),
        relation=claim.relation, eps=claim.eps, eps_reason=claim.eps_reason,
        n=interval.n if interval is not None else 0,
        mean_difference=interval.mean if interval is not None else math.nan,
        sd=interval.sd if interval is not None else math.nan,
        ci_low=interval.low if interval is not None else math.nan,
        ci_high=interval.high if interval is not None else math.nan,
        mean_a=mean_a if mean_a is not None else math.nan, mean_b=mean_b if mean_b is not None else math.nan,
        verdict=verdict or status, status=status, seeds_needed=needed, tost_p=tost,
        seeds_requested=seeds_requested, missing=list(missing), runs=list(runs),
        origins={key: sorted(values) for key, values in (origins or {}).items()})
