"""The claims registry and the judge (issue 15): verdicts on fabricated records, no training.

Records are written by the test with the configuration fingerprint of each (arm, seed), as ``bench run``
would write it, and a synth-lfw accuracy chosen so that the expected verdict follows by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats

from bench.repro.claims import CLAIMS_DIR, arm_config, load_claims, select_claims
from bench.repro.judge import judge
from methods.registry import ConfigError

TWO_ARMS = """
paper: {key: test, citation: "A. Author, A test paper, 2026"}
claims:
  - id: a-beats-b
    claim: "ArcFace beats CosFace on shallow data."
    where: "Sec. 1"
    metric: synth-lfw acc
    relation: better
    set: {data.split.name: shallow}
    a: {method: arcface}
    b: {method: cosface, params: {m: 0.35}}
  - id: a-equals-b
    claim: "ArcFace matches CosFace."
    where: "Sec. 2"
    metric: synth-lfw acc
    relation: equivalent
    eps: 0.01
    eps_reason: "one point"
    set: {data.split.name: shallow}
    a: {method: arcface}
    b: {method: cosface, params: {m: 0.35}}
  - id: needs-a-parameter
    claim: "A parameter that no method has helps."
    where: "Sec. 3"
    metric: synth-lfw acc
    relation: better
    requires: [arcface.no_such_parameter]
    a: {method: arcface}
    b: {method: cosface}
"""


@pytest.fixture()
def registry(tmp_path: Path):
    directory = tmp_path / "claims"
    directory.mkdir()
    (directory / "test.yaml").write_text(TWO_ARMS)
    return load_claims(directory)


def _write_run(results: Path, comparison, arm, seed: int, accuracy: float, name: str) -> Path:  # noqa: ANN001
    """A complete record of ``arm`` at ``seed`` as bench run writes its config (fingerprint included)."""
    config = arm_config(comparison, arm, seed, out=str(results)).for_method(arm.method).resolved()
    directory = results / name
    directory.mkdir(parents=True)
    record = {**config.to_dict(), "method": arm.method, "run_id": name, "group": "g",
              "config_fingerprint": config.fingerprint()}
    (directory / "config.yaml").write_text(yaml.safe_dump(record))
    for file in ("env.json", "data.json", "perf.json"):
        (directory / file).write_text("{}")
    (directory / "train.jsonl").write_text("")
    (directory / "metrics.json").write_text(json.dumps({"synth-lfw": {"accuracy": accuracy, "accuracy_std": 0.01}}))
    return directory


def _fabricate(results: Path, comparison, a_values: list[float | None], b_values: list[float]) -> None:  # noqa: ANN001
    for seed, (a, b) in enumerate(zip(a_values, b_values)):
        if a is not None:
            _write_run(results, comparison, comparison.a, seed, a, f"2026-a-{comparison.claim.id}-{seed}")
        _write_run(results, comparison, comparison.b, seed, b, f"2026-b-{comparison.claim.id}-{seed}")


def _hand_interval(differences: list[float]) -> tuple[float, float, float]:
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.mark.parametrize("a_values, b_values, expected", [
    ([0.80, 0.81, 0.82], [0.78, 0.78, 0.79], "reproduced"),     # d = .02, .03, .03: interval above 0
    ([0.78, 0.78, 0.79], [0.80, 0.81, 0.82], "contradicted"),   # the same, mirrored: below 0
    ([0.80, 0.78, 0.81], [0.78, 0.80, 0.80], "inconclusive"),   # d = .02, -.02, .01: straddles 0
])
def test_better_claim_gets_each_verdict(tmp_path: Path, registry, a_values, b_values, expected) -> None:  # noqa: ANN001
    """Catches: a judge that pairs the wrong records, mixes up A and B, or reads another column."""
    claim = select_claims(registry, ["a-beats-b"])[0]
    results = tmp_path / "results"
    _fabricate(results, claim.comparisons[0], a_values, b_values)
    # a decoy with another configuration (another seed's split) must not be used
    _write_run(results, claim.comparisons[0], claim.comparisons[0].a, 7, 0.10, "2026-decoy")
    (row,) = judge([claim], 3, results)
    mean, low, high = _hand_interval([a - b for a, b in zip(a_values, b_values)])
    assert row.verdict == expected and row.n == 3
    assert row.mean_difference == pytest.approx(mean, abs=1e-12)
    assert (row.ci_low, row.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert len(row.runs) == 6 and all("decoy" not in run for run in row.runs)
    if expected == "inconclusive":
        assert row.seeds_needed is not None and row.seeds_needed > 3


@pytest.mark.parametrize("differences, expected", [
    ([0.001, -0.002, 0.0005], "reproduced"),   # interval well inside +/- 1 point
    ([0.05, 0.06, 0.055], "contradicted"),     # entirely above +1 point
    ([0.005, 0.02, -0.01], "inconclusive"),    # crosses the band's edge
])
def test_equivalence_claim_gets_each_verdict(tmp_path: Path, registry, differences, expected) -> None:  # noqa: ANN001
    """Catches: an equivalence judged as a one-sided claim, or eps read in the wrong units."""
    claim = select_claims(registry, ["a-equals-b"])[0]
    b_values = [0.80, 0.79, 0.81]
    _fabricate(tmp_path, claim.comparisons[0], [b + d for b, d in zip(b_values, differences)], b_values)
    (row,) = judge([claim], 3, tmp_path)
    assert row.verdict == expected
    assert row.tost_p is not None and (row.tost_p < 0.025) == (expected == "reproduced")


def test_a_missing_seed_is_reported_and_left_out(tmp_path: Path, registry) -> None:
    """Catches: a missing run silently shrinking n, or paired with another seed's run."""
    claim = select_claims(registry, ["a-beats-b"])[0]
    _fabricate(tmp_path, claim.comparisons[0], [0.80, 0.81, None], [0.78, 0.78, 0.79])
    (row,) = judge([claim], 3, tmp_path)
    assert row.n == 2 and row.missing == ["A seed 2"]
    assert row.mean_difference == pytest.approx(0.025, abs=1e-12)
    assert "missing: A seed 2" in __import__("bench.report.claims", fromlist=["verdict_text"]).verdict_text(row)


