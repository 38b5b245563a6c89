"""Run folders with synthetic eval results for report tests (no model runs: milliseconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mileloss.eval.buckets import frequency_buckets
from mileloss.eval.perplexity import summarize_token_statistics
from tests.eval.fixtures import make_run_dir

VOCAB = 200
COUNTS = np.random.default_rng(0).zipf(1.4, size=VOCAB).clip(max=10**5)
TASK_SCORES = {"piqa": 0.60, "arc_easy": 0.40, "boolq": 0.55, "triviaqa": 0.02}


def write_eval_results(run_dir: Path, *, rare_shift: float, seed: int, with_benchmarks: bool = True) -> None:
    """perplexity.json from synthetic per-token statistics (rare targets get ``rare_shift`` extra nats of CE,
    minus a seed jitter) and lm_eval.json with plausible scores."""
    rng = np.random.default_rng(seed)
    buckets = frequency_buckets(COUNTS)
    targets = rng.integers(0, VOCAB, size=4000)
    rare = buckets.bucket_of_token[targets] > 0
    stats = {
        "targets": targets,
        "ce": rng.gamma(2.0, 1.0, size=len(targets)) + rare * rare_shift + 0.01 * seed,
        "entropy": rng.uniform(0, np.log(VOCAB), size=len(targets)),
        "confidence": rng.uniform(0, 1, size=len(targets)),
        "correct": rng.uniform(0, 1, size=len(targets)) < 0.3,
    }
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps(summarize_token_statistics(stats, buckets)))
    if with_benchmarks:
        tasks = {name: {"metric": "exact_match" if name == "triviaqa" else "acc",
                        "value": score - 0.02 * rare_shift + 0.005 * seed, "stderr": 0.02, "n": 100,
                        "num_fewshot": 0, "metrics": {}} for name, score in TASK_SCORES.items()}
        (out / "lm_eval.json").write_text(json.dumps({"tasks": tasks, "num_fewshot": 0, "limit": 100}))


def make_evaluated_runs(root: Path) -> list[Path]:
    """CE (2 seeds), focal, MiLe (2 seeds) and an unevaluated MiLe with gamma 0.5: six run folders."""
    runs = []
    for name, loss, gamma, seed, shift in [("ce_s0", "ce", 1.0, 0, 1.0), ("ce_s1", "ce", 1.0, 1, 1.0),
                                           ("focal", "focal", 1.0, 0, 0.9),
                                           ("mile_s0", "mile", 1.0, 0, 0.8), ("mile_s1", "mile", 1.0, 1, 0.8)]:
        run = make_run_dir(root / name, loss=loss, gamma=gamma, seed=seed, val_offset=0.05 * shift)
        write_eval_results(run, rare_shift=shift, seed=seed)
        runs.append(run)
    runs.append(make_run_dir(root / "mile_g05", loss="mile", gamma=0.5, seed=0))
    return runs
