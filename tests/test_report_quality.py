"""The report's low-resolution and face-quality sections (bench/report/quality_report.py) and the EDC figure,
from hand-written records of two methods x two seeds; means and stds computed here by hand."""

from __future__ import annotations

import statistics

import pytest

from bench.records import iter_records
from bench.report.runs import metric_columns, results_frame, summary_frame
from bench.report.tables import lower_is_better, to_markdown
from bench.report.writer import write_report
from tests.report_records import drawn_series, legend_labels, write_record

RESOLUTIONS = (8, 12, 16, 20)
NUISANCES = ("all", "resolution", "blur", "noise", "jpeg", "occlusion", "pose")
DISCARD = [0.0, 0.1, 0.2, 0.3]
SLUG = "synthface-shallow-small-1000"
# "arc_face" (an underscore, escaped in LaTeX) estimates no quality: no "ri" score.
ARC, COS = "arc_face", "cosface"


def lowres(base: float, tar: float, hr: float) -> dict:
    """synth-lowres metrics: rank-1 grows by 0.1 per resolution step; HR-vs-LR TAR@1e-3 = tar + 0.01 * step;
    LR-vs-LR TARs are 0.777 (never shown)."""
    per_resolution = {
        str(r): {"rank1": base + 0.1 * i, "rank5": 0.99,
                 "tar_at_far": {"0.001": tar + 0.01 * i, "0.01": 0.888},
                 "lr_tar_at_far": {"0.001": 0.777, "0.01": 0.777}}
        for i, r in enumerate(RESOLUTIONS)}
    summary = {f"rank-1 {r}px": base + 0.1 * i for i, r in enumerate(RESOLUTIONS)}
    summary["rank-1 mean"] = base + 0.15
    return {"resolutions": list(RESOLUTIONS), "per_resolution": per_resolution,
            "hr": {"rank1": hr, "rank5": 1.0, "tar_at_far": {"0.001": 0.9, "0.01": 0.95}},
            "summary": summary, "conventions": {"hr-lr": "HR gallery image against LR probe"}}


def quality(pauc: dict[str, float], rho_all: dict[str, float], fnmr_scale: float) -> dict:
    """synth-quality metrics: EDC of score s is fnmr_scale * (k + 1) * (1 - d) at the 4 discard fractions
    (k = the score's position), rho of nuisance j is rho_all[s] + 0.01 * j."""
    scores = list(pauc)
    edc = {s: {"discard": DISCARD, "fnmr": [fnmr_scale * (k + 1) * (1 - d) for d in DISCARD], "threshold": 0.3,
               "fmr": 0.001} for k, s in enumerate(scores)}
    spearman = {s: {n: rho_all[s] + 0.01 * j for j, n in enumerate(NUISANCES)} for s in scores}
    return {"fmr": 0.001, "pauc_max_discard": 0.2, "scores": scores, "edc": edc, "pauc": pauc,
            "spearman": spearman, "summary": {f"pAUC {s}": v for s, v in pauc.items()},
            "conventions": {"pauc": "stepwise, no normalisation"}}


# (method, seed, lowres(base, tar, hr), pAUC per score, rho "all" per score, EDC scale)
RUNS = [
    (ARC, 0, (0.40, 0.10, 0.90), {"ers": 0.020, "norm": 0.030, "random": 0.045},
     {"ers": -0.50, "norm": -0.30, "random": 0.00}, 0.10),
    (ARC, 1, (0.42, 0.14, 0.96), {"ers": 0.022, "norm": 0.030, "random": 0.047},
     {"ers": -0.54, "norm": -0.32, "random": 0.02}, 0.20),
    (COS, 0, (0.50, 0.20, 0.88), {"ri": 0.018, "ers": 0.024, "norm": 0.028, "random": 0.050},
     {"ri": -0.70, "ers": -0.40, "norm": -0.20, "random": -0.02}, 0.05),
    (COS, 1, (0.56, 0.22, 0.90), {"ri": 0.016, "ers": 0.026, "norm": 0.034, "random": 0.052},
     {"ri": -0.72, "ers": -0.44, "norm": -0.22, "random": 0.00}, 0.15),
]


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def values_of(method: str, pick) -> list[float]:
    return [pick(run) for run in RUNS if run[0] == method]


@pytest.fixture
def results(tmp_path):
    directory = tmp_path / "results"
    for i, (method, seed, lr, pauc, rho, scale) in enumerate(RUNS):
        write_record(directory, f"20260101-00000{i}-{method}-s{seed}", method, seed, 0.8, 0.3,
                     extra_metrics={"synth-lowres": lowres(*lr), "synth-quality": quality(pauc, rho, scale)})
    return directory


