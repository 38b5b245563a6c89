"""Frequency buckets of token types, cut by cumulative share of training-set occurrences.

Our reading of the paper's 80% / 5% split (Su et al. 2024; the project's notes on the paper are
shared/docs/paper.md): rank the token types by their training-set count (descending, ties broken by token id),
walk down the ranking accumulating occurrences, and cut the cumulative mass at ``80%`` and ``95%``:

    high   = the smallest prefix of the ranking that covers >= 80% of all training occurrences
    medium = the next types, up to the smallest prefix covering >= 95%
    low    = every remaining type, including the types never seen in training

Formally, with ``c_r`` the count of the type ranked ``r`` (0-based), ``C = sum_r c_r`` and the mass *before*
it ``M_r = sum_{s<r} c_s``, the type's bucket is the number of cut points ``q`` with ``M_r >= q/100 * C``.
A type that straddles a cut therefore belongs to the more frequent side. Any list of ``k`` increasing cut
points in (0, 100) gives ``k + 1`` buckets (``--buckets 50,80,95``).

>>> b = frequency_buckets(np.array([5, 0, 3, 10, 2]), cut_points=(80, 95))
>>> b.bucket_of_token.tolist()
[0, 2, 0, 0, 1]
>>> [d.name for d in b.descriptions]
['high', 'medium', 'low']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from mileloss.errors import BucketSpecError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CUT_POINTS", "BucketDescription", "FrequencyBuckets", "frequency_buckets", "parse_cut_points"]

DEFAULT_CUT_POINTS: tuple[float, ...] = (80.0, 95.0)
"""Cumulative-occurrence percentages separating high / medium / low frequency tokens."""


@dataclasses.dataclass(frozen=True)
class BucketDescription:
    """One bucket: which slice of the frequency ranking it holds and how much of the training set that is."""

    index: int
    name: str
    """``high`` / ``medium`` / ``low`` for three buckets, ``high`` / ``low`` for two, ``b0``... otherwise."""
    lower_percent: float
    """Cumulative-mass cut opening the bucket (0 for the first)."""
    upper_percent: float
    """Cumulative-mass cut closing the bucket (100 for the last)."""
    num_types: int
    """Token types in the bucket (unseen types included in the last bucket)."""
    num_unseen_types: int
    """Types with zero training count (only ever non-zero in the last bucket)."""
    train_occurrences: int
    share_of_occurrences: float
    """Fraction of training occurrences that fall on the bucket's types, in [0, 1]."""
    min_count: int
    max_count: int

    @property
    def label(self) -> str:
        """Short human label, e.g. ``high (0-80%)``."""
        return f"{self.name} ({self.lower_percent:g}-{self.upper_percent:g}%)"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "label": self.label}


@dataclasses.dataclass(frozen=True)
class FrequencyBuckets:
    """Token id -> bucket index, plus a description of each bucket.

    Attributes:
        bucket_of_token: (V,) int64, bucket index of every token id (0 = most frequent).
        cut_points: the k cumulative percentages that define the k + 1 buckets.
        descriptions: one :class:`BucketDescription` per bucket, in index order.
    """

    bucket_of_token: np.ndarray
    cut_points: tuple[float, ...]
    descriptions: tuple[BucketDescription, ...]

    @property
    def num_buckets(self) -> int:
        return len(self.descriptions)

    def to_dict(self) -> dict:
        return {"cut_points": list(self.cut_points), "buckets": [d.to_dict() for d in self.descriptions]}

    def format_table(self) -> str:
        """Plain-text table of the buckets (printed with every result)."""
        lines = [f"frequency buckets (cumulative training-occurrence cuts at {_fmt_cuts(self.cut_points)}):"]
        for d in self.descriptions:
            lines.append(
                f"  {d.label:<20} {d.num_types:>8} types ({d.num_unseen_types} unseen)  "
                f"{100 * d.share_of_occurrences:6.2f}% of training tokens  counts {d.min_count}..{d.max_count}"
            )
        return "\n".join(lines)


