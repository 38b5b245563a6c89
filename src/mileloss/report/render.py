"""``report.md`` (images beside it) and a self-contained ``report.html`` (images as base64 data URIs)."""

from __future__ import annotations

import base64
import datetime
import html
import logging
from collections.abc import Sequence
from pathlib import Path

from mileloss.report.plots import write_plots
from mileloss.report.runs import RunGroup, group_runs, load_run
from mileloss.report.tables import MISSING, Table, comparison_table, verdict

logger = logging.getLogger(__name__)

__all__ = ["write_report"]

CAPTIONS = {
    "curves": "Training and validation loss against training tokens (one colour per loss; seeds share it).",
    "bucket_ppl": "Held-out perplexity per training-frequency bucket of the target token, and its change "
                  "relative to cross-entropy (below 0 = better than CE).",
    "histograms": "Distribution of the prediction entropy H and of the MiLe weight (σ + H)^γ over held-out tokens.",
    "benchmarks": "Downstream benchmark scores (accuracy; TriviaQA: exact match).",
}
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
"""


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Compare training runs: write ``report.md``, ``report.html`` and PNG figures into ``out_dir``.

    Args:
        run_dirs: run folders written by ``mileloss train`` (evaluated ones also show perplexity and
            benchmark results; the others show "—" there).
        out_dir: created if needed.

    Returns:
        The path of the self-contained ``report.html``.

    Raises:
        EmptyRunError: if a folder has neither ``metrics.jsonl`` nor ``config.yaml`` (the message names it).
        ValueError: if ``run_dirs`` is empty.
    """
    if not run_dirs:
        raise ValueError("mileloss report: give at least one run folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs([load_run(path) for path in run_dirs])
    table, metrics = comparison_table(groups)
    summary = verdict(groups, metrics)
    figures = write_plots(groups, metrics, out)
    bucket_lines, run_lines = _bucket_lines(groups), _run_lines(groups)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    markdown = ["# mileloss report: CE vs focal vs MiLe", "", f"**Verdict:** {summary}", "",
                f"Generated {stamp}. Runs:", "", *[f"- {line}" for line in run_lines], ""]
    if bucket_lines:
        markdown += [bucket_lines[0], "", *[f"- {line}" for line in bucket_lines[1:]], ""]
    markdown += ["## Comparison", "", _markdown_table(table), "", *[f"- {note}" for note in NOTES], "",
                 "## Figures", ""]
    for name, path in figures.items():
        markdown += [f"![{name}]({path.name})", "", f"*{CAPTIONS[name]}*", ""]
    (out / "report.md").write_text("\n".join(markdown))

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mileloss report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>mileloss report: CE vs focal vs MiLe</h1>",
             f'<p class="verdict"><b>Verdict:</b> {html.escape(summary)}</p>',
             f'<p class="small">Generated {stamp}.</p><ul class="small">',
             *[f"<li>{html.escape(line)}</li>" for line in run_lines], "</ul>"]
    if bucket_lines:
        parts += [f'<p class="small">{html.escape(bucket_lines[0])}</p><ul class="small">',
                  *[f"<li>{html.escape(line)}</li>" for line in bucket_lines[1:]], "</ul>"]
    parts += ["<h2>Comparison</h2>", _html_table(table), '<ul class="small">',
              *[f"<li>{html.escape(note)}</li>" for note in NOTES], "</ul>", "<h2>Figures</h2>"]
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")
    parts.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s and %s", out / "report.md", report)
    return report
