"""The training-data curation table (sub-center ArcFace's purification) of ``bench report``.

One row per run whose ``perf.json`` holds a ``curation`` report (:func:`bench.curation.curation_report`):
when it curated, what it dropped and, where the training set knew its flipped labels, how well the dropped
set matches them (precision, recall) beside the flipped fraction (what a random drop would reach).
"""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from bench.report.latex import latex_escape

HEADERS = ["run", "method", "after step", "images", "dropped", "classes emptied", "flipped", "precision", "recall"]
NOTE = ("Each run that curated its training data (sub-center ArcFace with `drop_at`): images dropped after the "
        "step shown; against the labels SynthFace flipped (`data.synthface.label_noise`), the precision and "
        "recall of the dropped set (a random drop of the same size has an expected precision equal to the "
        "flipped fraction, shown under flipped). Empty: not known (real data, or nothing dropped or flipped).")


def _cells(record: dict[str, Any]) -> list[str]:
    report = record["perf"]["curation"]
    noise = report.get("label_noise") or {}

    def share(value: Any) -> str:
        return "" if value is None else f"{value:.3f}"

    flipped = (f"{noise['flipped']:,} ({noise['flipped_fraction']:.1%})" if noise else "")
    return [record["run_id"], str((record.get("config") or {}).get("method", "")), f"{report['step']:,}",
            f"{report['images']:,}", f"{report['dropped']:,} ({report['dropped_fraction']:.1%})",
            f"{report['classes_removed']:,}", flipped, share(noise.get("precision")), share(noise.get("recall"))]


def curation_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the curation table ("" when no run curated)."""
    rows = [_cells(r) for r in records if isinstance(r.get("perf"), dict) and r["perf"].get("curation")]
    if not rows:
        return "", ""
    md = "\n".join(["## Training-data curation\n", NOTE + "\n",
                    tabulate(rows, headers=HEADERS, tablefmt="pipe", disable_numparse=True) + "\n"])
    tex = "".join(["% Training-data curation (see results.md for the note)\n",
                   "\\begin{tabular}{ll" + "r" * (len(HEADERS) - 2) + "}\n\\toprule\n",
                   " & ".join(latex_escape(h) for h in HEADERS) + " \\\\\n\\midrule\n",
                   *(" & ".join(latex_escape(c) for c in row) + " \\\\\n" for row in rows),
                   "\\bottomrule\n\\end{tabular}\n"])
    return md, tex
