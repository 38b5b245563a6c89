"""Exact normalisation of the weighted mean across gradient-accumulation micro-batches and DDP ranks.

The weights are detached, so the normaliser W = sum_i w_i is a constant for autograd and

    grad( sum_i w_i CE_i / W ) = grad( sum_i w_i CE_i ) / W.

Each micro-batch therefore back-propagates its *unnormalised* ``reduction="sum"`` loss times any fixed
scale (for numerical range, e.g. 1 / tokens per step, like Hugging Face's ``num_items_in_batch``), and
after the last micro-batch the gradients are multiplied once by ``world / (scale * W_global)``: the
``world`` factor undoes DDP's averaging. The result is the gradient of one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from mileloss.losses.autograd import TokenStats


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
            raise ValueError(f"WeightNormalizer supports normalize 'weighted' or 'none', got {normalize!r}")
        self.process_group = process_group
        self.normalize = normalize
        self.scale: float | None = None
        self._totals: torch.Tensor | None = None  # (weighted_ce_sum, weight_sum or valid_count), float64

    def add(self, stats: TokenStats, scale: float = 1.0) -> None:
        """Record one micro-batch whose ``reduction="sum"`` loss was back-propagated times ``scale``."""
        if self.scale is not None and scale != self.scale:
            raise ValueError(f"every micro-batch must use the same scale; got {scale} after {self.scale}")
        self.scale = float(scale)
        denominator = stats.weight_sum if self.normalize == "weighted" else stats.valid_count
        values = torch.stack([stats.weighted_ce_sum.double(), denominator.double()])
        self._totals = values if self._totals is None else self._totals + values

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of w*CE, sum of w) over all micro-batches and, with a process group, all ranks."""
        if self._totals is None:
            raise RuntimeError("WeightNormalizer: no micro-batch was added")
        totals = self._totals.clone()
        if self.process_group is not None:
            dist.all_reduce(totals, group=self.process_group)
        return totals[0], totals[1]

    def rescale_gradients_(self, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
        """Multiply every ``.grad`` by ``world / (scale * W_global)``; return the global loss (0-d float64).

        An all-ignored step (W = 0) zeroes the gradients and returns 0; a non-finite weight sum (NaN logits
        somewhere) returns NaN and makes the gradients NaN, never a silently finite step."""
        numerator, denominator = self.totals()
        world = 1 if self.process_group is None else dist.get_world_size(self.process_group)
        if not bool(torch.isfinite(denominator) & torch.isfinite(numerator)):
            factor, loss = float("nan"), numerator / denominator
        elif float(denominator) > 0:
            factor, loss = world / (self.scale * float(denominator)), numerator / denominator
        else:
            factor, loss = 0.0, torch.zeros_like(numerator)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        self._totals, self.scale = None, None
        return loss
