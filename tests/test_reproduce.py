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


# ---------------------------------------------------------------------------------------------------------------
# sweeps: --gammas / --sigmas


SWEEP = ["reproduce", "--budget", "tiny", "--tasks", "none", "--max-steps", "12", "--gammas", "0,1"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert cli_main([*SWEEP, "--out", str(out)]) == 0
    return out


def _ppl(run):
    return json.loads((run / "eval" / "perplexity.json").read_text())


def test_sweep_trains_ce_and_one_mile_run_per_gamma_named_by_the_exact_values(tiny_sweep):
    summary = json.loads((tiny_sweep / "reproduce.json").read_text())
    names = sorted(p.name for p in (tiny_sweep / "runs").iterdir())
    assert names == ["shakespeare-ce-s111", "shakespeare-mile-g0.0-sig1.0-s111", "shakespeare-mile-g1.0-sig1.0-s111"]
    assert summary["complete"] and summary["losses"] == ["ce", "mile"]
    assert {(s["loss"], s["gamma"], s["sigma"]) for s in summary["run_specs"]} == {
        ("ce", None, None), ("mile", 0.0, 1.0), ("mile", 1.0, 1.0)}
    for name in names[1:]:
        config = (tiny_sweep / "runs" / name / "config.yaml").read_text()
        assert f"gamma: {name.split('-g')[1].split('-')[0]}" in config


def test_sweep_gamma_zero_is_cross_entropy_bit_for_bit(tiny_sweep):
    """MiLe at gamma = 0 weighs every token (sigma + H)^0 = 1 exactly (log w = xlogy(0, .) = 0): the engine gives
    the CE run's training losses and, the weights being identical, the same model, so the same eval numbers."""
    ce, zero = tiny_sweep / "runs" / "shakespeare-ce-s111", tiny_sweep / "runs" / "shakespeare-mile-g0.0-sig1.0-s111"
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("kind") == "train"] for run in (ce, zero)]
    assert losses[0] and losses[0] == losses[1]
    a, b = _ppl(ce), _ppl(zero)
    assert [x["ppl"] for x in a["buckets"]] == [x["ppl"] for x in b["buckets"]]
    assert a["overall"]["ppl"] == b["overall"]["ppl"]
    assert (ce / "eval" / "blocks.npz").read_bytes() == (zero / "eval" / "blocks.npz").read_bytes()
    report = (tiny_sweep / "report" / "report.md").read_text()
    assert "MiLe γ=0 σ=1 (γ = 0, i.e. cross-entropy) coincides with CE" in report
    assert "## Sweep over γ" in report and (tiny_sweep / "report" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_extends_with_new_gammas_and_skips_finished_runs(tiny_sweep, tmp_path):
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    # sigma 1 gamma 1 is already there; the plain MiLe run (gamma 1, sigma 1 by default) is the same run, not a new one
    assert cli_main([*SWEEP[:-1], "2", "--losses", "ce,mile", "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in stamps.items())
    summary = json.loads((out / "reproduce.json").read_text())
    assert [r.rsplit("/", 1)[1] for r in summary["runs"]] == [
        "shakespeare-ce-s111", "shakespeare-mile-g0.0-sig1.0-s111", "shakespeare-mile-g1.0-sig1.0-s111",
        "shakespeare-mile-g2.0-sig1.0-s111"]
    report = (out / "report" / "report.md").read_text()
    assert "MiLe γ=2 σ=1" in report and "MiLe γ=0 σ=1" in report


def test_sweep_into_a_folder_of_another_budget_is_refused(tiny_sweep, tmp_path, capsys):
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, out)
    assert cli_main([*SWEEP[:6], "13", *SWEEP[7:], "--out", str(out)]) == 2
    assert "another budget" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(p.name for p in (tiny_sweep / "runs").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--gammas", "0,x"], "--gammas must be comma-separated numbers"),
    (["--gammas", "0,0"], "--gammas: give distinct values"),
    (["--gammas", "-1"], "finite number >= 0"),
    (["--gammas", "nan"], "finite number >= 0"),
    (["--sigmas", "1"], "--sigmas needs --gammas"),
    (["--gammas", "1", "--losses", "mile"], "must include ce and mile"),
])
def test_bad_sweep_options_are_one_line_errors(tmp_path, capsys, argv, message):
    try:
        status = cli_main(["reproduce", "--budget", "tiny", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as stop:  # argparse's usage errors
        status = stop.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sweep_run_names_encode_gamma_and_sigma_unambiguously():
    from mileloss.reproduce import RunSpec, plan_runs, run_name

    assert run_name("kjv", "mile", 7, 0.5, 2) == "kjv-mile-g0.5-sig2.0-s7"
    assert run_name("kjv", "mile", 7) == "kjv-mile-s7"
    names = {run_name("c", "mile", 1, g, s) for g in (0.1, 0.1000001, 1e-5, 1, 10) for s in (1, 1.5)}
    assert len(names) == 10
    specs = plan_runs((1, 2), ("ce", "focal", "mile"), (0.0, 2.0), (1.0, 2.0))
    assert len(specs) == 2 * (2 + 4) and specs[0] == RunSpec("ce", 1)
    assert RunSpec("mile", 1, 1.0, 1.0).trained_as() == RunSpec("mile", 1).trained_as()
    assert RunSpec.from_json({"loss": "mile", "seed": 1, "gamma": 0.5, "sigma": 1}) == RunSpec("mile", 1, 0.5, 1.0)
    assert RunSpec.from_json({"loss": "ce", "seed": 1, "gamma": 0.5, "sigma": 1}) is None


def test_a_second_reproduce_on_a_run_being_trained_is_refused_and_changes_nothing(tiny_sweep, tmp_path, capsys):
    # two reproduces on one --out: the second reaches a run the first is training (its lock is held) and stops with
    # one line naming the lock, exit 2, leaving the finished runs as they were (found by hand: two processes, 2 cores)
    import shutil

    from mileloss.train.rundir import RunLock

    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    busy = out / "runs" / "shakespeare-mile-g3.0-sig1.0-s111"
    busy.mkdir()
    lock = RunLock(busy)
    lock.acquire()
    try:
        assert cli_main([*SWEEP[:-1], "3", "--losses", "ce,mile", "--out", str(out)]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"train {busy}" in err and "in use by mileloss train" in err and len(err.strip().splitlines()) == 1
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in stamps.items())
    assert sorted(p.name for p in busy.iterdir()) == []
