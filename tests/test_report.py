"""Report tables: aggregation over seeds against hand-computed values, best values, provenance, and the
written report (Markdown, LaTeX booktabs, figures); `bench run --seeds`."""

from __future__ import annotations

import shutil
import statistics
import subprocess

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.records import iter_records
from bench.report.runs import config_hash, provenance, results_frame, select_runs, summary_frame
from bench.report.tables import to_latex, to_markdown
from bench.report.writer import write_report
from tests.report_records import drawn_series, legend_labels, write_record

runner = CliRunner()

# arcface: three seeds; cosface: two seeds; accuracies and TARs chosen to give exact means and stds.
ARC = [(0, 0.80, 0.20, 1000.0, 500.0), (1, 0.82, 0.30, 1100.0, 520.0), (2, 0.84, 0.40, 1200.0, 540.0)]
COS = [(0, 0.78, 0.50, 900.0, 480.0), (1, 0.80, 0.60, 950.0, 460.0)]


@pytest.fixture
def results(tmp_path):
    directory = tmp_path / "results"
    for seed, accuracy, tar, img_s, mib in ARC:
        write_record(directory, f"20260101-00000{seed}-arcface-s{seed}-aaaa", "arcface", seed, accuracy, tar, img_s, mib)
    for seed, accuracy, tar, img_s, mib in COS:
        write_record(directory, f"20260101-00001{seed}-cosface-s{seed}-bbbb", "cosface", seed, accuracy, tar, img_s, mib)
    return directory


def test_mean_and_std_over_seeds_match_hand_computed_values(results):
    summary = summary_frame(results_frame(results)).set_index("method")
    arc, cos = summary.loc["arcface"], summary.loc["cosface"]
    assert arc["seeds"] == 3 and cos["seeds"] == 2
    assert arc["synth-lfw acc"] == pytest.approx(0.82)
    assert arc["synth-lfw acc sd"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.84]))  # 0.02, ddof=1
    assert arc["synth-lfw acc sd"] == pytest.approx(0.02)
    assert cos["synth-lfw TAR@FAR=0.01"] == pytest.approx(0.55)
    assert cos["synth-lfw TAR@FAR=0.01 sd"] == pytest.approx(0.0707106781)  # |0.5 - 0.6| / sqrt(2)
    assert arc["img/s"] == pytest.approx(1100.0) and arc["peak MiB"] == pytest.approx(520.0)
    assert arc["seed list"] == "0,1,2"


def test_table_cells_bold_the_best_and_show_n(results):
    table = to_markdown(summary_frame(results_frame(results)))
    arc_line = next(line for line in table.splitlines() if "arcface" in line)
    cos_line = next(line for line in table.splitlines() if "cosface" in line)
    assert "| 3 " in arc_line and "| 2 " in cos_line                       # n seeds
    assert "**82.00 ± 2.00**" in arc_line and "79.00 ± 1.41" in cos_line    # higher accuracy is bold
    assert "**55.00 ± 7.07**" in cos_line and "30.00 ± 10.00" in arc_line  # higher TAR is bold
    assert "**1100**" in arc_line                                           # higher throughput is bold
    assert "**470**" in cos_line and "| 520 " in arc_line                  # lower memory is bold


def test_one_seed_shows_the_fold_std(tmp_path):
    write_record(tmp_path, "20260101-000000-arcface-s0-aaaa", "arcface", 0, 0.9, 0.5, fold_std=0.0125)
    table = to_markdown(summary_frame(results_frame(tmp_path)))
    assert "90.00 ± 1.25" in table and "| 1 " in table
    assert "**" not in table  # a single row has nothing to be best against


def test_newest_run_per_seed_and_newest_configuration_win(tmp_path):
    write_record(tmp_path, "20260101-000000-arcface-s0-old", "arcface", 0, 0.50, 0.1)
    write_record(tmp_path, "20260101-000001-arcface-s0-new", "arcface", 0, 0.70, 0.1)   # replaces seed 0
    write_record(tmp_path, "20260101-000002-arcface-s1-new", "arcface", 1, 0.80, 0.1)
    write_record(tmp_path, "20260101-000003-arcface-s0-lr", "arcface", 0, 0.90, 0.1, lr=0.05)  # new config
    frame = results_frame(tmp_path)
    selected = select_runs(frame)
    assert list(selected["run_id"]) == ["20260101-000003-arcface-s0-lr"]
    write_record(tmp_path, "20260101-000004-arcface-s1-lr", "arcface", 1, 0.70, 0.1, lr=0.05)
    summary = summary_frame(results_frame(tmp_path))
    assert summary.loc[0, "seeds"] == 2 and summary.loc[0, "synth-lfw acc"] == pytest.approx(0.80)


