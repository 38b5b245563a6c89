"""TokenBatchLoader and iter_eval_batches on hand-made shards whose token i is i (mod vocab)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mileloss.data import LoaderStateError, SplitTooShortError, TokenBatchLoader, iter_eval_batches, read_split

VOCAB = 60000  # token ids up to 59999: with tokens[i] = i, the id tells the position


@pytest.fixture
def data_dir(tmp_path, write_data_dir):
    # 1001 train tokens = 62 windows of 16 (+1); shards of uneven size to cross boundaries.
    train = np.arange(1001)
    val = np.arange(5000, 5000 + 90)
    return write_data_dir(tmp_path / "data", {"train": [train[:300], train[300:301], train[301:]], "val": [val]}, VOCAB)


def batches(loader, count):
    return [loader.next_batch() for _ in range(count)]


def test_batches_are_long_tensors_with_labels_shifted_by_one(data_dir):
    input_ids, labels = TokenBatchLoader(data_dir, batch_size=4, seq_len=16).next_batch()
    assert input_ids.shape == labels.shape == (4, 16)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert torch.equal(labels, input_ids + 1)  # token i is i: the next token is one more
    assert torch.all(input_ids[:, 0] % 16 == 0), "windows start at multiples of seq_len"


def test_one_epoch_visits_every_window_once_then_reshuffles(data_dir):
    loader = TokenBatchLoader(data_dir, batch_size=2, seq_len=16, seed=3)
    assert loader.num_windows == 62
    epoch0 = torch.cat([ids[:, 0] for ids, _ in batches(loader, 31)]).tolist()
    assert sorted(epoch0) == list(range(0, 62 * 16, 16))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    epoch1 = torch.cat([ids[:, 0] for ids, _ in batches(loader, 31)]).tolist()
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0


def test_global_batch_crossing_the_epoch_end_takes_the_next_epochs_first_windows(data_dir):
    loader = TokenBatchLoader(data_dir, batch_size=5, seq_len=16, seed=0)
    seen = torch.cat([ids[:, 0] for ids, _ in batches(loader, 13)]).tolist()  # 65 = 62 + 3 windows
    assert sorted(seen[:62]) == list(range(0, 62 * 16, 16))
    assert loader.epoch == 1 and loader.position == 3
    fresh_epoch1 = np.random.default_rng((0, 1)).permutation(62)[:3] * 16
    assert seen[62:] == fresh_epoch1.tolist()


def test_two_ranks_of_four_see_exactly_the_windows_of_one_rank_of_eight(data_dir):
    single = TokenBatchLoader(data_dir, batch_size=8, seq_len=16, seed=7)
    ranks = [TokenBatchLoader(data_dir, batch_size=4, seq_len=16, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # 96 windows: crosses an epoch boundary
        ids, labels = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(ids, torch.cat([p[0] for p in parts]))
        assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_resuming_from_state_dict_gives_the_same_next_batches(data_dir):
    loader = TokenBatchLoader(data_dir, batch_size=3, seq_len=16, seed=1)
    batches(loader, 5)
    state = loader.state_dict()
    expected = batches(loader, 30)  # runs into the next epoch
    resumed = TokenBatchLoader(data_dir, batch_size=3, seq_len=16, seed=1)
    resumed.load_state_dict(state)
    for (ids, labels), (ids2, labels2) in zip(expected, batches(resumed, 30), strict=True):
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)


def test_state_from_other_seed_or_seq_len_is_rejected(data_dir):
    state = TokenBatchLoader(data_dir, batch_size=2, seq_len=16, seed=1).state_dict()
    with pytest.raises(LoaderStateError, match="seed=1"):
        TokenBatchLoader(data_dir, batch_size=2, seq_len=16, seed=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seq_len=16"):
        TokenBatchLoader(data_dir, batch_size=2, seq_len=8, seed=1).load_state_dict(state)


def test_split_shorter_than_one_window_raises(data_dir):
    with pytest.raises(SplitTooShortError, match="'val'.*90 tokens.*seq_len \\+ 1 = 91"):
        TokenBatchLoader(data_dir, split="val", batch_size=1, seq_len=90)
    with pytest.raises(SplitTooShortError):
        next(iter_eval_batches(data_dir, split="val", batch_size=1, seq_len=90))


def test_eval_batches_predict_every_token_but_the_first_exactly_once(data_dir):
    tokens = np.asarray(read_split(data_dir, "val"))
    batches_ = list(iter_eval_batches(data_dir, split="val", batch_size=2, seq_len=16))
    assert [ids.shape[0] for ids, _ in batches_] == [2, 2, 2]  # 5 full windows + 1 padded row
    labels = torch.cat([labels for _, labels in batches_]).reshape(-1)
    inputs = torch.cat([ids for ids, _ in batches_]).reshape(-1)
    kept = labels != -100
    assert labels[kept].tolist() == tokens[1:].tolist()
    assert inputs[kept].tolist() == tokens[:-1].tolist()
    again = list(iter_eval_batches(data_dir, split="val", batch_size=2, seq_len=16))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches_, again, strict=True))


def test_eval_batches_stop_at_max_batches_and_can_drop_the_partial_window(data_dir):
    assert len(list(iter_eval_batches(data_dir, split="val", batch_size=2, seq_len=16, max_batches=2))) == 2
    full_only = list(iter_eval_batches(data_dir, split="val", batch_size=2, seq_len=16, pad_last=False))
    assert sum(ids.shape[0] for ids, _ in full_only) == 5
    assert all(bool((labels != -100).all()) for _, labels in full_only)


@pytest.mark.parametrize("tail, shapes", [("pad", [(2, 4), (1, 4)]), ("short", [(2, 4), (1, 2)]), ("drop", [(2, 4)])])
def test_token_windows_tail_modes_cover_every_target_once_or_drop_the_tail(tail, shapes):
    from mileloss.data.loader import iter_token_windows

    tokens = np.arange(11)  # 2 full windows of 4 predict tokens 1..8; the tail predicts 9 and 10
    batches_ = list(iter_token_windows(tokens, seq_len=4, batch_size=2, tail=tail, pad_id=99))
    assert [inputs.shape for inputs, _ in batches_] == shapes
    targets = np.concatenate([t.reshape(-1) for _, t in batches_])
    inputs = np.concatenate([i.reshape(-1) for i, _ in batches_])
    kept = targets != -100
    expected = list(range(1, 9)) if tail == "drop" else list(range(1, 11))
    assert targets[kept].tolist() == expected
    assert inputs[kept].tolist() == [t - 1 for t in expected]
    if tail == "pad":
        assert inputs[~kept].tolist() == [99, 99]
