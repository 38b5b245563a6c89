"""The losses written the naive way: readable, (N, V) temporaries everywhere. The specification.

``token_weighted_loss_reference`` is what the chunked engine computes, without its memory savings;
``official_loss`` is the MiLe paper's released formula (quirks included), the ``normalize="paper"`` target
and the "official" baseline of ``benchmarks/bench_loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mileloss.losses.weights import token_weight


def token_weighted_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "weighted",
    detach_weight: bool = True,
) -> torch.Tensor:
    """Token-weighted cross-entropy, ``normalize`` in {"weighted", "none"} (see ``mileloss.mile_loss``).

    Args:
        logits: (N, V) float. targets: (N,) int64 in [0, V) or ``ignore_index``.
    Returns:
        "mean": sum_i w_i ce_i / sum_i w_i ("weighted") or / #valid ("none"); "sum": sum_i w_i ce_i;
        "none": (N,) w_i ce_i, 0 where ignored.
    """
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(logits, dim=-1)
    ce = -log_probs.gather(-1, safe_targets[:, None]).squeeze(-1)
    source = log_probs.detach() if detach_weight else log_probs
    entropy = -(source.exp() * source).sum(-1)
    weight = token_weight(weighting, entropy, (-ce.detach() if detach_weight else -ce).exp(), gamma, sigma)
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    per_token = torch.where(valid, weight * ce, torch.zeros_like(ce))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    denominator = weight.sum() if normalize == "weighted" else valid.sum().to(per_token.dtype)
    if denominator == 0:  # empty or all-ignored batch: loss 0, gradient 0
        return per_token.sum() * 0.0
    return per_token.sum() / denominator


def official_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The released MiLe/focal training loss, transcribed formula for formula (single process).

    CE per position with ignored positions at 0; entropy of a softmax clamped to [1e-8, 1] over *all*
    positions; ``alpha = 1 / mean(w)`` over all positions; loss ``mean(alpha * w * ce)`` over all positions.
    Under data parallelism the official code replaces alpha by the mean of the ranks' alphas.
    """
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1).clamp(1e-8, 1.0)
        entropy = -(probs * probs.log()).sum(-1)
        weight = token_weight(weighting, entropy, torch.exp(-ce), gamma, sigma)
        alpha = 1.0 / weight.mean()
    return (alpha * weight * ce).mean()