def test_config_hash_ignores_seed_device_and_location():
    base = {"method": "arcface", "train": {"seed": 0, "lr": 0.1, "device": "cpu"}, "data": {"root": "/a"},
            "run_id": "x", "out": "results"}
    same = {"method": "arcface", "train": {"seed": 7, "lr": 0.1, "device": "cuda"}, "data": {"root": "/b"},
            "run_id": "y", "out": "elsewhere"}
    other = {**base, "train": {"seed": 0, "lr": 0.2, "device": "cpu"}}
    assert config_hash(base) == config_hash(same) != config_hash(other)


def test_provenance_line_names_commit_config_device_and_date(results):
    summary = summary_frame(results_frame(results))
    line = provenance(summary)
    assert line.startswith("Provenance: git commit abcdef123456; config hash ")
    assert "device cpu (x86_64)" in line and "date 2026-01-01 00:00" in line
    for value in summary["config"]:
        assert value in line


def test_latex_is_booktabs_with_bold_best_and_escaped_text(results):
    tex = to_latex(summary_frame(results_frame(results)), "Provenance: x")
    assert tex.startswith("% Provenance: x\n\\begin{tabular}{lllll")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}"):
        assert rule in tex
    assert "\\textbf{82.00 $\\pm$ 2.00}" in tex
    assert "synth-lfw acc (\\%)" in tex and "peak MiB" in tex
    header = tex.splitlines()[3]
    assert header.count("&") == len(tex.splitlines()[5].split("&")) - 1  # header and rows have equal columns


def test_write_report_writes_markdown_latex_and_figures(results, tmp_path):
    out = tmp_path / "reports"
    paths = write_report(results, out)
    md = (out / "results.md").read_text()
    assert "Provenance: git commit" in md and "**82.00 ± 2.00**" in md
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == ["cost-synthface-shallow-small-1000.png", "roc-synth-lfw-synthface-shallow-small-1000.png",
                    "tar-at-far-synthface-shallow-small-1000.png", "training-synthface-shallow-small-1000.png"]
    for png in pngs:
        assert f"](figures/{png})" in md                          # embedded, so the report reads on its own
        assert (out / "figures" / png).with_suffix(".pdf").stat().st_size > 1000
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out / "results.tex" in paths and (out / "figures" / pngs[0]) in paths


def test_figures_draw_each_method_with_its_mean_over_seeds(results):
    """The series inside each figure, against values computed by hand from the records (write_record:
    ROC TAR at FAR 0.001, 0.01, 0.1, 1 is tar/2, tar, min(1, 2 tar), 1; TAR@FAR 0.001 and 0.01 is tar/2
    and tar; loss 10/step + seed; lr 0.1 (1 - step/5); 100 samples per step). Catches: a method left out
    of a figure, series drawn per seed instead of their mean, a wrong column on an axis, a lost legend,
    a missing ± 1 std band."""
    import matplotlib.pyplot as plt

    from bench.report.figures import draw_figures

    drawings = {d.name: d.figure for d in draw_figures(iter_records(results))}
    slug = "synthface-shallow-small-1000"
    assert sorted(drawings) == sorted(f"{kind}-{slug}" for kind in ("roc-synth-lfw", "tar-at-far", "training", "cost"))
    arc, cos = "arcface (n=3)", "cosface (n=2)"
    for figure in drawings.values():
        assert legend_labels(figure) == [arc, cos]

    (roc,) = drawings[f"roc-synth-lfw-{slug}"].axes
    far = [0.001, 0.01, 0.1, 1.0]
    # arcface: tar 0.2, 0.3, 0.4 -> mean 0.3; cosface: tar 0.5, 0.6 (2 tar capped at 1)
    assert drawn_series(roc) == {arc: (far, pytest.approx([15.0, 30.0, 60.0, 100.0])),
                                 cos: (far, pytest.approx([27.5, 55.0, 100.0, 100.0]))}
    assert len(roc.collections) == 2  # a ± 1 std band per method (both have several seeds)

    (tar,) = drawings[f"tar-at-far-{slug}"].axes
    points = drawn_series(tar)
    assert set(points) == {arc, cos}
    assert points[arc][1] == pytest.approx([15.0, 30.0]) and points[cos][1] == pytest.approx([27.5, 55.0])
    for x, _ in points.values():  # FAR 0.001 and 0.01, dodged by a few percent so the error bars do not overlap
        assert x == pytest.approx([0.001, 0.01], rel=0.1)

    loss, lr = drawings[f"training-{slug}"].axes
    thousands = [0.1, 0.2, 0.3, 0.4]
    assert drawn_series(loss) == {arc: (thousands, pytest.approx([10.0 / s + 1.0 for s in range(1, 5)])),
                                  cos: (thousands, pytest.approx([10.0 / s + 0.5 for s in range(1, 5)]))}
    schedule = pytest.approx([0.1 * (1 - s / 5) for s in range(1, 5)])
    assert drawn_series(lr) == {arc: (thousands, schedule), cos: (thousands, schedule)}

    speed_memory, accuracy_speed = drawings[f"cost-{slug}"].axes
    assert drawn_series(speed_memory) == {arc: ([520.0], [1100.0]), cos: ([470.0], [925.0])}
    assert drawn_series(accuracy_speed) == {arc: ([1100.0], [pytest.approx(82.0)]),
                                            cos: ([925.0], [pytest.approx(79.0)])}
    for figure in drawings.values():
        plt.close(figure)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX toolchain installed")
