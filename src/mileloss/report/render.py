"""``report.md`` (images beside it) and a self-contained ``report.html`` (images as base64 data URIs).

The output folder must be new, empty or an earlier report (``report.json`` lists what ``mileloss report`` wrote
there); a folder of anyone else's files is refused, nothing in it overwritten. Files are written atomically under
an exclusive lock (``.report.lock``), so two reports into one folder never interleave: a report started while
another writes there stops with a one-line error, and a later report replaces an earlier one, stale figures
included.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import html
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from mileloss.errors import ConfigError, OutputFolderError
from mileloss.eval.outputs import check_output_folder, create_output_folder
from mileloss.report.data_check import DataCheck, check_same_data
from mileloss.report.intervals import DEFAULT_RESAMPLES, METHOD, REFERENCES, GroupIntervals, group_intervals
from mileloss.report.plots import FIGURES, write_plots
from mileloss.report.runs import ReportError, RunGroup, group_runs, load_run
from mileloss.report.sweep import coincidence_lines, plot_sweep, sweep_points, sweep_table
from mileloss.report.tables import MISSING, Table, comparison_table, interval_verdicts, reference_group, verdict
from mileloss.run_folder import is_temp_of, read_json_object, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["write_report"]

COMMAND = "mileloss report"
MARKER = "report.json"
LOCK = ".report.lock"
WRITTEN = frozenset({"report.md", "report.html", *(f"{name}.png" for name in (*FIGURES, "sweep"))})
"""Every file a report may write besides :data:`MARKER` and :data:`LOCK`."""

CAPTIONS = {
    "curves": "Training and validation loss against training tokens (one colour per loss; seeds share it).",
    "bucket_ppl": "Held-out perplexity per training-frequency bucket of the target token, and its change "
                  "relative to cross-entropy (below 0 = better than CE). Error bars: on the left, the sample standard "
                  "deviation over seeds; on the right, the paired 95 % bootstrap interval (over seed pairs and "
                  "held-out blocks) where the runs have eval/blocks.npz, else the seed standard deviation.",
    "histograms": "Distribution over held-out tokens of the prediction entropy H and of the weight each run's own "
                  "loss gives a token (MiLe (σ + H)^γ, focal (1 − p)^γ; CE runs, always 1, are not drawn).",
    "benchmarks": "Downstream benchmark scores (accuracy; TriviaQA: exact match).",
    "sweep": "MiLe sweep: held-out perplexity per training-frequency bucket against γ (one line per σ; mean ± sample "
             "standard deviation over seeds; CE dashed, its seed spread shaded) and, below, the paired change vs CE "
             "with its 95 % bootstrap interval (over seed pairs and held-out blocks). γ = 0 is cross-entropy.",
}
SWEEP_TITLE = "Sweep over γ: MiLe against CE"
NOTES = [
    "Perplexity deltas are relative to the CE run: 100·(ppl − ppl_CE)/ppl_CE; benchmark deltas are in points.",
    "Runs that differ only by seed are one column: mean ± sample standard deviation.",
    f"{MISSING} = not available (the run has no `eval/` results: run `mileloss eval RUN_DIR`).",
]


def _bucket_lines(groups: list[RunGroup]) -> list[str]:
    cut_sets = {tuple(run.perplexity["bucket_cut_points"]) for g in groups for run in g.runs if run.perplexity}
    warning = []
    if len(cut_sets) > 1:
        warning = [f"WARNING: the runs were evaluated with different bucket cut points {sorted(cut_sets)}; "
                   f"re-run `mileloss eval` with one --buckets value so the buckets compare"]
        logger.warning("%s", warning[0])
    for group in groups:
        for run in group.runs:
            if run.perplexity:
                cuts = ", ".join(f"{c:g}%" for c in run.perplexity["bucket_cut_points"])
                lines = [f"Frequency buckets: token types ranked by training-set count, cumulative occurrences cut "
                         f"at {cuts} (from {run.path.name}):"]
                for bucket in run.perplexity["buckets"]:
                    lines.append(f"{bucket['label']}: {bucket['num_types']} types, "
                                 f"{100 * bucket['share_of_occurrences']:.1f}% of training tokens, "
                                 f"{bucket['num_tokens']} held-out targets")
                return lines + warning
    return []


def _run_lines(groups: list[RunGroup]) -> list[str]:
    return [f"{group.label}: " + ", ".join(str(run.path) for run in group.runs) for group in groups]


def _markdown_table(table: Table) -> str:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    lines = [cells(table.header), "|" + "---|" * len(table.header)]
    for index, row in enumerate(table.rows):
        lines.append(cells([f"**{row[0]}**", *row[1:]] if index in table.section_rows else row))
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.header)
    body = []
    for index, row in enumerate(table.rows):
        if index in table.section_rows:
            body.append(f'<tr class="section"><td colspan="{len(row)}">{html.escape(row[0])}</td></tr>')
        else:
            body.append("<tr>" + f"<th>{html.escape(row[0])}</th>"
                        + "".join(f"<td>{html.escape(c)}</td>" for c in row[1:]) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
.verdict { font-size: 1.1em; background: #f2f8f2; border-left: 4px solid #2ca02c; padding: .8em 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; white-space: nowrap; }
thead th { background: #eee; } tbody th { text-align: left; font-weight: normal; }
tr.section td { background: #f7f7f7; font-weight: bold; text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .small { color: #555; font-size: .9em; }
.warning { background: #fdecea; border-left: 6px solid #d62728; padding: .8em 1em; color: #611a15; }
"""


