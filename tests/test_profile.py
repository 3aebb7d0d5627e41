"""`bench profile` at toy sizes, run through the CLI: the record it writes, the memory budget, the class-count
parser and its errors, the ``(method, params)`` cases, and `bench report` drawing the profile table and figure
from the record.

Shows: the record is ``<stamp>-profile-cpu-<rand>/`` with ``config.yaml`` (``kind: profile`` and the
settings) and ``metrics.json`` holding one ``head-profile`` row per case x class count, in order, each
``ok`` with a positive step time and step / floor; ``logit_columns`` equals the closed form of each case
(full FC ``C``; Partial FC ``max(ceil(r C), B)``; DCQ ``max(G, floor(0.1 C) // G * G)``; Prototype Memory
``min(C, 16384)``; SST ``max(G, min(16384, C // 2) // G * G)``; ``G = B / 2``), and agrees with the sizes the
methods allocate when built and stepped as the profile does; the estimates equal their hand-computed
formulas; a budget far between two cases' estimates runs the smaller and reports the larger ``over budget``
without running it; the profile figure draws each case's rows (and the over-budget estimates); ``10k,1.5M``
parses to 10,000 and 1,500,000 and bad input is one ``error:`` line with exit 2; profile.py holds no
per-method step code. Toy sizes (B = 16, D = 32, one timed step); every case is one ``Trainer.step`` per
step, and Prototype Memory first fills its memory (``C / G`` steps, 500 at 4k classes): the file took 48-62 s
on the 2-core machine shared with four other test runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bench.cli import app
from bench.profile import COSTS, Shape, case_shape, parse_case, parse_counts
from tests.report_records import drawn_series, legend_labels
from bench.errors import ConfigError

runner = CliRunner()

CLASSES = (100, 1_000, 4_000)
BATCH, DIM = 16, 32
G = BATCH // 2
CASE_NAMES = ("arcface", "pfc-0.1", "pfc-0.2", "dcq", "pm", "sst")


def expected_columns(case: str, classes: int) -> int:
    """Rows each case's logits are computed against, written out from the method papers' / code's rules."""
    if case == "arcface":
        return classes                                              # every class center
    if case.startswith("pfc-"):
        rate = float(case.split("-")[1])
        return max(math.ceil(rate * classes), BATCH)                # sampled centers, at least the positives
    if case == "dcq":
        return max(G, int(0.1 * classes) // G * G)                  # 10 % of the classes, whole batches of G
    if case == "pm":
        return max(G, round(0.1 * classes))                         # 10 % of the classes, at least a batch
    if case == "sst":
        return max(G, min(16_384, classes // 2) // G * G)           # paper queue, at most half the classes
    raise AssertionError(case)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("profile") / "results"
    result = runner.invoke(app, ["profile", "--classes", "100,1k,4k", "--methods", ",".join(CASE_NAMES),
                                 "--batch-size", str(BATCH), "--embedding-size", str(DIM), "--steps", "1",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = list(out.iterdir())
    assert len(records) == 1
    return records[0], result


def _metrics(record: Path) -> list[dict[str, Any]]:
    return json.loads((record / "metrics.json").read_text())["head-profile"]["rows"]


def test_record_config_and_files(profiled: tuple[Path, Any]) -> None:
    record, _ = profiled
    assert record.name.split("-")[2:4] == ["profile", "cpu"]
    assert {p.name for p in record.iterdir()} >= {"config.yaml", "env.json", "perf.json", "metrics.json"}
    config = yaml.safe_load((record / "config.yaml").read_text())
    assert config["kind"] == "profile" and config["run_id"] == record.name
    assert config["classes"] == list(CLASSES) and config["cases"] == list(CASE_NAMES)
    assert (config["batch_size"], config["embedding_size"], config["steps"], config["device"]) == (BATCH, DIM, 1, "cpu")
    assert config["sgd"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def test_one_ok_row_per_case_and_class_count(profiled: tuple[Path, Any]) -> None:
    record, _ = profiled
    rows = _metrics(record)
    assert [(r["method"], r["classes"]) for r in rows] == [(c, n) for c in CASE_NAMES for n in CLASSES]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["step_over_floor"] > 0
        assert row["step_over_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"])
        assert row["img_s"] == pytest.approx(1000.0 * BATCH / row["step_ms"])
        assert row["peak_bytes"] > 0 and row["estimate_bytes"] > 0


def test_logit_columns_match_the_closed_form(profiled: tuple[Path, Any]) -> None:
    rows = {(r["method"], r["classes"]): r for r in _metrics(profiled[0])}
    hand = {  # the formula evaluated by hand at B = 16, G = 8
        ("arcface", 100): 100, ("pfc-0.1", 100): 16, ("pfc-0.1", 1_000): 100, ("pfc-0.2", 100): 20,
        ("pfc-0.2", 4_000): 800, ("dcq", 100): 8, ("dcq", 1_000): 96, ("dcq", 4_000): 400,
        ("pm", 4_000): 400, ("pm", 100): 10, ("sst", 100): 48, ("sst", 1_000): 496, ("sst", 4_000): 2_000,
    }
    for key, columns in hand.items():
        assert expected_columns(*key) == columns
    for (case, classes), row in rows.items():
        assert row["logit_columns"] == expected_columns(case, classes), (case, classes)


def test_gemm_flop_is_three_products_for_the_center_heads(profiled: tuple[Path, Any]) -> None:
    rows = {(r["method"], r["classes"]): r for r in _metrics(profiled[0])}
    for case in ("arcface", "pfc-0.1", "pfc-0.2"):
        for classes in CLASSES:
            k = expected_columns(case, classes)
            # logits [B, D] @ [D, K], gradient w.r.t. embeddings and w.r.t. the K centers: 3 x 2 B K D
            assert rows[case, classes]["gemm_flop"] == 3 * 2 * BATCH * k * DIM


def test_queue_sizes_agree_with_the_methods_own_derivation() -> None:
    """Catches: the profile's row counts (its memory estimate and floor) drifting from the sizes the methods
    themselves allocate when built and stepped as the profile does (DCQ's and SST's queues, Prototype
    Memory's memory)."""
    from bench.profile import CaseRun

    for label, attribute in (("dcq", "queue"), ("sst", "queue"), ("pm", "memory")):
        for classes in CLASSES:
            case = parse_case(label)
            run = CaseRun(case, case_shape(case, classes, BATCH, DIM), 2, torch.device("cpu"))
            run.step()  # a queue allocated on the first forward exists from here on, whatever the contract
            assert getattr(run.method, attribute).capacity == expected_columns(label, classes), (label, classes)


def test_command_prints_the_table(profiled: tuple[Path, Any]) -> None:
    _, result = profiled
    header = [c.strip() for c in result.stdout.splitlines()[0].strip("|").split("|")]
    assert header == ["method", "classes", "logit columns", "step ms", "img/s", "peak GiB", "estimate GiB",
                      "floor ms", "step / floor", "status"]
    assert len(result.stdout.strip().splitlines()) == 2 + len(CASE_NAMES) * len(CLASSES)
    assert "record " in result.stderr and "pfc-0.1" in result.stderr


def _own_estimate(label: str, classes: int) -> int:
    """The case's own estimate (without what the process holds), through the profile's cost table."""
    case = parse_case(label)
    shape = case_shape(case, classes, BATCH, DIM)
    return COSTS[case.method].estimate_bytes(shape, {**_defaults(case.method), **case.params})


def _defaults(method: str) -> dict[str, Any]:
    from methods.base import METHODS

    return METHODS.get(method).resolve_params({})


def test_estimates_match_the_hand_computed_formulas() -> None:
    """Catches: an estimate that forgets a term (Partial FC's sampling scores and indices, 3 C int64;
    full FC's weight-decay temporary): the numbers the budget and the README's memory formulas rely on."""
    classes = 1_000_000
    full, partial = _own_estimate("arcface", classes), _own_estimate("pfc-0.1", classes)
    # by hand: full FC 4 C D + 3 B C floats; PFC 2 C D + 4 K D + 3 B K floats + 3 C int64, K = 100,000
    assert full == 4 * (4 * classes * DIM + 3 * BATCH * classes) == 704_000_000
    assert partial == 4 * (2 * classes * DIM + 4 * 100_000 * DIM + 3 * BATCH * 100_000) + 24 * classes == 350_400_000


def test_cases_are_method_and_params_pairs() -> None:
    """Catches: a ``--methods`` value mapped to the wrong registered method or parameters (``pfc-0.2``
    profiled at the default rate 0.1, ``pm`` not reaching Prototype Memory), or the identities per batch
    not following the method's views per identity (G = B / 2 for the two-view methods, B for the heads)."""
    assert parse_case("pfc-0.2").method == "pfc" and parse_case("pfc-0.2").params == {"sample_rate": 0.2}
    assert parse_case("pfc-0.05").params == {"sample_rate": 0.05}
    assert (parse_case("pm").method, parse_case("pm").params) == ("prototype_memory", {})
    assert (parse_case("arcface").method, parse_case("sst").method) == ("arcface", "sst")
    assert case_shape(parse_case("dcq"), 1_000, BATCH, DIM) == Shape(1_000, BATCH, DIM, G)
    assert case_shape(parse_case("pfc-0.1"), 1_000, BATCH, DIM) == Shape(1_000, BATCH, DIM, BATCH)


def test_profile_has_no_per_method_step_code() -> None:
    """Catches: per-method step code coming back into bench/profile.py (issue 14, item 2: cases are built
    through the registry and stepped by the Trainer; only sizes are per method)."""
    import bench.profile

    source = Path(bench.profile.__file__).read_text()
    for call in ("direction_loss", "queue.enqueue", "logits(", "memory.write", ".backward(", "optimizer.step"):
        assert call not in source, call
    assert "Trainer(" in source and "build_method(" in source


def test_memory_budget_skips_cases_whose_estimate_exceeds_it(tmp_path: Path) -> None:
    """Catches: a case over the budget being run (or reported ok), or one within it being skipped.

    The outcome does not depend on what this process holds: 8 GiB is over 10,000 times the 1k-class
    cases' own estimates (under 1 MB; the recorded estimate adds the process's RSS, about 1 GiB under
    pytest) and under a quarter of the 1,000M-class ones' (350 GB and 704 GB), so only a process holding
    nearly 8 GiB could move a case across it (the test it replaces had a margin of 177 MB).
    """
    budget_gib, small, huge = 8.0, 1_000, 1_000_000_000
    budget = budget_gib * 2**30
    result = runner.invoke(app, ["profile", "--classes", "1k,1000M", "--methods", "arcface,pfc-0.1", "--batch-size",
                                 str(BATCH), "--embedding-size", str(DIM), "--steps", "1", "--device", "cpu",
                                 "--memory-budget-gb", str(budget_gib), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (record,) = tmp_path.iterdir()
    rows = _metrics(record)
    assert [(r["method"], r["classes"], r["status"]) for r in rows] == [
        ("arcface", small, "ok"), ("arcface", huge, "over budget"), ("pfc-0.1", small, "ok"),
        ("pfc-0.1", huge, "over budget")]
    for row in rows:
        own = _own_estimate(row["method"], row["classes"])
        assert row["estimate_bytes"] > own  # the recorded estimate adds what the process held (its RSS)
        if row["status"] == "ok":
            assert own < budget / 10_000 and row["step_ms"] > 0
        else:
            assert own > 4 * budget and "step_ms" not in row
    assert rows[2]["logit_columns"] == 100 and rows[3]["logit_columns"] == 100_000_000
    over = [line for line in result.stdout.splitlines() if line.rstrip().endswith("over budget |")]
    assert [line.split("|")[1].strip() for line in over] == ["arcface", "pfc-0.1"]
    # the figure marks each case over budget at its estimate (hollow marker), labelled in the legend
    import matplotlib.pyplot as plt

    figure = _profile_drawing(tmp_path)
    _, memory_ax = figure.axes
    markers = [(list(line.get_xdata()), list(line.get_ydata())) for line in memory_ax.get_lines()
               if line.get_linestyle() == "None"]
    assert markers == [([huge], [rows[1]["estimate_bytes"] / 2**30]), ([huge], [rows[3]["estimate_bytes"] / 2**30])]
    assert legend_labels(figure)[-2:] == ["budget 8 GiB", "over budget\n(estimate, not run)"]
    plt.close(figure)


def test_parse_counts() -> None:
    assert parse_counts("10k,1.5M") == [10_000, 1_500_000]
    assert parse_counts(" 2, 300K ,1m,") == [2, 300_000, 1_000_000]
    for bad, message in (("abc", "expected numbers like 10k,100k,1M, got 'abc'"), ("1", "need at least 2 classes"),
                         (",", "give at least one class count"), ("1e6", "got '1e6'"), ("-5k", "got '-5k'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            parse_counts(bad)


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "abc"], "error: --classes: expected numbers like 10k,100k,1M, got 'abc'"),
    (["--methods", "arcface,nope"],
     "error: unknown profile case 'nope'; valid: arcface, cosface, dcq, masst, pfc-<rate>, pm, sst"),
    (["--batch-size", "15"], "error: --batch-size must be even and >= 4 (two views per identity), got 15"),
    (["--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["--memory-budget-gb", "0"], "error: --memory-budget-gb must be > 0, got 0.0"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["profile", "--classes", "100", "--device", "cpu", "--out", str(tmp_path / "r"),
                                 *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == message
    assert not (tmp_path / "r").exists()  # nothing is written before the settings are valid


def test_report_draws_the_profile_table_and_figure(profiled: tuple[Path, Any], tmp_path: Path) -> None:
    record, _ = profiled
    out = tmp_path / "reports"
    result = runner.invoke(app, ["report", "--results", str(record.parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "results.md").read_text()
    assert "## Head cost vs classes (cpu, batch 16, embedding 32, memory budget 16.0 GiB)" in md
    assert f"record {record.name}" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in table[0].strip("|").split("|")][:3] == ["method", "classes", "logit columns"]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in table[1:]}
    assert ("pfc-0.1", "4,000", "400") in rows and ("sst", "1,000", "496") in rows and ("arcface", "100", "100") in rows
    png = out / "figures" / "profile-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "](figures/profile-cpu.png)" in md
    assert "\\toprule" in (out / "results.tex").read_text()


def _profile_drawing(results: Path) -> Any:
    from bench.records import iter_records
    from bench.report.figures import draw_figures

    (drawing,) = draw_figures(iter_records(results))
    assert drawing.name == "profile-cpu"
    return drawing.figure


def test_profile_figure_draws_every_case_from_its_rows(profiled: tuple[Path, Any]) -> None:
    """Catches: a case missing from the figure, a curve not following its record's rows (img/s and peak
    GiB per class count), or the budget line or legend lost."""
    import matplotlib.pyplot as plt

    record, _ = profiled
    rows = _metrics(record)
    figure = _profile_drawing(record.parent)
    speed_ax, memory_ax = figure.axes
    classes = [float(c) for c in CLASSES]
    expected_speed = {case: (classes, pytest.approx([r["img_s"] for r in rows if r["method"] == case]))
                      for case in CASE_NAMES}
    expected_memory = {case: (classes, pytest.approx([r["peak_bytes"] / 2**30 for r in rows if r["method"] == case]))
                       for case in CASE_NAMES}
    assert drawn_series(speed_ax) == expected_speed
    assert drawn_series(memory_ax) == expected_memory
    unlabelled = [list(line.get_ydata()) for line in memory_ax.get_lines() if line.get_label().startswith("_")]
    assert unlabelled == [[16.0, 16.0]]  # the budget line, at 16 GiB
    assert legend_labels(figure) == [*CASE_NAMES, "budget 16 GiB"]
    plt.close(figure)
