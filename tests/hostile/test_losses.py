"""Reproductions of the loss-engine bugs of issue 7 (items 5, 6, 7, 9): each fails on the engine before the fix.

The float64 oracle is ``tests/reference.py`` (no mileloss code); broader sweeps are in ``tests/losses/``.
"""

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mileloss
from mileloss.errors import (
    DTypeError,
    NotATensorError,
    ParameterError,
    ShapeError,
    TargetRangeError,
    WeightRangeError,
)
from tests import reference
from tests.conftest import assert_close

INF = float("inf")


def loss_and_grad(fn, tensor):
    leaf = tensor.detach().clone().requires_grad_()
    value = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


# --- item 5: -inf logits (a masked vocabulary) --------------------------------------------------------------


def masked_batch(n=12, v=40, masked=slice(10, 30)):
    logits = torch.randn(n, v, dtype=torch.float64) * 3
    logits[:, masked] = -INF
    targets = torch.randint(0, 10, (n,))
    targets[::5] = reference.IGNORE
    return logits, targets


@pytest.mark.parametrize("detach_weight", [True, False])
def test_mile_with_minus_inf_logits_is_finite_and_equals_the_oracle(detach_weight):
    logits, targets = masked_batch()
    options = dict(detach_weight=detach_weight)
    ours, our_grad = loss_and_grad(lambda z: mileloss.mile_loss(z, targets, chunk_size=5, **options), logits)
    want, want_grad = loss_and_grad(lambda z: reference.loss(z, targets, "mile", **options), logits)
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    assert_close(ours, want, what="loss")
    assert_close(our_grad, want_grad, what="grad")