def _fmt_cuts(cut_points: Sequence[float]) -> str:
    return ", ".join(f"{c:g}%" for c in cut_points)


def bucket_names(num_buckets: int) -> list[str]:
    """Names for ``num_buckets`` buckets ordered from most to least frequent."""
    if num_buckets == 3:
        return ["high", "medium", "low"]
    if num_buckets == 2:
        return ["high", "low"]
    return [f"b{i}" for i in range(num_buckets)]


def parse_cut_points(spec: str | Sequence[float]) -> tuple[float, ...]:
    """Parse ``"80,95"`` (or a sequence of numbers) into validated cut points.

    Raises:
        BucketSpecError: if a value is not a number, not strictly inside (0, 100), or not increasing.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise BucketSpecError(f"--buckets {spec!r}: expected comma-separated percentages like '80,95'") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise BucketSpecError("--buckets: need at least one cumulative percentage, e.g. '80,95'")
    if any(not 0.0 < v < 100.0 for v in values):
        raise BucketSpecError(f"--buckets {values}: every cut point must lie strictly between 0 and 100")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise BucketSpecError(f"--buckets {values}: cut points must be strictly increasing")
    return tuple(values)


def frequency_buckets(
    token_counts: np.ndarray, cut_points: str | Sequence[float] = DEFAULT_CUT_POINTS
) -> FrequencyBuckets:
    """Assign every token id to a frequency bucket from its training-set count.

    Args:
        token_counts: (V,) non-negative integer counts of each token id in the training split.
        cut_points: k increasing cumulative percentages in (0, 100), e.g. ``(80, 95)``; gives k + 1 buckets.

    Returns:
        :class:`FrequencyBuckets` with ``bucket_of_token`` of shape (V,).

    Raises:
        BucketSpecError: for bad cut points, a counts array that is not 1-D, negative counts, or all zeros.
    """
    cuts = parse_cut_points(cut_points)
    counts = np.asarray(token_counts)
    if counts.ndim != 1:
        raise BucketSpecError(f"token_counts must be 1-D (vocab_size,), got shape {counts.shape}")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise BucketSpecError("token_counts contains negative counts")
    total = int(counts.sum())
    if total == 0:
        raise BucketSpecError("token_counts is all zeros: no training occurrences to rank")

    vocab_size = counts.shape[0]
    # Rank by count descending, then by token id ascending (lexsort sorts by the last key first).
    order = np.lexsort((np.arange(vocab_size), -counts))
    ranked = counts[order]
    mass_before = np.cumsum(ranked) - ranked  # (V,) occurrences of all more frequent types
    # bucket = number of cut points q with mass_before >= q% of total; exact in float64 for counts < 2**53 / 100.
    thresholds = np.asarray(cuts, dtype=np.float64) * total / 100.0
    ranked_bucket = np.searchsorted(thresholds, mass_before.astype(np.float64), side="right")
    ranked_bucket[ranked == 0] = len(cuts)  # never seen in training -> rarest bucket
    bucket_of_token = np.empty(vocab_size, dtype=np.int64)
    bucket_of_token[order] = ranked_bucket

    names = bucket_names(len(cuts) + 1)
    edges = (0.0, *cuts, 100.0)
    descriptions = []
    for index in range(len(cuts) + 1):
        member_counts = counts[bucket_of_token == index]
        occurrences = int(member_counts.sum())
        descriptions.append(
            BucketDescription(
                index=index,
                name=names[index],
                lower_percent=edges[index],
                upper_percent=edges[index + 1],
                num_types=int(member_counts.size),
                num_unseen_types=int((member_counts == 0).sum()),
                train_occurrences=occurrences,
                share_of_occurrences=occurrences / total,
                min_count=int(member_counts.min()) if member_counts.size else 0,
                max_count=int(member_counts.max()) if member_counts.size else 0,
            )
        )
    buckets = FrequencyBuckets(bucket_of_token, cuts, tuple(descriptions))
    logger.info("%s", buckets.format_table())
    return buckets
