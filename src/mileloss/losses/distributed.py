"""Exact normalisation of the weighted mean across gradient-accumulation micro-batches and DDP ranks.

The weights are detached, so the normaliser W = sum_i w_i is a constant for autograd and

    grad( sum_i w_i CE_i / W ) = grad( sum_i w_i CE_i ) / W.

Each micro-batch therefore back-propagates its *unnormalised* ``reduction="sum"`` loss times any fixed
scale (for numerical range, e.g. 1 / tokens per step, like Hugging Face's ``num_items_in_batch``), and
after the last micro-batch the gradients are multiplied once by ``world / (scale * W_global)``: the
``world`` factor undoes DDP's averaging. The result is the gradient of one process on the whole batch.

The gradient of a micro-batch is back-propagated before the step's normaliser (or its largest weight) is
known, so the ``"sum"`` outputs cannot be shifted by the step's maximum log-weight as a single weighted
mean is. They carry ``w_i exp(-c)`` instead, with a shift ``c`` fixed by (weighting, gamma, sigma, V)
(``TokenStats.log_weight_shift``; 0 unless (sigma + ln V)^gamma > 2^32), the same on every micro-batch and
rank, and ``TokenStats.weight_sum``/``weighted_ce_sum`` use the same ``c``: the sums add up exactly and the
ratio is the weighted mean whatever ``c`` is. What a fixed shift cannot absorb is a step whose every weight is
tiny relative to exp(c): :meth:`WeightNormalizer.rescale_gradients_` raises ``WeightRangeError`` when the
step's largest shifted weight is below 2^-64 instead of applying gradients that lost their precision.

A z-loss (``z_loss=c``) is part of each micro-batch's ``"sum"`` loss as c exp(-c_shift) sum_i t_i lse_i^2
(``TokenStats.z_loss_sum``), and a gradient buffer has room for one normaliser only: the step's gradient is
that of (sum_i w_i CE_i + c sum_i t_i lse_i^2) / W, and the returned loss is that quantity. With
``normalize="none"`` (W = the valid-token count, or sum t) and for ``weighting="ce"`` (w = 1) that is
exactly the per-step loss plus c * mean lse^2; for focal and MiLe under ``normalize="weighted"`` the z-loss is
divided by sum w instead of the token count, i.e. scaled by (token count / sum w). Exact alternatives: one
``reduction="mean"`` call per step, or a z-loss coefficient divided by that ratio from the previous step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.distributed as dist

from mileloss.errors import ParameterError, WeightRangeError
from mileloss.losses.autograd import TokenStats

# the smallest largest-weight of a step (relative to exp(c)) whose float32 gradients keep their precision
MIN_LOG_WEIGHT = -64 * math.log(2.0)


class WeightNormalizer:
    """Accumulates weight sums over micro-batches, then fixes the gradients in place.

    >>> normalizer = WeightNormalizer(process_group=None)      # one per optimizer step
    >>> for hidden, labels in micro_batches:
    ...     loss_sum, stats = linear_mile_loss(hidden, head.weight, labels, reduction="sum", return_stats=True)
    ...     (loss_sum * scale).backward()
    ...     normalizer.add(stats, scale)
    >>> loss = normalizer.rescale_gradients_(model.parameters())   # exact global weighted-mean loss
    """

    def __init__(self, process_group=None, normalize: str = "weighted"):
        if normalize not in ("weighted", "none"):
            raise ParameterError(f"WeightNormalizer supports normalize 'weighted' or 'none', got {normalize!r}")
        self.process_group = process_group
        self.normalize = normalize
        self._reset()

    def _reset(self) -> None:
        self.scale: float | None = None
        self.shift: float | None = None
        self._totals: torch.Tensor | None = None  # (weighted_ce_sum, weight_sum or valid_count), float64
        self._top: torch.Tensor | None = None  # largest log_weight - shift so far (-inf: no weight yet)

    def add(self, stats: TokenStats, scale: float = 1.0) -> None:
        """Record one micro-batch whose ``reduction="sum"`` loss was back-propagated times ``scale``."""
        if not isinstance(stats, TokenStats):
            raise ParameterError(f"add() takes the TokenStats of a loss called with return_stats=True, got "
                                 f"{type(stats).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ParameterError(f"scale must be a finite number > 0, got {scale!r}")
        if self.scale is not None and scale != self.scale:
            raise ParameterError(f"every micro-batch must use the same scale; got {scale} after {self.scale}")
        shift = float(stats.log_weight_shift)
        if self.shift is not None and shift != self.shift:
            raise ParameterError(f"micro-batches were computed with different log-weight shifts ({shift} after "
                                 f"{self.shift}): the same weighting, gamma, sigma and vocabulary are needed")
        self.scale, self.shift = float(scale), shift
        denominator = stats.weight_sum if self.normalize == "weighted" else stats.valid_count
        numerator = stats.weighted_ce_sum.double()
        if stats.z_loss_sum is not None:  # the z-loss part of the "sum" loss, normalised with it
            numerator = numerator + stats.z_loss_sum.double()
        values = torch.stack([numerator, denominator.double()])
        self._totals = values if self._totals is None else self._totals + values
        log_weight = stats.log_weight.detach().reshape(-1).double()
        top = (log_weight.max() if log_weight.numel() else torch.tensor(-math.inf, dtype=torch.float64,
                                                                         device=log_weight.device)) - shift
        self._top = top if self._top is None else torch.maximum(self._top, top)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of w*CE, sum of w), both times exp(-shift), over all micro-batches and, with a process
        group, all ranks."""
        if self._totals is None:
            raise RuntimeError("WeightNormalizer: no micro-batch was added")
        totals = self._totals.clone()
        if self.process_group is not None:
            dist.all_reduce(totals, group=self.process_group)
        return totals[0], totals[1]

    def _global_top(self) -> torch.Tensor:
        top = self._top.clone()
        if self.process_group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.process_group)
        return top

    def rescale_gradients_(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
        """Multiply every ``.grad`` by ``world / (scale * W_global)``; return the global loss (0-d float64).

        An all-ignored step (W = 0) zeroes the gradients and returns 0; a non-finite weight sum (NaN logits
        somewhere) returns NaN and makes the gradients NaN, never a silently finite step.

        Raises:
            WeightRangeError: the step's largest weight times exp(-shift) is below 2^-64 (see the module
                docstring); the gradients are left as they are and the normalizer is reset.
        """
        try:
            numerator, denominator = self.totals()
            top = float(self._global_top())
            world = 1 if self.process_group is None else dist.get_world_size(self.process_group)
            if not bool(torch.isfinite(denominator) & torch.isfinite(numerator)):
                factor, loss = float("nan"), numerator / denominator
            elif float(denominator) > 0:
                if top < MIN_LOG_WEIGHT:
                    raise WeightRangeError(
                        f"the largest token weight of this step is exp({top:.1f}) relative to the fixed scale "
                        f"exp(c), c = {self.shift:g}, of the reduction='sum' outputs: below 2^-64, the summed "
                        "float32 gradients have lost their precision. Lower gamma (or raise sigma), or normalise "
                        "each micro-batch with reduction='mean'")
                factor, loss = world / (self.scale * float(denominator)), numerator / denominator
            else:
                factor, loss = 0.0, torch.zeros_like(numerator)
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor)
            return loss
        finally:
            self._reset()
