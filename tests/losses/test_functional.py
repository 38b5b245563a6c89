"""The chunked engine equals the float64 oracle: values and gradients, every weighting and option."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mileloss
from tests import reference
from tests.conftest import assert_close
from tests.losses.helpers import grads_of, make_batch

WEIGHTINGS = ["ce", "focal", "mile"]


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["weighted", "none"])
@pytest.mark.parametrize("detach_weight", [True, False])
def test_chunked_matches_reference_values_and_grads(weighting, reduction, normalize, detach_weight):
    logits, targets = make_batch(47, 123)  # 47 rows, chunk 8: the last chunk is partial
    options = dict(gamma=1.7, sigma=0.5, reduction=reduction, normalize=normalize, detach_weight=detach_weight)
    grad_output = torch.randn(47, dtype=torch.float64) if reduction == "none" else None
    ours, (our_grad,) = grads_of(
        lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, chunk_size=8, **options),
        logits, grad_output=grad_output)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting, **options), logits,
                                  grad_output=grad_output)
    assert_close(ours, want, what="loss")
    assert_close(our_grad, want_grad, what="grad logits")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_matches_reference_for_hidden_weight_and_bias(weighting, with_bias, reduction):
    n, d, v = 31, 12, 97
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64) * 0.5
    bias = torch.randn(v, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, v, (n,))
    targets[3::4] = reference.IGNORE
    go = torch.randn(n, dtype=torch.float64) if reduction == "none" else None
    tensors = (hidden, weight) + ((bias,) if with_bias else ())

    def ours_fn(h, w, *b):
        return mileloss.linear_token_weighted_loss(h, w, targets, b[0] if b else None, weighting=weighting,
                                                   reduction=reduction, chunk_size=5, gamma=2.0)

    def ref_fn(h, w, *b):
        logits = h @ w.T + (b[0] if b else 0)
        return reference.loss(logits, targets, weighting, gamma=2.0, reduction=reduction)

    ours, our_grads = grads_of(ours_fn, *tensors, grad_output=go)
    want, want_grads = grads_of(ref_fn, *tensors, grad_output=go)
    assert_close(ours, want, what="loss")
    for name, got, expected in zip(["hidden", "weight", "bias"], our_grads, want_grads, strict=False):
        assert_close(got, expected, what=f"grad {name}")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 70), v=st.integers(1, 97), chunk=st.integers(1, 80),
    weighting=st.sampled_from(WEIGHTINGS), reduction=st.sampled_from(["mean", "sum", "none"]),
    normalize=st.sampled_from(["weighted", "none"]), ignore_every=st.integers(0, 4),
    gamma=st.floats(0.0, 3.0), sigma=st.floats(0.0, 2.0), seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(n, v, chunk, weighting, reduction, normalize, ignore_every, gamma, sigma,
                                       seed):
    torch.manual_seed(seed)
    logits, targets = make_batch(n, v, ignore_every=ignore_every)
    options = dict(gamma=gamma, sigma=sigma, reduction=reduction, normalize=normalize)
    ours, (our_grad,) = grads_of(
        lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, chunk_size=chunk, **options), logits)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting, **options), logits)
    assert_close(ours, want, what="loss", atol=1e-10)
    assert_close(our_grad, want_grad, what="grad", atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_low_precision_error_is_no_worse_than_naive_same_dtype(dtype, weighting):
    # CCE's rule: our error against the float64 truth must not exceed the naive same-dtype error + tol
    logits64, targets = make_batch(64, 1000, scale=2.0)
    logits = logits64.to(dtype)
    truth, (truth_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting), logits.double())
    ours, (our_grad,) = grads_of(lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting), logits)
    assert ours.dtype == dtype and our_grad.dtype == dtype
    naive, (naive_grad,) = grads_of(lambda z: naive_same_dtype(z, targets, weighting), logits)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    loss_error = (ours.double() - truth).abs()
    assert loss_error <= (naive.double() - truth).abs() + tol * truth.abs()
    grad_error = (our_grad.double() - truth_grad).abs().max()
    assert grad_error <= (naive_grad.double() - truth_grad).abs().max() + tol * truth_grad.abs().max()


def naive_same_dtype(logits, targets, weighting):
    """The loss computed naively without upcasting, the way a user's code would in that dtype."""
    valid = targets != reference.IGNORE
    log_p = torch.log_softmax(logits, dim=-1)
    ce = -log_p.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1).detach()
    weight = {"ce": torch.ones_like(ce), "focal": 1 - torch.exp(-ce.detach()), "mile": 1 + entropy}[weighting]
    weight = weight * valid
    return (weight * ce).sum() / weight.sum()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_three_dimensional_inputs_keep_the_target_shape(fused, reduction):
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 5))
    if fused:
        out = mileloss.linear_mile_loss(hidden, weight, targets, reduction=reduction)
    else:
        out = mileloss.mile_loss(hidden @ weight.T, targets, reduction=reduction)
    flat = mileloss.mile_loss((hidden @ weight.T).view(10, 11), targets.view(10), reduction=reduction)
    assert out.shape == (targets.shape if reduction == "none" else ())
    assert_close(out.reshape(-1), flat.reshape(-1), torch.float32)


