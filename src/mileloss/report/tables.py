"""Numbers of the report: per-group metrics (mean ± std over seeds), the side-by-side table and the verdict.

Every metric is gathered per run and aggregated per :class:`~mileloss.report.runs.RunGroup`; perplexities are
compared with the cross-entropy group as a relative change ``100 * (ppl - ppl_CE) / ppl_CE`` (negative =
better than CE), accuracies as a difference in points.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

from mileloss.report.intervals import GroupIntervals, format_interval
from mileloss.report.runs import RunGroup, RunRecord

__all__ = ["MISSING", "Stat", "Table", "reported_buckets", "comparison_table", "group_metrics", "interval_verdicts",
           "reference_group", "task_names", "verdict"]

MISSING = "—"


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one metric over the ``n`` runs of a group that have it."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))

    def format(self, spec: str = ".3f") -> str:
        if self.mean is None:
            return MISSING
        text = format(self.mean, spec)
        return f"{text} ± {format(self.std, spec)}" if self.std is not None else text


@dataclasses.dataclass
class Table:
    """A plain table: header cells and rows of text cells (rendered to Markdown or HTML by ``render``)."""

    header: list[str]
    rows: list[list[str]]
    section_rows: set[int] = dataclasses.field(default_factory=set)
    """Indices of rows that are section titles (one text cell spanning the table)."""


def reported_buckets(groups: list[RunGroup]) -> list[tuple[str, str]]:
    """``(name, label)`` of the frequency buckets, from the first run with ``perplexity.json``."""
    for group in groups:
        for run in group.runs:
            if run.perplexity:
                return [(b["name"], b.get("label", b["name"])) for b in run.perplexity["buckets"]]
    return []


def task_names(groups: list[RunGroup]) -> list[str]:
    """Benchmark tasks present in any run, in first-seen order."""
    names: dict[str, None] = {}
    for group in groups:
        for run in group.runs:
            for name in (run.lm_eval or {}).get("tasks", {}):
                names[name] = None
    return list(names)


def _bucket_value(run: RunRecord, name: str, field: str):
    for bucket in (run.perplexity or {}).get("buckets", []):
        if bucket["name"] == name:
            return bucket.get(field)
    return None


def _task_value(run: RunRecord, name: str):
    return (run.lm_eval or {}).get("tasks", {}).get(name, {}).get("value")


def group_metrics(group: RunGroup, buckets: list[tuple[str, str]], tasks: list[str]) -> dict[str, Stat]:
    """Every reported metric of a group as a :class:`Stat` keyed ``steps``, ``ppl/overall``, ``ppl/low``..."""
    getters: dict[str, Callable[[RunRecord], float | None]] = {
        "steps": lambda r: r.steps,
        "tokens": lambda r: r.tokens,
        "train_loss": lambda r: r.final_train_loss,
        "val_loss": lambda r: r.final_val_loss,
        "ppl/overall": lambda r: (r.perplexity or {}).get("overall", {}).get("ppl"),
        "accuracy": lambda r: (r.perplexity or {}).get("overall", {}).get("accuracy"),
        "ece": lambda r: (r.perplexity or {}).get("overall", {}).get("ece"),
        "entropy": lambda r: ((r.perplexity or {}).get("overall", {}).get("entropy") or {}).get("mean"),
        "bench/average": lambda r: _average([_task_value(r, t) for t in tasks if t != "triviaqa"]),
    }
    for name, _ in buckets:
        getters[f"ppl/{name}"] = lambda r, name=name: _bucket_value(r, name, "ppl")
    for task in tasks:
        getters[f"bench/{task}"] = lambda r, task=task: _task_value(r, task)
    return {key: Stat.of([get(run) for run in group.runs]) for key, get in getters.items()}


def _average(values: list) -> float | None:
    # an average over the tasks only when every task has a value, so groups stay comparable
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _relative(value: Stat, reference: Stat | None) -> str:
    if reference is None or value.mean is None or reference.mean in (None, 0):
        return ""
    return f" ({100 * (value.mean - reference.mean) / reference.mean:+.2f}%)".replace("-", "−")


def _points(value: Stat, reference: Stat | None) -> str:
    if reference is None or value.mean is None or reference.mean is None:
        return ""
    return f" ({100 * (value.mean - reference.mean):+.1f} pt)".replace("-", "−")


def reference_group(groups: list[RunGroup]) -> RunGroup | None:
    """The cross-entropy group that deltas are computed against (the first one), or None."""
    return next((g for g in groups if g.loss_kind == "ce"), None)


def comparison_table(groups: list[RunGroup], intervals: dict[str, GroupIntervals] | None = None
                     ) -> tuple[Table, dict[str, dict[str, Stat]]]:
    """The side-by-side table (one column per group) and the metrics behind it; with ``intervals`` (from
    :func:`~mileloss.report.intervals.group_intervals`), a section of paired changes vs CE with 95 % intervals.

    Returns:
        ``(table, metrics)`` with ``metrics[group.label][key]`` as in :func:`group_metrics`.
    """
    buckets, tasks = reported_buckets(groups), task_names(groups)
    metrics = {g.label: group_metrics(g, buckets, tasks) for g in groups}
    reference = reference_group(groups)
    ref = metrics[reference.label] if reference is not None else None
    header = ["", *[g.label for g in groups]]
    rows: list[list[str]] = []
    sections: set[int] = set()

    def section(title: str) -> None:
        sections.add(len(rows))
        rows.append([title] + [""] * len(groups))

    def row(name: str, cell: Callable[[RunGroup, dict[str, Stat]], str]) -> None:
        rows.append([name, *[cell(g, metrics[g.label]) for g in groups]])

    def metric_row(name: str, key: str, spec: str, delta: Callable | None = None) -> None:
        row(name, lambda g, m: m[key].format(spec) + (
            delta(m[key], ref[key] if ref is not None and g is not reference else None) if delta else ""))

    section("training")
    row("loss", lambda g, m: g.runs[0].loss_kind)
    row("γ / σ", lambda g, m: "—" if g.loss_kind == "ce" else
        f"{g.runs[0].loss.get('gamma', '?')} / {g.runs[0].loss.get('sigma', '—') if g.loss_kind == 'mile' else '—'}")
    row("runs (seeds)", lambda g, m: f"{len(g.runs)} ({', '.join(str(s) for s in g.seeds)})")
    metric_row("steps", "steps", ".0f")
    metric_row("tokens", "tokens", ",.0f")
    metric_row("final train loss", "train_loss", ".4f", _relative)
    metric_row("final val loss", "val_loss", ".4f", _relative)
    section("held-out perplexity (bucket of the target token)")
    metric_row("overall", "ppl/overall", ".3f", _relative)
    for name, label in buckets:
        metric_row(label, f"ppl/{name}", ".3f", _relative)
    metric_row("top-1 accuracy", "accuracy", ".4f", _points)
    metric_row("ECE (15 bins)", "ece", ".4f")
    metric_row("mean entropy (nats)", "entropy", ".3f")
    if intervals is not None and reference is not None and buckets:
        section("paired perplexity change vs CE, 95 % CI (bootstrap over seed pairs and held-out blocks)")
        for key, label in [*buckets, ("overall", "overall")]:
            row(label, lambda g, m, key=key: _interval_cell(g, reference, intervals, key))
    if tasks:
        shots = sorted({(r.lm_eval or {}).get("num_fewshot") for g in groups for r in g.runs} - {None})
        section(f"benchmarks ({'/'.join(str(s) for s in shots)}-shot; accuracy, TriviaQA exact match)")
        for task in tasks:
            metric_row(task, f"bench/{task}", ".4f", _points)
        if len([t for t in tasks if t != "triviaqa"]) > 1:
            metric_row("average (multiple choice)", "bench/average", ".4f", _points)
    return Table(header, rows, sections), metrics


def _interval_cell(group: RunGroup, reference: RunGroup, intervals: dict[str, GroupIntervals], key: str) -> str:
    if group is reference:
        return "reference"
    found = intervals.get(group.label)
    interval = found.intervals.get(key) if found is not None else None
    if interval is None:
        return "unavailable"
    low, high = (f"{x:+.2f}".replace("-", "−") for x in (interval.low, interval.high))
    return f"{interval.change:+.2f} % [{low}, {high}]".replace("-", "−")


def interval_verdicts(groups: list[RunGroup], intervals: dict[str, GroupIntervals]) -> list[str]:
    """One line per non-CE group: its paired perplexity change vs CE on every bucket (rarest first) and overall,
    e.g. ``"MiLe γ=1 σ=1 vs CE (2 seed pairs × 512 blocks): low: lower, 95 % CI [−4.10 %, −1.20 %]; ..."``."""
    buckets = reported_buckets(groups)
    lines = []
    for group in groups:
        found = intervals.get(group.label)
        if found is None:
            continue
        if not found.pairs:
            reason = "; ".join(found.notes) or "no evaluated run of this loss"
            lines.append(f"{group.label} vs CE: interval unavailable ({reason})")
            continue
        blocks = min(len(pair.count) for pair in found.pairs)
        parts = []
        for name, label in [*reversed(buckets), ("overall", "overall")]:
            interval = found.intervals.get(name)
            shown = name if name in ("high", "medium", "low", "overall") else label
            parts.append(f"{shown}: " + (format_interval(interval) if interval is not None else
                                         "interval unavailable (too few tokens or blocks)"))
        pairs = len(found.pairs)
        head = f"{group.label} vs CE ({pairs} seed pair{'s' if pairs > 1 else ''} × {blocks} blocks)"
        notes = f" [{'; '.join(found.notes)}]" if found.notes else ""
        lines.append(f"{head}: {'; '.join(parts)}{notes}")
    return lines


def _best(groups: list[RunGroup], metrics: dict[str, dict[str, Stat]], key: str, lower: bool):
    candidates = [(metrics[g.label][key], g) for g in groups if metrics[g.label][key].mean is not None]
    if not candidates:
        return None
    return (min if lower else max)(candidates, key=lambda pair: pair[0].mean)


def _within_noise(a: Stat, b: Stat) -> bool:
    spread = max(a.std or 0.0, b.std or 0.0)
    return spread > 0 and abs(a.mean - b.mean) <= spread


def verdict(groups: list[RunGroup], metrics: dict[str, dict[str, Stat]],
            intervals: dict[str, GroupIntervals] | None = None) -> str:
    """One sentence saying which loss did best on which frequency bucket, compared with CE.

    e.g. "MiLe γ=1 σ=1 has the lowest perplexity on the low-frequency bucket (15.371 vs CE 15.517, −0.94%);
    high: CE (4.390); overall: MiLe γ=1 σ=1 (7.12 vs CE 7.15, −0.42%); best benchmark average: ..."

    A perplexity difference is judged by the group's paired 95 % interval vs CE where ``intervals`` has one
    ("paired: lower, 95 % CI [...]"): the seed spread of the absolute perplexities ("within seed noise", the
    fallback) contains the seed-to-seed variation that pairing by seed removes.
    """
    buckets = reported_buckets(groups)
    reference = reference_group(groups)
    ref = metrics[reference.label] if reference is not None else None

    def describe(key: str, lower: bool = True, spec: str = ".3f", points: bool = False) -> tuple[str, str] | None:
        """(best group's label, "value vs CE value, change") for one metric, or None if no group has it."""
        best = _best(groups, metrics, key, lower)
        if best is None:
            return None
        stat, group = best
        detail = format(stat.mean, spec)
        tied = [g.label for g in groups if metrics[g.label][key].mean is not None
                and format(metrics[g.label][key].mean, spec) == detail]
        if len(tied) > 1:  # equal at the printed precision: name them all, no winner
            return " = ".join(tied), f"tie at {detail}"
        if ref is not None and group is not reference and ref[key].mean is not None:
            change = (f"{100 * (stat.mean - ref[key].mean):+.1f} pt" if points
                      else f"{100 * (stat.mean - ref[key].mean) / ref[key].mean:+.2f}%")
            detail += f" vs CE {format(ref[key].mean, spec)}, {change}".replace("-", "−")
            found = intervals.get(group.label) if intervals and key.startswith("ppl/") else None
            interval = found.intervals.get(key.split("/", 1)[1]) if found is not None else None
            if interval is not None:
                detail += f", paired: {format_interval(interval)}"
            elif _within_noise(stat, ref[key]):
                detail += ", within seed noise"
            seeds, ref_seeds = sorted(set(group.seeds), key=str), sorted(set(reference.seeds), key=str)
            if seeds != ref_seeds:  # e.g. a sweep point run for one seed only: the means are not comparable
                detail += (f"; means over other seeds ({', '.join(map(str, seeds))} vs CE's "
                           f"{', '.join(map(str, ref_seeds))})")
        return group.label, detail

    if not buckets:
        best_val = describe("val_loss", spec=".4f")
        if best_val is None:
            return "No run has validation or evaluation results yet; run `mileloss eval RUN_DIR` first."
        return (f"No run has been evaluated yet (`mileloss eval RUN_DIR`); lowest final validation loss: "
                f"{best_val[0]} ({best_val[1]}).")

    def phrase(name: str, label: str) -> str:
        return f"{name}-frequency bucket" if name in ("high", "medium", "low") else f"bucket {label}"

    parts, empty = [], []
    for name, bucket_label in reversed(buckets):  # rarest first: the bucket MiLe is meant to help
        best = describe(f"ppl/{name}")
        if best is None:
            empty.append(phrase(name, bucket_label))
        elif not parts:
            rarest = " (rarest tokens" if name == buckets[-1][0] else " (the rarest bucket with held-out tokens"
            parts.append(f"{best[0]} has the lowest perplexity on the {phrase(name, bucket_label)}{rarest}; "
                         f"{best[1]})")
        else:
            parts.append(f"{phrase(name, bucket_label)}: {best[0]} ({best[1]})")
    if empty:
        parts.append(f"no held-out tokens in the {' and '.join(empty)}")
    for prefix, best in (("overall", describe("ppl/overall")),
                         ("best benchmark average", describe("bench/average", lower=False, spec=".4f", points=True))):
        if best is not None:
            parts.append(f"{prefix}: {best[0]} ({best[1]})")
    evaluated = [g for g in groups if any(run.perplexity for run in g.runs)]
    if len(evaluated) > 1 and all(sum(1 for run in g.runs if run.perplexity) == 1 for g in evaluated):
        parts.append("one seed per loss, so there is no estimate of seed noise")
    return "; ".join(parts) + "."
