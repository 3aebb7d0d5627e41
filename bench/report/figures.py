"""Figures from run records (matplotlib + seaborn), PNG and PDF, one style, for ``bench report``.

Every figure is drawn from the runs the tables show (:func:`bench.report.runs.select_runs`: per
configuration key the newest configuration, the newest run per seed) and carries their provenance line.
A method keeps one colour and marker in every figure. With several seeds, lines are the mean over seeds
with a band of +- one std, points have error bars of +- one std; with one seed there is no band.

Per group of comparable runs (dataset, split, backbone, budget), ``<slug>`` = ``dataset-split-backbone-budget``:

- ``roc-<protocol>-<slug>``: the ROC of each protocol that stores one (``roc`` in its metrics; IJB's
  ``1:1``), all methods overlaid on a log-FAR axis;
- ``tar-at-far-<slug>``: TAR at each protocol's target FARs, one panel per protocol;
- ``training-<slug>``: loss and learning rate against samples seen (``train.jsonl``);
- ``cost-<slug>``: throughput against peak memory, and the headline accuracy against throughput;
- ``long-tail-<slug>``: ``synth-tail`` rank-1 per bucket of training images per identity;
- ``edc-<slug>``: ``synth-quality``'s error-versus-discard curves (FNMR against the fraction of genuine
  comparisons discarded by quality), one panel per method, one line per quality score, the pAUC range shaded;

and ``profile-<device>``: images/s and peak memory against the number of classes (``bench profile``).

:func:`draw_figures` draws them one at a time from records already read (``bench report`` reads each
record once); :func:`write_figures` stages each as PNG and PDF
(:class:`bench.report.staging.StagedFiles`: the report's files are replaced all or none) and closes it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.report.quality_report import SCORE_ORDER, edc_runs, pauc_limit  # noqa: E402
from bench.report.staging import StagedFiles  # noqa: E402
from bench.report.runs import (  # noqa: E402
    GROUP_COLUMNS,
    is_run_record,
    metric_columns,
    profile_records,
    provenance,
    provenance_line,
    record_row,
    select_runs,
)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
BUCKETS = ("tail", "middle", "head")
FIGURE_WIDTH = 7.0  # inches: a two-column paper's text width


@dataclass
class Drawing:
    """A drawn figure, not yet saved: what the tests inspect (its axes' lines, markers and legend)."""
    figure: plt.Figure
    name: str  # file stem
    caption: str


@dataclass
class Figure:
    """A saved figure: its PNG and PDF files."""
    name: str
    caption: str
    png: Path
    pdf: Path


def apply_style() -> None:
    """The one style of every FaceBench figure."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15)
    plt.rcParams.update({"savefig.dpi": 150, "savefig.bbox": "tight", "savefig.pad_inches": 0.08,
                         "pdf.fonttype": 42, "axes.titlesize": 11, "axes.titleweight": "bold",
                         "legend.fontsize": 9, "legend.framealpha": 0.9})


class Styles:
    """A fixed colour and marker per method (sorted names), shared by all figures of a report."""

    def __init__(self, methods: Iterable[str]) -> None:
        names = sorted({str(m) for m in methods})
        palette = sns.color_palette("colorblind", max(len(names), 1))
        self.colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
        self.marker = {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(names)}

    def __call__(self, method: str) -> dict[str, Any]:
        return {"color": self.colour.get(method, "0.3"), "marker": self.marker.get(method, "o")}


def _footer(fig: plt.Figure, text: str) -> None:
    """The provenance line under the figure (outside the axes; ``bbox_inches='tight'`` keeps it)."""
    width = int(fig.get_figwidth() * 16)  # characters of 6.5-pt text per line
    fig.text(0.0, -0.01, textwrap.fill(text, width), ha="left", va="top", fontsize=6.5, color="0.35",
             transform=fig.transFigure)


def _legend_right(fig: plt.Figure, ax: plt.Axes) -> None:
    """The methods' legend outside the axes, on the right (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k written as plain numbers (no 7x10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def save_figure(drawing: Drawing, out_dir: Path, files: StagedFiles) -> Figure:
    """Stage ``drawing`` as ``<name>.png`` and ``<name>.pdf`` under ``out_dir`` and close it."""
    png, pdf = out_dir / f"{drawing.name}.png", out_dir / f"{drawing.name}.pdf"
    try:
        for path, kind in ((png, "png"), (pdf, "pdf")):
            files.write(path, lambda handle, kind=kind: drawing.figure.savefig(handle, format=kind))
    finally:
        plt.close(drawing.figure)
    return Figure(drawing.name, drawing.caption, png, pdf)


def _slug(group: tuple) -> str:
    return "-".join(str(v) for v in group).replace("/", "_").replace(" ", "_")


def _group_title(group: tuple) -> str:
    dataset, split, backbone, budget = group
    return f"{dataset}, {split} split, {backbone}, {int(budget):,} samples"


def _mean_band(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    stacked = np.vstack(curves)
    return stacked.mean(axis=0), (stacked.std(axis=0, ddof=1) if len(curves) >= 2 else None)


def _legend_label(method: str, seeds: int) -> str:
    return f"{method} (n={seeds})" if seeds > 1 else method


# ----------------------------------------------------------------------------------------------------
# Per-group figures
# ----------------------------------------------------------------------------------------------------


def _roc_of(values: Any) -> dict[str, Any] | None:
    if not isinstance(values, dict):
        return None
    if isinstance(values.get("roc"), dict):
        return values["roc"]
    inner = values.get("1:1")
    return inner.get("roc") if isinstance(inner, dict) and isinstance(inner.get("roc"), dict) else None


def _tars_of(values: Any) -> dict[str, float] | None:
    if not isinstance(values, dict):
        return None
    tars = values.get("tar_at_far")
    return tars if isinstance(tars, dict) and tars else None


def roc_figures(runs: dict[str, list[dict]], group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    protocols = sorted({p for records in runs.values() for r in records for p, v in (r["metrics"] or {}).items()
                        if _roc_of(v) is not None})
    figures = []
    for protocol in protocols:
        fig, ax = plt.subplots(figsize=(FIGURE_WIDTH * 0.75, 3.6), layout="constrained")
        lowest = 1.0
        for method, records in sorted(runs.items()):
            rocs = [_roc_of((r["metrics"] or {}).get(protocol)) for r in records]
            rocs = [roc for roc in rocs if roc is not None]
            if not rocs:
                continue
            style = styles(method)
            grids = {tuple(roc["far"]) for roc in rocs}
            if len(grids) == 1:
                far = np.asarray(rocs[0]["far"])
                mean, band = _mean_band([100 * np.asarray(roc["tar"]) for roc in rocs])
                ax.plot(far, mean, color=style["color"], lw=1.6, label=_legend_label(method, len(rocs)))
                if band is not None:
                    ax.fill_between(far, mean - band, mean + band, color=style["color"], alpha=0.18, lw=0)
            else:  # different pair sets per seed: draw each
                for i, roc in enumerate(rocs):
                    ax.plot(roc["far"], 100 * np.asarray(roc["tar"]), color=style["color"], lw=1.0, alpha=0.8,
                            label=_legend_label(method, len(rocs)) if i == 0 else None)
            lowest = min(lowest, min(min(roc["far"]) for roc in rocs))
        ax.set_xscale("log")
        ax.set_xlim(lowest, 1.0)
        ax.set_ylim(0, 101)
        ax.set_xlabel("False accept rate, FAR (log scale)")
        ax.set_ylabel("True accept rate, TAR (%)")
        ax.set_title(f"ROC: {protocol}")
        _legend_right(fig, ax)
        _footer(fig, f"{_group_title(group)}. {footer}")
        name = f"roc-{protocol}-{_slug(group)}"
        figures.append(Drawing(fig, name, f"ROC of {protocol}, {_group_title(group)}; all methods, "
                                          f"log-FAR axis (band: ± 1 std over seeds)."))
    return figures


def tar_figure(runs: dict[str, list[dict]], group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    protocols = sorted({p for records in runs.values() for r in records for p, v in (r["metrics"] or {}).items()
                        if _tars_of(v) is not None})
    if not protocols:
        return []
    fig, axes = plt.subplots(1, len(protocols), figsize=(min(FIGURE_WIDTH, 3.4 * len(protocols) + 0.4), 3.4),
                             layout="constrained", squeeze=False)
    methods = sorted(runs)
    for ax, protocol in zip(axes[0], protocols):
        for index, method in enumerate(methods):
            points: dict[float, list[float]] = {}
            for record in runs[method]:
                for far, tar in (_tars_of((record["metrics"] or {}).get(protocol)) or {}).items():
                    points.setdefault(float(far), []).append(100 * float(tar))
            if not points:
                continue
            fars = np.array(sorted(points))
            means = np.array([np.mean(points[f]) for f in fars])
            sds = np.array([np.std(points[f], ddof=1) if len(points[f]) >= 2 else 0.0 for f in fars])
            # a small horizontal dodge per method, so error bars of one FAR do not hide each other
            dodge = 10 ** ((index - (len(methods) - 1) / 2) * 0.04)
            style = styles(method)
            ax.errorbar(fars * dodge, means, yerr=sds, color=style["color"], marker=style["marker"], ms=5, lw=1.0,
                        capsize=3, label=_legend_label(method, len(runs[method])))
        ax.set_xscale("log")
        ax.set_xlabel("FAR (log scale)")
        ax.set_ylabel("TAR (%)")
        ax.set_title(f"TAR@FAR: {protocol}")
        ax.margins(x=0.15)
    _legend_right(fig, axes[0][0])
    _footer(fig, f"TAR at each protocol's target FARs; {_group_title(group)}. {footer}")
    return [Drawing(fig, f"tar-at-far-{_slug(group)}",
                    f"TAR at each protocol's target FARs, {_group_title(group)} (error bars: ± 1 std over seeds).")]


def _curve(records: list[dict], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    curves = [[(e["samples"], e[field]) for e in (r.get("train") or []) if field in e and "samples" in e]
              for r in records]
    curves = [c for c in curves if c]
    if not curves:
        return None
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        curves = [c[:min(lengths)] for c in curves]
    x = np.array([s for s, _ in curves[0]], dtype=float)
    mean, band = _mean_band([np.array([v for _, v in c], dtype=float) for c in curves])
    return x, mean, band


def training_figure(runs: dict[str, list[dict]], group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 3.2), layout="constrained")
    drawn = False
    for method, records in sorted(runs.items()):
        style = styles(method)
        for ax, field in ((loss_ax, "loss"), (lr_ax, "lr")):
            curve = _curve(records, field)
            if curve is None:
                continue
            x, mean, band = curve
            ax.plot(x / 1000, mean, color=style["color"], lw=1.4, label=_legend_label(method, len(records)))
            if band is not None:
                ax.fill_between(x / 1000, mean - band, mean + band, color=style["color"], alpha=0.18, lw=0)
            drawn = True
    if not drawn:
        plt.close(fig)
        return []
    loss_ax.set_ylabel("Training loss (method's own, nats)")
    lr_ax.set_ylabel("Learning rate")
    for ax, title in ((loss_ax, "Loss"), (lr_ax, "Learning-rate schedule")):
        ax.set_xlabel("Samples seen (thousands)")
        ax.set_title(title)
    _legend_right(fig, loss_ax)
    _footer(fig, f"{_group_title(group)}. Losses of different methods are on different scales. {footer}")
    return [Drawing(fig, f"training-{_slug(group)}",
                    f"Training curves (train.jsonl), {_group_title(group)}: loss and learning rate against samples "
                    f"seen (band: ± 1 std over seeds).")]


def cost_figure(rows: pd.DataFrame, group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    quality = [c for c in metric_columns(rows) if c.endswith(" acc")] or metric_columns(rows)
    headline = next((c for c in quality if rows[c].notna().any()), None)
    panels = 2 if headline else 1
    fig, axes = plt.subplots(1, panels, figsize=(FIGURE_WIDTH if panels == 2 else 4.2, 3.3), layout="constrained",
                             squeeze=False)
    for method, runs in rows.groupby("method", sort=True):
        style = styles(method)
        label = _legend_label(method, len(runs))

        def stat(column: str, scale: float = 1.0) -> tuple[float, float]:
            values = pd.to_numeric(runs[column], errors="coerce").dropna() * scale
            return float(values.mean()), float(values.std(ddof=1)) if len(values) >= 2 else 0.0

        memory, memory_sd = stat("peak MiB")
        speed, speed_sd = stat("img/s")
        axes[0][0].errorbar(memory, speed, xerr=memory_sd, yerr=speed_sd, ls="none", ms=7, capsize=3,
                            label=label, **style)
        if headline:
            accuracy, accuracy_sd = stat(headline, 100.0)
            axes[0][1].errorbar(speed, accuracy, xerr=speed_sd, yerr=accuracy_sd, ls="none", ms=7, capsize=3,
                                label=label, **style)
    axes[0][0].set_xlabel("Peak memory (MiB)")
    axes[0][0].set_ylabel("Training throughput (images/s)")
    axes[0][0].set_title("Throughput vs memory")
    if headline:
        axes[0][1].set_xlabel("Training throughput (images/s)")
        axes[0][1].set_ylabel(f"{headline.replace(' acc', ' accuracy')} (%)")
        axes[0][1].set_title("Accuracy vs throughput")
    for ax in axes[0]:
        ax.margins(0.2)
    _legend_right(fig, axes[0][0])
    _footer(fig, f"{_group_title(group)}. Peak memory: CUDA max allocated, or process peak RSS on CPU. {footer}")
    return [Drawing(fig, f"cost-{_slug(group)}",
                    f"Cost per method, {_group_title(group)}: throughput against peak memory, and accuracy against "
                    f"throughput (error bars: ± 1 std over seeds).")]


def long_tail_figure(runs: dict[str, list[dict]], group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    per_method: dict[str, dict[str, list[float]]] = {}
    bucket_info: dict[str, dict[str, Any]] = {}
    for method, records in runs.items():
        for record in records:
            tail = (record["metrics"] or {}).get("synth-tail")
            if not isinstance(tail, dict) or "buckets" not in tail:
                continue
            for bucket, values in tail["buckets"].items():
                if values.get("rank1") is not None:
                    per_method.setdefault(method, {}).setdefault(bucket, []).append(100 * values["rank1"])
                    bucket_info[bucket] = values
    buckets = [b for b in BUCKETS if b in bucket_info]
    if not per_method or not buckets:
        return []
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH * 0.8, 3.4), layout="constrained")
    methods = sorted(per_method)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        x = np.arange(len(buckets)) + (i - (len(methods) - 1) / 2) * width
        values = [per_method[method].get(b, []) for b in buckets]
        means = [np.mean(v) if v else np.nan for v in values]
        sds = [np.std(v, ddof=1) if len(v) >= 2 else 0.0 for v in values]
        style = styles(method)
        ax.bar(x, means, width=width * 0.92, yerr=sds, capsize=3, color=style["color"], edgecolor="white",
               label=_legend_label(method, len(runs[method])))
    labels = []
    for b in buckets:
        info = bucket_info[b]["train_images"]
        span = f"{info['min']}+" if info["max"] is None else (f"{info['min']}" if info["min"] == info["max"]
                                                             else f"{info['min']}-{info['max']}")
        labels.append(f"{b}\n{span} images\n{bucket_info[b]['num_identities']} ids")
    ax.set_xticks(np.arange(len(buckets)), labels)
    ax.set_ylabel("Rank-1 of held-out images (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Long-tail diagnostic (synth-tail)")
    ax.set_xlabel("Bucket: training images per identity, identities evaluated")
    _legend_right(fig, ax)
    _footer(fig, f"{_group_title(group)}. Closed-set rank-1 of unseen images of training identities against the "
                 f"identities' mean embeddings, by training images per identity. {footer}")
    return [Drawing(fig, f"long-tail-{_slug(group)}",
                    f"Long-tail diagnostic, {_group_title(group)}: rank-1 of held-out images of training identities "
                    f"per bucket of training images per identity (error bars: ± 1 std over seeds).")]


def edc_figure(runs: dict[str, list[dict]], group: tuple, styles: Styles, footer: str) -> list[Drawing]:
    """``synth-quality``'s EDCs: one panel per method, one line per quality score (mean over seeds, band
    ± one std when the seeds share a discard grid), the pAUC discard range shaded."""
    per_method = {method: edc_runs(records) for method, records in sorted(runs.items())}
    per_method = {method: curves for method, curves in per_method.items() if curves}
    if not per_method:
        return []
    everywhere = list(dict.fromkeys(score for curves in per_method.values() for score in curves))
    everywhere = [s for s in SCORE_ORDER if s in everywhere] + [s for s in everywhere if s not in SCORE_ORDER]
    scores = [s for s in everywhere if s != "random"]
    palette = dict(zip(scores, sns.color_palette("colorblind", max(len(scores), 1))))
    limit = pauc_limit([r for records in runs.values() for r in records])
    columns = min(len(per_method), 3)
    rows = -(-len(per_method) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(min(FIGURE_WIDTH, 2.6 * columns + 1.2), 2.6 * rows + 0.4),
                             layout="constrained", squeeze=False, sharey=True)
    for ax, (method, curves) in zip(axes.flat, per_method.items()):
        if limit:
            ax.axvspan(0, 100 * limit, color="0.85", alpha=0.6, lw=0, label=f"pAUC range (0-{100 * limit:g} %)")
        for score, series in curves.items():
            style = {"color": "0.45", "ls": "--"} if score == "random" else {"color": palette[score], "ls": "-"}
            if len({tuple(d) for d, _ in series}) == 1:
                mean, band = _mean_band([100 * np.asarray(f) for _, f in series])
                x = 100 * np.asarray(series[0][0])
                ax.plot(x, mean, lw=1.4, label=score, **style)
                if band is not None:
                    ax.fill_between(x, mean - band, mean + band, color=style["color"], alpha=0.18, lw=0)
            else:  # different discard grids per seed: draw each
                for i, (discard, fnmr) in enumerate(series):
                    ax.plot(100 * np.asarray(discard), 100 * np.asarray(fnmr), lw=1.0, alpha=0.8,
                            label=score if i == 0 else None, **style)
        ax.set_title(_legend_label(method, len(runs[method])))
        ax.set_ylim(bottom=0)
    for ax in axes.flat[len(per_method):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("FNMR (%)")
    fig.supxlabel("Genuine comparisons discarded by quality (%)")
    legend: dict[str, Any] = {}  # every panel's scores (a method without quality estimation has no "ri")
    for ax in axes.flat[:len(per_method)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [label for label in legend if label not in everywhere] + [s for s in everywhere if s in legend]
    fig.legend([legend[label] for label in labels], labels, loc="outside right upper", frameon=False)
    _footer(fig, f"{_group_title(group)}. Error-versus-discard characteristic of each quality score: FNMR of the "
                 f"genuine comparisons kept after discarding the lowest pairwise quality (the lower of the two "
                 f"images'), at the threshold fixed on all impostor comparisons. {footer}")
    return [Drawing(fig, f"edc-{_slug(group)}",
                    f"Face quality (synth-quality), {_group_title(group)}: FNMR against the fraction of genuine "
                    f"comparisons discarded by each quality score, per method (band: ± 1 std over seeds; shaded: "
                    f"the pAUC range).")]


# ----------------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------------


def profile_figure(record: dict[str, Any], styles: Styles) -> Drawing:
    config = record["config"]
    rows = record["metrics"]["head-profile"]["rows"]
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 3.6), layout="constrained")
    over_drawn = False
    for method in dict.fromkeys(r["method"] for r in rows):
        style = styles(method)
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        over = [r for r in rows if r["method"] == method and r["status"] != "ok"]
        if ok:
            classes = [r["classes"] for r in ok]
            speed_ax.plot(classes, [r["img_s"] for r in ok], lw=1.4, ms=5, label=method, **style)
            memory_ax.plot(classes, [r["peak_bytes"] / 2**30 for r in ok], lw=1.4, ms=5, label=method, **style)
        if over:
            memory_ax.plot([r["classes"] for r in over], [r["estimate_bytes"] / 2**30 for r in over], ls="none",
                           ms=7, marker=style["marker"], mfc="none", mec=style["color"], mew=1.4)
            over_drawn = True
    budget = float(config.get("memory_budget_gib", 0) or 0)
    if budget:
        memory_ax.axhline(budget, color="0.3", ls="--", lw=1.0)
    for ax in (speed_ax, memory_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Classes (log scale)")
        _plain_log_ticks(ax.yaxis)
    speed_ax.set_ylabel("Head throughput (images/s, log)")
    speed_ax.set_title("Speed")
    memory_ax.set_ylabel("Peak memory (GiB, log)")
    memory_ax.set_title("Memory")
    handles, labels = speed_ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if budget:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1.0))
        labels.append(f"budget {budget:g} GiB")
    if over_drawn:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec="0.3", mew=1.4, ms=7))
        labels.append("over budget\n(estimate, not run)")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    device = str(config.get("device"))
    peak = "process peak RSS (whole process)" if device.startswith("cpu") else "CUDA max allocated"
    _footer(fig, f"Head cost vs classes on {device}: batch {config.get('batch_size')}, embedding "
                 f"{config.get('embedding_size')}, float32. One step = logits, loss, backward and state update of "
                 f"the head on fixed random embeddings; memory: {peak}. {provenance_line(record)}")
    name = f"profile-{device.replace(':', '')}"
    return Drawing(fig, name, f"Head cost against the number of classes on {device} (`bench profile`): "
                              f"images/s and peak memory; hollow markers: estimated need of cases over the "
                              f"memory budget (not run).")


# ----------------------------------------------------------------------------------------------------


def draw_figures(records: list[dict[str, Any]]) -> Iterator[Drawing]:
    """Every figure ``records`` support, drawn one after another (a generator: the caller saves and
    closes each before the next is drawn)."""
    apply_style()
    runs_by_id = {r["run_id"]: r for r in records if is_run_record(r)}
    rows = pd.DataFrame([record_row(r) for r in runs_by_id.values()])
    profiles = profile_records(records)
    methods = list(rows["method"].dropna()) if not rows.empty else []
    methods += [row["method"] for p in profiles for row in p["metrics"]["head-profile"]["rows"]]
    styles = Styles(methods)
    if not rows.empty:
        selected = select_runs(rows)
        for group, group_rows in selected.groupby(GROUP_COLUMNS, sort=True, dropna=False):
            runs = {str(m): [runs_by_id[i] for i in g["run_id"]] for m, g in group_rows.groupby("method", sort=True)}
            footer = provenance(group_rows)
            yield from roc_figures(runs, group, styles, footer)
            yield from tar_figure(runs, group, styles, footer)
            yield from training_figure(runs, group, styles, footer)
            yield from cost_figure(group_rows, group, styles, footer)
            yield from long_tail_figure(runs, group, styles, footer)
            yield from edc_figure(runs, group, styles, footer)
    for record in profiles:
        yield profile_figure(record, styles)


def write_figures(records: list[dict[str, Any]], out_dir: Path, files: StagedFiles) -> list[Figure]:
    """Draw every figure ``records`` support and stage its PNG and PDF under ``out_dir``; returns them."""
    return [save_figure(drawing, out_dir, files) for drawing in draw_figures(records)]
