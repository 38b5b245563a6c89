import numpy as np
import pytest

from mileloss.errors import BucketSpecError
from mileloss.eval.buckets import frequency_buckets, parse_cut_points


def test_hand_example_assigns_types_by_cumulative_mass_before_them():
    # ranking: id3 (10), id0 (5), id2 (3), id4 (2), id1 (0); mass before each: 0, 10, 15, 18, 20 of 20
    # = 0%, 50%, 75%, 90%, 100%  -> high, high, high, medium (>= 80%), low (unseen)
    buckets = frequency_buckets(np.array([5, 0, 3, 10, 2]), cut_points=(80, 95))
    assert buckets.bucket_of_token.tolist() == [0, 2, 0, 0, 1]
    high, medium, low = buckets.descriptions
    assert (high.name, high.num_types, high.train_occurrences, high.share_of_occurrences) == ("high", 3, 18, 0.9)
    assert (medium.name, medium.num_types, medium.share_of_occurrences) == ("medium", 1, 0.1)
    assert (low.name, low.num_types, low.num_unseen_types, low.share_of_occurrences) == ("low", 1, 1, 0.0)
    assert (high.lower_percent, high.upper_percent, low.lower_percent, low.upper_percent) == (0, 80, 95, 100)


def test_ties_are_broken_by_token_id():
    # four types of equal count: mass before = 0, 25, 50, 75% in id order -> cut at 50% puts ids 0, 1 high
    buckets = frequency_buckets(np.array([3, 3, 3, 3]), cut_points=(50,))
    assert buckets.bucket_of_token.tolist() == [0, 0, 1, 1]
    assert [d.name for d in buckets.descriptions] == ["high", "low"]


def test_type_reaching_the_cut_exactly_opens_the_next_bucket():
    # mass before id1 is exactly 80% -> id1 is medium, not high
    buckets = frequency_buckets(np.array([80, 15, 5]), cut_points=(80, 95))
    assert buckets.bucket_of_token.tolist() == [0, 1, 2]


def test_unseen_types_always_go_to_the_rarest_bucket():
    counts = np.zeros(10, dtype=np.int64)
    counts[0] = 100
    buckets = frequency_buckets(counts, cut_points=(10, 20, 30))
    assert buckets.bucket_of_token.tolist() == [0] + [3] * 9
    assert buckets.descriptions[3].num_unseen_types == 9
    assert [d.name for d in buckets.descriptions] == ["b0", "b1", "b2", "b3"]


def test_bucket_shares_cover_every_occurrence():
    counts = np.random.default_rng(0).zipf(1.3, size=5000).clip(max=10**6)
    buckets = frequency_buckets(counts)
    assert sum(d.share_of_occurrences for d in buckets.descriptions) == pytest.approx(1.0)
    assert sum(d.num_types for d in buckets.descriptions) == 5000
    high, medium, _ = buckets.descriptions
    assert high.share_of_occurrences >= 0.8 and high.share_of_occurrences + medium.share_of_occurrences >= 0.95
    # the smallest prefix: removing the last high type would drop below 80%
    assert high.share_of_occurrences - high.min_count / counts.sum() < 0.8


@pytest.mark.parametrize("spec", ["", "abc", "0,50", "80,80", "95,80", "50,100"])
def test_bad_cut_points_are_rejected_with_the_flag_named(spec):
    with pytest.raises(BucketSpecError, match="--buckets"):
        parse_cut_points(spec)


def test_cut_points_parse_from_the_cli_string():
    assert parse_cut_points("80, 95") == (80.0, 95.0)
    assert parse_cut_points("50,80,99.5") == (50.0, 80.0, 99.5)


def test_all_zero_counts_are_rejected():
    with pytest.raises(BucketSpecError, match="all zeros"):
        frequency_buckets(np.zeros(5, dtype=np.int64))
