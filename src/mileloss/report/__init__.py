"""Reports comparing runs: a side-by-side table, a one-sentence verdict and matplotlib figures.

>>> from mileloss.report import write_report                                    # doctest: +SKIP
>>> write_report(["runs/ce", "runs/focal", "runs/mile"], "reports/compare")      # doctest: +SKIP
PosixPath('reports/compare/report.html')
"""

from mileloss.report.render import write_report
from mileloss.report.runs import EmptyRunError, ReportError, RunGroup, RunRecord, group_runs, load_run
from mileloss.report.tables import Stat, comparison_table, verdict

__all__ = ["EmptyRunError", "ReportError", "RunGroup", "RunRecord", "Stat", "comparison_table", "group_runs",
           "load_run", "verdict", "write_report"]
