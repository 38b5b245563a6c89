import math

import numpy as np
import pytest
import torch

from mileloss.data.loader import iter_token_windows
from mileloss.eval.buckets import frequency_buckets
from mileloss.eval.perplexity import (
    evaluate_perplexity,
    expected_calibration_error,
    head_token_statistics,
    summarize_token_statistics,
)


def _hand_stats():
    # counts -> buckets of ids [0, 1, 2, 3, 4] = [high, low, high, high, medium] (see test_buckets)
    buckets = frequency_buckets(np.array([5, 0, 3, 10, 2]), cut_points=(80, 95))
    stats = {
        "targets": np.array([3, 0, 2, 4, 1, 3]),
        "ce": np.array([1.0, 2.0, 0.5, 3.0, 4.0, 1.5]),
        "entropy": np.array([0.0, 1.0, 0.5, 1.5, 1.6, 0.2]),
        "confidence": np.array([0.9, 0.2, 0.7, 0.1, 0.05, 0.6]),
        "correct": np.array([True, False, True, False, False, True]),
    }
    return stats, buckets


def test_per_bucket_perplexity_is_exp_of_mean_ce_of_targets_in_the_bucket():
    stats, buckets = _hand_stats()
    result = summarize_token_statistics(stats, buckets)
    high, medium, low = result["buckets"]
    assert [high["num_tokens"], medium["num_tokens"], low["num_tokens"]] == [4, 1, 1]
    assert high["loss"] == pytest.approx(1.25) and high["ppl"] == pytest.approx(math.exp(1.25))
    assert medium["ppl"] == pytest.approx(math.exp(3.0))
    assert low["ppl"] == pytest.approx(math.exp(4.0))
    assert result["overall"]["ppl"] == pytest.approx(math.exp(2.0))
    assert result["overall"]["accuracy"] == pytest.approx(0.5)
    assert high["accuracy"] == pytest.approx(0.75)
    assert high["share_of_eval_tokens"] == pytest.approx(4 / 6)


def test_mile_weight_statistics_use_sigma_plus_entropy_to_the_gamma():
    stats, buckets = _hand_stats()
    result = summarize_token_statistics(stats, buckets, sigma=1.0, gamma=1.0)
    assert result["overall"]["weight"]["mean"] == pytest.approx(1.0 + stats["entropy"].mean())
    assert result["buckets"][0]["entropy"]["mean"] == pytest.approx((0.0 + 1.0 + 0.5 + 0.2) / 4)
    squared = summarize_token_statistics(stats, buckets, sigma=0.5, gamma=2.0)
    assert squared["buckets"][1]["weight"]["mean"] == pytest.approx((0.5 + 1.5) ** 2)


def test_histograms_have_fixed_edges_and_count_every_token():
    stats, buckets = _hand_stats()
    hist = summarize_token_statistics(stats, buckets, histogram_bins=10)["histograms"]
    assert hist["entropy"]["edges"][0] == 0.0 and hist["entropy"]["edges"][-1] == pytest.approx(math.log(5))
    assert sum(hist["entropy"]["overall"]) == 6 and sum(hist["weight"]["overall"]) == 6
    assert [sum(h) for h in hist["entropy"]["buckets"]] == [4, 1, 1]


def test_ece_on_a_hand_example():
    confidence = np.array([0.1, 0.5, 0.55, 0.95, 1.0])
    correct = np.array([False, True, False, True, True])
    # bins (k/15, (k+1)/15]: {0.1} -> |0 - 0.1|, {0.5} -> |1 - 0.5|, {0.55} -> |0 - 0.55|, {0.95, 1.0} -> |1 - 0.975|
    ece, bins = expected_calibration_error(confidence, correct)
    assert ece == pytest.approx((0.1 + 0.5 + 0.55 + 2 * 0.025) / 5)
    assert sum(bins["count"]) == 5 and bins["count"][14] == 2 and len(bins["edges"]) == 16


def test_ece_is_zero_when_confidence_matches_accuracy():
    confidence = np.full(4, 0.75)
    correct = np.array([True, True, True, False])
    assert expected_calibration_error(confidence, correct)[0] == pytest.approx(0.0)


