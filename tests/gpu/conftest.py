"""The GPU checks (issue 19): marked ``gpu``, skipped as a folder when CUDA is absent.

Without CUDA every test collected here is skipped with :data:`tests.gpu.gpu_settings.SKIP_REASON`, so CI
on a CPU stays green and lists them as skipped. ``FACEBENCH_GPU_TESTS_DEVICE=cpu`` (set only by
``scripts/gpu_check.sh --cpu-dry-run``) runs them on CPU instead; see :mod:`tests.gpu.gpu_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.gpu_settings import OUT_ENV, SKIP_REASON, GpuSizes, ResultsLog, check_device, read_sizes

HERE = Path(__file__).resolve().parent
#: Quick checks first, so that a GPU check cut short by its time limit has run as many as it could.
RUN_ORDER = ("test_gpu_heads.py", "test_gpu_partial_fc.py", "test_gpu_amp_training.py", "test_gpu_eval.py")
#: Resolved once per session; None when the checks are skipped.
DEVICE = check_device()
_LOG: ResultsLog | None = None
#: Node ids of the tests collected in this folder (their outcomes go into the results file).
_COLLECTED: set[str] = set()


def _here(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def _run_rank(item: pytest.Item) -> int:
    name = Path(str(item.path)).name
    return RUN_ORDER.index(name) if _here(item) and name in RUN_ORDER else len(RUN_ORDER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``gpu`` and run them in :data:`RUN_ORDER`; skip them all when there
    is no device to run them on."""
    if any(_here(item) for item in items) and all(_here(item) for item in items):
        items.sort(key=_run_rank)  # only when this folder alone runs: never reorder a whole-suite run
    for item in items:
        if _here(item):
            _COLLECTED.add(item.nodeid)
            item.add_marker(pytest.mark.gpu)
            if DEVICE is None:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def _results_log() -> ResultsLog:
    global _LOG
    if _LOG is None:
        _LOG = ResultsLog(DEVICE, read_sizes() if DEVICE is not None else None, os.environ.get(OUT_ENV))
    return _LOG


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep each GPU check's outcome in the results file (a failed setup counts as the test's outcome)."""
    if DEVICE is None or report.nodeid not in _COLLECTED:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _results_log().outcome(report.nodeid, report.outcome)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the checks run on (CUDA; CPU in the dry run)."""
    assert DEVICE is not None, SKIP_REASON
    return DEVICE


@pytest.fixture(scope="session")
def sizes() -> GpuSizes:
    return read_sizes()


@pytest.fixture(scope="session")
def record() -> Callable[[str, dict[str, Any]], None]:
    """``record(name, values)``: store what a check measured in the session's results file."""
    return _results_log().record


@pytest.fixture(autouse=True)
def _release_cuda_cache(device: torch.device):
    """Release CUDA's cached blocks after each check, so that one check's leftovers do not crowd the next."""
    yield
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _two_threads():
    """Overrides tests/conftest.py's fixture of this name: the CPU references of the GPU checks (CPU
    features of r50, IJB-C- and MegaFace-sized scoring) use every core of the GPU machine, since they are
    part of the check's few minutes there. The dry run limits threads with OMP_NUM_THREADS instead."""
    yield