def test_latex_table_compiles(results, tmp_path):
    out = tmp_path / "reports"
    write_report(results, out, figures=False)
    document = tmp_path / "doc.tex"
    document.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[margin=5mm,landscape]{geometry}"
                        "\\begin{document}\\tiny\\input{" + str(out / "results.tex") + "}\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


def test_empty_results_write_a_placeholder(tmp_path):
    (tmp_path / "results").mkdir()
    paths = write_report(tmp_path / "results", tmp_path / "reports")
    assert "No complete runs" in (tmp_path / "reports" / "results.md").read_text()
    assert len(paths) == 2


def test_report_command_writes_figures(results, tmp_path):
    result = runner.invoke(app, ["report", "--results", str(results), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "figures/roc-synth-lfw" in result.stderr and (tmp_path / "r" / "results.md").is_file()


def test_run_with_seeds_repeats_each_method_in_one_group(tmp_path, tiny_args):
    result = runner.invoke(app, ["run", "--methods", "cosface", "--seeds", "2", "--seed", "3", *tiny_args],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = iter_records(tmp_path / "results")
    assert sorted(r["config"]["train"]["seed"] for r in records) == [3, 4]
    assert len({r["config"]["group"] for r in records}) == 1
    line = next(line for line in result.stdout.splitlines() if "cosface" in line)
    assert "| 2 " in line and " ± " in line  # n = 2 and the std over the two seeds


def test_seeds_must_be_positive(tmp_path, tiny_args):
    result = runner.invoke(app, ["run", "--methods", "cosface", "--seeds", "0", *tiny_args])
    assert result.exit_code == 2 and result.stderr.strip() == "error: seeds must be >= 1, got 0"


def test_report_tabulates_the_curation_of_runs_that_curated(tmp_path):
    """A run whose perf.json holds a curation report gets a row in "Training-data curation" (counts,
    shares, precision and recall as recorded); runs without one add nothing, and no curation at all means
    no section. Catches the section missing, a run without curation listed, and precision/recall swapped."""
    import json

    directory = tmp_path / "results"
    plain = write_record(directory, "20260101-000000-subcenter-s0-aaaa", "subcenter", 0, 0.8, 0.2)
    write_report(directory, tmp_path / "reports", figures=False)
    assert "Training-data curation" not in (tmp_path / "reports" / "results.md").read_text()
    curated = write_record(directory, "20260101-000001-subcenter-s1-bbbb", "subcenter", 1, 0.8, 0.2)
    perf = json.loads((curated / "perf.json").read_text())
    perf["curation"] = {"step": 562, "images": 20000, "dropped": 770, "dropped_fraction": 0.0385, "classes": 1000,
                        "classes_removed": 3, "label_noise": {"flipped": 4000, "flipped_fraction": 0.2,
                                                              "dropped_and_flipped": 700, "precision": 0.909,
                                                              "recall": 0.175, "flipped_kept": 3300}}
    (curated / "perf.json").write_text(json.dumps(perf))
    write_report(directory, tmp_path / "reports", figures=False)
    text = (tmp_path / "reports" / "results.md").read_text()
    section = text[text.index("## Training-data curation"):]
    rows = [line for line in section.splitlines() if line.startswith("| 2026")]
    assert rows == ["| 20260101-000001-subcenter-s1-bbbb | subcenter | 562          | 20,000   | 770 (3.9%) "
                    "| 3                 | 4,000 (20.0%) | 0.909       | 0.175    |"]
    assert plain.name not in section
    assert "562" in (tmp_path / "reports" / "results.tex").read_text()
