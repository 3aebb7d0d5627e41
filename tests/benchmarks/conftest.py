"""Rounds of the microbenchmarks: a measurement under ``--benchmark-enable``, a quick pass otherwise.

``python -m pytest tests/benchmarks --benchmark-enable`` runs each benchmark with the rounds and warm-up
its test asks for. The normal test command (no flag) runs it with :data:`FEW_ROUNDS` rounds and no
warm-up, so the suite stays fast while every benchmark still runs its code and its behavioural checks
(ours: pytest-benchmark's own ``--benchmark-enable`` only overrides ``--benchmark-disable`` and leaves
``pedantic``'s rounds alone). Under ``--benchmark-disable`` pytest-benchmark calls the function once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

#: Rounds of each benchmark in the normal test command.
FEW_ROUNDS = 2


@pytest.fixture
def bench_rounds(request: pytest.FixtureRequest) -> Callable[[int, int], dict[str, int]]:
    """``benchmark.pedantic(fn, **bench_rounds(rounds, warmup_rounds))``: the given numbers under
    ``--benchmark-enable``, else :data:`FEW_ROUNDS` rounds and no warm-up."""
    measuring = bool(request.config.getoption("benchmark_enable"))

    def pedantic_rounds(rounds: int, warmup_rounds: int = 0) -> dict[str, int]:
        if measuring:
            return {"rounds": rounds, "warmup_rounds": warmup_rounds}
        return {"rounds": min(rounds, FEW_ROUNDS), "warmup_rounds": 0}

    return pedantic_rounds