def test_fused_mile_with_minus_inf_bias_equals_the_oracle():
    logits, targets = masked_batch()
    hidden, weight = torch.randn(12, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    bias = torch.zeros(40, dtype=torch.float64)
    bias[10:30] = -INF
    ours = mileloss.linear_mile_loss(hidden, weight, targets, bias, chunk_size=5)
    assert_close(ours, reference.loss(hidden @ weight.T + bias, targets, "mile"))


def test_paper_mode_and_stats_with_minus_inf_logits_are_finite():
    logits, targets = masked_batch()
    paper = mileloss.mile_loss(logits, targets, normalize="paper", chunk_size=5)
    assert_close(paper, reference.official(logits, targets).mean(), what="paper loss")
    _, stats = mileloss.mile_loss(logits, targets, return_stats=True)
    assert_close(stats.entropy, reference.per_token_terms(logits, targets, "mile", 1.0, 1.0)[1], what="entropy")


def test_target_with_minus_inf_logit_gives_inf_loss_like_cross_entropy():
    logits, targets = masked_batch()
    targets[1] = 15  # a masked class
    for weighting in ("ce", "focal", "mile"):
        ours, grad = loss_and_grad(lambda z, w=weighting: mileloss.token_weighted_loss(z, targets, weighting=w), logits)
        assert ours == INF and torch.isfinite(grad).all()
    assert F.cross_entropy(logits, targets) == INF


def test_a_row_of_minus_inf_is_nan_when_valid_and_unseen_when_ignored_like_cross_entropy():
    logits, targets = masked_batch()
    logits[2] = -INF
    targets[2] = 3
    assert torch.isnan(mileloss.mile_loss(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    targets[2] = reference.IGNORE
    assert_close(mileloss.mile_loss(logits, targets), reference.loss(logits, targets, "mile"))


@pytest.mark.parametrize("bad", [INF, float("nan")])
@pytest.mark.parametrize("fused", [False, True])
def test_plus_inf_or_nan_logits_still_give_nan_next_to_minus_inf(bad, fused):
    logits, targets = masked_batch()
    for weighting in ("ce", "focal", "mile"):
        if fused:
            bias = torch.zeros(40, dtype=torch.float64)
            bias[10:30] = -INF
            bias[3] = bad
            value = mileloss.linear_token_weighted_loss(torch.randn(12, 4, dtype=torch.float64),
                                                        torch.randn(40, 4, dtype=torch.float64), targets, bias,
                                                        weighting=weighting)
        else:
            poisoned = logits.clone()
            poisoned[4, 2] = bad
            value = mileloss.token_weighted_loss(poisoned, targets, weighting=weighting)
        assert torch.isnan(value), weighting


# --- item 6: overflow and underflow of the weights and the normaliser ---------------------------------------


def test_gamma_40_at_vocab_32000_is_finite_and_equals_the_oracle():
    logits, targets = torch.randn(12, 32000), torch.randint(0, 32000, (12,))
    ours, grad = loss_and_grad(lambda z: mileloss.mile_loss(z, targets, gamma=40.0), logits)
    want, want_grad = loss_and_grad(lambda z: reference.loss(z, targets, "mile", gamma=40.0), logits.double())
    assert_close(ours, want, torch.float32, what="loss")
    assert_close(grad, want_grad, torch.float32, what="grad")


def confident_batch(gap, dtype, n=16, v=50, noise=0.3):
    """Every row confident: the target's logit ``gap`` above noise, so 1 - p_y ~ v e^-gap."""
    logits = torch.randn(n, v, dtype=torch.float64) * noise
    targets = torch.randint(0, v, (n,))
    logits[torch.arange(n), targets] += gap
    return logits.to(dtype), targets


# float32 too at float32 tolerance: for focal and sigma < 1 the engine sums the tail sum_{v != argmax} e_v
# without the maximum's 1, so 1 - p_y and H of these rows keep their relative precision
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gap,gamma", [(20, 8.0), (24, 6.0), (30, 0.5)])
def test_sigma_0_on_peaked_logits_is_finite_and_equals_the_oracle(gap, gamma, dtype):
    logits, targets = confident_batch(gap, dtype)  # H ~ 1e-7 .. 1e-11: H^gamma as small as 1e-90
    ours, grad = loss_and_grad(lambda z: mileloss.mile_loss(z, targets, sigma=0.0, gamma=gamma), logits)
    want, want_grad = loss_and_grad(lambda z: reference.loss(z, targets, "mile", gamma=gamma, sigma=0.0),
                                    logits.double())
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    assert_close(ours, want, dtype, what="loss")
    assert_close(grad, want_grad, dtype, what="grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gap", [17, 18])
def test_focal_gamma_8_on_confident_predictions_keeps_its_loss_and_gradient(gap, dtype):
    logits, targets = confident_batch(gap, dtype)  # (1 - p_y)^8 ~ 1e-46 .. 1e-50: below float32
    ours, grad = loss_and_grad(lambda z: mileloss.focal_loss(z, targets, gamma=8.0), logits)
    want, want_grad = loss_and_grad(lambda z: reference.loss(z, targets, "focal", gamma=8.0), logits.double())
    assert ours > 0 and grad.abs().max() > 0
    assert_close(ours, want, dtype, what="loss")
    assert_close(grad, want_grad, dtype, what="grad")


def test_float16_sum_is_returned_in_float32_and_does_not_overflow():
    logits, targets = torch.randn(6000, 200).half(), torch.randint(0, 200, (6000,))
    total = mileloss.mile_loss(logits, targets, reduction="sum")
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert_close(total, reference.loss(logits, targets, "mile", reduction="sum"), torch.float32, rtol=1e-5)


def test_gradient_accumulation_at_gamma_40_equals_one_big_batch():
    hidden, weight = torch.randn(40, 8), torch.randn(32000, 8) * 0.3
    targets = torch.randint(0, 32000, (40,))
    w_big = weight.clone().requires_grad_()
    mileloss.linear_mile_loss(hidden, w_big, targets, gamma=40.0, chunk_size=7).backward()
    w_acc = weight.clone().requires_grad_()
    normalizer = mileloss.WeightNormalizer()
    for rows in (slice(0, 15), slice(15, 40)):
        loss_sum, stats = mileloss.linear_mile_loss(hidden[rows], w_acc, targets[rows], gamma=40.0, chunk_size=7,
                                                    reduction="sum", return_stats=True)
        assert torch.isfinite(loss_sum)
        (loss_sum * 0.5).backward()
        normalizer.add(stats, 0.5)
    loss = normalizer.rescale_gradients_([w_acc])
    assert_close(loss, reference.loss((hidden @ weight.T).double(), targets, "mile", gamma=40.0), torch.float32)
    assert_close(w_acc.grad, w_big.grad, torch.float32, what="accumulated grad")


def test_weight_normalizer_refuses_a_step_whose_weights_underflow_the_fixed_shift():
    logits = torch.randn(8, 50) * 30
    targets = logits.argmax(1)  # focal weights (1 - p_y)^30 ~ 1e-200: far below 2^-64
    leaf = logits.clone().requires_grad_()
    loss_sum, stats = mileloss.focal_loss(leaf, targets, gamma=30.0, reduction="sum", return_stats=True)
    loss_sum.backward()
    normalizer = mileloss.WeightNormalizer()
    normalizer.add(stats)
    with pytest.raises(WeightRangeError, match="2\\^-64"):
        normalizer.rescale_gradients_([leaf])


# --- item 7: autograd state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(reduction="none"), dict(detach_weight=False)])
def test_second_backward_raises_instead_of_doubling_the_gradient(options):
    logits = torch.randn(6, 9, requires_grad=True)
    loss = mileloss.mile_loss(logits, torch.randint(0, 9, (6,)), **options).sum()
    loss.backward()
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    assert torch.equal(logits.grad, first)


def _live_tensors(shape, dtype):
    gc.collect()
    tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]  # type(): no attribute lookups
    return [t for t in tensors if t.shape == shape and t.dtype == dtype]


def test_the_saved_gradient_is_freed_after_backward_while_the_loss_lives():
    # the fused path keeps fp32 (V, D) accumulators for a bfloat16 head; the logits path an (N, V) gradient
    hidden = torch.randn(7, 5, dtype=torch.bfloat16)
    head = torch.randn(13, 5, dtype=torch.bfloat16, requires_grad=True)
    loss = mileloss.linear_mile_loss(hidden, head, torch.randint(0, 13, (7,)))
    assert len(_live_tensors((13, 5), torch.float32)) == 1  # the accumulator, before backward
    loss.backward()
    assert _live_tensors((13, 5), torch.float32) == []
    logits = torch.randn(11, 17, requires_grad=True)
    loss = mileloss.mile_loss(logits, torch.randint(0, 17, (11,)))
    loss.backward()
    logits.grad = None
    assert [t for t in _live_tensors((11, 17), torch.float32) if t is not logits] == []
    assert loss.grad_fn is not None  # the loss is still alive


# --- item 9: tracebacks instead of named errors -------------------------------------------------------------


def small():
    return torch.randn(4, 5), torch.randint(0, 5, (4,))


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=None), "gamma must be a real number"),
    (dict(ignore_index=None), "ignore_index must be an int"),
    (dict(chunk_size=True), "chunk_size must be an int, got bool"),
])
def test_none_and_bool_options_raise_parameter_error(kwargs, match):
    logits, targets = small()
    with pytest.raises(ParameterError, match=match):
        mileloss.mile_loss(logits, targets, **kwargs)


