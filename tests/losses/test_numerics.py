"""Numerical range: -inf logits on every path, log-space weights over the supported gamma/sigma range, the
fixed shift of the unnormalised outputs, output dtypes, and repeated backward."""

import math

import pytest
import torch

import mileloss
from tests import reference
from tests.conftest import assert_close
from tests.losses.helpers import grads_of

WEIGHTINGS = ["ce", "focal", "mile"]
INF = float("inf")


def masked_logits(n=23, v=31, seed=0):
    """float64 logits with -inf in a random ~40% of the entries (never a whole row, never the target)."""
    generator = torch.Generator(torch.get_default_device()).manual_seed(seed)
    logits = torch.randn(n, v, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(n, v, generator=generator) < 0.4
    targets = torch.randint(0, v, (n,), generator=generator)
    mask[torch.arange(n), targets] = False
    logits[mask] = -INF
    targets[::6] = reference.IGNORE
    return logits, targets


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_weight", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_minus_inf_logits_match_the_oracle_on_every_path(weighting, reduction, detach_weight, fused):
    logits, targets = masked_logits()
    options = dict(gamma=1.5, sigma=0.5, reduction=reduction, detach_weight=detach_weight)
    go = torch.randn(len(targets), dtype=torch.float64) if reduction == "none" else None
    if fused:  # -inf through the bias; the hidden part is finite
        hidden, head = torch.randn(23, 6, dtype=torch.float64), torch.randn(31, 6, dtype=torch.float64)
        bias = torch.zeros(31, dtype=torch.float64)
        bias[::3] = -INF  # masked classes; no target among them
        moved = targets - targets % 3 + 1  # the next class not masked ...
        moved = torch.where(moved < 31, moved, moved - 3)  # ... inside the vocabulary (30 -> 28, not 31)
        targets = torch.where(targets >= 0, moved, targets)
        ours, our_grads = grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
            h, w, targets, bias, weighting=weighting, chunk_size=4, **options), hidden, head, grad_output=go)
        want, want_grads = grads_of(lambda h, w: reference.loss(h @ w.T + bias, targets, weighting, **options),
                                    hidden, head, grad_output=go)
    else:
        ours, our_grads = grads_of(lambda z: mileloss.token_weighted_loss(
            z, targets, weighting=weighting, chunk_size=4, **options), logits, grad_output=go)
        want, want_grads = grads_of(lambda z: reference.loss(z, targets, weighting, **options), logits,
                                    grad_output=go)
    assert_close(ours, want, what="loss")
    for got, expected in zip(our_grads, want_grads, strict=True):
        assert torch.isfinite(got).all()
        assert_close(got, expected, what="grad")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_minus_inf_logits_in_paper_mode_and_stats(weighting):
    logits, targets = masked_logits()
    loss, stats = mileloss.token_weighted_loss(logits, targets, weighting=weighting, normalize="paper",
                                               chunk_size=5, return_stats=True)
    assert_close(loss, reference.official(logits, targets, weighting).mean(), what="paper loss")
    _, stats = mileloss.token_weighted_loss(logits, targets, weighting=weighting, return_stats=True, chunk_size=5)
    ce, entropy, weight = reference.per_token_terms(logits, targets, weighting, 1.0, 1.0)
    assert_close(stats.entropy, entropy, what="entropy")
    assert_close(stats.ce, ce, what="ce")
    assert_close(stats.weight, weight, what="weight")


def peaked_logits(n=40, v=64, seed=1):
    """Rows from near-uniform to near-one-hot (scales 0.1 .. 40), so H spans ~1e-12 .. ln V."""
    generator = torch.Generator(torch.get_default_device()).manual_seed(seed)
    scales = torch.logspace(-1, math.log10(40), n, dtype=torch.float64)[:, None]
    logits = torch.randn(n, v, generator=generator, dtype=torch.float64) * scales
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[::3] = logits[::3].argmax(1)
    targets[5::7] = reference.IGNORE
    return logits, targets


