"""The gamma sweep: per-bucket perplexity of MiLe against gamma (one line per sigma), with CE as the reference.

A report holds a sweep when it has at least two evaluated MiLe groups (runs differing only by seed, see
:func:`~mileloss.report.runs.group_runs`) with different (gamma, sigma). Then it adds ``sweep.png`` (top: perplexity
per bucket and overall against gamma, seed mean ± sample standard deviation, CE as a dashed line; bottom, with
intervals: the paired change vs CE in % with its 95 % bootstrap interval), a table of the same numbers, and, for
gamma = 0 (where MiLe's weight (sigma + H)^0 is 1, so the loss is cross-entropy), whether those runs coincide with
the CE run of their seed: equal per-bucket and overall perplexities, or the largest difference.
"""

from __future__ import annotations

import dataclasses
import math

from mileloss.report.intervals import GroupIntervals
from mileloss.report.runs import RunGroup, RunRecord
from mileloss.report.tables import MISSING, Stat, Table, reference_group, reported_buckets

__all__ = ["SweepPoint", "coincidence_lines", "plot_sweep", "sweep_points", "sweep_table"]


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One MiLe group of a sweep."""

    gamma: float
    sigma: float
    group: RunGroup


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def sweep_points(groups: list[RunGroup]) -> list[SweepPoint]:
    """The evaluated MiLe groups sorted by (sigma, gamma) when they form a sweep (two or more distinct (gamma,
    sigma)), else []. Groups without ``eval/perplexity.json`` or whose gamma or sigma is not a number are left out."""
    points = []
    for group in groups:
        if group.loss_kind != "mile" or not any(run.perplexity for run in group.runs):
            continue
        loss = group.runs[0].loss
        gamma, sigma = _number(loss.get("gamma")), _number(loss.get("sigma"))
        if gamma is not None and sigma is not None:
            points.append(SweepPoint(gamma, sigma, group))
    if len({(p.gamma, p.sigma) for p in points}) < 2:
        return []
    return sorted(points, key=lambda p: (p.sigma, p.gamma))


def _ppl_values(run: RunRecord) -> dict[str, float | None]:
    perplexity = run.perplexity or {}
    values = {b["name"]: b.get("ppl") for b in perplexity.get("buckets", [])}
    values["overall"] = (perplexity.get("overall") or {}).get("ppl")
    return values


def coincidence_lines(groups: list[RunGroup]) -> list[str]:
    """For every MiLe group with gamma = 0: does each run give exactly the perplexities (every bucket and overall)
    of the CE run with its seed? One line per group."""
    reference = reference_group(groups)
    if reference is None:
        return []
    by_seed = {str(run.seed): run for run in reference.runs if run.perplexity}
    lines = []
    for group in groups:
        if group.loss_kind != "mile" or _number(group.runs[0].loss.get("gamma")) != 0.0:
            continue
        equal, unpaired, worst = [], [], 0.0
        for run in group.runs:
            partner = by_seed.get(str(run.seed))
            if run.perplexity is None or partner is None:
                unpaired.append(str(run.seed))
                continue
            mine, theirs = _ppl_values(run), _ppl_values(partner)
            if mine == theirs:
                equal.append(str(run.seed))
                continue
            for key, value in mine.items():
                other = theirs.get(key)
                if value is not None and other:
                    worst = max(worst, abs(100 * (value - other) / other))
        compared = [str(run.seed) for run in group.runs if str(run.seed) not in unpaired]
        if not compared:
            lines.append(f"{group.label} (γ = 0, i.e. cross-entropy): no evaluated CE run of the same seed to "
                         f"compare with")
        elif len(equal) == len(compared):
            lines.append(f"{group.label} (γ = 0, i.e. cross-entropy) coincides with CE: per-bucket and overall "
                         f"perplexities are identical for seed{'s' if len(equal) > 1 else ''} {', '.join(equal)}")
        else:
            lines.append(f"{group.label} (γ = 0, i.e. cross-entropy) does not coincide exactly with CE: per-bucket "
                         f"perplexities differ by up to {worst:.3g} % (identical for "
                         f"{len(equal)} of {len(compared)} seeds)")
    return lines


def _interval(intervals: dict[str, GroupIntervals] | None, group: RunGroup, key: str):
    found = (intervals or {}).get(group.label)
    return found.intervals.get(key) if found is not None else None


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def sweep_table(points: list[SweepPoint], groups: list[RunGroup], metrics: dict[str, dict[str, Stat]],
                intervals: dict[str, GroupIntervals] | None) -> Table:
    """One row per (sigma, gamma), CE first: seeds, perplexity per bucket and overall (mean ± sd over seeds), and
    the paired change vs CE with its 95 % interval."""
    buckets = [*reported_buckets(groups), ("overall", "overall")]
    header = ["loss", "σ", "γ", "seeds", *[f"ppl {label}" for _, label in buckets]]
    if intervals is not None:
        header += [f"vs CE {label} (95 % CI)" for _, label in buckets]
    rows = []
    reference = reference_group(groups)
    if reference is not None:
        rows.append(["CE", "—", "—", ", ".join(str(s) for s in reference.seeds),
                     *[metrics[reference.label][f"ppl/{name}"].format(".3f") for name, _ in buckets],
                     *(["reference"] * len(buckets) if intervals is not None else [])])
    for point in points:
        stats = metrics[point.group.label]
        row = [point.group.label, f"{point.sigma:g}", f"{point.gamma:g}", ", ".join(str(s) for s in point.group.seeds),
               *[stats[f"ppl/{name}"].format(".3f") for name, _ in buckets]]
        if intervals is not None:
            for name, _ in buckets:
                found = _interval(intervals, point.group, name)
                row.append(MISSING if found is None else
                           f"{_signed(found.change)} % [{_signed(found.low)}, {_signed(found.high)}]")
        rows.append(row)
    return Table(header, rows)


def plot_sweep(points: list[SweepPoint], groups: list[RunGroup], metrics: dict[str, dict[str, Stat]], out,
               intervals: dict[str, GroupIntervals] | None = None):
    """``sweep.png``: per bucket (columns), perplexity against gamma and, with intervals, the paired change vs CE
    with its 95 % interval; one line per sigma. Returns the path, or None without a sweep or evaluated runs."""
    from mileloss.report.plots import _save, plt  # the Agg backend is chosen there

    buckets = [*reported_buckets(groups), ("overall", "overall")]
    if not points or len(buckets) == 1:
        return None
    reference = reference_group(groups)
    with_ci = intervals is not None and any(_interval(intervals, p.group, name) is not None
                                            for p in points for name, _ in buckets)
    rows = 2 if with_ci else 1
    fig, axes = plt.subplots(rows, len(buckets), figsize=(3.6 * len(buckets), 3.4 * rows), squeeze=False)
    sigmas = sorted({p.sigma for p in points})
    colors = dict(zip(sigmas, ["#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf"] * 4, strict=False))
    for column, (name, label) in enumerate(buckets):
        top = axes[0, column]
        key = f"ppl/{name}"
        for sigma in sigmas:
            line = [p for p in points if p.sigma == sigma and metrics[p.group.label][key].mean is not None]
            if not line:
                continue
            top.errorbar([p.gamma for p in line], [metrics[p.group.label][key].mean for p in line],
                         yerr=[metrics[p.group.label][key].std or 0.0 for p in line], fmt="o-", capsize=3,
                         color=colors[sigma], label=f"MiLe σ={sigma:g}")
            if with_ci:
                found = [(p, _interval(intervals, p.group, name)) for p in line]
                found = [(p, i) for p, i in found if i is not None]
                if found:
                    axes[1, column].errorbar(
                        [p.gamma for p, _ in found], [i.change for _, i in found],
                        yerr=[[max(i.change - i.low, 0.0) for _, i in found],
                              [max(i.high - i.change, 0.0) for _, i in found]],
                        fmt="o-", capsize=3, color=colors[sigma], label=f"MiLe σ={sigma:g}")
        if reference is not None and metrics[reference.label][key].mean is not None:
            ce = metrics[reference.label][key]
            top.axhline(ce.mean, color="#1f77b4", ls="--", lw=1, label="CE")
            if ce.std:
                top.axhspan(ce.mean - ce.std, ce.mean + ce.std, color="#1f77b4", alpha=0.12)
        top.set_title(f"{label}")
        top.set_xlabel("γ")
        top.grid(alpha=0.3)
        if column == 0:
            top.set_ylabel("perplexity (lower is better)")
        if top.has_data():
            top.legend(fontsize=7)
        if with_ci:
            bottom = axes[1, column]
            bottom.axhline(0, color="black", lw=0.8)
            bottom.set_xlabel("γ")
            bottom.grid(alpha=0.3)
            if column == 0:
                bottom.set_ylabel("paired change vs CE (%, 95 % CI)")
    return _save(fig, out / "sweep.png")
