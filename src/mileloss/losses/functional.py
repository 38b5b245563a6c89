"""Public loss functions: argument checks with named errors, then the chunked engine.

All six functions compute ``sum_i w_i * CE_i / normaliser`` over the non-ignored tokens i with

    CE_i = logsumexp(z_i) - z_i[y_i],    p_i = softmax(z_i),    H_i = -sum_v p_iv log p_iv
    ce:    w_i = 1
    focal: w_i = (1 - p_i[y_i]) ** gamma
    mile:  w_i = (sigma + H_i) ** gamma          (Su et al., Findings of NAACL 2024)

and the weight detached by default. ``normalize`` picks the normaliser of ``reduction="mean"``:
``"weighted"`` sum_i w_i (the paper's alpha-normalisation, ignored tokens counting nowhere), ``"none"`` the
number of valid tokens, ``"paper"`` the official code's formula with its quirks (alpha and the mean over all
positions, ignored ones included; the mean of the ranks' alphas under a process group; clamped entropy).
The ``linear_*`` variants take the last hidden states and the LM-head weight and never materialise the
(N, V) logits.
"""

from __future__ import annotations

import torch

from mileloss.losses.autograd import TokenStats, TokenWeightedLossFunction, _forward
from mileloss.losses.chunked import LossSpec
from mileloss.losses.errors import DeviceError, DTypeError, ParameterError, ShapeError, TargetRangeError
from mileloss.losses.weights import WEIGHTINGS

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("weighted", "paper", "none")


def _check_spec(spec: LossSpec) -> None:
    if spec.weighting not in WEIGHTINGS:
        raise ParameterError(f"weighting must be one of {WEIGHTINGS}, got {spec.weighting!r}")
    if spec.reduction not in REDUCTIONS:
        raise ParameterError(f"reduction must be one of {REDUCTIONS}, got {spec.reduction!r}")
    if spec.normalize not in NORMALIZATIONS:
        raise ParameterError(f"normalize must be one of {NORMALIZATIONS}, got {spec.normalize!r}")
    for name in ("gamma", "sigma"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float)) or not value == value or value in (float("inf"), -float("inf")):
            raise ParameterError(f"{name} must be a finite number, got {value!r}")
        if value < 0:
            raise ParameterError(f"{name} must be >= 0, got {value}")
    if spec.chunk_size is not None and (not isinstance(spec.chunk_size, int) or spec.chunk_size < 1):
        raise ParameterError(f"chunk_size must be a positive int or None, got {spec.chunk_size!r}")
    if spec.normalize == "paper" and not spec.detach_weight:
        raise ParameterError("normalize='paper' reproduces the official code, which detaches the weight; "
                             "use detach_weight=True or another normalize")