def test_no_runs_and_not_yet_runnable_get_no_verdict(tmp_path: Path, registry) -> None:
    """Catches: a fake verdict for a claim that was not run, or that cannot run yet."""
    rows = {row.id: row for row in judge(registry, 3, tmp_path)}
    assert rows["a-beats-b"].verdict == "no runs" and rows["a-beats-b"].n == 0
    assert rows["needs-a-parameter"].verdict == "not yet runnable: needs arcface.no_such_parameter"


def test_shipped_registry_has_the_issue_claims_and_every_arm_builds() -> None:
    """Catches: a claim file that does not load, or an arm whose method or parameter does not exist."""
    claims = load_claims(CLAIMS_DIR)
    ids = {claim.id for claim in claims}
    assert {"sst-shallow", "masst-vs-sst", "pfc-equivalent", "pfc-noise", "dcq-queue", "npcface-arcface",
            "subcenter-noise", "pm-shallow", "depth-matters"} <= ids
    for claim in claims:
        if claim.requires:
            continue
        for comparison in claim.comparisons:
            for arm in (comparison.a, comparison.b):
                config = arm_config(comparison, arm, 0)
                assert config.methods == [arm.method]
                assert config.train.seed == 0 and config.data.split.seed == 0
                for param, value in arm.params.items():
                    assert config.method_params[arm.method][param] == value
    equivalences = [claim for claim in claims if claim.relation == "equivalent"]
    assert equivalences and all(claim.eps and claim.eps_reason for claim in equivalences)


def test_arms_of_one_seed_share_the_split_and_seeds_differ(registry) -> None:  # noqa: ANN001
    """Catches: unpaired seeds (arm A and B drawing different splits or data orders for one seed)."""
    comparison = select_claims(registry, ["a-beats-b"])[0].comparisons[0]
    a0, b0, a1 = (arm_config(comparison, comparison.a, 0), arm_config(comparison, comparison.b, 0),
                  arm_config(comparison, comparison.a, 1))
    assert (a0.data, a0.train.seed) == (b0.data, b0.train.seed)
    assert a1.data.split.seed == 1 and a1.train.seed == 1


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("    eps: 0.01\n", ""), "an equivalence needs eps"),
    (lambda t: t.replace("relation: better\n    set: {data.split.name: shallow}", "relation: sometimes\n    set: {}", 1),
     "relation must be one of"),
    (lambda t: t.replace("where: \"Sec. 1\"", "whence: \"Sec. 1\""), "unknown key"),
    (lambda t: t.replace("paper: {key: test, ", "paper: {"), "'paper' needs 'key'"),
])
def test_a_bad_claim_file_is_one_line_naming_it(tmp_path: Path, edit, message) -> None:  # noqa: ANN001
    """Catches: a malformed claim loading with a default, or failing with a traceback instead of the file."""
    (tmp_path / "bad.yaml").write_text(edit(TWO_ARMS))
    with pytest.raises(ConfigError, match=message) as error:
        load_claims(tmp_path)
    assert "bad.yaml" in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_method_or_claim_id_is_one_line(tmp_path: Path, registry) -> None:  # noqa: ANN001
    """Catches: a typo in an arm's method reaching the runner (or an unknown --claims id passing)."""
    (tmp_path / "x.yaml").write_text(TWO_ARMS.replace("a: {method: arcface}", "a: {method: arcfase}", 1))
    claim = load_claims(tmp_path)[0]
    with pytest.raises(ConfigError, match="arcfase") as error:
        arm_config(claim.comparisons[0], claim.comparisons[0].a, 0)
    assert "x.yaml" in str(error.value)
    with pytest.raises(ConfigError, match="unknown claim id"):
        select_claims(registry, ["no-such-claim"])


