"""Paired intervals against cross-entropy: how sure the report is that a loss changed a bucket's perplexity.

For a run ``A`` and the CE run with the same seed (same initialisation and data order), evaluated on the same
held-out tokens, ``eval/blocks.npz`` holds per evaluation window (block) ``b`` and frequency bucket ``k`` the sum of
cross-entropy ``S_bk`` and the token count ``n_bk`` (the same for both runs: same targets). The paired change of
mean loss on bucket ``k`` is

    D_k = sum_b (S^A_bk - S^CE_bk) / sum_b n_bk          (nats; "overall" sums over every bucket)

and over P seed pairs the estimate is their mean, reported as the change of perplexity ``100 * (exp(mean D) - 1)``
percent (the ratio of geometric-mean perplexities). Its 95 % interval comes from a two-level (hierarchical)
bootstrap that resamples both sources of noise: draw P seed pairs with replacement, then, independently for each
drawn pair, its blocks with replacement (the same blocks for both runs of the pair, so the token noise they share
cancels), recompute the mean ``D``; the 2.5th and 97.5th percentiles of R such resamples bound the interval
(percentile method; Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13; paired bootstrap over test
items: Koehn 2004, *Statistical significance tests for machine translation evaluation*, EMNLP). An interval that
excludes 0 is a detected change ("lower" / "higher"); one that contains 0 is "no detectable difference".

With one seed pair the interval covers the held-out tokens only, not seed-to-seed variation, and the report says
so. Resampling at both levels counts the token noise twice (it is already part of the spread between seed pairs),
which makes the interval conservative (wider) when token noise dominates; with 2 or 3 pairs, on the other hand,
the seed level has few distinct resamples and understates seed-to-seed variation (by about a factor (P - 1)/P in
variance). Deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mileloss.errors import BlockMismatchError, BlocksFileError
from mileloss.eval.perplexity import BlockSums, read_blocks
from mileloss.report.runs import RunGroup, RunRecord
from mileloss.run_folder import BLOCKS, RunFolder

__all__ = ["DEFAULT_RESAMPLES", "METHOD", "REFERENCES", "Interval", "PairedBlocks", "bootstrap_change",
           "format_interval", "group_intervals", "load_blocks", "pair_blocks"]

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95
MIN_BLOCKS = 2
REFERENCES = ("B. Efron and R. J. Tibshirani (1993), An Introduction to the Bootstrap, Chapman & Hall/CRC.",
              "P. Koehn (2004), Statistical significance tests for machine translation evaluation, EMNLP 2004.")
METHOD = (
    "Intervals: for each loss, every run is paired with the CE run of the same seed (same initialisation and data "
    "order), both evaluated on the same held-out tokens, cut into the evaluation windows (blocks) recorded in "
    "eval/blocks.npz. The paired change of mean cross-entropy on a bucket is the sum over blocks of the two runs' "
    "loss difference divided by the bucket's token count, averaged over the seed pairs, and shown as the change of "
    "perplexity 100·(exp(Δ) − 1) %. Its 95 % interval is a two-level percentile bootstrap over both sources of "
    "noise: resample the seed pairs with replacement, then within each drawn pair its blocks with replacement (the "
    "same blocks for both runs), {resamples} resamples, seed {seed} (Efron & Tibshirani 1993; paired bootstrap over "
    "test items as in Koehn 2004). 'lower' / 'higher' = the interval excludes 0; otherwise 'no detectable "
    "difference'. With one seed pair the interval covers the held-out tokens only, not seed-to-seed variation; "
    "with few seed pairs the seed level understates seed-to-seed variation, while resampling blocks at both levels "
    "counts token noise twice (conservative)."
)


@dataclasses.dataclass(frozen=True)
class PairedBlocks:
    """The blocks of one seed pair: per block and bucket, the loss sums of the run and of CE, and token counts."""

    run: Path
    reference: Path
    seed: object
    ce_sum: np.ndarray  # (B, K) the run's
    reference_ce_sum: np.ndarray  # (B, K) CE's
    count: np.ndarray  # (B, K)
    bucket_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Interval:
    """Paired change of perplexity vs CE on one bucket, in percent, with its 95 % bootstrap interval."""

    change: float
    low: float
    high: float
    num_pairs: int
    num_blocks: int

    @property
    def direction(self) -> str:
        return "lower" if self.high < 0 else "higher" if self.low > 0 else "same"

    def to_dict(self) -> dict:
        return {"change_percent": self.change, "low_percent": self.low, "high_percent": self.high,
                "num_seed_pairs": self.num_pairs, "num_blocks": self.num_blocks, "direction": self.direction}


def _pct(value: float) -> str:
    return f"{value:+.2f} %".replace("-", "−")


def format_interval(interval: Interval) -> str:
    """``"lower, 95 % CI [−4.10 %, −1.20 %]"`` or ``"no detectable difference (95 % CI [−1.00 %, +0.50 %])"``."""
    bounds = f"95 % CI [{_pct(interval.low)}, {_pct(interval.high)}]"
    if interval.direction == "same":
        return f"no detectable difference ({bounds})"
    return f"{interval.direction}, {bounds}"


def load_blocks(run: RunRecord) -> BlockSums | None:
    """The run's ``eval/blocks.npz``, checked against the sha256 and totals in its ``perplexity.json``; None when
    the run was evaluated before blocks files existed (or not at all).

    Raises:
        BlocksFileError: the file is damaged, changed since ``mileloss eval`` wrote it, or disagrees with
            ``perplexity.json`` (bucket names or token counts).
    """
    path = RunFolder(run.path).eval_dir / BLOCKS
    recorded = (run.perplexity or {}).get("blocks")
    if run.perplexity is None or not path.is_file():
        if isinstance(recorded, dict):
            raise BlocksFileError(f"{path}: missing, but {run.path / 'eval' / 'perplexity.json'} records it; "
                                  f"re-run `mileloss eval`")
        return None
    sha256 = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not isinstance(sha256, str):
        raise BlocksFileError(f"{path}: perplexity.json records no sha256 for it; re-run `mileloss eval`")
    blocks = read_blocks(path, sha256=sha256)
    names = tuple(b["name"] for b in run.perplexity["buckets"])
    _, counts = blocks.totals()
    if blocks.bucket_names != names or counts != [int(b["num_tokens"]) for b in run.perplexity["buckets"]]:
        raise BlocksFileError(f"{path}: its buckets or token counts differ from perplexity.json's; re-run "
                              f"`mileloss eval`")
    return blocks


def pair_blocks(run: RunRecord, blocks: BlockSums, reference: RunRecord, reference_blocks: BlockSums) -> PairedBlocks:
    """Pair a run's blocks with the CE run's, block by block.

    Raises:
        BlockMismatchError: the two were not evaluated on the same blocks (window length, number, starts, lengths,
            target tokens) or with the same frequency buckets; the message names both runs and the first difference.
    """
    where = f"{run.path} and {reference.path}"
    if blocks.bucket_names != reference_blocks.bucket_names or blocks.cut_points != reference_blocks.cut_points:
        raise BlockMismatchError(f"{where} were evaluated with different frequency buckets "
                                 f"({list(blocks.cut_points)} vs {list(reference_blocks.cut_points)}); re-run "
                                 f"`mileloss eval` with one --buckets")
    if blocks.seq_len != reference_blocks.seq_len or blocks.num_blocks != reference_blocks.num_blocks:
        raise BlockMismatchError(f"{where} were evaluated on different blocks ({blocks.num_blocks} windows of "
                                 f"{blocks.seq_len} vs {reference_blocks.num_blocks} of {reference_blocks.seq_len}); "
                                 f"re-run `mileloss eval` with the same --max-tokens and --seq-len")
    for name in ("start", "length", "target_hash"):
        differ = np.flatnonzero(getattr(blocks, name) != getattr(reference_blocks, name))
        if differ.size:
            raise BlockMismatchError(f"{where}: block {int(differ[0])} differs in its {name.replace('_', ' ')}; they "
                                     f"were not evaluated on the same held-out tokens")
    if not np.array_equal(blocks.count, reference_blocks.count):
        raise BlockMismatchError(f"{where}: the same tokens fall in different buckets (different training counts)")
    return PairedBlocks(run.path, reference.path, run.seed, blocks.ce_sum, reference_blocks.ce_sum, blocks.count,
                        blocks.bucket_names)


def _columns(pair: PairedBlocks) -> tuple[np.ndarray, np.ndarray]:
    """(B, K+1) loss differences and counts: every bucket, then overall."""
    diff = pair.ce_sum - pair.reference_ce_sum
    return (np.concatenate([diff, diff.sum(axis=1, keepdims=True)], axis=1),
            np.concatenate([pair.count, pair.count.sum(axis=1, keepdims=True)], axis=1).astype(np.float64))


def bootstrap_change(pairs: Sequence[PairedBlocks], *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> dict[str, Interval | None]:
    """The paired change of perplexity vs CE per bucket and ``overall``, with hierarchical-bootstrap 95 % intervals.

    Args:
        pairs: one :class:`PairedBlocks` per seed pair (same bucket names in all).
        resamples: R, the number of bootstrap resamples (>= 1).
        seed: the random generator's seed; the same inputs and seed give the same intervals.

    Returns:
        ``{bucket name or "overall": Interval}``, None where a bucket has no held-out tokens or a pair has fewer
        than 2 blocks.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not pairs:
        return {}
    names = [*pairs[0].bucket_names, "overall"]
    columns = [_columns(pair) for pair in pairs]
    totals = np.array([count.sum(axis=0) for _, count in columns])  # (P, K+1)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = np.array([diff.sum(axis=0) for diff, _ in columns]) / totals  # (P, K+1) nats
    rng = np.random.default_rng(seed)
    num_pairs = len(pairs)
    chosen = rng.integers(0, num_pairs, size=(resamples, num_pairs))  # seed level
    draws = np.zeros((resamples, len(names)))
    for j in range(num_pairs):  # block level, independently for every drawn pair
        for p, (diff, count) in enumerate(columns):
            rows = np.flatnonzero(chosen[:, j] == p)
            if rows.size == 0:
                continue
            blocks = len(diff)
            weights = rng.multinomial(blocks, np.full(blocks, 1.0 / blocks), size=rows.size).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                draws[rows] += (weights @ diff) / (weights @ count)
    draws /= num_pairs
    result: dict[str, Interval | None] = {}
    enough = all(len(diff) >= MIN_BLOCKS for diff, _ in columns)
    for k, name in enumerate(names):
        if not enough or (totals[:, k] == 0).any():
            result[name] = None
            continue
        finite = draws[:, k][np.isfinite(draws[:, k])]  # a resample with no token of a rare bucket has no value
        if finite.size < 0.9 * resamples:
            result[name] = None
            continue
        low, high = np.quantile(finite, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        percent = [100 * math.expm1(float(x)) for x in (point[:, k].mean(), low, high)]
        result[name] = Interval(*percent, num_pairs=num_pairs, num_blocks=int(min(len(d) for d, _ in columns)))
    return result


@dataclasses.dataclass
class GroupIntervals:
    """The intervals of one group against CE, and why they are missing or partial."""

    intervals: dict[str, Interval | None]
    pairs: list[PairedBlocks]
    notes: list[str]


def group_intervals(groups: Sequence[RunGroup], reference: RunGroup | None, *, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0, allow_mismatch: bool = False) -> dict[str, GroupIntervals]:
    """:func:`bootstrap_change` for every group but CE, pairing each run with the CE run of the same seed.

    Runs without ``blocks.npz`` (evaluated before it existed), without a CE run of their seed, or (with
    ``allow_mismatch``) on other blocks than their CE run, are left out with a note saying so.

    Raises:
        BlocksFileError: a damaged blocks file.   BlockMismatchError: paired runs on different blocks (unless
            ``allow_mismatch``).
    """
    if reference is None:
        return {}
    cache: dict[Path, BlockSums | None] = {}

    def blocks_of(run: RunRecord) -> BlockSums | None:
        if run.path not in cache:
            cache[run.path] = load_blocks(run)
        return cache[run.path]

    reference_by_seed = {str(run.seed): run for run in reference.runs if run.perplexity}
    result = {}
    for group in groups:
        if group is reference:
            continue
        pairs, notes = [], []
        for run in group.runs:
            if run.perplexity is None:
                continue
            partner = reference_by_seed.get(str(run.seed))
            if partner is None:
                notes.append(f"{run.path.name}: no evaluated CE run with seed {run.seed} to pair with")
                continue
            mine, theirs = blocks_of(run), blocks_of(partner)
            missing = [r.path.name for r, b in ((run, mine), (partner, theirs)) if b is None]
            if missing:
                notes.append(f"interval unavailable for {' and '.join(missing)}: evaluated before eval/blocks.npz "
                             f"existed (re-run `mileloss eval`)")
                continue
            try:
                pairs.append(pair_blocks(run, mine, partner, theirs))
            except BlockMismatchError as error:
                if not allow_mismatch:
                    raise
                notes.append(str(error))
        if len(pairs) == 1:
            notes.append("one seed pair: the interval covers held-out token noise only, not seed noise")
        result[group.label] = GroupIntervals(bootstrap_change(pairs, resamples=resamples, seed=seed), pairs, notes)
    return result


__all__ += ["BlocksFileError", "GroupIntervals"]
