"""Bad input raises a ValueError subclass whose message names the problem."""

import numpy as np
import pytest
import torch

import mileloss
from mileloss.errors import (
    DeviceError,
    DTypeError,
    NotATensorError,
    ParameterError,
    ShapeError,
    TargetRangeError,
)


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
        (dict(gamma=float("inf")), ParameterError, "gamma must be a finite number"),
        (dict(gamma=1001.0), ParameterError, "gamma must be <= 1000"),
        (dict(gamma="1.0"), ParameterError, "gamma must be a real number"),
        (dict(gamma=True), ParameterError, "gamma must be a real number"),
        (dict(gamma=torch.tensor(1.0)), ParameterError, "gamma must be a real number"),
        (dict(sigma=float("nan")), ParameterError, "sigma must be a finite number"),
        (dict(sigma=float("inf")), ParameterError, "sigma must be a finite number"),
        (dict(sigma=None), ParameterError, "sigma must be a real number"),
        (dict(sigma=2e6), ParameterError, "sigma must be <= 1e\\+06"),
        (dict(ignore_index=-100.0), ParameterError, "ignore_index must be an int, got float"),
        (dict(ignore_index=True), ParameterError, "ignore_index must be an int, got bool"),
        (dict(chunk_size=2.5), ParameterError, "chunk_size must be an int or None"),
        (dict(chunk_size=-3), ParameterError, "chunk_size must be a positive int"),
        (dict(reduction=None), ParameterError, "reduction must be one of"),
        (dict(reduction="Mean"), ParameterError, "reduction must be one of"),
        (dict(normalize=None), ParameterError, "normalize must be one of"),
        (dict(detach_weight="no"), ParameterError, "detach_weight must be True or False"),
        (dict(return_stats=1), ParameterError, "return_stats must be True or False"),
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


@pytest.mark.parametrize("weighting", ["entropy", "MiLe", None])
def test_unknown_weighting_is_named(weighting):
    logits, targets = logits_targets()
    with pytest.raises(ParameterError, match="weighting must be one of"):
        mileloss.token_weighted_loss(logits, targets, weighting=weighting)


def test_numpy_scalars_are_accepted_as_options():
    logits, targets = logits_targets()
    expected = mileloss.mile_loss(logits, targets, gamma=2.0, chunk_size=2, ignore_index=-1)
    got = mileloss.mile_loss(logits, targets, gamma=np.float32(2.0), chunk_size=np.int64(2), ignore_index=np.int8(-1))
    assert torch.equal(got, expected)


def test_unknown_keyword_is_a_type_error_naming_it():
    logits, targets = logits_targets()
    with pytest.raises(TypeError, match="label_smoothng"):
        mileloss.mile_loss(logits, targets, label_smoothng=0.1)


@pytest.mark.parametrize("name", ["hidden", "weight", "targets", "bias"])
def test_fused_inputs_that_are_not_tensors_are_named(name):
    inputs = dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.randint(0, 5, (4,)),
                  bias=torch.randn(5))
    inputs[name] = inputs[name].tolist() if name != "targets" else inputs[name].cpu().numpy()
    with pytest.raises(NotATensorError, match=f"{name} must be a torch.Tensor"):
        mileloss.linear_mile_loss(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["bias"])


def test_empty_feature_and_vocabulary_dimensions_are_named():
    targets = torch.randint(0, 5, (4,))
    with pytest.raises(ShapeError, match="empty feature dimension"):
        mileloss.linear_focal_loss(torch.randn(2, 2, 0), torch.randn(5, 0), targets.view(2, 2))
    with pytest.raises(ShapeError, match="empty vocabulary dimension"):
        mileloss.linear_mile_loss(torch.randn(4, 3), torch.randn(0, 3), targets)
    with pytest.raises(ShapeError, match="empty class dimension"):
        mileloss.mile_loss(torch.randn(4, 0), targets)


def test_modules_check_their_options_at_construction():
    with pytest.raises(ParameterError, match="gamma must be a real number"):
        mileloss.MiLeLoss(gamma=None)
    with pytest.raises(ParameterError, match="reduction must be one of"):
        mileloss.LinearFocalLoss(reduction="avg")


def test_weight_normalizer_refuses_bad_use_by_name():
    with pytest.raises(ParameterError, match="normalize 'weighted' or 'none'"):
        mileloss.WeightNormalizer(normalize="paper")
    logits, targets = logits_targets()
    _, stats = mileloss.mile_loss(logits, targets, reduction="sum", return_stats=True)
    normalizer = mileloss.WeightNormalizer()
    for scale in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ParameterError, match="scale must be a finite number > 0"):
            normalizer.add(stats, scale)
    with pytest.raises(ParameterError, match="TokenStats"):
        normalizer.add(torch.zeros(3))
    normalizer.add(stats)
    _, other = mileloss.mile_loss(torch.randn(4, 40000), targets, gamma=20.0, reduction="sum", return_stats=True)
    with pytest.raises(ParameterError, match="different log-weight shifts"):
        normalizer.add(other)
