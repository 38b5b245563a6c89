"""Per-token weightings of the one token-weighted cross-entropy engine.

Every loss in mileloss is ``sum_i w_i * CE_i / normaliser`` with a per-token weight ``w_i`` that is a
function of two detached per-row statistics of the predicted distribution ``p_i = softmax(z_i)``:

    ce       w_i = 1
    focal    w_i = (1 - p_i[y_i]) ** gamma             (Lin et al. 2017; as the MiLe paper's baseline)
    mile     w_i = (sigma + H_i) ** gamma,  H_i = -sum_v p_iv log p_iv   (Su et al. 2024)

Adding a weighting means adding one branch to :func:`token_weight` and, for ``detach_weight=False``,
its derivative to :func:`weight_derivative`.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("ce", "focal", "mile")


def token_weight(
    weighting: str, entropy: torch.Tensor, p_target: torch.Tensor, gamma: float, sigma: float
) -> torch.Tensor:
    """Weight ``w`` per row. ``entropy`` and ``p_target`` are (N,) float tensors (entropy may be unused)."""
    if weighting == "ce":
        return torch.ones_like(p_target)
    if weighting == "focal":
        return (1.0 - p_target).clamp_min(0.0).pow(gamma)
    if weighting == "mile":
        return (sigma + entropy).pow(gamma)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def weight_derivative(
    weighting: str, entropy: torch.Tensor, p_target: torch.Tensor, gamma: float, sigma: float
) -> torch.Tensor:
    """Derivative of the weight w.r.t. its statistic, per row (N,).

    mile:  dw/dH   = gamma * (sigma + H) ** (gamma - 1)
    focal: dw/dp_t = -gamma * (1 - p_t) ** (gamma - 1)
    ce:    0
    Where the power is singular (base 0 with gamma < 1) the derivative is taken as 0.
    """
    if weighting == "ce" or gamma == 0.0:
        return torch.zeros_like(p_target)
    if weighting == "focal":
        base = (1.0 - p_target).clamp_min(0.0)
        derivative = -gamma * base.pow(gamma - 1.0)
    elif weighting == "mile":
        base = sigma + entropy
        derivative = gamma * base.pow(gamma - 1.0)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return torch.where(base > 0, derivative, torch.zeros_like(derivative))
