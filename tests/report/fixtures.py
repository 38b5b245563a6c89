"""Run folders with synthetic eval results for report tests (no model runs: milliseconds each)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from mileloss.eval.buckets import frequency_buckets
from mileloss.eval.perplexity import block_sums, summarize_token_statistics, write_blocks
from tests.eval.fixtures import make_run_dir

VOCAB = 200
COUNTS = np.random.default_rng(0).zipf(1.4, size=VOCAB).clip(max=10**5)
TASK_SCORES = {"piqa": 0.60, "arc_easy": 0.40, "boolq": 0.55, "triviaqa": 0.02}


BLOCK_LEN = 100


def write_eval_results(run_dir: Path, *, rare_shift: float, seed: int, with_benchmarks: bool = True,
                       with_blocks: bool = True, noise: float = 0.0) -> None:
    """perplexity.json from synthetic per-token statistics (rare targets get ``rare_shift`` extra nats of CE,
    minus a seed jitter), blocks.npz (40 blocks of 100 positions; the same targets for the same seed, as for runs
    evaluated on the same data) unless not ``with_blocks``, and lm_eval.json with plausible scores. ``noise``: the
    sd of extra per-token CE noise drawn from a generator of its own (so runs of one seed differ token by token)."""
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
    if noise:
        stats["ce"] = np.abs(stats["ce"] + np.random.default_rng([seed, int(1000 * rare_shift)]).normal(
            0, noise, size=len(targets)))
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result = summarize_token_statistics(stats, buckets)
    if with_blocks:
        blocks = block_sums(stats, buckets, BLOCK_LEN)
        data = write_blocks(blocks)
        (out / "blocks.npz").write_bytes(data)
        for bucket, total in zip(result["buckets"], blocks.totals()[0], strict=True):
            bucket["ce_sum"] = total
        result["overall"]["ce_sum"] = math.fsum(blocks.ce_sum.ravel().tolist())
        result["blocks"] = {"file": "blocks.npz", "sha256": hashlib.sha256(data).hexdigest(),
                            "num_blocks": blocks.num_blocks, "block": "evaluation window", "seq_len": BLOCK_LEN}
    (out / "perplexity.json").write_text(json.dumps(result))
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
