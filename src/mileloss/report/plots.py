"""Matplotlib figures of the report (Agg backend, PNG): one colour per loss, the same colour for every seed.

- ``curves.png``: training loss and validation loss against training tokens.
- ``bucket_ppl.png``: perplexity per frequency bucket (grouped bars, log scale) and its change vs CE in %, with
  the paired 95 % bootstrap interval as error bars where the runs have ``eval/blocks.npz``.
- ``histograms.png``: distribution of the prediction entropy H and of the weight of each run's own loss.
- ``benchmarks.png``: accuracy (TriviaQA: exact match) per task.

Each function returns the written path, or None when no run has the data the figure needs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from mileloss.report.intervals import GroupIntervals  # noqa: E402
from mileloss.report.runs import RunGroup  # noqa: E402
from mileloss.report.tables import Stat, reference_group, reported_buckets, task_names  # noqa: E402
from mileloss.run_folder import write_atomic  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["group_colors", "plot_benchmarks", "plot_bucket_perplexity", "plot_curves", "plot_histograms",
           "write_plots"]

# ce, focal, mile get fixed hues so every report reads the same way; other groups take the next colours
KIND_COLORS = {"ce": "#1f77b4", "focal": "#ff7f0e", "mile": "#2ca02c"}
EXTRA_COLORS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
DPI = 110


def group_colors(groups: list[RunGroup]) -> dict[str, str]:
    """Colour of each group: the loss kind's hue for the first group of a kind, distinct colours after."""
    colors, used, extra = {}, set(), iter(EXTRA_COLORS * 4)
    for group in groups:
        color = KIND_COLORS.get(group.loss_kind)
        if color is None or color in used:
            color = next(extra)
        used.add(color)
        colors[group.label] = color
    return colors


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=DPI)
    plt.close(fig)
    write_atomic(path, image.getvalue())
    logger.info("wrote %s", path)
    return path


def plot_curves(groups: list[RunGroup], out: Path) -> Path | None:
    """Training loss (left) and validation loss (right) against tokens seen."""
    if not any(run.train or run.val for g in groups for run in g.runs):
        return None
    colors = group_colors(groups)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for group in groups:
        for index, run in enumerate(group.runs):
            label = group.label if index == 0 else None
            if run.train:
                x = [line.get("tokens", line["step"]) for line in run.train]
                left.plot(x, [line["loss"] for line in run.train], color=colors[group.label], lw=1.2,
                          alpha=0.9 if len(group.runs) == 1 else 0.6, label=label)
            if run.val:
                x = [line.get("tokens", line["step"]) for line in run.val]
                right.plot(x, [line["val_loss"] for line in run.val], "o-", color=colors[group.label], lw=1.2,
                           ms=3, alpha=0.9 if len(group.runs) == 1 else 0.6, label=label)
    for axis, title in ((left, "training loss (each run's own objective)"),
                        (right, "validation loss (cross-entropy)")):
        axis.set_title(title)
        axis.set_xlabel("training tokens")
        axis.set_ylabel("loss (nats)")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=8)
    return _save(fig, out / "curves.png")


def _grouped_bars(axis, categories: list[str], groups: list[RunGroup], stats: dict[str, list[Stat]],
                  colors: dict[str, str], value_format: str,
                  bounds: dict[str, list[tuple[float, float] | None]] | None = None) -> None:
    """Bars of ``stats``' means with the standard deviation as error bars, or, where ``bounds`` gives a
    (low, high) pair for a bar, that interval instead."""
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(categories))
    for index, group in enumerate(groups):
        values = [s.mean if s.mean is not None else np.nan for s in stats[group.label]]
        spans = (bounds or {}).get(group.label) or [None] * len(values)
        below = [value - span[0] if span else (s.std or 0.0)
                 for value, span, s in zip(values, spans, stats[group.label], strict=True)]
        above = [span[1] - value if span else (s.std or 0.0)
                 for value, span, s in zip(values, spans, stats[group.label], strict=True)]
        errors = np.clip(np.nan_to_num([below, above]), 0.0, None)
        position = x - 0.4 + width * (index + 0.5)
        bars = axis.bar(position, values, width, yerr=errors, color=colors[group.label], label=group.label,
                        capsize=3 if errors.any() else 0)
        for bar, value, low, high in zip(bars, values, errors[0], errors[1], strict=True):
            if np.isfinite(value):  # label above the bar (below it for negative bars), clear of the error bar
                tip = value + high if value >= 0 else value - low
                axis.annotate(format(value, value_format), (bar.get_x() + bar.get_width() / 2, tip),
                              ha="center", va="bottom" if value >= 0 else "top", fontsize=7,
                              rotation=90 if len(groups) > 2 else 0,
                              xytext=(0, 2 if value >= 0 else -2), textcoords="offset points")
    axis.set_xticks(x, categories)
    axis.margins(y=0.18)  # headroom for the value labels
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)