@pytest.mark.parametrize("weighting", ["focal", "mile"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 5.0, 40.0, 200.0])
@pytest.mark.parametrize("sigma", [0.0, 1.0, 10.0])
def test_weighted_mean_matches_the_oracle_over_the_gamma_sigma_range(weighting, gamma, sigma):
    if weighting == "focal" and sigma != 1.0:
        pytest.skip("sigma is not read by focal")
    logits, targets = peaked_logits()
    ours, (our_grad,) = grads_of(lambda z: mileloss.token_weighted_loss(
        z, targets, weighting=weighting, gamma=gamma, sigma=sigma, chunk_size=7), logits)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting, gamma=gamma, sigma=sigma), logits)
    assert torch.isfinite(want)  # the float64 oracle is finite here (w up to 1e230), so must we be
    # the power amplifies the rounding of H (or 1 - p_y) by gamma; and for near-one-hot rows the oracle's own
    # log-softmax rounds log p_max (~ -1e-15) to a few ulps of 1, which the weights read when sigma = 0 or focal
    small_base = weighting == "focal" or sigma == 0.0
    tolerance = dict(rtol=(1e-8 if small_base else 1e-10) * max(1.0, gamma), atol=1e-10 if small_base else 1e-12)
    assert_close(ours, want, what="loss", **tolerance)
    assert_close(our_grad, want_grad, what="grad", **tolerance)


@pytest.mark.parametrize("weighting", ["focal", "mile"])
@pytest.mark.parametrize("gamma", [5.0, 40.0])
def test_float32_weighted_mean_is_finite_and_close_over_the_range(weighting, gamma):
    logits, targets = peaked_logits()
    ours, (our_grad,) = grads_of(lambda z: mileloss.token_weighted_loss(
        z, targets, weighting=weighting, gamma=gamma, sigma=0.0 if weighting == "mile" else 1.0), logits.float())
    want, (want_grad,) = grads_of(lambda z: reference.loss(
        z, targets, weighting, gamma=gamma, sigma=0.0 if weighting == "mile" else 1.0), logits)
    # float32 entropy has a relative error ~1e-7 that the power multiplies by gamma
    assert_close(ours, want, torch.float32, what="loss", rtol=2e-6 * gamma)
    assert_close(our_grad, want_grad, torch.float32, what="grad", rtol=2e-6 * gamma)


def test_fused_accumulators_are_rescaled_when_a_later_chunk_has_larger_weights():
    # rows sorted from peaked to flat: every chunk raises the running max of the log-weights, so the weight and
    # bias gradients are rescaled at each chunk; gamma = 40 spreads the weights over ~1e40
    generator = torch.Generator(torch.get_default_device()).manual_seed(3)
    n, d, v = 36, 5, 50
    hidden = torch.randn(n, d, generator=generator, dtype=torch.float64)
    hidden = hidden * torch.linspace(8, 0.05, n, dtype=torch.float64)[:, None]
    weight, bias = torch.randn(v, d, generator=generator, dtype=torch.float64), torch.randn(v, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=generator)
    ours, our_grads = grads_of(lambda h, w, b: mileloss.linear_mile_loss(h, w, targets, b, gamma=40.0, chunk_size=5),
                               hidden, weight, bias)
    want, want_grads = grads_of(lambda h, w, b: reference.loss(h @ w.T + b, targets, "mile", gamma=40.0),
                                hidden, weight, bias)
    assert_close(ours, want, what="loss", rtol=1e-9)
    for name, got, expected in zip(["hidden", "weight", "bias"], our_grads, want_grads, strict=True):
        assert_close(got, expected, what=f"grad {name}", rtol=1e-9)


@pytest.mark.parametrize("weighting,gamma,sigma,token_weights,fixed", [
    ("ce", 1.0, 1.0, False, True), ("mile", 1.0, 1.0, False, True), ("mile", 0.5, 0.2, False, True),
    ("mile", 40.0, 1.0, False, False), ("focal", 2.0, 1.0, False, False), ("mile", 1.0, 1.0, True, False)])
