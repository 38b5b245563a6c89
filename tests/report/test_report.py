import json

import matplotlib.image
import numpy as np
import pytest

from mileloss.cli import main as cli
from mileloss.report import EmptyRunError, write_report
from tests.eval.fixtures import make_checkpoint, make_data_dir, make_run_dir, make_tokenizer
from tests.report.fixtures import make_evaluated_runs


def main(argv):
    return cli(["report", *map(str, argv)])

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = make_evaluated_runs(root / "runs")
    return runs, write_report(runs, root / "out")


def test_report_writes_markdown_html_and_every_plot_as_a_valid_png(report):
    _, html_path = report
    out = html_path.parent
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["benchmarks.png", "bucket_ppl.png", "curves.png", "histograms.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    html = html_path.read_text()
    assert html.count('src="data:image/png;base64,') == 4 and 'src="http' not in html and ".png\"" not in html
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in pngs)


def test_seed_runs_are_aggregated_into_one_column_with_mean_and_std(report):
    runs, html_path = report
    markdown = (html_path.parent / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|  |"))
    assert header == "|  | CE | Focal γ=1 | MiLe γ=1 σ=1 | MiLe γ=0.5 σ=1 |"
    assert "| runs (seeds) | 2 (0, 1) | 1 (0) | 2 (0, 1) | 1 (0) |" in markdown
    ce = [json.loads((r / "eval" / "perplexity.json").read_text())["overall"]["ppl"] for r in runs[:2]]
    overall = next(line for line in markdown.splitlines() if line.startswith("| overall |"))
    assert f"{np.mean(ce):.3f} ± {np.std(ce, ddof=1):.3f}" in overall.split("|")[2]


def test_unevaluated_run_is_shown_with_dashes(report):
    _, html_path = report
    markdown = (html_path.parent / "report.md").read_text()
    low = next(line for line in markdown.splitlines() if line.startswith("| low (95-100%) |"))
    assert low.rstrip(" |").endswith("—")  # the last column: MiLe γ=0.5 has no eval/ results
    assert "(−" in low  # deltas vs CE, relative %


def test_verdict_names_the_loss_with_the_lowest_rare_bucket_perplexity_against_ce(report):
    runs, html_path = report
    low = {r.name: json.loads((r / "eval" / "perplexity.json").read_text())["buckets"][2]["ppl"] for r in runs[:5]}
    mile, ce = np.mean([low["mile_s0"], low["mile_s1"]]), np.mean([low["ce_s0"], low["ce_s1"]])
    markdown = (html_path.parent / "report.md").read_text()
    verdict = next(line for line in markdown.splitlines() if line.startswith("**Verdict:**"))
    assert verdict.startswith("**Verdict:** MiLe γ=1 σ=1 has the lowest perplexity on the low-frequency bucket")
    assert f"{mile:.3f} vs CE {ce:.3f}, −{100 * (ce - mile) / ce:.2f}%" in verdict


def test_empty_run_folder_is_rejected_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyRunError, match=f"{tmp_path / 'empty'}: not a training run"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no metrics.jsonl or config.yaml" in capsys.readouterr().err


def test_report_of_runs_without_eval_results_says_so_and_plots_only_curves(tmp_path):
    runs = [make_run_dir(tmp_path / "ce", loss="ce"), make_run_dir(tmp_path / "mile", loss="mile", val_offset=-0.1)]
    html_path = write_report(runs, tmp_path / "out")
    assert sorted(p.name for p in html_path.parent.glob("*.png")) == ["curves.png"]
    assert "No run has been evaluated yet" in html_path.read_text()
    assert "lowest final validation loss: MiLe γ=1 σ=1" in html_path.read_text()


def test_eval_then_report_end_to_end_on_tiny_models(tmp_path):
    from mileloss.eval import evaluate

    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    data = make_data_dir(tmp_path / "data", tokenizer)
    runs = []
    for seed, loss in enumerate(["ce", "mile"]):
        checkpoint = make_checkpoint(tmp_path / f"ckpt_{loss}", tokenizer, seed=seed)
        run = make_run_dir(tmp_path / loss, loss=loss, final_from=checkpoint, data_dir=data)
        evaluate(run, tasks="none", max_tokens=64)
        runs.append(run)
    assert main([*map(str, runs), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "on the low-frequency bucket" in markdown
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["bucket_ppl.png", "curves.png",
                                                                         "histograms.png"]