def plot_bucket_perplexity(groups: list[RunGroup], metrics: dict[str, dict[str, Stat]], out: Path,
                           intervals: dict[str, GroupIntervals] | None = None) -> Path | None:
    """Per-bucket perplexity (log scale) and, when a CE run is present, its relative change vs CE: the paired
    change with its 95 % interval as error bars where ``intervals`` has one, else the change of the seed means
    with the seed standard deviation."""
    buckets = reported_buckets(groups)
    if not buckets:
        return None
    colors = group_colors(groups)
    groups = [g for g in groups if any(run.perplexity for run in g.runs)]
    keys = [f"ppl/{name}" for name, _ in buckets] + ["ppl/overall"]
    categories = [label for _, label in buckets] + ["overall"]
    reference = reference_group(groups)
    others = [g for g in groups if g is not reference]
    with_delta = reference is not None and others
    fig, axes = plt.subplots(1, 2 if with_delta else 1, figsize=(12 if with_delta else 7, 4.2), squeeze=False)
    axis = axes[0, 0]
    _grouped_bars(axis, categories, groups, {g.label: [metrics[g.label][k] for k in keys] for g in groups},
                  colors, ".4g")
    axis.set_yscale("log")
    # plain numbers at 1-2-5 steps instead of 2x10^2 style labels
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_ylabel("perplexity (log scale, lower is better)")
    axis.set_title("held-out perplexity by training-frequency bucket of the target")
    if with_delta:
        ref = metrics[reference.label]
        deltas, bounds = {}, {}
        for group in others:
            row, spans = [], []
            found = (intervals or {}).get(group.label)
            for key in keys:
                value, base = metrics[group.label][key], ref[key]
                interval = found.intervals.get(key.removeprefix("ppl/")) if found is not None else None
                if interval is not None:
                    row.append(Stat(interval.change, None, interval.num_pairs))
                    spans.append((interval.low, interval.high))
                    continue
                spans.append(None)
                if value.mean is None or base.mean is None:
                    row.append(Stat(None, None, 0))
                else:
                    std = 100 * value.std / base.mean if value.std is not None else None
                    row.append(Stat(100 * (value.mean - base.mean) / base.mean, std, value.n))
            deltas[group.label], bounds[group.label] = row, spans
        axis = axes[0, 1]
        _grouped_bars(axis, categories, others, deltas, colors, "+.2g", bounds)
        axis.axhline(0, color="black", lw=0.8)
        axis.set_ylabel(f"change vs {reference.label} (%; below 0 = better)")
        with_intervals = any(span for spans in bounds.values() for span in spans)
        axis.set_title(f"perplexity relative to {reference.label}"
                       + (" (paired, 95 % CI)" if with_intervals else ""))
    return _save(fig, out / "bucket_ppl.png")


def _weight_kind(run) -> str:
    """The loss whose weight a run's weight histogram holds (files from before ``loss_weight``: MiLe's)."""
    return str((run.perplexity.get("loss_weight") or {}).get("kind", "mile"))


