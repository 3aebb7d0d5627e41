"""`bench reproduce` end to end on a 2-arm claim at toy sizes (issue 15): the table, the figure, the run
ids, and reuse on a second call. The verdict itself is not asserted (a few hundred samples decide nothing)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.records import iter_records
from tests.conftest import TINY_SETS

runner = CliRunner()


@pytest.mark.slow
def test_reproduce_writes_table_figure_and_run_ids_then_reuses(tmp_path, tiny_eval):
    """Catches: a reproduce that trains but writes no claims table or figure, a table without its runs,
    unpaired seeds, and a second call that retrains instead of reusing."""
    results, reports = tmp_path / "claims", tmp_path / "reports"
    args = ["reproduce", "--claims", "sst-shallow", "--seeds", "2", "--budget", "128", "--out", str(results),
            "--reports", str(reports), "--device", "cpu", "--no-progress", "--set", "eval.protocols=synth-lfw",
            "--set", "train.batch_size=8", "--set", f"data.root={tmp_path / 'data'}"]
    for item in TINY_SETS:
        args += ["--set", item]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = iter_records(results)
    arms = sorted((r["config"]["method"], r["config"]["train"]["seed"], r["config"]["data"]["split"]["seed"])
                  for r in records)
    assert arms == [("arcface", 0, 0), ("arcface", 1, 1), ("sst", 0, 0), ("sst", 1, 1)]
    claims_md = (reports / "claims.md").read_text()
    assert "| sst-shallow" in claims_md and "| sst-shallow" in result.stdout
    row = next(line for line in claims_md.splitlines() if line.startswith("| sst-shallow"))
    assert re.search(r"(reproduced|contradicted|inconclusive)", row)
    assert re.search(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] +\| 2 ", row)  # difference, CI, n
    commit = records[0]["env"]["git_commit"][:12]
    assert f"Provenance of the runs: git commit {commit}" in claims_md
    for record in records:  # every run named with its fingerprint
        assert f"{record['run_id']} ({record['config']['config_fingerprint']})" in claims_md
    assert (reports / "figures" / "claims.png").stat().st_size > 0
    assert (reports / "figures" / "claims.pdf").stat().st_size > 0
    assert "\\toprule" in (reports / "claims.tex").read_text()
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0 and len(iter_records(results)) == 4
    assert " ".join(again.output.split()).count("reusing the complete record") == 4
