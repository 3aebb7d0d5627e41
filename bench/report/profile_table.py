"""The head-cost table of ``bench profile`` records (newest record per device), for ``bench report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.records import iter_records


def profile_records(results_dir: Path) -> list[dict[str, Any]]:
    """The newest complete ``bench profile`` record per device (oldest device first)."""
    newest: dict[str, dict[str, Any]] = {}
    for record in iter_records(results_dir):
        config = record.get("config") or {}
        if config.get("kind") == "profile" and "head-profile" in (record.get("metrics") or {}):
            newest[str(config.get("device"))] = record  # iter_records is sorted by run id: the last wins
    return list(newest.values())


def _rows(record: dict[str, Any]) -> list[list[str]]:
    lines = []
    for row in record["metrics"]["head-profile"]["rows"]:
        ok = row["status"] == "ok"
        lines.append([row["method"], f"{row['classes']:,}", f"{row['logit_columns']:,}",
                      f"{row['step_ms']:.1f}" if ok else "", f"{row['img_s']:,.0f}" if ok else "",
                      f"{row['peak_bytes'] / 2**30:.2f}" if ok else "", f"{row['estimate_bytes'] / 2**30:.2f}",
                      f"{row['step_over_floor']:.2f}" if ok else "", row["status"]])
    return lines


HEADERS = ["method", "classes", "logit columns", "step ms", "img/s", "peak GiB", "estimate GiB", "step / floor",
           "status"]


def provenance_line(record: dict[str, Any]) -> str:
    env, config = record.get("env") or {}, record.get("config") or {}
    commit = str(env.get("git_commit") or "unknown")
    commit = commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
    detail = env.get("gpu") or env.get("cpu") or ""
    return (f"Provenance: git commit {commit}; record {record['run_id']}; device {config.get('device')}"
            f"{f' ({detail})' if detail else ''}, threads {config.get('threads', '?')}; "
            f"date {str(env.get('date', 'unknown'))[:16].replace('T', ' ')}.")


def profile_section(results_dir: Path) -> tuple[str, str]:
    """Markdown and LaTeX of the newest profile record per device ("" when there is none)."""
    from tabulate import tabulate

    from bench.report.tables import latex_escape

    md, tex = [], []
    for record in profile_records(results_dir):
        config = record["config"]
        title = (f"Head cost vs classes ({config.get('device')}, batch {config.get('batch_size')}, embedding "
                 f"{config.get('embedding_size')}, memory budget {config.get('memory_budget_gib')} GiB)")
        note = ("One step = the head's logits, loss, backward and state update on fixed random embeddings "
                "(`bench profile`); median of the timed steps; peak = process peak RSS on CPU (whole process), "
                "CUDA max allocated on GPU; step / floor = step time over the time of its bare matrix products; "
                "`over budget`: estimated memory above the budget, not run.")
        lines = _rows(record)
        md += [f"## {title}\n", note + "\n", provenance_line(record) + "\n",
               tabulate(lines, headers=HEADERS, tablefmt="pipe", disable_numparse=True) + "\n"]
        tex += [f"% {latex_escape(title)}\n% {provenance_line(record)}\n",
                "\\begin{tabular}{l" + "r" * (len(HEADERS) - 2) + "l}\n\\toprule\n",
                " & ".join(latex_escape(h) for h in HEADERS) + " \\\\\n\\midrule\n",
                *(" & ".join(latex_escape(c) for c in line) + " \\\\\n" for line in lines),
                "\\bottomrule\n\\end{tabular}\n"]
    return "\n".join(md), "".join(tex)
