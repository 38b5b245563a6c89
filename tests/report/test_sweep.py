"""The report of a gamma sweep: sweep.png, the table per (sigma, gamma) and whether gamma = 0 coincides with CE."""

import json

import pytest

from mileloss.report import write_report
from mileloss.report.runs import group_runs, load_run
from mileloss.report.sweep import coincidence_lines, sweep_points
from tests.eval.fixtures import make_run_dir
from tests.report.fixtures import write_eval_results

# (name, loss, gamma, sigma, rare_shift): gamma 0 gets CE's shift, so its eval results equal CE's seed by seed
SWEEP = [("ce", "ce", 1.0, 1.0, 1.0), ("g0", "mile", 0.0, 1.0, 1.0), ("g05", "mile", 0.5, 1.0, 0.9),
         ("g1", "mile", 1.0, 1.0, 0.8), ("g2", "mile", 2.0, 1.0, 0.85), ("g1s2", "mile", 1.0, 2.0, 0.95)]


def make_sweep(root, rows=SWEEP, seeds=(0, 1)):
    runs = []
    for name, loss, gamma, sigma, shift in rows:
        for seed in seeds:
            run = make_run_dir(root / f"{name}_s{seed}", loss=loss, gamma=gamma, sigma=sigma, seed=seed)
            write_eval_results(run, rare_shift=shift, seed=seed, with_benchmarks=False)
            runs.append(run)
    return runs


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    runs = make_sweep(root / "runs")
    return runs, write_report(runs, root / "out", bootstrap=200)


def test_sweep_report_draws_the_figure_and_tabulates_every_gamma_and_sigma(sweep_report):
    _, html_path = sweep_report
    out = html_path.parent
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Sweep over γ: MiLe against CE", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| loss")]
    assert [row.split(" | ")[1:3] for row in rows] == [["—", "—"], ["1", "0"], ["1", "0.5"], ["1", "1"], ["1", "2"],
                                                       ["2", "1"]]
    assert "vs CE overall (95 % CI)" in section and "reference" in rows[0]
    assert "sweep.png" in json.loads((out / "report.json").read_text())["files"]
    assert "Sweep over γ" in html_path.read_text() and "MiLe sweep" in html_path.read_text()


def test_sweep_report_says_gamma_zero_coincides_with_ce_and_its_interval_is_zero(sweep_report):
    _, html_path = sweep_report
    markdown = (html_path.parent / "report.md").read_text()
    assert "MiLe γ=0 σ=1 (γ = 0, i.e. cross-entropy) coincides with CE: per-bucket and overall perplexities are " \
           "identical for seeds 0, 1" in markdown
    intervals = json.loads((html_path.parent / "report.json").read_text())["intervals"]["groups"]
    for bucket in intervals["MiLe γ=0 σ=1"]["buckets"].values():
        if bucket is not None:
            assert bucket["change_percent"] == bucket["low_percent"] == bucket["high_percent"] == 0.0


def test_a_gamma_zero_run_that_differs_from_ce_is_reported_with_the_largest_difference(tmp_path):
    runs = make_sweep(tmp_path, rows=[SWEEP[0], ("g0", "mile", 0.0, 1.0, 1.01), SWEEP[3]], seeds=(0,))
    lines = coincidence_lines(group_runs([load_run(r) for r in runs]))
    assert len(lines) == 1 and "does not coincide exactly with CE" in lines[0] and "identical for 0 of 1" in lines[0]


def test_one_mile_setting_is_no_sweep_and_adds_no_sweep_section(tmp_path):
    runs = make_sweep(tmp_path / "runs", rows=[SWEEP[0], SWEEP[3]], seeds=(0,))
    assert sweep_points(group_runs([load_run(r) for r in runs])) == []
    html_path = write_report(runs, tmp_path / "out", bootstrap=0)
    assert not (html_path.parent / "sweep.png").exists()
    assert "Sweep over γ" not in (html_path.parent / "report.md").read_text()


def test_a_sweep_report_replaced_by_a_plain_one_removes_the_stale_sweep_figure(tmp_path):
    runs = make_sweep(tmp_path / "runs", rows=SWEEP[:3], seeds=(0,))
    write_report(runs, tmp_path / "out", bootstrap=0)
    assert (tmp_path / "out" / "sweep.png").exists()
    write_report([runs[0], runs[2]], tmp_path / "out", bootstrap=0)
    assert not (tmp_path / "out" / "sweep.png").exists()
