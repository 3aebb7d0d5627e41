"""``scripts/gpu_check.sh`` works before it meets a GPU (issue 19): its CPU dry run, its usage errors, and
its GPU mode on a machine without CUDA.

The GPU machine is lent for minutes, with no network, and only what the script leaves in OUTDIR comes
back (at most 8 flat files with safe names, each at most 16 MiB). The dry run runs every step of the GPU
check at tiny sizes on the CPU, so a broken step, a wrong path or an unreadable output shows here first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bench.check import load_baseline
from methods.base import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
DRY_RUN_FILES = {"gpu_check.log", "gpu_tests.json", "gpu.json", "results.md", "profile-cpu.png", "records.tar.gz"}


def run_script(*args: str, work: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("FACEBENCH_GPU_TESTS_DEVICE", None)
    if work is not None:
        env["FACEBENCH_GPU_CHECK_WORK"] = str(work)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_dry_run_brings_back_a_valid_baseline(tmp_path: Path) -> None:
    """Catches: a step of the GPU check that fails or crashes (a traceback in the log), an output missing
    from OUTDIR or one that would not come back (a ninth file, a folder, an unsafe name, over 16 MiB), a
    log that misses what the script printed, a gpu.json that is not a baseline of every registered
    method or that ``bench check`` rejects against the very records it was made from, a GPU test that
    fails or is not recorded, and records packed with their checkpoints."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_script("--cpu-dry-run", str(out), work=work, timeout=900)
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 0, log[-6000:]
    assert result.stdout == log and result.stderr == "", "everything the script prints must be in the log"
    assert "Traceback" not in log

    entries = list(out.iterdir())
    assert all(path.is_file() and SAFE_NAME.fullmatch(path.name) for path in entries), entries
    assert len(entries) <= MAX_FILES and all(path.stat().st_size <= MAX_FILE_BYTES for path in entries)
    assert DRY_RUN_FILES <= {path.name for path in entries}
    assert (out / "profile-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    baseline = load_baseline(out / "gpu.json")
    assert sorted(entry["key"]["method"] for entry in baseline["entries"]) == sorted(METHODS.names())
    check = subprocess.run([sys.executable, "-m", "bench", "check", "--baseline", str(out / "gpu.json"),
                            "--results", str(work / "results")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    tests = json.loads((out / "gpu_tests.json").read_text())
    assert tests["dry_run"] is True and tests["outcomes"]
    assert set(tests["outcomes"].values()) == {"passed"}, tests["outcomes"]
    assert {f"amp_training/{name}" for name in METHODS.names()} <= set(tests["results"])

    with tarfile.open(out / "records.tar.gz") as packed:
        names = packed.getnames()
    assert sum(name.endswith("/metrics.json") for name in names) == len(METHODS.names()) + 1  # + the profile
    assert "report/results.md" in names and not any("checkpoints" in name for name in names)


@pytest.mark.parametrize("args, message", [
    ((), "missing OUTDIR"),
    (("--fast", "OUT"), "unknown option '--fast'"),
    (("A", "B"), "give one OUTDIR"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    """Catches: a usage error that starts the check anyway, prints a traceback or several lines, or exits
    with another code than 2."""
    result = run_script(*(str(tmp_path / a) if a in ("OUT", "A", "B") else a for a in args))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_refuses_an_outdir_that_holds_files(tmp_path: Path) -> None:
    """Catches: a run that writes into (or over) a previous run's outputs, which would also break the
    8-file limit of what comes back."""
    (tmp_path / "gpu.json").write_text("previous")
    result = run_script(str(tmp_path))
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"] and (tmp_path / "gpu.json").read_text() == "previous"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU mode's stop on a machine without CUDA")
def test_gpu_mode_without_cuda_stops_at_once_and_keeps_the_log(tmp_path: Path) -> None:
    """Catches: a GPU-mode run that goes on without CUDA (every later step would run r50 on the CPU until
    its time limit, burning the machine's minutes), that exits 0, or that leaves no log to bring back."""
    out = tmp_path / "out"
    result = run_script(str(out), work=tmp_path / "work")
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 1, log
    assert "CUDA is not available" in log and "=== stopping" in log
    assert "[gpu-tests]" not in log and "[run]" not in log
    assert [p.name for p in out.iterdir()] == ["gpu_check.log"]
