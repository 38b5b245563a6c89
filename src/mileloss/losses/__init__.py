"""The loss engine: pure math on tensors; imports nothing else from mileloss."""

from mileloss.losses.autograd import TokenStats
from mileloss.losses.distributed import WeightNormalizer
from mileloss.losses.functional import (
    cross_entropy_loss,
    focal_loss,
    linear_cross_entropy_loss,
    linear_focal_loss,
    linear_mile_loss,
    linear_token_weighted_loss,
    mile_loss,
    token_weighted_loss,
)
from mileloss.losses.modules import (
    CrossEntropyLoss,
    FocalLoss,
    LinearCrossEntropyLoss,
    LinearFocalLoss,
    LinearMiLeLoss,
    MiLeLoss,
)

__all__ = [
    "CrossEntropyLoss", "FocalLoss", "LinearCrossEntropyLoss", "LinearFocalLoss", "LinearMiLeLoss", "MiLeLoss",
    "TokenStats", "WeightNormalizer", "cross_entropy_loss", "focal_loss", "linear_cross_entropy_loss",
    "linear_focal_loss", "linear_mile_loss", "linear_token_weighted_loss", "mile_loss", "token_weighted_loss",
]