def _usable(histogram: dict | None) -> bool:
    """Finite increasing edges and one finite, non-negative count per bin."""
    if not histogram:
        return False
    edges, counts = np.asarray(histogram["edges"], float), np.asarray(histogram["overall"], float)
    return (len(edges) >= 2 and len(counts) == len(edges) - 1 and bool(np.isfinite(edges).all())
            and bool((np.diff(edges) > 0).all()) and bool(np.isfinite(counts).all()) and bool((counts >= 0).all()))


def plot_histograms(groups: list[RunGroup], out: Path) -> Path | None:
    """Share of held-out tokens per entropy bin and per bin of the weight each run's own loss gives a token
    (summed over each group's seeds; cross-entropy runs, whose weight is always 1, are left out of the latter)."""
    colors = group_colors(groups)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for axis, key, xlabel in ((axes[0], "entropy", "prediction entropy H (nats)"),
                              (axes[1], "weight", "weight of the run's own loss: (σ + H)^γ, (1 − p)^γ")):
        occupied: list[float] = []  # edges of non-empty bins: zoom there, the bins stay the fixed ones
        for group in groups:
            runs = [run for run in group.runs if run.perplexity and (key == "entropy" or _weight_kind(run) != "ce")]
            histograms = [h for h in ((run.perplexity.get("histograms") or {}).get(key) for run in runs) if _usable(h)]
            if not histograms:
                continue
            edges = np.asarray(histograms[0]["edges"], float)
            counts = np.sum([h["overall"] for h in histograms if len(h["overall"]) == len(edges) - 1], axis=0)
            if counts.sum() == 0:
                continue
            axis.stairs(counts / counts.sum(), edges, color=colors[group.label], lw=1.6, label=group.label)
            nonzero = np.flatnonzero(counts)
            occupied += [edges[max(nonzero[0] - 1, 0)], edges[min(nonzero[-1] + 2, len(edges) - 1)]]
            drawn = True
        if occupied:
            axis.set_xlim(min(occupied), max(occupied))
        axis.set_xlabel(xlabel)
        axis.set_ylabel("share of held-out tokens")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=8)
    axes[0].set_title("entropy of the predicted distribution")
    axes[1].set_title("weight each run's loss gives a token (CE: always 1)")
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out / "histograms.png")


def plot_benchmarks(groups: list[RunGroup], metrics: dict[str, dict[str, Stat]], out: Path) -> Path | None:
    """Accuracy per benchmark task (exact match for TriviaQA), grouped bars."""
    tasks = task_names(groups)
    if not tasks:
        return None
    colors = group_colors(groups)
    groups = [g for g in groups if any(run.lm_eval for run in g.runs)]
    fig, axis = plt.subplots(figsize=(max(7, 1.3 * len(tasks) + 2), 4.2))
    _grouped_bars(axis, tasks, groups, {g.label: [metrics[g.label][f"bench/{t}"] for t in tasks] for g in groups},
                  colors, ".2f")
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy / exact match")
    shots = sorted({(r.lm_eval or {}).get("num_fewshot") for g in groups for r in g.runs} - {None})
    axis.set_title(f"downstream benchmarks ({'/'.join(str(s) for s in shots)}-shot)")
    plt.setp(axis.get_xticklabels(), rotation=20, ha="right")
    return _save(fig, out / "benchmarks.png")


FIGURES = ("curves", "bucket_ppl", "histograms", "benchmarks")
"""Every figure's name; ``<name>.png`` in the output folder."""


def write_plots(groups: list[RunGroup], metrics: dict[str, dict[str, Stat]], out: Path,
                intervals: dict[str, GroupIntervals] | None = None) -> dict[str, Path]:
    """Write every figure that has data into the existing folder ``out``; returns ``{name: path}`` in display order."""
    figures = {
        "curves": plot_curves(groups, out),
        "bucket_ppl": plot_bucket_perplexity(groups, metrics, out, intervals),
        "histograms": plot_histograms(groups, out),
        "benchmarks": plot_benchmarks(groups, metrics, out),
    }
    return {name: path for name, path in figures.items() if path is not None}
