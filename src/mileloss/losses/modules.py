"""``torch.nn.Module`` wrappers: the functional losses with their options fixed at construction."""

from __future__ import annotations

import torch

from mileloss.errors import ParameterError
from mileloss.losses.functional import linear_token_weighted_loss, make_spec, token_weighted_loss


class TokenWeightedLoss(torch.nn.Module):
    """``loss = module(logits, targets, token_weights=None)``; options as in
    :func:`mileloss.token_weighted_loss`, checked here (a bad option raises ``ParameterError`` at
    construction, not at the first call); ``token_weights`` is per call."""

    weighting = "mile"
    fused = False

    def __init__(self, *, gamma: float = 1.0, sigma: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", normalize: str = "weighted", detach_weight: bool = True,
                 process_group=None, chunk_size: int | None = None, return_stats: bool = False,
                 softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 compile: bool | str = "auto", inplace_backward: bool = False):
        super().__init__()
        self.options = dict(weighting=self.weighting, gamma=gamma, sigma=sigma, ignore_index=ignore_index,
                            reduction=reduction, normalize=normalize, detach_weight=detach_weight,
                            process_group=process_group, chunk_size=chunk_size, return_stats=return_stats,
                            softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, compile=compile)
        make_spec(**self.options, inplace_backward=inplace_backward)
        if self.fused and inplace_backward:
            raise ParameterError(f"{type(self).__name__}: inplace_backward applies to a loss from logits; the "
                                 "fused loss never allocates the (N, V) logits or their gradient")
        if not self.fused:
            self.options["inplace_backward"] = inplace_backward

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None = None):
        return token_weighted_loss(logits, targets, token_weights=token_weights, **self.options)

    def extra_repr(self) -> str:
        shown = ("weighting", "gamma", "sigma", "ignore_index", "reduction", "normalize")
        extra = tuple(key for key, off in (("softcap", None), ("label_smoothing", 0.0), ("z_loss", 0.0))
                      if self.options[key] != off)
        return ", ".join(f"{key}={self.options[key]!r}" for key in shown + extra)


class LinearTokenWeightedLoss(TokenWeightedLoss):
    """``loss = module(hidden, lm_head_weight, targets, bias=None, token_weights=None)``, never materialising
    the logits."""

    fused = True

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None):
        return linear_token_weighted_loss(hidden, weight, targets, bias, token_weights=token_weights,
                                          **self.options)


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