def test_fused_single_pass_reads_nothing_back_where_the_log_weights_have_a_known_range(
        monkeypatch, weighting, gamma, sigma, token_weights, fixed):
    # CE and MiLe with sigma + H within e^20 of sigma + ln V: one fixed shift, so the (V, D) accumulators are
    # never rescaled and the running maximum is never read on the host (a synchronisation per chunk on CUDA);
    # focal, a wide MiLe range and caller's token weights keep the running maximum. Same gradient either way.
    from mileloss.losses import chunked
    calls = []
    original = chunked.LinearHead.rescale_accumulators
    monkeypatch.setattr(chunked.LinearHead, "rescale_accumulators",
                        lambda head, ratio: (calls.append(ratio), original(head, ratio)))
    generator = torch.Generator(torch.get_default_device()).manual_seed(5)
    n, d, v = 36, 5, 50
    hidden = torch.randn(n, d, generator=generator, dtype=torch.float64)
    hidden = hidden * torch.linspace(8, 0.05, n, dtype=torch.float64)[:, None]
    weight = torch.randn(v, d, generator=generator, dtype=torch.float64)
    # confident and right first, flat last: every weighting's weights grow from chunk to chunk
    targets = (hidden @ weight.T).argmax(dim=1)
    t = torch.logspace(0, 6, n, dtype=torch.float64) if token_weights else None
    options = dict(weighting=weighting, gamma=gamma, sigma=sigma)
    ours, our_grads = grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
        h, w, targets, chunk_size=5, token_weights=t, **options), hidden, weight)
    want, want_grads = grads_of(lambda h, w: reference.loss(h @ w.T, targets, token_weights=t, **options),
                                hidden, weight)
    assert_close(ours, want, what="loss", rtol=1e-9)
    for name, got, expected in zip(["hidden", "weight"], our_grads, want_grads, strict=True):
        assert_close(got, expected, what=f"grad {name}", rtol=1e-9)
    assert (calls == []) == fixed, calls


def test_the_fixed_shift_bounds_every_log_weight_the_engine_can_produce():
    from mileloss.losses.weights import single_pass_shift
    v = 64
    # a one-hot row (H = 0), a uniform row (H = ln V), peaked and flat rows, in paper mode too
    spread = torch.randn(30, v, dtype=torch.float64) * torch.logspace(-3, 2, 30, dtype=torch.float64)[:, None]
    one_hot = torch.full((1, v), -INF, dtype=torch.float64).index_fill_(1, torch.tensor([3]), 0.0)
    logits = torch.cat([one_hot, torch.zeros(1, v, dtype=torch.float64), spread])
    targets = torch.randint(0, v, (len(logits),))
    for gamma, sigma in [(1.0, 1.0), (3.0, 0.5), (0.25, 0.01)]:
        shift = single_pass_shift("mile", gamma, sigma, v)
        assert shift == pytest.approx(gamma * math.log(sigma + math.log(v) + 1.0 + 2e-7 * v))
        for normalize in ("weighted", "paper"):
            _, stats = mileloss.mile_loss(logits, targets, gamma=gamma, sigma=sigma, normalize=normalize,
                                          return_stats=True)
            valid = stats.log_weight[torch.isfinite(stats.log_weight)]
            assert valid.max() <= shift and valid.min() >= shift - 20.0, (gamma, sigma, normalize)
    assert single_pass_shift("ce", 5.0, 1.0, v) == 0.0 and single_pass_shift("mile", 0.0, 0.0, v) == 0.0
    assert single_pass_shift("focal", 2.0, 1.0, v) is None
    assert single_pass_shift("mile", 1.0, 0.0, v) is None  # sigma = 0: H = 0 gives weight 0
    assert single_pass_shift("mile", 40.0, 1.0, 32000) is None  # (1 + ln V)^40 spans ~e^100


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_unnormalised_outputs_carry_the_documented_fixed_shift(reduction):
    logits, targets = torch.randn(12, 3000, dtype=torch.float64), torch.randint(0, 3000, (12,))
    shift = reference.sum_shift("mile", 40.0, 1.0, 3000)
    assert shift > 0  # (1 + ln 3000)^40 ~ 1e39 > 2^32
    ours, stats = mileloss.mile_loss(logits, targets, gamma=40.0, reduction=reduction, return_stats=True)
    assert_close(ours, reference.loss(logits, targets, "mile", gamma=40.0, reduction=reduction))
    assert float(stats.log_weight_shift) == pytest.approx(shift, rel=1e-12)
    ce, _, weight = reference.per_token_terms(logits, targets, "mile", 40.0, 1.0)
    assert_close(stats.weight_sum, weight.sum() * math.exp(-shift))
    assert_close(stats.weighted_ce_sum / stats.weight_sum, reference.loss(logits, targets, "mile", gamma=40.0))
    assert_close(stats.log_weight, weight.log(), what="log weight")
    # the default options keep the plain sum
    _, plain = mileloss.mile_loss(logits, targets, reduction="sum", return_stats=True)
    assert float(plain.log_weight_shift) == 0.0
    assert_close(plain.weight_sum, reference.per_token_terms(logits, targets, "mile", 1.0, 1.0)[2].sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_sums_come_back_in_float32_and_means_in_the_input_dtype(dtype, fused):
    hidden, weight = torch.randn(30, 8).to(dtype), (torch.randn(50, 8) * 0.3).to(dtype)
    targets = torch.randint(0, 50, (30,))
    for reduction, expected in (("mean", dtype), ("sum", torch.float32), ("none", torch.float32)):
        if fused:
            out = mileloss.linear_mile_loss(hidden, weight, targets, reduction=reduction)
        else:
            out = mileloss.mile_loss(hidden @ weight.T, targets, reduction=reduction)
        assert out.dtype == expected, reduction


def test_float16_logits_with_large_weights_keep_a_finite_gradient():
    # (1 + ln 500)^6 ~ 1.4e5 > 65504: the unnormalised per-row gradient used to be stored in float16 and overflow
    logits, targets = (torch.randn(64, 500) * 0.1).half(), torch.randint(0, 500, (64,))
    ours, (grad,) = grads_of(lambda z: mileloss.mile_loss(z, targets, gamma=6.0), logits)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, "mile", gamma=6.0), logits.double())
    assert torch.isfinite(grad).all()
    assert_close(ours, want, torch.float16, what="loss")
    assert_close(grad, want_grad, torch.float16, what="grad")


