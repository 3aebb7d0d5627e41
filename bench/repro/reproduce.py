"""``bench reproduce``: train the arms of the selected claims over seeds (reusing complete runs), then judge.

Every (comparison, arm, seed) becomes one run configuration (:func:`bench.repro.claims.arm_config`); runs
shared by several claims (the same configuration fingerprint) are trained once. They are trained seed by
seed (all arms of seed 0 first), each through :func:`bench.runner.run`, which reuses a complete record with
the same fingerprint, so an interrupted ``bench reproduce`` resumes where it stopped and one more seed
trains only that seed. The options of the invocation (budget, overrides) are kept in
``<out>/reproduce.json``, so that ``bench report`` judges the same runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from bench.config import RunConfig
from bench.records import atomic_write_json, ensure_writable_dir
from bench.report.claims import ClaimRow
from bench.repro.claims import (CLAIMS_RESULTS, Claim, arm_fingerprint, missing_requirements, run_fingerprint,
                                trend_config)
from bench.repro.judge import judge
from bench.runner import run
from bench.train import NonFiniteLossError
from methods.registry import ConfigError

#: The options of the last ``bench reproduce`` in a claims results directory.
OPTIONS_FILE = "reproduce.json"
#: Seeds per arm unless ``--seeds`` says otherwise (issue 15).
DEFAULT_SEEDS = 5


@dataclass(frozen=True)
class PlannedRun:
    config: RunConfig
    fingerprint: str
    label: str


def plan(claims: list[Claim], seeds: int, budget: int | None = None, out: str = CLAIMS_RESULTS,
         overrides: dict[str, Any] | None = None) -> list[PlannedRun]:
    """The distinct runs the runnable ``claims`` need, seed-major (every arm of seed 0, then of seed 1...)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    planned: dict[str, PlannedRun] = {}
    for seed in range(seeds):
        for claim in claims:
            if missing_requirements(claim):
                continue
            if claim.trend is not None:
                for level in range(len(claim.trend.levels)):
                    config = trend_config(claim, level, seed, budget, out, overrides)
                    fingerprint = run_fingerprint(config)
                    planned.setdefault(fingerprint, PlannedRun(
                        config, fingerprint,
                        f"{claim.trend.method} [{claim.trend.level_label(level)}] seed {seed} ({claim.id})"))
            for comparison in claim.comparisons:
                for arm in (comparison.a, comparison.b):
                    config, fingerprint = arm_fingerprint(comparison, arm, seed, budget, out, overrides)
                    planned.setdefault(fingerprint, PlannedRun(config, fingerprint,
                                                               f"{arm.label()} seed {seed} ({comparison.setting_text() or 'defaults'})"))
    return list(planned.values())


def save_options(out: str, budget: int | None, overrides: dict[str, Any] | None) -> None:
    directory = ensure_writable_dir(Path(out))
    atomic_write_json(directory / OPTIONS_FILE, {"budget": budget, "overrides": overrides or {}})


def load_options(out: str | Path) -> dict[str, Any]:
    """``{"budget": ..., "overrides": {...}}`` of the last ``bench reproduce`` in ``out`` (defaults if none)."""
    path = Path(out) / OPTIONS_FILE
    if not path.is_file():
        return {"budget": None, "overrides": {}}
    try:
        options = json.loads(path.read_text())
        if not isinstance(options, dict) or not isinstance(options.get("overrides", {}), dict):
            raise ValueError("not a mapping with 'budget' and 'overrides'")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); delete it or run `bench reproduce` again") from None
    return {"budget": options.get("budget"), "overrides": options.get("overrides") or {}}


def reproduce(claims: list[Claim], seeds: int = DEFAULT_SEEDS, budget: int | None = None, out: str = CLAIMS_RESULTS,
              overrides: dict[str, Any] | None = None, force: bool = False, console: Console | None = None,
              progress: bool = True) -> list[ClaimRow]:
    """Train what the claims need (reusing complete runs unless ``force``) and judge them."""
    console = console or Console(stderr=True)
    runs = plan(claims, seeds, budget, out, overrides)
    save_options(out, budget, overrides)
    for number, planned in enumerate(runs, 1):
        console.print(f"[bold]bench reproduce[/] run {number} of {len(runs)}: {escape(planned.label)}", soft_wrap=True,
                      highlight=False)
        try:
            run(planned.config, console=console, progress=progress, force=force)
        except NonFiniteLossError as exc:
            # A diverged run is a result, not a crash: its arm misses that seed, which the judge reports.
            console.print(f"[yellow]warning:[/] {escape(planned.label)}: {escape(str(exc))}; its seed is reported missing",
                          soft_wrap=True, highlight=False)
    return judge(claims, seeds, out, budget, overrides)
