from pathlib import Path

import pytest

from mileloss.report.intervals import GroupIntervals, Interval
from mileloss.report.runs import RunRecord, group_runs
from mileloss.report.tables import Stat, comparison_table, verdict


def _run(name: str, kind: str, seed: int, low_ppl: float, high_ppl: float = 5.0) -> RunRecord:
    buckets = [{"name": "high", "label": "high (0-80%)", "ppl": high_ppl},
               {"name": "low", "label": "low (80-100%)", "ppl": low_ppl}]
    return RunRecord(path=Path(name), config={"loss": {"kind": kind, "gamma": 1.0, "sigma": 1.0},
                                              "run": {"seed": seed, "out": name}},
                     train=[], val=[], perplexity={"buckets": buckets, "overall": {"ppl": (low_ppl + high_ppl) / 2}},
                     lm_eval=None, run_info={})


def test_stat_is_mean_and_sample_std_ignoring_missing_values():
    stat = Stat.of([1.0, None, 3.0])
    assert (stat.mean, stat.std, stat.n) == (2.0, pytest.approx(2**0.5), 2)
    assert Stat.of([None]).format() == "—" and Stat.of([2.0]).format(".1f") == "2.0"


def test_runs_differing_in_seed_group_but_not_runs_differing_in_loss():
    groups = group_runs([_run("a", "ce", 0, 10), _run("b", "mile", 0, 9), _run("c", "ce", 1, 12)])
    assert [(g.label, len(g.runs)) for g in groups] == [("CE", 2), ("MiLe γ=1 σ=1", 1)]


def test_verdict_flags_a_difference_smaller_than_the_seed_spread():
    groups = group_runs([_run("a", "ce", 0, 10), _run("c", "ce", 1, 14), _run("b", "mile", 0, 11.5)])
    _, metrics = comparison_table(groups)
    text = verdict(groups, metrics)
    assert text.startswith("MiLe γ=1 σ=1 has the lowest perplexity on the low-frequency bucket")
    assert "11.500 vs CE 12.000, −4.17%, within seed noise" in text


def test_verdict_without_a_ce_run_reports_values_without_deltas():
    groups = group_runs([_run("f", "focal", 0, 10), _run("m", "mile", 0, 9)])
    _, metrics = comparison_table(groups)
    text = verdict(groups, metrics)
    assert text.startswith("MiLe γ=1 σ=1 has the lowest perplexity on the low-frequency bucket (rarest tokens; 9.000)")
    assert "vs CE" not in text


def test_verdict_judges_a_difference_by_its_paired_interval_where_there_is_one():
    # the seed spread (10 vs 14) covers the 4 % difference, but the paired interval excludes 0: the verdict
    # quotes the interval, not the unpaired spread; a bucket without an interval keeps the spread's reading
    groups = group_runs([_run("a", "ce", 0, 10), _run("c", "ce", 1, 14), _run("b", "mile", 0, 11.5)])
    _, metrics = comparison_table(groups)
    paired = GroupIntervals(intervals={"low": Interval(-4.0, -6.5, -1.25, 2, 64)}, pairs=[], notes=[])
    text = verdict(groups, metrics, {"MiLe γ=1 σ=1": paired})
    assert "11.500 vs CE 12.000, −4.17%, paired: lower, 95 % CI [−6.50 %, −1.25 %]" in text
    assert "within seed noise" not in text.split(";")[0]
    same = GroupIntervals(intervals={"low": Interval(-4.0, -6.5, 0.5, 2, 64)}, pairs=[], notes=[])
    assert "paired: no detectable difference (95 % CI [−6.50 %, +0.50 %])" in verdict(
        groups, metrics, {"MiLe γ=1 σ=1": same})
    assert "within seed noise" in verdict(groups, metrics, {"MiLe γ=1 σ=1": GroupIntervals({}, [], [])})


def test_verdict_says_when_a_change_compares_means_over_different_seeds():
    # MiLe ran for seed 0 only, CE for seeds 0 and 1: "11.5 vs 12.0" compares one seed with a two-seed mean
    groups = group_runs([_run("a", "ce", 0, 10), _run("c", "ce", 1, 14), _run("b", "mile", 0, 11.5)])
    _, metrics = comparison_table(groups)
    assert "−4.17%, within seed noise; means over other seeds (0 vs CE's 0, 1))" in verdict(groups, metrics)
    same = group_runs([_run("a", "ce", 0, 10), _run("c", "ce", 1, 14), _run("b", "mile", 0, 11.5),
                       _run("d", "mile", 1, 12.5)])
    _, metrics = comparison_table(same)
    assert "other seeds" not in verdict(same, metrics)
