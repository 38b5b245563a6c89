"""Per-token weightings of the one token-weighted cross-entropy engine, computed as log-weights.

Every loss in mileloss is ``sum_i w_i * CE_i / normaliser`` with a per-token weight ``w_i`` that is a
function of two detached per-row statistics of the predicted distribution ``p_i = softmax(z_i)``:

    ce       w_i = 1
    focal    w_i = (1 - p_i[y_i]) ** gamma             (Lin et al. 2017; as the MiLe paper's baseline)
    mile     w_i = (sigma + H_i) ** gamma,  H_i = -sum_v p_iv log p_iv   (Su et al. 2024)

The engine never forms ``w_i`` itself: it works with ``log w_i = gamma * log(base_i)`` and exponentiates
``log w_i - shift`` for a shift that keeps every value in range (the batch's largest log-weight for a
weighted mean, :func:`log_weight_shift` for the unnormalised outputs). ``(sigma + H)^gamma`` at gamma = 40
and V = 32000 is ~1e42 (beyond float32) and ``(1 - p_y)^8`` of a confident prediction ~1e-72 (below it);
their logs are ordinary numbers.

Adding a weighting means adding one branch to :func:`log_token_weight` and, for ``detach_weight=False``,
its log-derivative to :func:`log_weight_derivative`.
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("ce", "focal", "mile")

# the unnormalised outputs ("sum", "none", normalize="none") keep every weight below 2^32
_SUM_HEADROOM = 32 * math.log(2.0)
# single_pass_shift: the widest range of log-weights (in nats) that the fused single pass takes with a fixed shift
_FIXED_SPAN = 20.0


def _base(weighting: str, entropy: torch.Tensor, ce: torch.Tensor, sigma: float) -> torch.Tensor:
    """The quantity raised to gamma: ``sigma + H`` (mile) or ``1 - p_y = -expm1(-CE)`` (focal), per row.

    ``-expm1(-CE)`` keeps ``1 - p_y`` exact for a confident prediction (CE ~ 1e-9), where ``1 - exp(-CE)``
    would round to 0."""
    if weighting == "focal":
        return -torch.expm1(-ce)
    if weighting == "mile":
        return entropy + sigma
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def log_token_weight(
    weighting: str, entropy: torch.Tensor, ce: torch.Tensor, gamma: float, sigma: float
) -> torch.Tensor:
    """``log w`` per row, (N,) in the dtype of ``entropy``/``ce`` (both (N,), detached statistics).

        ce:    0
        focal: gamma * log(1 - p_y),  1 - p_y = -expm1(-CE)
        mile:  gamma * log(sigma + H)

    ``xlogy`` makes gamma = 0 give log w = 0 (w = 1, also where the base is 0) and a zero base with
    gamma > 0 give -inf (w = 0). A NaN statistic (non-finite logits) gives NaN.
    """
    if weighting == "ce":
        return torch.zeros_like(ce)
    return torch.xlogy(gamma, _base(weighting, entropy, ce, sigma))


def log_weight_derivative(
    weighting: str, entropy: torch.Tensor, ce: torch.Tensor, gamma: float, sigma: float
) -> torch.Tensor:
    """Derivative of ``log w`` w.r.t. the weight's statistic, per row (N,):

        mile:  d log w / dH   =  gamma / (sigma + H)
        focal: d log w / dp_y = -gamma / (1 - p_y)
        ce:    0

    so that ``dw/dstat = w * dlogw``. Where the base is 0 (then w = 0 for gamma > 0, and the statistic is
    at an extremum where its own derivative vanishes) the value is taken as 0.
    """
    if weighting == "ce" or gamma == 0.0:
        return torch.zeros_like(ce)
    base = _base(weighting, entropy, ce, sigma)
    derivative = gamma / base
    if weighting == "focal":
        derivative = -derivative
    return torch.where(base > 0, derivative, torch.zeros_like(derivative))


def log_weight_shift(weighting: str, gamma: float, sigma: float, vocab: int) -> float:
    """The fixed shift ``c`` of the unnormalised outputs: they carry ``w_i * exp(-c)`` instead of ``w_i``.

        mile:       c = max(0, gamma * ln(sigma + ln V) - 32 ln 2)
        focal, ce:  c = 0

    ``(sigma + ln V)^gamma`` is the largest weight MiLe can give (H <= ln V), so every shifted weight is at
    most 2^32 (and ``c = 0``, the plain sum, whenever the largest possible weight is below 2^32, e.g.
    gamma <= 9 at V = 32000, sigma = 1). Focal and CE weights are at most 1. ``c`` depends only on the
    options and V, not on the data, so micro-batches and ranks of one step share it and their sums add up.
    """
    if weighting != "mile" or gamma == 0.0:
        return 0.0
    base = sigma + math.log(vocab) if vocab > 0 else sigma
    if base <= 0.0:
        return 0.0
    return max(0.0, gamma * math.log(base) - _SUM_HEADROOM)


def single_pass_shift(weighting: str, gamma: float, sigma: float, vocab: int) -> float | None:
    """A data-independent shift c with every log-weight in [c - 20, c], or None where no such c exists.

        ce, or gamma = 0:  c = 0                                    (every weight is 1)
        mile, sigma > 0:   c = gamma * ln(sigma + h)                when gamma * ln((sigma + h) / sigma) <= 20
        focal:             None                                     ((1 - p_y)^gamma has no lower bound)

    with h = ln V + 1 + 2e-7 V > H (paper mode's clamped entropy exceeds ln V by up to V * 1.9e-7), so
    exp(lw_i - c) lies in [2e-9, 1] for every token:
    the fused single pass can weight each chunk's rows by it directly, with no running maximum, no rescaling
    of the (V, D) accumulators and no host synchronisation per chunk. Where None (focal, a wide MiLe range,
    caller's token weights), the chunk loop keeps the running maximum (``chunked.run_chunks``).
    """
    if weighting == "ce" or gamma == 0.0:
        return 0.0
    if weighting != "mile" or sigma <= 0.0:
        return None
    top = math.log(sigma + math.log(max(vocab, 1)) + 1.0 + 2e-7 * vocab)
    if gamma * (top - math.log(sigma)) > _FIXED_SPAN:
        return None
    return gamma * top
