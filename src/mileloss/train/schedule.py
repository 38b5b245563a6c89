"""Learning-rate schedule: linear warmup, then cosine decay to a floor (the paper: 2000 warmup steps, cosine).

    lr(s) = lr_max * (s + 1) / warmup                                   for s < warmup
    lr(s) = lr_min + (lr_max - lr_min) * (1 + cos(pi * progress)) / 2   progress = (s - warmup) / (total - warmup)

with ``lr_min = lr_max * min_lr_ratio``; ``s`` counts optimizer steps from 0, and the value at ``s >= total``
stays at ``lr_min``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_with_warmup", "build_scheduler"]


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps or total_steps <= warmup_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`cosine_with_warmup` (step it once per optimizer step)."""

    def multiplier(step: int) -> float:
        return cosine_with_warmup(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
