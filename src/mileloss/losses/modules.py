"""``torch.nn.Module`` wrappers: the functional losses with their options fixed at construction."""

from __future__ import annotations

import torch

from mileloss.losses.functional import linear_token_weighted_loss, make_spec, token_weighted_loss


class TokenWeightedLoss(torch.nn.Module):
    """``loss = module(logits, targets)``; options as in :func:`mileloss.token_weighted_loss`, checked here
    (a bad option raises ``ParameterError`` at construction, not at the first call)."""

    weighting = "mile"

    def __init__(self, *, gamma: float = 1.0, sigma: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", normalize: str = "weighted", detach_weight: bool = True,
                 process_group=None, chunk_size: int | None = None, return_stats: bool = False):
        super().__init__()
        self.options = dict(weighting=self.weighting, gamma=gamma, sigma=sigma, ignore_index=ignore_index,
                            reduction=reduction, normalize=normalize, detach_weight=detach_weight,
                            process_group=process_group, chunk_size=chunk_size, return_stats=return_stats)
        make_spec(**self.options)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return token_weighted_loss(logits, targets, **self.options)

    def extra_repr(self) -> str:
        shown = ("weighting", "gamma", "sigma", "ignore_index", "reduction", "normalize")
        return ", ".join(f"{key}={self.options[key]!r}" for key in shown)


class LinearTokenWeightedLoss(TokenWeightedLoss):
    """``loss = module(hidden, lm_head_weight, targets, bias=None)``, never materialising the logits."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None):
        return linear_token_weighted_loss(hidden, weight, targets, bias, **self.options)


class MiLeLoss(TokenWeightedLoss):
    """MiLe loss module: CE weighted by ``(sigma + H)^gamma`` (see :func:`mileloss.mile_loss`)."""


class FocalLoss(TokenWeightedLoss):
    """Focal loss module: CE weighted by ``(1 - p_y)^gamma`` (see :func:`mileloss.focal_loss`)."""

    weighting = "focal"


class CrossEntropyLoss(TokenWeightedLoss):
    """Plain cross-entropy on the chunked engine (w = 1)."""

    weighting = "ce"


class LinearMiLeLoss(LinearTokenWeightedLoss):
    """Fused LM head + MiLe loss module (see :func:`mileloss.linear_mile_loss`)."""


class LinearFocalLoss(LinearTokenWeightedLoss):
    """Fused LM head + focal loss module."""

    weighting = "focal"


class LinearCrossEntropyLoss(LinearTokenWeightedLoss):
    """Fused LM head + cross-entropy module."""

    weighting = "ce"