def test_fused_call_with_empty_hidden_dimension_raises_shape_error():
    with pytest.raises(ShapeError, match="empty feature dimension"):
        mileloss.linear_mile_loss(torch.randn(4, 0), torch.randn(5, 0), torch.randint(0, 5, (4,)))


def test_numpy_targets_are_refused_by_type_not_by_device():
    logits, targets = small()
    with pytest.raises(NotATensorError, match="targets must be a torch.Tensor, got numpy.ndarray") as error:
        mileloss.mile_loss(logits, targets.cpu().numpy())
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)
    with pytest.raises(NotATensorError, match="torch.from_numpy"):
        mileloss.linear_mile_loss(torch.randn(4, 3), torch.randn(5, 3), np.zeros(4, dtype=np.int64))


# the old range check compared in the targets' dtype: V = 200 wrapped to -56 in int8 (a false error) and
# ignore_index = -100 to 156 in uint8 (so a target 156 >= V passed the check)
@pytest.mark.parametrize("dtype,vocab,bad", [(torch.int8, 200, -3), (torch.int16, 40000, -7), (torch.uint8, 100, 156),
                                             (torch.int32, 70000, 70000)])
def test_small_integer_target_dtypes_are_accepted_and_range_checked(dtype, vocab, bad):
    logits = torch.randn(4, vocab)
    targets = torch.tensor([1, 2, 3, min(vocab - 1, torch.iinfo(dtype).max)])
    assert_close(mileloss.mile_loss(logits, targets.to(dtype)), mileloss.mile_loss(logits, targets), torch.float32)
    if dtype != torch.uint8:
        ignored = targets.clone()
        ignored[0] = -100
        assert_close(mileloss.mile_loss(logits, ignored.to(dtype)), mileloss.mile_loss(logits, ignored),
                     torch.float32)
    wrong = targets.clone()
    wrong[1] = bad
    with pytest.raises(TargetRangeError, match=f"target {bad} is outside \\[0, {vocab}\\)"):
        mileloss.mile_loss(logits, wrong.to(dtype))


