"""Start-up time of the light commands: ``bench --help``, ``bench list``, ``bench run --help``.

Target (issue 14, item 5): under 0.5 s wall each on the 2-core CI machine, whole process included
(interpreter start, typer, rich). Reported, not asserted (timings vary with the machine's load); that no
heavy module is imported is asserted in tests/test_cli_startup.py. For comparison, ``import torch``
alone is reported too (``timing``): what these commands cost before they stopped importing it.

Run alone: ``python -m pytest tests/benchmarks/test_bench_cli_startup.py --benchmark-enable -s``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.faults.fault_helpers import REPO, python_env


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=python_env(), timeout=120)


@pytest.mark.parametrize("args, expected", [
    (("--help",), "Usage: bench"),
    (("list",), "prototype_memory (alias: pm)"),
    (("run", "--help"), "--no-progress"),
])
def test_light_command_wall_time(benchmark, bench_rounds, args, expected):
    """Wall time of ``python -m bench ARGS`` in a fresh interpreter; checks it succeeds and prints what
    it should (a broken command would time its own error)."""
    argv = [sys.executable, "-m", "bench", *args]
    proc = benchmark.pedantic(_run, args=(argv,), **bench_rounds(7, 1))
    assert proc.returncode == 0 and expected in proc.stdout, proc.stderr
    benchmark.extra_info["target_s"] = 0.5


@pytest.mark.timing
def test_import_torch_wall_time(benchmark, bench_rounds):
    """``python -c "import torch"``: the floor of any command that imports torch (comparison point)."""
    proc = benchmark.pedantic(_run, args=([sys.executable, "-c", "import torch"],), **bench_rounds(3, 1))
    assert proc.returncode == 0, proc.stderr
