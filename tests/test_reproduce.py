"""`mileloss reproduce --budget tiny`: the whole pipeline on the embedded default corpus, end to end."""

import json

import pytest

from mileloss.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert cli_main(["reproduce", "--budget", "tiny", "--out", str(out)]) == 0
    return out


def test_reproduce_tiny_trains_evaluates_and_reports_every_loss(tiny_reproduction):
    out = tiny_reproduction
    summary = json.loads((out / "reproduce.json").read_text())
    assert summary["losses"] == ["ce", "focal", "mile"] and summary["corpus"] == "shakespeare"
    for loss in ("ce", "focal", "mile"):
        run = out / "runs" / f"shakespeare-{loss}-s111"
        assert (run / "final" / "config.json").exists()
        perplexity = json.loads((run / "eval" / "perplexity.json").read_text())
        assert [b["label"].split()[0] for b in perplexity["buckets"]] == ["high", "medium", "low"]
        benchmarks = json.loads((run / "eval" / "lm_eval.json").read_text())
        assert "arc_easy" in json.dumps(benchmarks)
    report = (out / "report" / "report.md").read_text()
    assert "Verdict" in report and "MiLe" in report and "Focal" in report
    for png in (out / "report").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report" / "report.html").stat().st_size > 10_000  # figures embedded


def test_reproduce_again_skips_finished_stages(tiny_reproduction):
    out = tiny_reproduction
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    stamps.update({p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval/*.json")})
    assert cli_main(["reproduce", "--budget", "tiny", "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in stamps.items())


def test_reproduce_rejects_unknown_losses(tmp_path):
    from mileloss.reproduce import reproduce

    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        reproduce(tmp_path, budget="tiny", losses=("ce", "dice"))
