"""Paired bootstrap intervals vs CE: synthetic blocks with a known effect, pairing checks, the rendered report."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mileloss.cli import main as cli
from mileloss.errors import BlockMismatchError, BlocksFileError
from mileloss.eval.perplexity import BlockSums, read_blocks
from mileloss.report import write_report
from mileloss.report.intervals import PairedBlocks, bootstrap_change, format_interval, pair_blocks
from mileloss.report.runs import load_run
from tests.eval.fixtures import make_run_dir
from tests.report.fixtures import make_evaluated_runs, write_eval_results

NAMES = ("high", "low")


def synthetic_pairs(rng, delta: float, *, pairs: int = 3, blocks: int = 60, seed_sd: float = 0.01,
                    token_sd: float = 0.8) -> list[PairedBlocks]:
    """Seed pairs whose per-token loss difference is ``delta`` nats on every bucket, plus a per-seed offset
    (sd ``seed_sd``) and per-token noise (sd ``token_sd``), summed into blocks of ~50 high and ~8 low tokens."""
    out = []
    for p in range(pairs):
        count = np.stack([rng.poisson(50, blocks), rng.poisson(8, blocks) + 1], axis=1).astype(np.int64)
        reference = rng.gamma(2.0, 1.0, size=count.shape) * count
        offset = delta + rng.normal(0, seed_sd)
        run = reference + count * offset + rng.normal(0, token_sd, size=count.shape) * np.sqrt(count)
        out.append(PairedBlocks(Path(f"run{p}"), Path(f"ce{p}"), p, run, reference, count, NAMES))
    return out


def _percent(delta: float) -> float:
    return 100 * math.expm1(delta)


def test_interval_covers_a_known_difference_and_detects_an_injected_five_percent_drop():
    delta = math.log(0.95)  # -5 % perplexity
    pairs = synthetic_pairs(np.random.default_rng(1), delta, blocks=100, token_sd=0.4)
    result = bootstrap_change(pairs, resamples=1000, seed=0)
    for name in (*NAMES, "overall"):
        interval = result[name]
        assert interval.low <= _percent(delta) <= interval.high, (name, interval)
        assert interval.direction == "lower" and format_interval(interval).startswith("lower, 95 % CI [−")
        assert interval.num_pairs == 3 and interval.num_blocks == 100


def test_identical_runs_give_a_zero_interval_and_no_detectable_difference():
    pairs = synthetic_pairs(np.random.default_rng(2), 0.0)
    identical = [dataclasses.replace(p, ce_sum=p.reference_ce_sum.copy()) for p in pairs]
    result = bootstrap_change(identical, resamples=200, seed=0)
    for interval in result.values():
        assert interval.change == interval.low == interval.high == 0.0
        assert format_interval(interval) == "no detectable difference (95 % CI [+0.00 %, +0.00 %])"


def test_a_zero_effect_gives_an_interval_containing_zero_in_at_least_90_of_100_simulations():
    rng = np.random.default_rng(3)
    covered = sum(bootstrap_change(synthetic_pairs(rng, 0.0, pairs=3, blocks=30), resamples=200, seed=s)["overall"]
                  .direction == "same" for s in range(100))
    assert covered >= 90


def test_the_bootstrap_is_deterministic_for_a_seed_and_the_resamples_are_configurable():
    pairs = synthetic_pairs(np.random.default_rng(4), 0.02)
    assert bootstrap_change(pairs, resamples=300, seed=7) == bootstrap_change(pairs, resamples=300, seed=7)
    assert bootstrap_change(pairs, resamples=300, seed=7) != bootstrap_change(pairs, resamples=300, seed=8)
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_change(pairs, resamples=0)


def test_seed_noise_widens_the_interval():
    narrow = bootstrap_change(synthetic_pairs(np.random.default_rng(5), 0.0, seed_sd=0.0), seed=0)["overall"]
    wide = bootstrap_change(synthetic_pairs(np.random.default_rng(5), 0.0, seed_sd=0.2), seed=0)["overall"]
    assert wide.high - wide.low > 3 * (narrow.high - narrow.low)


def test_degenerate_inputs_one_seed_one_block_and_an_empty_bucket():
    one_seed = bootstrap_change(synthetic_pairs(np.random.default_rng(6), -0.1, pairs=1), seed=0)
    assert one_seed["overall"].num_pairs == 1 and one_seed["overall"].direction == "lower"
    one_block = bootstrap_change(synthetic_pairs(np.random.default_rng(6), -0.1, blocks=1), seed=0)
    assert one_block == {"high": None, "low": None, "overall": None}
    pair = synthetic_pairs(np.random.default_rng(6), -0.1, pairs=1)[0]
    count = pair.count.copy()
    count[:, 1] = 0
    empty = bootstrap_change([dataclasses.replace(pair, count=count)], seed=0)
    assert empty["low"] is None and empty["high"] is not None
    assert bootstrap_change([]) == {}


def _blocks(num: int = 4, **changes) -> BlockSums:
    base = BlockSums(start=np.arange(num, dtype=np.int64) * 10, length=np.full(num, 10, dtype=np.int64),
                     target_hash=np.arange(num, dtype=np.uint64), ce_sum=np.ones((num, 2)),
                     count=np.array([[7, 3]] * num, dtype=np.int64), bucket_names=NAMES, cut_points=(80.0,),
                     seq_len=10)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"target_hash": np.array([0, 1, 9, 3], dtype=np.uint64)}, "block 2 differs in its target hash"),
    ({"start": np.array([0, 10, 20, 31])}, "block 3 differs in its start"),
    ({"num": 3}, "different blocks \\(3 windows of 10 vs 4 of 10\\)"),
    ({"cut_points": (90.0,)}, "different frequency buckets"),
    ({"count": np.array([[6, 4]] * 4, dtype=np.int64)}, "fall in different buckets"),
])
def test_pairing_refuses_blocks_of_other_tokens_naming_both_runs(tmp_path, changes, message):
    runs = [load_run(make_run_dir(tmp_path / name, loss=name)) for name in ("mile", "ce")]
    changes = dict(changes)
    other = _blocks(changes.pop("num", 4), **changes)
    with pytest.raises(BlockMismatchError, match=f"{tmp_path / 'mile'} and {tmp_path / 'ce'}.*{message}"):
        pair_blocks(runs[0], other, runs[1], _blocks())
    assert pair_blocks(runs[0], _blocks(), runs[1], _blocks()).count.shape == (4, 2)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("intervals")
    runs = make_evaluated_runs(root / "runs")
    return runs, write_report(runs, root / "out", bootstrap=200, bootstrap_seed=1)


def test_report_states_a_paired_interval_per_bucket_and_overall_with_the_method(report):
    _, html_path = report
    out = html_path.parent
    markdown = (out / "report.md").read_text()
    lines = markdown.splitlines()
    start = lines.index("**Paired change vs CE (95 % CI):**")
    mile = next(line for line in lines[start:] if line.startswith("- MiLe γ=1 σ=1 vs CE"))
    # same targets and draws per seed; MiLe has 0.2 nats less on rare targets, the same CE on frequent ones
    assert mile.startswith("- MiLe γ=1 σ=1 vs CE (2 seed pairs × 40 blocks): low: lower, 95 % CI [−18.13 %, −18.13 %]")
    assert "high: no detectable difference (95 % CI [+0.00 %, +0.00 %])" in mile and "; overall: lower" in mile
    focal = next(line for line in lines[start:] if line.startswith("- Focal γ=1 vs CE"))
    assert "(1 seed pair × 40 blocks)" in focal and "held-out token noise only, not seed noise" in focal
    assert "- MiLe γ=0.5 σ=1 vs CE: interval unavailable" in markdown
    assert "## Method of the intervals" in markdown and "Efron & Tibshirani 1993" in markdown and "Koehn" in markdown
    assert "resample the seed pairs with replacement" in markdown and "200 resamples, seed 1" in markdown
    low_row = next(line for line in lines if line.startswith("| low (95-100%) |") and "[" in line)
    assert "| reference |" in low_row and "| −18.13 % [−18.13, −18.13] |" in low_row
    assert low_row.rstrip(" |").endswith("unavailable")
    html = html_path.read_text()
    assert "Paired change vs CE (95 % CI)" in html and "Method of the intervals" in html
    saved = json.loads((out / "report.json").read_text())["intervals"]
    assert saved["resamples"] == 200 and saved["seed"] == 1
    assert saved["groups"]["MiLe γ=1 σ=1"]["buckets"]["low"]["direction"] == "lower"


def test_report_intervals_are_the_same_for_the_same_seed_and_drawn_as_error_bars(tmp_path, monkeypatch):
    runs = []
    for name, loss, seed, shift in [("ce0", "ce", 0, 1.0), ("ce1", "ce", 1, 1.0), ("m0", "mile", 0, 0.95),
                                    ("m1", "mile", 1, 0.95)]:
        run = make_run_dir(tmp_path / "runs" / name, loss=loss, seed=seed)
        write_eval_results(run, rare_shift=shift, seed=seed, with_benchmarks=False, noise=0.5)
        runs.append(run)
    drawn = []
    import mileloss.report.plots as plots

    original = plots._grouped_bars
    monkeypatch.setattr(plots, "_grouped_bars", lambda *a, **k: (drawn.append(a), original(*a, **k))[1])
    texts = []
    for out in ("a", "b"):
        write_report(runs, tmp_path / out, bootstrap=100, bootstrap_seed=3)
        texts.append(json.loads((tmp_path / out / "report.json").read_text())["intervals"])
    assert texts[0] == texts[1]
    bounds = drawn[1][6]  # the change-vs-CE panel: (low, high) per bucket from the intervals
    interval = texts[0]["groups"]["MiLe γ=1 σ=1"]["buckets"]["low"]
    assert bounds["MiLe γ=1 σ=1"][2] == (interval["low_percent"], interval["high_percent"])
    assert interval["low_percent"] < interval["change_percent"] < interval["high_percent"]


def test_runs_evaluated_before_blocks_files_still_report_and_say_the_interval_is_unavailable(tmp_path, capsys):
    runs = []
    for name, loss in (("ce", "ce"), ("mile", "mile")):
        run = make_run_dir(tmp_path / name, loss=loss, seed=0)
        write_eval_results(run, rare_shift=1.0 if loss == "ce" else 0.8, seed=0, with_blocks=False)
        runs.append(run)
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ("MiLe γ=1 σ=1 vs CE: interval unavailable (interval unavailable for mile and ce: evaluated before "
            "eval/blocks.npz existed (re-run `mileloss eval`))") in printed
    assert "**Verdict:** MiLe γ=1 σ=1 has the lowest perplexity" in (tmp_path / "out" / "report.md").read_text()


def test_bootstrap_zero_leaves_the_intervals_out(tmp_path):
    runs = make_evaluated_runs(tmp_path / "runs")[:3]
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "95 % CI" not in markdown and "Method of the intervals" not in markdown


@pytest.mark.parametrize("args, message", [(["--bootstrap", "-1"], "--bootstrap must be an integer >= 0"),
                                           (["--bootstrap-seed", "-2"], "--bootstrap-seed must be an integer >= 0")])
def test_bad_bootstrap_options_are_one_line_errors(tmp_path, capsys, args, message):
    runs = make_evaluated_runs(tmp_path / "runs")[:2]
    assert cli(["report", *map(str, runs), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_read_blocks_checks_the_recorded_sha256_and_the_arrays(tmp_path):
    run = make_run_dir(tmp_path / "run", loss="ce")
    write_eval_results(run, rare_shift=1.0, seed=0, with_benchmarks=False)
    path = run / "eval" / "blocks.npz"
    sha = json.loads((run / "eval" / "perplexity.json").read_text())["blocks"]["sha256"]
    assert read_blocks(path, sha).num_blocks == 40
    with pytest.raises(BlocksFileError, match="sha256 differs"):
        read_blocks(path, "0" * 64)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value, message in [("count", arrays["count"][:, :1], "shape"),
                                 ("ce_sum", -arrays["ce_sum"], "negative or non-finite"),
                                 ("length", arrays["length"] + 1, "do not add up"),
                                 ("start", None, "missing the array 'start'")]:
        broken = dict(arrays)
        if value is None:
            del broken[name]
        else:
            broken[name] = value
        np.savez(tmp_path / "broken.npz", **broken)
        with pytest.raises(BlocksFileError, match=message):
            read_blocks(tmp_path / "broken.npz")
    import mileloss.eval.perplexity as perplexity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perplexity, "MAX_BLOCKS_BYTES", 1000)
        with pytest.raises(BlocksFileError, match=r"blocks.npz: unpacks to \d+ bytes, more than .* \(1000\)"):
            read_blocks(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BlocksFileError, match="not a readable blocks file"):
        read_blocks(tmp_path / "junk.npz")
