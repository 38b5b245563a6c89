"""normalize="paper" reproduces the official code's formula, quirks included, to 1e-6 relative."""

import pytest
import torch

import mileloss
from tests import reference
from tests.conftest import assert_close


@pytest.mark.parametrize("weighting", ["ce", "focal", "mile"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_paper_mode_matches_the_official_formula(weighting, dtype, fused):
    n, d, v = 53, 16, 211
    hidden, head = torch.randn(n, d, dtype=dtype), torch.randn(v, d, dtype=dtype) * 2.5  # peaked: p < 1e-8 occurs
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    logits = hidden @ head.T
    if fused:
        ours = mileloss.linear_token_weighted_loss(hidden, head, labels, weighting=weighting, normalize="paper",
                                                   chunk_size=16)
    else:
        ours = mileloss.token_weighted_loss(logits, labels, weighting=weighting, normalize="paper", chunk_size=16)
    official = reference.official(logits, labels, weighting).mean()
    assert_close(ours, official, what="paper loss", rtol=1e-6, atol=0)


def test_paper_mode_counts_ignored_positions_unlike_weighted():
    logits = torch.randn(40, 30, dtype=torch.float64)
    labels = torch.randint(0, 30, (40,))
    labels[:20] = -100
    paper = mileloss.mile_loss(logits, labels, normalize="paper")
    weighted = mileloss.mile_loss(logits, labels)
    assert not torch.isclose(paper, weighted)
    assert_close(weighted, reference.loss(logits, labels, "mile"))


def test_paper_entropy_uses_the_clamped_softmax():
    # one logit far below the others: p ~ e^-40 < 1e-8 contributes -1e-8 log 1e-8 instead of ~0
    logits = torch.tensor([[0.0, 0.0, -40.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    paper_sum = mileloss.mile_loss(logits, labels, normalize="paper", reduction="sum")
    assert_close(paper_sum, reference.official(logits, labels).sum(), rtol=1e-12)
    _, stats = mileloss.mile_loss(logits, labels, normalize="paper", return_stats=True)
    assert stats.entropy[0] > torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-7


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_paper_mode_sum_and_none_scale_by_alpha(reduction):
    logits = torch.randn(12, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (12,))
    labels[1] = -100
    ours = mileloss.mile_loss(logits, labels, normalize="paper", reduction=reduction)
    terms = reference.official(logits, labels)
    assert_close(ours, terms.sum() if reduction == "sum" else terms, rtol=1e-10)


def test_paper_gradients_match_the_official_formula():
    logits = torch.randn(20, 17, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (20,))
    labels[::3] = -100
    mileloss.mile_loss(logits, labels, normalize="paper", chunk_size=6).backward()
    ours = logits.grad.clone()
    logits.grad = None
    reference.official(logits, labels).mean().backward()
    assert_close(ours, logits.grad, what="paper grad", rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighting", ["mile", "focal"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, id="compiled")])
def test_paper_mode_on_peaked_logits_equals_the_official_formula_at_float64_tolerance(weighting, fused, compiled):
    # a third of the rows has p < 1e-8 in most columns: the official clamp makes each of those columns add
    # -1e-8 log 1e-8 ~ 1.8e-7 to H instead of ~0, a change far above float64 tolerance
    generator = torch.Generator(torch.get_default_device()).manual_seed(11)
    n, d, v = 30, 12, 160
    hidden = torch.randn(n, d, generator=generator, dtype=torch.float64)
    hidden[: n // 3] *= 6.0
    head = torch.randn(v, d, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[::4] = -100
    logits = hidden @ head.T
    tiny = (torch.softmax(logits, -1) < 1e-8).sum(1)
    assert (tiny > v // 2).sum() >= 5, "the batch must have several rows with p < 1e-8 in many columns"
    leaves = (hidden.clone().requires_grad_(), head.clone().requires_grad_())
    if fused:
        ours = mileloss.linear_token_weighted_loss(*leaves, labels, weighting=weighting, normalize="paper",
                                                   chunk_size=7, compile=compiled)
    else:
        ours = mileloss.token_weighted_loss(leaves[0] @ leaves[1].T, labels, weighting=weighting,
                                            normalize="paper", chunk_size=7, compile=compiled)
    ours.backward()
    expected_leaves = (hidden.clone().requires_grad_(), head.clone().requires_grad_())
    expected = reference.official(expected_leaves[0] @ expected_leaves[1].T, labels, weighting).mean()
    expected.backward()
    assert_close(ours, expected, what="paper loss")
    for got, want in zip(leaves, expected_leaves, strict=True):
        assert_close(got.grad, want.grad, what="paper grad")
