"""Bad input raises a ValueError subclass whose message names the problem."""

import pytest
import torch

import mileloss
from mileloss.losses.errors import DeviceError, DTypeError, ParameterError, ShapeError, TargetRangeError


def logits_targets(n=4, v=5):
    return torch.randn(n, v), torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(gamma=-1.0), ParameterError, "gamma must be >= 0"),
        (dict(sigma=-0.1), ParameterError, "sigma must be >= 0"),
        (dict(gamma=float("nan")), ParameterError, "gamma must be a finite number"),
        (dict(reduction="avg"), ParameterError, "reduction must be one of"),
        (dict(normalize="alpha"), ParameterError, "normalize must be one of"),
        (dict(chunk_size=0), ParameterError, "chunk_size"),
        (dict(normalize="paper", detach_weight=False), ParameterError, "detaches the weight"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    logits, targets = logits_targets()
    with pytest.raises(error, match=match):
        mileloss.mile_loss(logits, targets, **kwargs)


def test_target_out_of_range_names_the_value():
    logits, targets = logits_targets()
    targets[2] = 5
    with pytest.raises(TargetRangeError, match=r"target 5 is outside \[0, 5\)"):
        mileloss.mile_loss(logits, targets)
    targets[2] = -1
    with pytest.raises(TargetRangeError, match="target -1"):
        mileloss.focal_loss(logits, targets)


def test_custom_ignore_index_is_accepted_and_ignored():
    logits, targets = logits_targets()
    targets[0] = -1
    loss = mileloss.mile_loss(logits, targets, ignore_index=-1)
    assert torch.isclose(loss, mileloss.mile_loss(logits[1:], targets[1:]))


def test_shape_mismatch_is_named():
    logits, targets = logits_targets()
    with pytest.raises(ShapeError, match=r"targets shape \(3,\) does not match logits leading shape \(4,\)"):
        mileloss.mile_loss(logits, targets[:3])
    with pytest.raises(ShapeError, match="weight must be"):
        mileloss.linear_mile_loss(torch.randn(4, 3), torch.randn(5, 2), targets)
    with pytest.raises(ShapeError, match="bias must have shape"):
        mileloss.linear_mile_loss(torch.randn(4, 3), torch.randn(5, 3), targets, torch.randn(4))


def test_integer_logits_and_float_targets_are_rejected():
    logits, targets = logits_targets()
    with pytest.raises(DTypeError, match="logits must be a floating-point tensor"):
        mileloss.mile_loss(logits.long(), targets)
    with pytest.raises(DTypeError, match="targets must be an integer tensor"):
        mileloss.mile_loss(logits, targets.float())


def test_mismatched_dtypes_are_rejected():
    with pytest.raises(DTypeError, match="same dtype"):
        mileloss.linear_mile_loss(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), torch.zeros(4).long())


def test_mismatched_devices_are_rejected():
    logits, targets = logits_targets()
    with pytest.raises(DeviceError, match="different devices"):
        mileloss.mile_loss(logits.to("meta"), targets)


def test_errors_are_value_errors():
    assert issubclass(TargetRangeError, ValueError) and issubclass(ShapeError, ValueError)