def test_bool_and_float_targets_are_refused_by_name():
    logits, targets = small()
    for bad in (targets.bool(), targets.float()):
        with pytest.raises(DTypeError, match="targets must be an integer tensor"):
            mileloss.mile_loss(logits, bad)


# --- issue 12's options under hostile input --------------------------------------------------------------------


def test_token_weights_as_numpy_or_bool_are_named():
    logits, targets = torch.randn(5, 7), torch.randint(0, 7, (5,))
    with pytest.raises(NotATensorError, match="torch.from_numpy"):
        mileloss.mile_loss(logits, targets, token_weights=np.ones(5))
    with pytest.raises(DTypeError, match="token_weights"):
        mileloss.mile_loss(logits, targets, token_weights=torch.ones(5, dtype=torch.bool))


def test_huge_token_weights_keep_a_finite_mean():
    # log-space: t = 1e300 (beyond float32) is only an offset of the log-weights
    logits = torch.randn(9, 13)
    targets = torch.randint(0, 13, (9,))
    t = torch.full((9,), 1e300, dtype=torch.float64)
    t[0] = 1e-300
    for weighting in ("ce", "focal", "mile"):
        ours, grad = loss_and_grad(lambda z, w=weighting: mileloss.token_weighted_loss(
            z, targets, weighting=w, token_weights=t), logits)
        want, want_grad = loss_and_grad(lambda z, w=weighting: reference.loss(
            z, targets, w, token_weights=t), logits.double())
        assert torch.isfinite(ours) and torch.isfinite(grad).all()
        assert_close(ours, want, torch.float32)
        assert_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_all_zero_token_weights_give_zero_loss_and_gradient(z_loss):
    logits, targets = torch.randn(6, 8), torch.randint(0, 8, (6,))
    for reduction in ("mean", "sum"):
        loss, grad = loss_and_grad(lambda z, r=reduction: mileloss.mile_loss(
            z, targets, token_weights=torch.zeros(6), z_loss=z_loss, reduction=r), logits)
        assert float(loss) == 0.0 and not grad.any()


def test_label_smoothing_with_masked_logits_matches_f_cross_entropy():
    logits = torch.randn(6, 10)
    logits[:, 7:] = -INF  # a masked vocabulary: the uniform term is infinite, as in F.cross_entropy
    targets = torch.randint(0, 7, (6,))
    ours = mileloss.cross_entropy_loss(logits, targets, label_smoothing=0.1, reduction="none")
    want = F.cross_entropy(logits, targets, label_smoothing=0.1, reduction="none")
    assert torch.equal(torch.isinf(ours), torch.isinf(want))
    assert_close(mileloss.cross_entropy_loss(logits, targets, label_smoothing=0.0),
                 F.cross_entropy(logits, targets), torch.float32)


def test_softcap_of_a_nan_logit_stays_nan():
    logits = torch.randn(4, 6)
    logits[2, 3] = float("nan")
    assert torch.isnan(mileloss.mile_loss(logits, torch.randint(0, 6, (4,)), softcap=5.0))


def test_token_weights_on_another_device_are_named():
    from mileloss.errors import DeviceError

    logits, targets = torch.randn(5, 7), torch.randint(0, 7, (5,))
    with pytest.raises(DeviceError, match="token_weights is on meta"):
        mileloss.mile_loss(logits, targets, token_weights=torch.ones(5, device="meta"))
