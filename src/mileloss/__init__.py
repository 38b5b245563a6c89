"""mileloss: MiLe loss (entropy-weighted cross-entropy) for language-model training.

    import mileloss
    loss = mileloss.mile_loss(logits, labels)                         # from (N, V) logits
    loss = mileloss.linear_mile_loss(hidden, lm_head.weight, labels)  # fused with the LM head
"""

from mileloss.losses import (
    CrossEntropyLoss,
    FocalLoss,
    LinearCrossEntropyLoss,
    LinearFocalLoss,
    LinearMiLeLoss,
    MiLeLoss,
    TokenStats,
    WeightNormalizer,
    cross_entropy_loss,
    focal_loss,
    linear_cross_entropy_loss,
    linear_focal_loss,
    linear_mile_loss,
    linear_token_weighted_loss,
    mile_loss,
    token_weighted_loss,
)

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss", "FocalLoss", "LinearCrossEntropyLoss", "LinearFocalLoss", "LinearMiLeLoss", "MiLeLoss",
    "TokenStats", "WeightNormalizer", "__version__", "cross_entropy_loss", "focal_loss",
    "linear_cross_entropy_loss", "linear_focal_loss", "linear_mile_loss", "linear_token_weighted_loss",
    "mile_loss", "token_weighted_loss",
]