def test_per_token_stats_match_the_oracle_and_sum_up():
    logits, targets = make_batch(29, 41)
    loss, stats = mileloss.mile_loss(logits, targets, return_stats=True, chunk_size=4)
    ce, entropy, weight = reference.per_token_terms(logits, targets, "mile", 1.0, 1.0)
    assert_close(stats.ce, ce, what="ce")
    assert_close(stats.entropy, entropy, what="entropy")
    assert_close(stats.weight, weight, what="weight")
    assert_close(stats.lse, torch.logsumexp(logits, -1), what="lse")
    assert torch.all(stats.weight[targets == reference.IGNORE] == 0)
    assert_close(stats.weighted_ce_sum / stats.weight_sum, loss, what="loss from stats")
    assert int(stats.valid_count) == int((targets != reference.IGNORE).sum())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("compile_mode", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_per_token_max_logit_and_top1_correctness_come_with_the_stats(fused, compile_mode, softcap):
    n, d, v = 29, 6, 41
    hidden, weight = torch.randn(n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    logits = hidden @ weight.T
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    targets = torch.randint(0, v, (n,))
    targets[::3] = capped.argmax(-1)[::3]
    targets[::7] = reference.IGNORE  # ignored rows are never correct, even where target 0 would be
    options = dict(return_stats=True, chunk_size=8, softcap=softcap, compile=compile_mode)
    if fused:
        _, stats = mileloss.linear_mile_loss(hidden, weight, targets, **options)
    else:
        _, stats = mileloss.mile_loss(logits, targets, **options)
    assert_close(stats.max_logit, capped.max(-1).values, what="max logit")
    valid = targets != reference.IGNORE
    expected = valid & (capped.argmax(-1) == torch.where(valid, targets, 0))
    assert stats.correct.dtype == torch.bool and torch.equal(stats.correct, expected)
    assert int(expected.sum()) >= 8


@pytest.mark.parametrize("weighting", ["ce", "focal"])
def test_per_token_entropy_is_reported_for_every_weighting(weighting):
    logits, targets = make_batch(17, 23)
    _, stats = mileloss.token_weighted_loss(logits, targets, weighting=weighting, return_stats=True, chunk_size=5)
    assert_close(stats.entropy, reference.per_token_terms(logits, targets, weighting, 1.0, 1.0)[1], what="entropy")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("normalize", ["weighted", "none", "paper"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [0, 6])  # empty, and 6 rows that are all ignored
def test_empty_or_all_ignored_batch_gives_zero_loss_and_zero_grad(fused, normalize, reduction, n):
    targets = torch.full((n,), reference.IGNORE)
    hidden = torch.randn(n, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    if fused:
        loss = mileloss.linear_focal_loss(hidden, weight, targets, normalize=normalize, reduction=reduction)
    else:
        logits = (hidden @ weight.T).detach().requires_grad_()
        loss = mileloss.focal_loss(logits, targets, normalize=normalize, reduction=reduction)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    for tensor in ([hidden, weight] if fused else [logits]):
        assert torch.all(tensor.grad == 0)


def test_non_finite_logits_give_nan_not_a_finite_wrong_number():
    logits, targets = make_batch(8, 10, ignore_every=0)
    for bad in (float("nan"), float("inf")):
        poisoned = logits.clone()
        poisoned[3, 4] = bad
        for weighting in WEIGHTINGS:
            assert torch.isnan(mileloss.token_weighted_loss(poisoned, targets, weighting=weighting))


def test_modules_equal_the_functions():
    logits, targets = make_batch(10, 13)
    hidden, weight = torch.randn(10, 6, dtype=torch.float64), torch.randn(13, 6, dtype=torch.float64)
    assert_close(mileloss.MiLeLoss(gamma=0.5)(logits, targets), mileloss.mile_loss(logits, targets, gamma=0.5))
    assert_close(mileloss.FocalLoss(gamma=2.0)(logits, targets), mileloss.focal_loss(logits, targets, gamma=2.0))
    assert_close(mileloss.CrossEntropyLoss()(logits, targets), torch.nn.functional.cross_entropy(logits, targets))
    assert_close(mileloss.LinearMiLeLoss()(hidden, weight, targets), mileloss.mile_loss(hidden @ weight.T, targets))
    assert "gamma=0.5" in repr(mileloss.MiLeLoss(gamma=0.5))


def test_no_grad_evaluation_gives_the_same_loss():
    logits, targets = make_batch(20, 30)
    with torch.no_grad():
        no_grad_loss = mileloss.mile_loss(logits, targets)
    assert_close(no_grad_loss, mileloss.mile_loss(logits.requires_grad_(), targets))


def test_only_requested_gradients_are_produced():
    hidden = torch.randn(12, 5, requires_grad=True)
    weight = torch.randn(7, 5)  # frozen head
    targets = torch.randint(0, 7, (12,))
    mileloss.linear_mile_loss(hidden, weight, targets).backward()
    assert weight.grad is None
    hidden64 = hidden.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.loss(hidden64 @ weight.double().T, targets), hidden64)[0]
    assert_close(hidden.grad, expected, torch.float32)


@pytest.mark.parametrize("compile_mode", [False, True])
def test_from_logits_the_forward_keeps_only_the_logits_and_per_row_statistics(compile_mode):
    # the gradient is made in backward, in one sweep from the saved row maxima and log-denominators: between
    # forward and backward nothing of size (N, V) is held but the caller's own logits
    n, v = 40, 300
    logits, targets = make_batch(n, v, torch.float32)
    logits.requires_grad_()
    saved = []

    def keep(tensor):
        saved.append((tensor.data_ptr(), tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = mileloss.mile_loss(logits, targets, chunk_size=16, compile=compile_mode)
    wide = [(ptr, size) for ptr, size in saved if size > n]
    assert wide == [(logits.data_ptr(), n * v)]
    loss.backward()
    expected = grads_of(lambda z: reference.loss(z, targets), logits.detach().double())[1][0]
    assert_close(logits.grad, expected, torch.float32)


def test_second_backward_through_the_same_loss_gives_the_same_gradient():
    logits, targets = make_batch(6, 7)
    logits.requires_grad_()
    loss = mileloss.mile_loss(logits, targets)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss * 3.0, logits)[0]
    assert_close(second, 3.0 * first)


@pytest.mark.parametrize("weighting", ["focal", "mile"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_with_gradient_through_the_weight(weighting, reduction):
    logits, targets = make_batch(7, 5, scale=1.0)
    logits.requires_grad_()
    fn = lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, gamma=1.5, reduction=reduction,
                                                detach_weight=False, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (logits,))


# a detached weight has no analytic derivative by design, so finite differences check CE and the
# non-detached weightings; detached MiLe/focal are checked against the oracle above
@pytest.mark.parametrize("weighting,detach_weight", [("ce", True), ("mile", False), ("focal", False)])
def test_gradcheck_fused_linear(weighting, detach_weight):
    hidden = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, -100, 2, 1, 3])
    fn = lambda h, w, b: mileloss.linear_token_weighted_loss(h, w, targets, b, weighting=weighting,
                                                             detach_weight=detach_weight, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_runs_under_torch_compile_and_matches_eager():
    # inductor compiles the model around the loss; the chunk loop itself runs eagerly (a graph break)
    torch._dynamo.reset()
    embed, head = torch.nn.Embedding(19, 8), torch.nn.Linear(8, 19, bias=False)
    inputs, targets = torch.randint(0, 19, (2, 6)), torch.randint(0, 19, (2, 6))

    def step():
        loss = mileloss.linear_mile_loss(torch.tanh(embed(inputs)), head.weight, targets)
        loss.backward()
        grad = head.weight.grad.clone()
        head.weight.grad = embed.weight.grad = None
        return loss.detach(), grad

    compiled_loss, compiled_grad = torch.compile(step)()
    eager_loss, eager_grad = step()
    assert_close(compiled_loss, eager_loss, torch.float32)
    assert_close(compiled_grad, eager_grad, torch.float32)


def test_weight_normalizer_matches_one_big_batch_and_propagates_nan():
    logits, targets = make_batch(30, 11)
    big = logits.clone().requires_grad_()
    mileloss.mile_loss(big, targets).backward()
    micro = logits.clone().requires_grad_()
    normalizer = mileloss.WeightNormalizer()
    for rows in (slice(0, 13), slice(13, 30)):
        loss_sum, stats = mileloss.mile_loss(micro[rows], targets[rows], reduction="sum", return_stats=True)
        (loss_sum * 0.25).backward()
        normalizer.add(stats, 0.25)
    loss = normalizer.rescale_gradients_([micro])
    assert_close(loss, reference.loss(logits, targets, "mile"))
    assert_close(micro.grad, big.grad)

    poisoned = logits.clone()
    poisoned[2, 3] = float("nan")
    poisoned.requires_grad_()
    loss_sum, stats = mileloss.mile_loss(poisoned, targets, reduction="sum", return_stats=True)
    loss_sum.backward()
    normalizer.add(stats)
    assert torch.isnan(normalizer.rescale_gradients_([poisoned]))
    assert torch.isnan(poisoned.grad).all()
