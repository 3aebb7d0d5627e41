"""The head-cost table of ``bench profile`` records (newest record per device), for ``bench report``."""

from __future__ import annotations

from typing import Any

from bench.profile import TABLE_HEADERS, table_cells


def profile_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest complete ``bench profile`` record per device among ``records`` (sorted by run id, as
    :func:`bench.records.iter_records` returns them; oldest device first)."""
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        config = record.get("config") or {}
        profile = (record.get("metrics") or {}).get("head-profile")
        if config.get("kind") == "profile" and isinstance(profile, dict) and isinstance(profile.get("rows"), list):
            newest[str(config.get("device"))] = record  # iter_records is sorted by run id: the last wins
    return list(newest.values())


def provenance_line(record: dict[str, Any]) -> str:
    env, config = record.get("env") or {}, record.get("config") or {}
    commit = str(env.get("git_commit") or "unknown")
    commit = commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
    detail = env.get("gpu") or env.get("cpu") or ""
    return (f"Provenance: git commit {commit}; record {record['run_id']}; device {config.get('device')}"
            f"{f' ({detail})' if detail else ''}, threads {config.get('threads', '?')}; "
            f"date {str(env.get('date', 'unknown'))[:16].replace('T', ' ')}.")


def profile_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and LaTeX of the newest profile record per device ("" when there is none)."""
    from tabulate import tabulate

    from bench.report.tables import latex_escape

    md, tex = [], []
    for record in profile_records(records):
        config = record["config"]
        title = (f"Head cost vs classes ({config.get('device')}, batch {config.get('batch_size')}, embedding "
                 f"{config.get('embedding_size')}, memory budget {config.get('memory_budget_gib')} GiB)")
        note = ("One step = the head's logits, loss, backward and state update on fixed random embeddings "
                "(`bench profile`); median of the timed steps; peak = process peak RSS on CPU (whole process), "
                "CUDA max allocated on GPU; step / floor = step time over the time of its bare matrix products; "
                "`over budget`: estimated memory above the budget, not run.")
        lines = table_cells(record["metrics"]["head-profile"]["rows"])
        md += [f"## {title}\n", note + "\n", provenance_line(record) + "\n",
               tabulate(lines, headers=TABLE_HEADERS, tablefmt="pipe", disable_numparse=True) + "\n"]
        tex += [f"% {latex_escape(title)}\n% {provenance_line(record)}\n",
                "\\begin{tabular}{l" + "r" * (len(TABLE_HEADERS) - 2) + "l}\n\\toprule\n",
                " & ".join(latex_escape(h) for h in TABLE_HEADERS) + " \\\\\n\\midrule\n",
                *(" & ".join(latex_escape(c) for c in line) + " \\\\\n" for line in lines),
                "\\bottomrule\n\\end{tabular}\n"]
    return "\n".join(md), "".join(tex)