@pytest.fixture
def report(results, tmp_path):
    out = tmp_path / "reports"
    paths = write_report(results, out)
    return out, paths, (out / "results.md").read_text(), (out / "results.tex").read_text()


def section(md: str, title: str) -> str:
    """The text of ``## title`` up to the next ``## `` section."""
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def line_of(text: str, *needles: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("|") and all(n in line for n in needles))


def test_lowres_table_shows_the_seed_means(report):
    _, _, md, _ = report
    text = section(md, "Low-resolution recognition")
    assert "### synthface, shallow split" in text and "Provenance: git commit" in text
    header = line_of(text, "method")
    assert [h.strip() for h in header.strip("|").split("|")][:4] == ["backbone", "budget", "method", "n"]
    for r in RESOLUTIONS:
        assert f"rank-1 (%) {r}px" in header and f"TAR (%) @FAR=1e-3 HR-LR {r}px" in header
    assert header.index("rank-1 (%) 8px") < header.index("rank-1 (%) 12px") < header.index("TAR (%) @FAR=1e-3 HR-LR 8px")
    for method in (ARC, COS):
        line = line_of(text, f" {method} ")
        assert "| 2 " in line                                                       # n seeds
        for i, r in enumerate(RESOLUTIONS):
            assert mean_sd(values_of(method, lambda run: run[2][0] + 0.1 * i), 100) in line
            assert mean_sd(values_of(method, lambda run: run[2][1] + 0.01 * i), 100) in line
        assert mean_sd(values_of(method, lambda run: run[2][2]), 100) in line      # HR rank-1
        assert "77.70" not in line                                                  # LR-vs-LR is not shown
    arc, cos = line_of(text, f" {ARC} "), line_of(text, f" {COS} ")
    assert "**53.00 ± 4.24**" in cos and "41.00 ± 1.41" in arc and "**41.00" not in arc
    assert "**93.00 ± 4.24**" in arc and "89.00 ± 1.41" in cos                    # HR rank-1: arc_face higher


def test_quality_tables_show_the_seed_means_and_a_dash_for_a_missing_score(report):
    _, _, md, _ = report
    text = section(md, "Face quality (EDC)")
    assert "FMR 0.001; pAUC over discarded fractions [0, 0.2]" in text
    pauc_table = text[text.index("pAUC of the EDC"):text.index("Spearman rho of")]
    header = line_of(pauc_table, "method")
    assert header.index("pAUC ri") < header.index("pAUC ers") < header.index("pAUC norm") < header.index("pAUC random")
    arc, cos = line_of(pauc_table, f" {ARC} "), line_of(pauc_table, f" {COS} ")
    assert [c.strip() for c in arc.strip("|").split("|")][4] == "–"                  # arc_face has no "ri"
    for score in ("ers", "norm", "random"):
        assert mean_sd(values_of(ARC, lambda run: run[3][score]), digits=4) in arc
    for score in ("ri", "ers", "norm", "random"):
        assert mean_sd(values_of(COS, lambda run: run[3][score]), digits=4) in cos
    assert "**0.0170 ± 0.0014**" in cos                                            # lowest pAUC of the row: ri
    assert "**0.0210 ± 0.0014**" in arc                                            # ers for arc_face
    assert "**0.0" not in cos.replace("**0.0170 ± 0.0014**", "")

    rho_table = text[text.index("Spearman rho of"):]
    header = line_of(rho_table, "quality score")
    assert [h.strip() for h in header.strip("|").split("|")][5:] == [f"rho {n}" for n in NUISANCES]
    assert not any(f" {ARC} " in line and "| ri " in line for line in rho_table.splitlines())
    for method, scores in ((ARC, ("ers", "norm", "random")), (COS, ("ri", "ers", "norm", "random"))):
        for score in scores:
            line = line_of(rho_table, f" {method} ", f"| {score} ")
            for j, _ in enumerate(NUISANCES):
                assert mean_sd(values_of(method, lambda run: run[4][score] + 0.01 * j), digits=3) in line


