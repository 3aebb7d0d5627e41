"""Hand-written run records for the report and check tests (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_record(results: Path, name: str, method: str, seed: int, accuracy: float, tar: float,
                 img_s: float = 1000.0, peak_mib: float = 500.0, split: str = "shallow", budget: int = 1000,
                 lr: float = 0.1, extra_metrics: dict[str, Any] | None = None, fold_std: float = 0.01,
                 commit: str = "abcdef1234567890", roc: bool = True) -> Path:
    """One complete run directory ``results/<name>`` with the files ``bench report`` reads."""
    directory = Path(results) / name
    directory.mkdir(parents=True)
    config = {"methods": [method], "method_params": {}, "method": method, "run_id": name, "group": "g",
              "data": {"dataset": "synthface", "split": {"name": split}},
              "train": {"backbone": "small", "budget": budget, "seed": seed, "lr": lr, "device": "cpu"},
              "eval": {"protocols": ["synth-lfw"]}, "config_fingerprint": f"fp{seed}"}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "env.json").write_text(json.dumps({"git_commit": commit, "device": "cpu", "cpu": "x86_64",
                                                    "date": "2026-01-01T00:00:00+00:00"}))
    (directory / "data.json").write_text("{}")
    (directory / "train.jsonl").write_text("".join(
        json.dumps({"step": s, "samples": 100 * s, "loss": 10.0 / s + seed, "lr": 0.1 * (1 - s / 5), "img_s": img_s})
        + "\n" for s in range(1, 5)))
    (directory / "perf.json").write_text(json.dumps({"throughput_img_s": img_s, "peak_memory_bytes": peak_mib * 2**20,
                                                     "train_wall_time_s": 10.0}))
    lfw: dict[str, Any] = {"accuracy": accuracy, "accuracy_std": fold_std, "tar_at_far": {"0.001": tar / 2, "0.01": tar}}
    if roc:
        lfw["roc"] = {"far": [0.001, 0.01, 0.1, 1.0], "tar": [tar / 2, tar, min(1.0, 2 * tar), 1.0]}
    (directory / "metrics.json").write_text(json.dumps({"synth-lfw": lfw, **(extra_metrics or {})}))
    return directory


def drawn_series(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    """``{legend label: (x, y)}`` of every labelled series an axes draws: lines (``plot``) and the data
    points of error bars (``errorbar``); unlabelled artists (bands, bar caps, reference lines) are left out."""
    series = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    series.update({c.get_label(): c.lines[0] for c in ax.containers if hasattr(c, "has_xerr")})
    return {label: ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for label, line in series.items()}


def legend_labels(figure: Any) -> list[str]:
    """The texts of a figure's legends (FaceBench puts one legend outside the axes, on the figure)."""
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]