def _check_targets(targets: torch.Tensor, leading: tuple[int, ...], vocab: int, ignore_index: int, what: str):
    if not isinstance(targets, torch.Tensor):
        raise DTypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise DTypeError(f"targets must be an integer tensor of class ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != leading:
        raise ShapeError(f"targets shape {tuple(targets.shape)} does not match {what} leading shape {leading}")
    flat = targets.reshape(-1)
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if bool(bad.any()):  # one host sync; a wrong label must never become a silently wrong number
        value = int(flat[bad][0])
        raise TargetRangeError(f"target {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}")


def _check_float(name: str, tensor, ndim_min: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise DTypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < ndim_min:
        raise ShapeError(f"{name} must have at least {ndim_min} dims, got shape {tuple(tensor.shape)}")


def _check_devices(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise DeviceError(f"tensors are on different devices: {devices}")


def _finish(outputs, targets: torch.Tensor, spec: LossSpec, return_stats: bool):
    loss, ce, entropy, weight, lse = outputs
    shape = targets.shape
    if spec.reduction == "none":
        loss = loss.view(shape)
    if not return_stats:
        return loss
    valid = targets.reshape(-1) != spec.ignore_index
    weight64 = weight.double()
    stats = TokenStats(ce.view(shape), entropy.view(shape), weight.view(shape), lse.view(shape),
                       weight64.sum(), valid.sum().double(), (weight64 * ce.double()).sum())
    return loss, stats


@torch.compiler.disable  # the chunk loop runs eagerly; a surrounding torch.compile graph-breaks here
def _apply(spec: LossSpec, targets: torch.Tensor, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TokenWeightedLossFunction.apply(spec, targets, *tensors)
    loss, stats, _, _, _ = _forward(spec, targets, tensors, needs=(False,) * len(tensors))
    return loss, stats["ce"], stats["entropy"], stats["weight"], stats["lse"]


def token_weighted_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "weighted",
    detach_weight: bool = True,
    process_group=None,
    chunk_size: int | None = None,
    return_stats: bool = False,
):
    """Token-weighted cross-entropy from logits, chunked; ``weighting`` in {"ce", "focal", "mile"}.

    Equals ``mileloss.losses.reference.token_weighted_loss_reference`` (and ``official_loss`` with
    ``normalize="paper"``) while allocating only the (N, V) gradient plus two fp32 (chunk, V) buffers.

    Args:
        logits: (..., V) unnormalised scores, fp32/bf16/fp16 (math in fp32 per chunk).
        targets: (...) integer class ids in [0, V) or ``ignore_index``.
        weighting: "ce" (w = 1), "focal" (w = (1 - p_y)^gamma) or "mile" (w = (sigma + H)^gamma).
        gamma, sigma: weight exponent and entropy offset, both >= 0 (sigma is unused by focal and ce).
        reduction: "mean" (normalised as ``normalize`` says), "sum" (sum_i w_i CE_i, for external
            normalisation across micro-batches), "none" (per-token w_i CE_i, 0 where ignored).
        normalize: "weighted" | "none" | "paper" (see the module docstring).
        detach_weight: if False the gradient also flows through w (exact; the loop runs again in backward).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``) to all-reduce the normaliser
            over. For "weighted"/"none" means the returned loss is multiplied by the world size, so that
            DDP's gradient *averaging* gives exactly the gradient of one process on the concatenated batch;
            the mean of the ranks' losses is the global loss (Hugging Face's convention).
        chunk_size: rows per chunk; default from the vocab size and device.
        return_stats: also return a :class:`TokenStats` (per-token ce, entropy, weight, lse; local sums).
    Returns:
        The loss (0-d, or shaped like ``targets`` for "none") in the logits' dtype, and the stats if asked.
        An empty or all-ignored batch gives 0 with zero gradients. Non-finite logits give a NaN loss.
    Raises:
        ShapeError, DTypeError, DeviceError, TargetRangeError, ParameterError (all ``ValueError``).
    """
    spec = LossSpec(weighting, float(gamma), float(sigma), ignore_index, reduction, normalize, detach_weight,
                    process_group, chunk_size, return_stats)
    _check_spec(spec)
    _check_float("logits", logits, 1)
    _check_devices(logits=logits, targets=targets)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ShapeError(f"logits have an empty class dimension: shape {tuple(logits.shape)}")
    _check_targets(targets, tuple(logits.shape[:-1]), vocab, ignore_index, "logits")
    outputs = _apply(spec, targets.reshape(-1).long(), logits.reshape(-1, vocab))
    return _finish(outputs, targets, spec, return_stats)


def linear_token_weighted_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "weighted",
    detach_weight: bool = True,
    process_group=None,
    chunk_size: int | None = None,
    return_stats: bool = False,
):
    """Token-weighted cross-entropy of ``F.linear(hidden, weight, bias)`` without the (N, V) logits.

    Same loss as :func:`token_weighted_loss` on ``hidden @ weight.T + bias``; gradients for ``hidden``,
    ``weight`` and ``bias`` are accumulated chunk by chunk (fp32 accumulators for a low-precision weight).

    Args:
        hidden: (..., D) last hidden states, fp32/bf16/fp16.   weight: (V, D) LM-head weight, same dtype.
        targets: (...) integer class ids, the leading shape of ``hidden``.   bias: optional (V,).
        Other arguments as in :func:`token_weighted_loss`.
    """
    spec = LossSpec(weighting, float(gamma), float(sigma), ignore_index, reduction, normalize, detach_weight,
                    process_group, chunk_size, return_stats)
    _check_spec(spec)
    _check_float("hidden", hidden, 1)
    _check_float("weight", weight, 2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(f"weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise DTypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        _check_float("bias", bias, 1)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ShapeError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise DTypeError(f"bias ({bias.dtype}) must have the dtype of hidden ({hidden.dtype})")
    _check_devices(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if weight.shape[0] == 0:
        raise ShapeError(f"weight has an empty vocabulary dimension: shape {tuple(weight.shape)}")
    _check_targets(targets, tuple(hidden.shape[:-1]), weight.shape[0], ignore_index, "hidden")
    outputs = _apply(spec, targets.reshape(-1).long(), hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return _finish(outputs, targets, spec, return_stats)


def mile_loss(logits, targets, *, gamma: float = 1.0, sigma: float = 1.0, **kwargs):
    """MiLe loss from logits: CE weighted by ``(sigma + H)^gamma``, H the detached predictive entropy.

    ``loss = sum_i w_i CE_i / sum_i w_i`` over non-ignored tokens. Equals
    ``mileloss.losses.reference.token_weighted_loss_reference(logits, targets, "mile")`` without its (N, V)
    temporaries; ``normalize="paper"`` reproduces the official code. Other keywords: :func:`token_weighted_loss`.

    >>> loss = mile_loss(logits.view(-1, V), labels.view(-1))   # instead of F.cross_entropy(...)
    """
    return token_weighted_loss(logits, targets, weighting="mile", gamma=gamma, sigma=sigma, **kwargs)


def focal_loss(logits, targets, *, gamma: float = 1.0, **kwargs):
    """Focal loss from logits: CE weighted by ``(1 - p_y)^gamma`` (p_y detached), weighted mean by default."""
    return token_weighted_loss(logits, targets, weighting="focal", gamma=gamma, **kwargs)


def cross_entropy_loss(logits, targets, **kwargs):
    """Plain cross-entropy on the same chunked engine (w = 1): ``F.cross_entropy`` with less memory."""
    return token_weighted_loss(logits, targets, weighting="ce", **kwargs)


def linear_mile_loss(hidden, weight, targets, bias=None, *, gamma: float = 1.0, sigma: float = 1.0, **kwargs):
    """MiLe loss of ``hidden @ weight.T + bias`` without materialising the logits (see :func:`mile_loss`)."""
    return linear_token_weighted_loss(hidden, weight, targets, bias, weighting="mile", gamma=gamma, sigma=sigma,
                                      **kwargs)


def linear_focal_loss(hidden, weight, targets, bias=None, *, gamma: float = 1.0, **kwargs):
    """Focal loss of ``hidden @ weight.T + bias`` without materialising the logits."""
    return linear_token_weighted_loss(hidden, weight, targets, bias, weighting="focal", gamma=gamma, **kwargs)


def linear_cross_entropy_loss(hidden, weight, targets, bias=None, **kwargs):
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits (cf. F.linear_cross_entropy)."""
    return linear_token_weighted_loss(hidden, weight, targets, bias, weighting="ce", **kwargs)
