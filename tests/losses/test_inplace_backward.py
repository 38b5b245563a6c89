"""``inplace_backward=True`` (from logits): the backward writes the gradient over the logits, allocates no (N, V)
tensor, gives the same gradient as the default, and anything that still needed the logits fails loudly."""

import pytest
import torch

import mileloss
from mileloss.errors import ParameterError
from tests import reference
from tests.conftest import assert_close
from tests.losses.helpers import make_batch


def backward_in_place(logits, targets, grad_output=None, **options):
    """(loss, the logits' gradient as it reaches a non-leaf's hook, whether it lives in the logits' memory)."""
    z = logits.detach().clone().requires_grad_() * 1.0  # a non-leaf: its hook sees what our backward returns
    seen = []
    z.register_hook(lambda grad: seen.append((grad.clone(), grad.data_ptr() == z.data_ptr())))
    loss = mileloss.token_weighted_loss(z, targets, inplace_backward=True, **options)
    loss.backward(grad_output)
    (grad, in_place), = seen
    assert torch.equal(z.detach(), grad)  # the logits now hold their gradient
    return loss.detach(), grad, in_place


ALL_OPTIONS = dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-2)
THROUGH_THE_WEIGHT = dict(detach_weight=False, reduction="none")
CASES = [(weighting, False, options) for weighting in ("ce", "focal", "mile")
         for options in ({}, ALL_OPTIONS, THROUGH_THE_WEIGHT)] + [("mile", True, {})]
CASES += [pytest.param("mile", True, options, marks=pytest.mark.slow) for options in (ALL_OPTIONS, THROUGH_THE_WEIGHT)]


@pytest.mark.parametrize("weighting,compile_mode,options", CASES)
def test_the_gradient_is_the_default_one_and_lives_in_the_logits(weighting, compile_mode, options):
    logits, targets = make_batch(37, 53, torch.float32)
    grad_output = torch.rand(37) if options.get("reduction") == "none" else None
    loss, grad, in_place = backward_in_place(logits, targets, grad_output, weighting=weighting, chunk_size=16,
                                             compile=compile_mode, **options)
    assert in_place
    default = logits.clone().requires_grad_()
    want = mileloss.token_weighted_loss(default, targets, weighting=weighting, chunk_size=16, compile=compile_mode,
                                        **options)
    want.backward(grad_output)
    assert_close(loss, want.detach(), torch.float32, what="loss")
    assert_close(grad, default.grad, torch.float32, what="grad")
    oracle = logits.double().requires_grad_()
    reference.loss(oracle, targets, weighting, **options).backward(
        None if grad_output is None else grad_output.double())
    assert_close(grad, oracle.grad, torch.float32, what="grad vs oracle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_receive_the_gradient_in_their_dtype(dtype):
    logits, targets = make_batch(29, 41, dtype)
    _, grad, in_place = backward_in_place(logits, targets, chunk_size=8)
    default = logits.clone().requires_grad_()
    mileloss.mile_loss(default, targets, chunk_size=8).backward()
    assert in_place and grad.dtype == dtype
    assert torch.equal(grad, default.grad)  # both round the same fp32 gradient once


def test_a_second_backward_fails_instead_of_reading_overwritten_logits():
    logits, targets = make_batch(12, 9, torch.float32)
    z = logits.requires_grad_() * 1.0
    loss = mileloss.mile_loss(z, targets, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_logits_another_op_saved_make_its_backward_fail_not_compute_wrong_gradients():
    x, targets = make_batch(12, 9, torch.float32)
    x.requires_grad_()
    z = x.exp()  # exp saves its output, the logits, for its own backward
    loss = mileloss.mile_loss(z, targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_option_is_checked_and_refused_for_the_fused_module():
    with pytest.raises(ParameterError, match="inplace_backward"):
        mileloss.MiLeLoss(inplace_backward="yes")
    with pytest.raises(ParameterError, match="from logits"):
        mileloss.LinearMiLeLoss(inplace_backward=True)
    module = mileloss.CrossEntropyLoss(inplace_backward=True)
    logits, targets = make_batch(10, 7, torch.float32)
    z = logits.requires_grad_() * 1.0
    module(z, targets).backward()
    expected = torch.nn.functional.softmax(logits.detach(), -1)
    valid = targets != reference.IGNORE
    expected[valid.nonzero()[:, 0], targets[valid]] -= 1.0
    expected = torch.where(valid[:, None], expected / valid.sum(), torch.zeros_like(expected))
    assert_close(z.detach(), expected, torch.float32, what="logits hold the CE gradient")


def test_expanded_logits_are_refused_by_name_and_transposed_ones_work():
    targets = torch.randint(0, 50, (40,))
    row = torch.randn(1, 50, requires_grad=True)
    with pytest.raises(ParameterError, match="expanded"):
        mileloss.mile_loss(row.expand(40, 50), targets, inplace_backward=True)
    base = torch.randn(50, 40, requires_grad=True)
    mileloss.mile_loss(base.t() * 1.0, targets, inplace_backward=True, chunk_size=16).backward()  # strides (1, 40)
    expected = base.detach().clone().requires_grad_()
    mileloss.mile_loss(expected.t(), targets, chunk_size=16).backward()
    assert_close(base.grad, expected.grad, torch.float32)