def test_latex_tables_exist_and_are_escaped(report):
    _, _, _, tex = report
    assert "% Low-resolution recognition (synth-lowres)" in tex and "% Face quality (synth-quality)" in tex
    assert tex.count("\\begin{tabular}") == 4 and tex.count("\\end{tabular}") == 4  # results, lowres, pAUC, rho
    assert "rank-1 (\\%) 8px" in tex and "pAUC ri" in tex
    assert "arc\\_face" in tex and "arc_face" not in tex.replace("arc\\_face", "")
    assert "\\textbf{53.00 $\\pm$ 4.24}" in tex and "\\textbf{0.0170 $\\pm$ 0.0014}" in tex
    pauc_line = next(line for line in tex.splitlines() if "arc\\_face" in line and "0.0210" in line)
    assert " -- " in pauc_line and "–" not in tex                                  # the missing "ri"


def test_the_main_table_keeps_pauc_out_and_rank1_in(report, results):
    _, _, md, _ = report
    main = section(md, "Results")
    assert "synth-lowres rank-1 (%) 8px" in main and "synth-lowres rank-1 (%) mean" in main
    assert "pAUC" not in main
    columns = metric_columns(summary_frame(results_frame(results)))
    assert "synth-lowres rank-1 8px" in columns
    assert not any("pAUC" in c for c in columns)   # so `bench check` never gates it as higher-is-better
    assert lower_is_better("synth-quality pAUC ers") and not lower_is_better("synth-lowres rank-1 8px")
    assert "**" in to_markdown(summary_frame(results_frame(results)))


def test_edc_figure_is_written_and_draws_the_seed_means(report, results):
    out, paths, md, _ = report
    png, pdf = out / "figures" / f"edc-{SLUG}.png", out / "figures" / f"edc-{SLUG}.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.stat().st_size > 1000
    assert png in paths and pdf in paths and f"](figures/edc-{SLUG}.png)" in md

    import matplotlib.pyplot as plt

    from bench.report.figures import draw_figures

    drawings = {d.name: d.figure for d in draw_figures(iter_records(results))}
    figure = drawings[f"edc-{SLUG}"]
    arc_ax, cos_ax = [ax for ax in figure.axes if ax.get_visible()]
    assert arc_ax.get_title() == f"{ARC} (n=2)" and cos_ax.get_title() == f"{COS} (n=2)"
    assert legend_labels(figure) == ["pAUC range (0-20 %)", "ri", "ers", "norm", "random"]
    x = [100 * d for d in DISCARD]
    for ax, method, scores in ((arc_ax, ARC, ("ers", "norm", "random")), (cos_ax, COS, ("ri", "ers", "norm", "random"))):
        series = drawn_series(ax)
        assert list(series) == list(scores)
        scale = statistics.mean(values_of(method, lambda run: run[5]))
        for k, score in enumerate(scores):
            assert series[score] == (pytest.approx(x), pytest.approx([100 * scale * (k + 1) * (1 - d) for d in DISCARD]))
        span = [p for p in ax.patches if p.get_label().startswith("pAUC range")]
        assert len(span) == 1 and span[0].get_x() == 0 and span[0].get_width() == pytest.approx(20.0)
    for drawn in drawings.values():
        plt.close(drawn)


def test_sections_and_figure_absent_without_the_protocols(tmp_path):
    results = tmp_path / "results"
    for seed in (0, 1):
        write_record(results, f"20260101-00000{seed}-arcface-s{seed}", "arcface", seed, 0.8, 0.3)
    out = tmp_path / "reports"
    write_report(results, out)
    md, tex = (out / "results.md").read_text(), (out / "results.tex").read_text()
    assert "Low-resolution" not in md and "Face quality" not in md
    assert "synth-lowres" not in tex and "synth-quality" not in tex
    assert not list((out / "figures").glob("edc-*"))


def test_only_one_protocol_gives_only_its_section(tmp_path):
    results = tmp_path / "results"
    write_record(results, "20260101-000000-arcface-s0", "arcface", 0, 0.8, 0.3,
                 extra_metrics={"synth-lowres": lowres(0.4, 0.1, 0.9)})
    write_report(results, tmp_path / "reports", figures=False)
    md = (tmp_path / "reports" / "results.md").read_text()
    line = line_of(section(md, "Low-resolution recognition"), " arcface ")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:5] == ["1", "40.00"] and "±" not in line                      # one seed: no spread
    assert "Face quality" not in md


def test_a_failing_figure_leaves_the_previous_report(report, results, monkeypatch):
    out, _, md, _ = report
    from bench.report import figures

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "edc_figure", broken)
    with pytest.raises(RuntimeError):
        write_report(results, out)
    assert (out / "results.md").read_text() == md
    assert not [p for p in out.rglob("*") if p.name.endswith(".staged")]