def _owned(out: Path) -> set[str]:
    """Names in ``out`` that an earlier ``mileloss report`` wrote (from its ``report.json``)."""
    marker = read_json_object(out / MARKER)
    if marker is not None and marker.get("written_by") == COMMAND and isinstance(marker.get("files"), list):
        return {name for name in marker["files"] if name in WRITTEN} | {MARKER, LOCK}
    markdown = out / "report.md"  # a report from before report.json: recognised by its title
    if markdown.is_file() and markdown.read_bytes()[:18] == b"# mileloss report:":
        return set(WRITTEN) | {LOCK}
    return set()


def _check_out(out: Path) -> set[str]:
    owned = _owned(out) if out.is_dir() else set()
    # the lock file holds nothing and is never removed: taking it is safe whoever made it
    check_output_folder(out, COMMAND, lambda entry: (entry.name in owned | {LOCK} and not entry.is_symlink())
                        or (is_temp_of(entry, WRITTEN | {MARKER}) and entry.is_file()))
    return owned


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (released when the process ends, even if killed)."""
    handle = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputFolderError(f"another mileloss report is writing into {out}; wait for it or choose "
                                    f"another --out") from None
        yield
    finally:
        os.close(handle)


def _warning_lines(check: DataCheck) -> list[str]:
    if not check.mixed:
        return []
    return ["WARNING: these runs were not trained and evaluated on the same data, so their numbers do not compare "
            "(reported anyway: --allow-mixed-data).", *check.mixed]


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, allow_mixed_data: bool = False,
                 bootstrap: int = DEFAULT_RESAMPLES, bootstrap_seed: int = 0) -> Path:
    """Compare training runs: write ``report.md``, ``report.html``, PNG figures and ``report.json`` into ``out_dir``.

    Args:
        run_dirs: run folders written by ``mileloss train`` (evaluated ones also show perplexity and
            benchmark results; the others show "—" there).
        out_dir: a new or empty folder, or one holding an earlier report (which this one replaces).
        allow_mixed_data: report runs trained or evaluated on different data (corpus, tokenizer, vocabulary size,
            token shards) anyway, under a warning at the top, instead of refusing.
        bootstrap: resamples of the paired bootstrap behind the intervals vs CE (0: no intervals).
        bootstrap_seed: its random seed (the same runs and seed give the same intervals).

    Returns:
        The path of the self-contained ``report.html``.

    Raises:
        EmptyRunError: if a folder has neither ``metrics.jsonl`` nor ``config.yaml`` (the message names it).
        ReportError: a run file that is malformed (file and field named); MixedDataError: runs on different data;
            BlocksFileError: a damaged ``eval/blocks.npz``; BlockMismatchError: a run and its CE partner evaluated
            on different blocks (unless ``allow_mixed_data``).
        OutputFolderError: ``out_dir`` is a file, not writable, holds files this command did not write, or another
            report is writing into it.
        ValueError: if ``run_dirs`` is empty.
    """
    if not run_dirs:
        raise ValueError("mileloss report: give at least one run folder")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"--bootstrap must be an integer >= 0, got {bootstrap!r}")
    if isinstance(bootstrap_seed, bool) or not isinstance(bootstrap_seed, int) or bootstrap_seed < 0:
        raise ConfigError(f"--bootstrap-seed must be an integer >= 0, got {bootstrap_seed!r}")
    seen: dict[Path, str] = {}
    for path in run_dirs:
        if Path(path).resolve() in seen:
            raise ReportError(f"{path} is given twice (as {seen[Path(path).resolve()]}): each run is one column entry")
        seen[Path(path).resolve()] = str(path)
    out = Path(out_dir)
    _check_out(out)  # before any work: a folder that cannot take the report fails fast
    runs = [load_run(path) for path in run_dirs]
    check = check_same_data(runs, allow_mixed=allow_mixed_data)
    for line in _warning_lines(check):
        logger.warning("%s", line)
    groups = group_runs(runs)
    intervals = (group_intervals(groups, reference_group(groups), resamples=bootstrap, seed=bootstrap_seed,
                                 allow_mismatch=allow_mixed_data) if bootstrap else None)
    table, metrics = comparison_table(groups, intervals)
    summary = verdict(groups, metrics, intervals)
    interval_lines = interval_verdicts(groups, intervals) if intervals else []
    method = METHOD.format(resamples=bootstrap, seed=bootstrap_seed) if intervals else None
    create_output_folder(out)
    with _locked(out):
        previous = _check_out(out)  # again under the lock: the folder may have changed meanwhile
        marker = {"written_by": COMMAND, "runs": [str(run.path) for run in runs]}
        # listed before writing, so that a report killed half-way leaves a folder the next report recognises
        write_atomic(out / MARKER, json.dumps({**marker, "complete": False, "files": sorted(WRITTEN)}, indent=2))
        figures = write_plots(groups, metrics, out, intervals)
        points = sweep_points(groups)
        sweep_figure = plot_sweep(points, groups, metrics, out, intervals)
        if sweep_figure is not None:
            figures["sweep"] = sweep_figure
        sweep = (sweep_table(points, groups, metrics, intervals), coincidence_lines(groups)) if points else None
        report = _write_documents(out, groups, table, summary, figures, check, interval_lines, method, sweep)
        written = {"report.md", "report.html", *(path.name for path in figures.values())}
        write_atomic(out / MARKER, json.dumps({**marker, "complete": True, "files": sorted(written),
                                               "intervals": _intervals_json(intervals, bootstrap, bootstrap_seed)},
                                              indent=2))
        for stale in sorted((previous & WRITTEN) - written):  # figures of an earlier report that has no data now
            (out / stale).unlink(missing_ok=True)
    logger.info("wrote %s and %s", out / "report.md", report)
    return report


def _intervals_json(intervals: dict[str, GroupIntervals] | None, resamples: int, seed: int) -> dict | None:
    """The intervals in ``report.json``, for scripts (docs/results.md) that quote them."""
    if intervals is None:
        return None
    return {"resamples": resamples, "seed": seed, "level": 0.95, "groups": {
        label: {"seed_pairs": [{"run": str(p.run), "ce": str(p.reference), "seed": p.seed} for p in found.pairs],
                "notes": found.notes,
                "buckets": {name: i.to_dict() if i is not None else None for name, i in found.intervals.items()}}
        for label, found in intervals.items()}}


def _write_documents(out: Path, groups: list[RunGroup], table: Table, summary: str, figures: dict[str, Path],
                     check: DataCheck, interval_lines: list[str], method: str | None,
                     sweep: tuple[Table, list[str]] | None = None) -> Path:
    """``report.md`` and ``report.html`` (with ``sweep``, a section of its table and the γ = 0 lines); returns the
    latter."""
    bucket_lines, run_lines = _bucket_lines(groups), _run_lines(groups)
    warning = _warning_lines(check)
    unverified = ([f"Training data not verified for {', '.join(check.unverified)}: only the recorded vocabulary "
                   f"size was compared."] if check.unverified else [])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    markdown = ["# mileloss report: CE vs focal vs MiLe", ""]
    if warning:
        markdown += [f"> **{warning[0]}**", ">", *[f"> - {line}" for line in warning[1:]], ""]
    markdown += [f"**Verdict:** {summary}", ""]
    if interval_lines:
        markdown += ["**Paired change vs CE (95 % CI):**", "", *[f"- {line}" for line in interval_lines], ""]
    markdown += [f"Generated {stamp}. Runs:", "", *[f"- {line}" for line in run_lines],
                 "", *[f"{line}\n" for line in unverified]]
    if bucket_lines:
        markdown += [bucket_lines[0], "", *[f"- {line}" for line in bucket_lines[1:]], ""]
    markdown += ["## Comparison", "", _markdown_table(table), "", *[f"- {note}" for note in NOTES], ""]
    if sweep is not None:
        markdown += [f"## {SWEEP_TITLE}", "", *[f"- {line}" for line in sweep[1]], "", _markdown_table(sweep[0]), ""]
    if method:
        markdown += ["## Method of the intervals", "", method, "", *[f"- {ref}" for ref in REFERENCES], ""]
    markdown += ["## Figures", ""]
    for name, path in figures.items():
        markdown += [f"![{name}]({path.name})", "", f"*{CAPTIONS[name]}*", ""]
    write_atomic(out / "report.md", "\n".join(markdown))

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mileloss report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>mileloss report: CE vs focal vs MiLe</h1>"]
    if warning:
        parts += [f'<div class="warning"><b>{html.escape(warning[0])}</b><ul>',
                  *[f"<li>{html.escape(line)}</li>" for line in warning[1:]], "</ul></div>"]
    parts += [f'<p class="verdict"><b>Verdict:</b> {html.escape(summary)}</p>']
    if interval_lines:
        parts += ['<p><b>Paired change vs CE (95 % CI):</b></p><ul class="intervals">',
                  *[f"<li>{html.escape(line)}</li>" for line in interval_lines], "</ul>"]
    parts += [
              f'<p class="small">Generated {stamp}.</p><ul class="small">',
              *[f"<li>{html.escape(line)}</li>" for line in run_lines], "</ul>",
              *[f'<p class="small">{html.escape(line)}</p>' for line in unverified]]
    if bucket_lines:
        parts += [f'<p class="small">{html.escape(bucket_lines[0])}</p><ul class="small">',
                  *[f"<li>{html.escape(line)}</li>" for line in bucket_lines[1:]], "</ul>"]
    parts += ["<h2>Comparison</h2>", _html_table(table), '<ul class="small">',
              *[f"<li>{html.escape(note)}</li>" for note in NOTES], "</ul>"]
    if sweep is not None:
        parts += [f"<h2>{html.escape(SWEEP_TITLE)}</h2>", "<ul>",
                  *[f"<li>{html.escape(line)}</li>" for line in sweep[1]], "</ul>", _html_table(sweep[0])]
    if method:
        parts += ["<h2>Method of the intervals</h2>", f"<p>{html.escape(method)}</p>", '<ul class="small">',
                  *[f"<li>{html.escape(ref)}</li>" for ref in REFERENCES], "</ul>"]
    parts += ["<h2>Figures</h2>"]
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")
    parts.append("</body></html>")
    return write_atomic(out / "report.html", "\n".join(parts))
