"""The head-cost table of ``bench profile`` records (newest record per device), for ``bench report``."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from bench.report.latex import latex_escape
from bench.report.runs import profile_records, provenance_line


#: Columns of the profile table (``bench profile`` output and ``bench report``'s profile section).
TABLE_HEADERS = ["method", "classes", "logit columns", "step ms", "img/s", "peak GiB", "estimate GiB", "floor ms",
                 "step / floor", "status"]


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as text cells under :data:`TABLE_HEADERS` (timing cells empty for cases not run)."""
    lines = []
    for row in rows:
        ok = row["status"] == "ok"
        lines.append([row["method"], f"{row['classes']:,}", f"{row['logit_columns']:,}",
                      f"{row['step_ms']:.1f}" if ok else "", f"{row['img_s']:,.0f}" if ok else "",
                      f"{row['peak_bytes'] / 2**30:.2f}" if ok else "",
                      f"{row['estimate_bytes'] / 2**30:.2f}", f"{row['floor_ms']:.1f}" if ok else "",
                      f"{row['step_over_floor']:.2f}" if ok else "", row["status"]])
    return lines


def profile_markdown(rows: list[dict[str, Any]]) -> str:
    """``rows`` of a ``head-profile`` record as a Markdown table (also what ``bench profile`` prints)."""
    return tabulate(table_cells(rows), headers=TABLE_HEADERS, tablefmt="pipe", disable_numparse=True)


def profile_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the newest profile record per device ("" when there is none)."""
    md, tex = [], []
    for record in profile_records(records):
        config = record["config"]
        title = (f"Head cost vs classes ({config.get('device')}, batch {config.get('batch_size')}, embedding "
                 f"{config.get('embedding_size')}, memory budget {config.get('memory_budget_gib')} GiB)")
        note = ("One step = the head's logits, loss, backward and state update on fixed random embeddings "
                "(`bench profile`); median of the timed steps; peak = process peak RSS on CPU (whole process), "
                "CUDA max allocated on GPU; step / floor = step time over the time of its bare matrix products; "
                "`over budget`: estimated memory above the budget, not run.")
        rows = record["metrics"]["head-profile"]["rows"]
        lines = table_cells(rows)
        md += [f"## {title}\n", note + "\n", provenance_line(record) + "\n", profile_markdown(rows) + "\n"]
        tex += [f"% {latex_escape(title)}\n% {provenance_line(record)}\n",
                "\\begin{tabular}{l" + "r" * (len(TABLE_HEADERS) - 2) + "l}\n\\toprule\n",
                " & ".join(latex_escape(h) for h in TABLE_HEADERS) + " \\\\\n\\midrule\n",
                *(" & ".join(latex_escape(c) for c in line) + " \\\\\n" for line in lines),
                "\\bottomrule\n\\end{tabular}\n"]
    return "\n".join(md), "".join(tex)