@pytest.mark.parametrize("fused", [False, True])
def test_retained_graph_gives_the_same_gradient_on_every_backward(fused):
    generator = torch.Generator(torch.get_default_device()).manual_seed(4)
    hidden = torch.randn(14, 4, generator=generator, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (14,), generator=generator)
    if fused:
        leaf = hidden.requires_grad_()
        loss = mileloss.linear_mile_loss(leaf, weight, targets, gamma=30.0, chunk_size=3)
    else:
        leaf = (hidden @ weight.detach().T).requires_grad_()
        loss = mileloss.mile_loss(leaf, targets, gamma=30.0, chunk_size=3)
    first = torch.autograd.grad(loss, leaf, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss * 2.5, leaf, retain_graph=True)[0]
    third = torch.autograd.grad(loss, leaf)[0]
    assert_close(second, 2.5 * first)
    assert_close(third, first)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, leaf)


def test_gamma_zero_is_cross_entropy_even_where_the_base_is_zero():
    logits, targets = torch.randn(10, 7, dtype=torch.float64), torch.randint(0, 7, (10,))
    logits[0] = torch.tensor([0.0] + [-INF] * 6, dtype=torch.float64)  # H = 0, so (sigma + H)^0 with sigma = 0
    targets[0] = 0
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert_close(mileloss.mile_loss(logits, targets, gamma=0.0, sigma=0.0), expected)
    assert_close(mileloss.focal_loss(logits, targets, gamma=0.0), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_paper_mode_at_gamma_40_equals_the_official_formula(reduction):
    # alpha = 1 / mean(w) with w ~ 1e42: alpha and w are combined in logs, never formed in float32
    logits, labels = torch.randn(12, 32000), torch.randint(0, 32000, (12,))
    labels[::4] = reference.IGNORE
    ours = mileloss.mile_loss(logits, labels, gamma=40.0, normalize="paper", reduction=reduction)
    terms = reference.official(logits, labels, gamma=40.0)
    expected = {"mean": terms.mean(), "sum": terms.sum(), "none": terms}[reduction]
    assert_close(ours, expected, torch.float32, what="paper loss")