def test_bench_report_judges_the_claims_runs_it_finds(tmp_path: Path) -> None:
    """Catches: `bench report` ignoring results/claims, judging over seeds that were never run (reporting
    them missing), or writing the claims files outside the report."""
    from typer.testing import CliRunner

    from bench.cli import app

    claim = select_claims(load_claims(CLAIMS_DIR), ["sst-shallow"])[0]
    results = tmp_path / "results"
    _fabricate(results / "claims", claim.comparisons[0], [0.80, 0.81, 0.82], [0.78, 0.78, 0.79])
    result = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(tmp_path / "reports"),
                                      "--no-figures"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "reports" / "claims.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sst-shallow"))
    assert "| 3 " in row and "reproduced" in row and "missing" not in row
    # MASST vs SST on shallow data shares its SST arm with sst-shallow (one run, two claims): B is there
    masst = next(line for line in text.splitlines() if line.startswith("| masst-vs-sst/shallow"))
    assert "no paired seeds; missing: A seed 0, A seed 1, A seed 2" in masst
    assert "no runs" in next(line for line in text.splitlines() if line.startswith("| pfc-noise"))
    assert "\\toprule" in (tmp_path / "reports" / "claims.tex").read_text()


ONE_RUN_TWO_SCORES = """
paper: {key: test, citation: "A. Author, A test paper, 2026"}
claims:
  - id: own-score-beats-ers
    claim: "The method's own quality score has a lower pAUC than ERS."
    where: "Sec. 4"
    metric: synth-quality pAUC ri
    relation: better
    lower_is_better: true
    set: {data.split.name: full}
    a: {method: arcface, metric: synth-quality pAUC ri}
    b: {method: arcface, metric: synth-quality pAUC ers}
"""


def test_arms_may_read_two_columns_of_one_run_and_lower_can_be_better(tmp_path: Path) -> None:
    """Catches: a judge that ignores an arm's own metric (it would compare a column with itself: all 0),
    or that keeps A - B for a lower-is-better metric (the verdict would flip)."""
    directory = tmp_path / "claims"
    directory.mkdir()
    (directory / "test.yaml").write_text(ONE_RUN_TWO_SCORES)
    (claim,) = load_claims(directory)
    comparison = claim.comparisons[0]
    assert comparison.a.label() == "arcface on 'synth-quality pAUC ri'"
    results = tmp_path / "results"
    own, ers = [0.010, 0.012, 0.011], [0.020, 0.025, 0.021]
    for seed, (a, b) in enumerate(zip(own, ers)):
        run = _write_run(results, comparison, comparison.a, seed, 0.9, f"2026-run-{seed}")
        (run / "metrics.json").write_text(json.dumps(
            {"synth-quality": {"summary": {"pAUC ri": a, "pAUC ers": b}}}))
    (row,) = judge([claim], 3, results)
    mean, low, high = _hand_interval([b - a for a, b in zip(own, ers)])
    assert row.verdict == "reproduced" and row.n == 3
    assert row.mean_difference == pytest.approx(mean, abs=1e-12) and row.ci_low == pytest.approx(low, abs=1e-12)
    assert "lower is better" in row.metric
    with pytest.raises(ConfigError, match="lower_is_better must be true or false"):
        (directory / "test.yaml").write_text(ONE_RUN_TWO_SCORES.replace("lower_is_better: true",
                                                                        "lower_is_better: maybe"))
        load_claims(directory)