@pytest.mark.parametrize("weighting, gamma, sigma", [("mile", 0.5, 2.0), ("focal", 2.0, 1.0), ("ce", 1.0, 1.0)])
def test_head_token_statistics_equal_naive_float64_logits(weighting, gamma, sigma):
    hidden = torch.randn(37, 16, dtype=torch.float64)
    weight = torch.randn(53, 16, dtype=torch.float64)
    bias = torch.randn(53, dtype=torch.float64)
    targets = torch.randint(0, 53, (37,))
    stats = head_token_statistics(hidden, weight, targets, bias, weighting=weighting, gamma=gamma, sigma=sigma)
    logits = hidden @ weight.T + bias  # the naive (N, V) path, float64
    log_p = logits.log_softmax(-1)
    ce = -log_p.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    expected_weight = {"mile": (sigma + entropy) ** gamma, "focal": (1 - (-ce).exp()) ** gamma,
                       "ce": torch.ones_like(ce)}[weighting]
    np.testing.assert_allclose(stats["ce"], ce.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["entropy"], entropy.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["weight"], expected_weight.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["confidence"], log_p.exp().max(-1).values.numpy(), rtol=1e-10, atol=1e-12)
    assert (stats["correct"] == (logits.argmax(-1) == targets).numpy()).all()  # no ties in random logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_correct_is_the_target_at_the_row_maximum_with_ties_counted_and_comes_from_the_one_engine_pass(dtype):
    hidden, weight = torch.randn(37, 16, dtype=dtype), torch.randn(53, 16, dtype=dtype)
    weight[3] = weight[7] = hidden[1] * 3  # types 3 and 7 always tie, and win row 1
    logits = hidden.double() @ weight.double().T
    targets = torch.randint(0, 53, (37,))
    targets[::2] = logits.argmax(-1)[::2]  # half the rows are right
    assert logits.argmax(-1)[1] == 3
    targets[1] = 7  # a tie with the argmax's first pick counts as correct
    stats = head_token_statistics(hidden, weight, targets)
    assert stats["correct"][1]
    top_logit = logits.max(-1).values
    expected = (logits.gather(1, targets[:, None]).squeeze(1) == top_logit).numpy()
    assert expected.sum() >= 18
    assert (stats["correct"] == expected).all()
    np.testing.assert_allclose(stats["confidence"], logits.softmax(-1).max(-1).values.numpy(),
                               rtol=1e-10 if dtype == torch.float64 else 1e-5)


def test_windows_predict_every_token_but_the_first_exactly_once():
    tokens = np.arange(11)
    batches = list(iter_token_windows(tokens, seq_len=4, batch_size=3, tail="short"))
    assert [b[0].shape for b in batches] == [(2, 4), (1, 2)]
    assert np.concatenate([t.reshape(-1) for _, t in batches]).tolist() == list(range(1, 11))
    assert np.concatenate([i.reshape(-1) for i, _ in batches]).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_overall_loss_equals_transformers_loss_on_one_window(checkpoint_dir, data_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir)).eval()
    counts = np.load(data_dir / "train_token_counts.npy")
    tokens = np.fromfile(data_dir / "val_00000.bin", dtype="<u2").astype(np.int64)[:33]
    result = evaluate_perplexity(model, tokens, frequency_buckets(counts), seq_len=32)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)[None], labels=torch.from_numpy(tokens)[None]).loss.item()
    assert result["overall"]["num_tokens"] == 32
    assert result["overall"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert sum(b["num_tokens"] for b in result["buckets"]) == 32


def test_max_tokens_caps_the_number_of_predicted_tokens(checkpoint_dir, data_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir)).eval()
    counts = np.load(data_dir / "train_token_counts.npy")
    tokens = np.fromfile(data_dir / "val_00000.bin", dtype="<u2").astype(np.int64)
    result = evaluate_perplexity(model, tokens, frequency_buckets(counts), seq_len=16, batch_size=2, max_tokens=50)
    assert result["overall"]["num_tokens"] == 50 and result["windows"]["num_windows"] == 4
