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
(N, V) logits. The float64 oracle these are tested against is ``tests/reference.py``.

Options that compose with every weighting, reduction, normalize mode, both paths and ``detach_weight=False``
(the oracle states them in ``tests/reference.py``):

* ``softcap=s``: z <- s tanh(z / s) before anything else (Gemma 2); CE, entropy, weights and lse read the
  capped logits and the gradient goes through the tanh (a third (chunk, V) buffer, only when set).
* ``label_smoothing=eps``: CE_i = (1 - eps) nll_i + eps (lse_i - mean_v z_iv), ``F.cross_entropy``'s
  definition; the weight multiplies it; focal's p_y stays exp(-nll_i).
* ``token_weights=t``: log t_i is added to log w_i, so t multiplies w in numerator and denominator
  (sum t w CE / sum t w; ``normalize="none"`` divides by sum t); t_i = 0 excludes token i.
* ``z_loss=c``: adds c * sum t lse^2 / sum t over valid tokens to a mean (global under a process group);
  "sum"/"none" add c exp(-c_shift) t_i lse_i^2 per token, which ``WeightNormalizer`` then divides by the
  step's weight sum together with the weighted CE (exact for CE and ``normalize="none"``; see
  ``mileloss.losses.distributed``). A z-loss makes backward recompute the chunks (no single pass).
With every option off the engine runs exactly the operations it ran before they existed.

Non-finite logits. A -inf logit (a masked vocabulary entry, a -inf bias) has p = 0 and contributes 0 to
the entropy and the softmax, as in ``F.cross_entropy``; a target whose logit is -inf has CE = +inf (the loss
is +inf, its gradient finite). A row whose logits are all -inf has no distribution: NaN if its target is
valid; if it is ignored the loss does not see it but its gradient row is NaN, both as ``F.cross_entropy``.
A +inf or NaN logit makes its row, and so the loss, NaN.

Range of gamma and sigma. The weights are handled as logs, ``log w = gamma * log(sigma + H)`` (focal:
``gamma * log(1 - p_y)``), and exponentiated only after subtracting a shift, so they never overflow or
underflow on the way to the loss:

* ``reduction="mean"`` with ``normalize="weighted"`` or ``"paper"``: the shift is the batch's largest
  log-weight (all-reduced with MAX under a process group), so sum_i w_i CE_i / sum_i w_i is computed as
  sum_i exp(lw_i - m) CE_i / sum_i exp(lw_i - m) with every term in [0, 1]. Finite for any gamma, sigma
  in range whenever the logits are finite (gamma = 40 at V = 32000, sigma = 0 on one-hot-like logits,
  focal gamma = 8 on confident predictions all work). Tokens whose weight is below 2^-126 of the largest
  count as 0, which changes the loss by less than that fraction.
* ``reduction="sum"``/``"none"`` and ``normalize="none"`` return ``exp(-c) * w_i CE_i`` terms with a fixed
  shift ``c`` (``TokenStats.log_weight_shift``; ``weights.log_weight_shift``): 0 for CE and focal (w <= 1)
  and for MiLe whenever ``(sigma + ln V)^gamma <= 2^32`` (the plain sum: e.g. gamma <= 9 at V = 32000 and
  sigma = 1), else ``gamma ln(sigma + ln V) - 32 ln 2``, so that no weight exceeds 2^32. ``c`` depends only
  on (weighting, gamma, sigma, V), which is what lets micro-batches and ranks add their sums: gradient
  accumulation back-propagates each micro-batch's sum before the step's normaliser is known, and
  ``WeightNormalizer`` divides by the summed ``weight_sum`` (computed with the same ``c``) afterwards.
  The limit of a fixed shift: the largest weight of the step, times exp(-c), must stay above 2^-64, or the
  float32 gradients summed over the micro-batches lose their precision; ``WeightNormalizer`` checks this
  and raises ``WeightRangeError`` rather than take a wrong step. That needs, per step, some token with
  ``gamma * log2((sigma + ln V) / (sigma + H)) < 96`` (MiLe: at gamma = 40, V = 32000, sigma = 1, some token
  with H > 1.2 nats) or ``(1 - p_y)^gamma > 2^-64`` (focal: at gamma = 8, some token with p_y < 0.996).
  These sums are returned in float32 (float64 for float64 inputs) even for 16-bit inputs: a float16 sum of
  a few thousand cross-entropies overflows.
* Bounds: ``0 <= gamma <= 1000`` and ``0 <= sigma <= 1e6`` (``ParameterError`` outside). Nothing overflows
  beyond them, but they are where float32 stops giving the weights meaning: the entropy carries a relative
  rounding error of ~1e-7, which the power turns into a relative weight error of ~gamma * 1e-7 (1e-4 at
  gamma = 1000), and above sigma = 1e6 the float32 sum sigma + H keeps H (<= ln V) only to ~0.06 nats.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from mileloss.errors import (
    DeviceError,
    DTypeError,
    NotATensorError,
    ParameterError,
    ShapeError,
    TargetRangeError,
    TokenWeightError,
)
from mileloss.losses.autograd import STAT_KEYS, TokenStats, TokenWeightedLossFunction, _forward, token_mass
from mileloss.losses.chunked import LossSpec
from mileloss.losses.compiled import compile_setting
from mileloss.losses.weights import WEIGHTINGS, log_weight_shift

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("weighted", "paper", "none")
MAX_GAMMA = 1000.0
MAX_SIGMA = 1.0e6


def _real(name: str, value, upper: float) -> float:
    """A finite real number in [0, upper] as a float; bools, strings, None and tensors are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ParameterError(f"{name} must be >= 0, got {value}")
    if value > upper:
        raise ParameterError(f"{name} must be <= {upper:g} (the supported range; see the 'Range of gamma and "
                             f"sigma' notes of mileloss.losses.functional), got {value:g}")
    return value


def _integer(name: str, value, *, allow_none: bool = False):
    """An int (Python or numpy integer); bools and floats are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ParameterError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        expected = "an int or None" if allow_none else "an int"
        raise ParameterError(f"{name} must be {expected}, got {type(value).__name__} {value!r}") from None


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _softcap(value) -> float | None:
    if value is None:
        return None
    value = _real("softcap", value, math.inf)
    if value == 0:
        raise ParameterError("softcap must be > 0 (or None for no cap), got 0")
    return value


def _label_smoothing(value) -> float:
    value = _real("label_smoothing", value, 1.0)
    if value >= 1.0:
        raise ParameterError(f"label_smoothing must be in [0, 1), got {value}")
    return value


def make_spec(weighting="mile", gamma=1.0, sigma=1.0, ignore_index=-100, reduction="mean", normalize="weighted",
              detach_weight=True, process_group=None, chunk_size=None, return_stats=False, softcap=None,
              label_smoothing=0.0, z_loss=0.0, compile="auto", inplace_backward=False) -> LossSpec:
    """Check every option (named :class:`ParameterError` on a wrong type or value) and build the spec."""
    spec = LossSpec(
        weighting=_choice("weighting", weighting, WEIGHTINGS),
        gamma=_real("gamma", gamma, MAX_GAMMA),
        sigma=_real("sigma", sigma, MAX_SIGMA),
        ignore_index=_integer("ignore_index", ignore_index),
        reduction=_choice("reduction", reduction, REDUCTIONS),
        normalize=_choice("normalize", normalize, NORMALIZATIONS),
        detach_weight=_flag("detach_weight", detach_weight),
        process_group=process_group,
        chunk_size=_integer("chunk_size", chunk_size, allow_none=True),
        return_stats=_flag("return_stats", return_stats),
        softcap=_softcap(softcap),
        label_smoothing=_label_smoothing(label_smoothing),
        z_loss=_real("z_loss", z_loss, math.inf),
        compile=compile_setting(compile),
        inplace_backward=_flag("inplace_backward", inplace_backward),
    )
    if spec.chunk_size is not None and spec.chunk_size < 1:
        raise ParameterError(f"chunk_size must be a positive int or None, got {spec.chunk_size!r}")
    if spec.normalize == "paper" and not spec.detach_weight:
        raise ParameterError("normalize='paper' reproduces the official code, which detaches the weight; "
                             "use detach_weight=True or another normalize")
    return spec


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        hint = " (convert it with torch.from_numpy or torch.as_tensor)" if hasattr(value, "__array__") else ""
        raise NotATensorError(f"{name} must be a torch.Tensor, got {type(value).__module__}.{type(value).__name__}"
                              f"{hint}")


def _check_targets(targets: torch.Tensor, leading: tuple[int, ...], vocab: int, ignore_index: int, what: str):
    """Any integer dtype (int8 ... int64, uint8); the range is checked on an int64 copy, so that a small dtype
    cannot wrap the comparison with V or ignore_index."""
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise DTypeError(f"targets must be an integer tensor of class ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != leading:
        raise ShapeError(f"targets shape {tuple(targets.shape)} does not match {what} leading shape {leading}")
    flat = targets.reshape(-1).long()
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if bool(bad.any()):  # one host sync; a wrong label must never become a silently wrong number
        value = int(flat[bad][0])
        raise TargetRangeError(f"target {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}")
    return flat


def _check_float(name: str, tensor, ndim_min: int) -> None:
    _check_tensor(name, tensor)
    if not tensor.dtype.is_floating_point:
        raise DTypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < ndim_min:
        raise ShapeError(f"{name} must have at least {ndim_min} dims, got shape {tuple(tensor.shape)}")


def _check_devices(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise DeviceError(f"tensors are on different devices: {devices}")


def _check_token_weights(token_weights, targets: torch.Tensor, device: torch.device):
    """The caller's per-token weights as a detached (N,) float64 tensor, or None.

    A floating tensor shaped like ``targets`` (or flat, (N,)), on the inputs' device, every value finite and
    >= 0 (one host synchronisation); no gradient flows to it."""
    if token_weights is None:
        return None
    _check_tensor("token_weights", token_weights)
    if not token_weights.dtype.is_floating_point:
        raise DTypeError(f"token_weights must be a floating-point tensor, got dtype {token_weights.dtype}")
    n = targets.numel()
    if tuple(token_weights.shape) not in (tuple(targets.shape), (n,)):
        raise ShapeError(f"token_weights shape {tuple(token_weights.shape)} must be the targets' shape "
                         f"{tuple(targets.shape)} or ({n},)")
    if token_weights.device != device:
        raise DeviceError(f"token_weights is on {token_weights.device}, the inputs on {device}")
    flat = token_weights.detach().reshape(-1)
    bad = ~torch.isfinite(flat) | (flat < 0)
    if bool(bad.any()):
        value = float(flat[bad][0])
        raise TokenWeightError(f"token_weights must be finite and >= 0 (0 excludes a token), got {value}")
    return flat.to(torch.float64)  # float64 until its log is taken: t = 1e300 is a usable weight


def _finish(outputs, targets: torch.Tensor, spec: LossSpec, vocab: int, token_weights=None):
    loss, ce, entropy, log_weight, lse, max_logit, correct = outputs
    shape = targets.shape
    if spec.reduction == "none":
        loss = loss.view(shape)
    if not spec.return_stats:
        return loss
    mass = token_mass(targets.reshape(-1), spec, token_weights)
    shift = log_weight_shift(spec.weighting, spec.gamma, spec.sigma, vocab)
    shifted = torch.exp(log_weight.double() - shift)
    lse64 = lse.double()
    z_terms = torch.where(mass > 0, mass * lse64 * lse64, torch.zeros_like(lse64))
    z_loss_sum = z_terms.sum() * (spec.z_loss * math.exp(-shift))
    stats = TokenStats(ce.view(shape), entropy.view(shape), log_weight.exp().view(shape), lse.view(shape),
                       shifted.sum(), mass.sum(), (shifted * ce.double()).sum(), log_weight.view(shape),
                       torch.tensor(shift, dtype=torch.float64, device=log_weight.device), z_loss_sum,
                       max_logit.view(shape), correct.view(shape))
    return loss, stats


@torch.compiler.disable  # the chunk loop runs eagerly; a surrounding torch.compile graph-breaks here
def _apply(spec: LossSpec, targets: torch.Tensor, token_weights, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TokenWeightedLossFunction.apply(spec, targets, token_weights, *tensors)
    result = _forward(spec, targets, tensors, needs=(False,) * len(tensors), token_weights=token_weights)
    return (result.loss, *(result.stats[key] for key in STAT_KEYS))


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
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    token_weights: torch.Tensor | None = None,
    z_loss: float = 0.0,
    compile: bool | str = "auto",
    inplace_backward: bool = False,
):
    """Token-weighted cross-entropy from logits, chunked; ``weighting`` in {"ce", "focal", "mile"}.

    The naive formulas (the float64 oracle of ``tests/reference.py``, and the official code's formula for
    ``normalize="paper"``) without their (N, V) temporaries: only the (N, V) gradient plus two fp32
    (chunk, V) buffers are allocated.

    Args:
        logits: (..., V) unnormalised scores, fp32/bf16/fp16/fp64 (math in fp32 per chunk, fp64 for fp64);
            -inf entries are masked classes (see the module docstring).
        targets: (...) class ids in [0, V) or ``ignore_index``, a tensor of any integer dtype (not bool,
            not float, not a numpy array: ``NotATensorError``).
        weighting: "ce" (w = 1), "focal" (w = (1 - p_y)^gamma) or "mile" (w = (sigma + H)^gamma).
        gamma, sigma: weight exponent in [0, 1000] and entropy offset in [0, 1e6] (sigma is unused by focal
            and ce); the module docstring says why.
        ignore_index: an int; targets equal to it are ignored.
        reduction: "mean" (normalised as ``normalize`` says), "sum" (sum_i w_i CE_i exp(-c), for external
            normalisation across micro-batches), "none" (per-token w_i CE_i exp(-c), 0 where ignored); c is
            the fixed shift of the module docstring, 0 unless (sigma + ln V)^gamma > 2^32.
        normalize: "weighted" | "none" | "paper" (see the module docstring).
        detach_weight: if False the gradient also flows through w (exact; the loop runs again in backward).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``) to all-reduce the normaliser
            over. For "weighted"/"none" means the returned loss is multiplied by the world size, so that
            DDP's gradient *averaging* gives exactly the gradient of one process on the concatenated batch;
            the mean of the ranks' losses is the global loss (Hugging Face's convention).
        chunk_size: rows per chunk (an int >= 1, not a bool); default from the vocab size and device.
        return_stats: also return a :class:`TokenStats` (per-token ce, entropy, weight, log-weight, lse;
            local sums).
        softcap: None, or s > 0: the logits become s * tanh(z / s) before anything else (Gemma 2); entropy,
            weights, CE and lse all see the capped logits, the gradient flows through the tanh. A -inf logit
            becomes -s (no longer masked) and a +inf one s, as in Gemma.
        label_smoothing: eps in [0, 1): CE_i becomes (1 - eps) nll_i + eps (lse_i - mean_v z_iv), exactly
            ``F.cross_entropy(label_smoothing=eps)``'s per-token term; the weight multiplies this smoothed CE,
            while focal's p_y stays exp(-nll_i) and MiLe's entropy is that of the predicted distribution.
        token_weights: None, or the caller's weights t_i >= 0 (finite floats, shaped like ``targets`` or
            flat (N,); no gradient flows to them): they multiply the weighting's own weight in numerator and
            denominator, sum t w CE / sum t w (``normalize="none"``: / sum t over valid tokens); t_i = 0
            excludes token i (its log-weight is -inf, as an ignored token's).
        z_loss: c >= 0: adds c * sum_i t_i lse_i^2 / sum_i t_i over valid tokens (PaLM; t = 1 without token
            weights; not multiplied by the weighting's w) to every "mean"; under a process group the sums are
            global (and the term multiplied by the world size, as the means are). "sum" adds
            c * exp(-c_shift) * sum_i t_i lse_i^2 and "none" the per-token c * exp(-c_shift) t_i lse_i^2 (so
            "sum" is the sum of "none"; ``TokenStats.z_loss_sum`` reports the part). A z-loss > 0 makes the
            backward recompute the chunks (one more sweep).
        compile: the element-wise math of each chunk compiled with ``torch.compile`` (True), eager (False), or
            "auto": compiled where it was measured faster (chunks of >= 2^20 logits on CPU), else eager; the
            environment variable ``MILELOSS_COMPILE=0``/``1`` overrides "auto" (not an explicit True/False).
            Same results to rounding; if compilation fails, one ``RuntimeWarning`` and the eager path
            (``mileloss.losses.compiled``).
        inplace_backward: the backward writes the logits' gradient over the logits themselves (as flash-attn's
            ``CrossEntropyLoss(inplace_backward=True)`` and Liger-Kernel's cross-entropy do): no (N, V)
            gradient is allocated, so the loss needs no (N, V) memory at all. The logits hold the gradient
            after ``backward()``; anything else that saved them for its own backward (and a second backward
            with ``retain_graph=True``) then fails with PyTorch's "modified by an inplace operation" error
            instead of computing with overwritten values. Only for logits you do not read after the backward.
    Returns:
        The loss (0-d, or shaped like ``targets`` for "none"), and the stats if asked. A mean comes back in
        the logits' dtype; "sum" and "none" in float32 (float64 for float64 logits), also for 16-bit logits.
        An empty or all-ignored batch gives 0 with zero gradients. +inf or NaN logits give NaN.
        The loss supports one backward (twice with ``retain_graph=True``), like any PyTorch graph.
    Raises:
        ShapeError, DTypeError (NotATensorError, also a TypeError), DeviceError, TargetRangeError,
        ParameterError (all ``ValueError``).
    """
    spec = make_spec(weighting, gamma, sigma, ignore_index, reduction, normalize, detach_weight, process_group,
                     chunk_size, return_stats, softcap, label_smoothing, z_loss, compile, inplace_backward)
    _check_float("logits", logits, 1)
    _check_tensor("targets", targets)
    _check_devices(logits=logits, targets=targets)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ShapeError(f"logits have an empty class dimension: shape {tuple(logits.shape)}")
    if spec.inplace_backward and any(step == 0 and size > 1
                                     for step, size in zip(logits.stride(), logits.shape, strict=True)):
        raise ParameterError(f"inplace_backward=True writes the gradient over the logits, but these are expanded "
                             f"(shape {tuple(logits.shape)}, strides {logits.stride()}: several entries share one "
                             f"memory location); pass logits.contiguous() or inplace_backward=False")
    flat = _check_targets(targets, tuple(logits.shape[:-1]), vocab, spec.ignore_index, "logits")
    weights = _check_token_weights(token_weights, targets, logits.device)
    outputs = _apply(spec, flat, weights, logits.reshape(-1, vocab))
    return _finish(outputs, flat.view(targets.shape), spec, vocab, weights)


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
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    token_weights: torch.Tensor | None = None,
    z_loss: float = 0.0,
    compile: bool | str = "auto",
):
    """Token-weighted cross-entropy of ``F.linear(hidden, weight, bias)`` without the (N, V) logits.

    Same loss as :func:`token_weighted_loss` on ``hidden @ weight.T + bias``; gradients for ``hidden``,
    ``weight`` and ``bias`` are accumulated chunk by chunk (fp32 accumulators for a low-precision weight).

    Args:
        hidden: (..., D) last hidden states, fp32/bf16/fp16.   weight: (V, D) LM-head weight, same dtype.
        targets: (...) integer class ids, the leading shape of ``hidden``.   bias: optional (V,).
        Other arguments as in :func:`token_weighted_loss`.
    """
    spec = make_spec(weighting, gamma, sigma, ignore_index, reduction, normalize, detach_weight, process_group,
                     chunk_size, return_stats, softcap, label_smoothing, z_loss, compile)
    _check_float("hidden", hidden, 1)
    _check_float("weight", weight, 2)
    _check_tensor("targets", targets)
    if bias is not None:
        _check_float("bias", bias, 1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(f"weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if hidden.shape[-1] == 0:
        raise ShapeError(f"hidden has an empty feature dimension (D = 0): shape {tuple(hidden.shape)}; the "
                         "logits would not depend on the inputs")
    if weight.dtype != hidden.dtype:
        raise DTypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ShapeError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise DTypeError(f"bias ({bias.dtype}) must have the dtype of hidden ({hidden.dtype})")
    _check_devices(hidden=hidden, weight=weight, targets=targets, bias=bias)
    vocab = weight.shape[0]
    if vocab == 0:
        raise ShapeError(f"weight has an empty vocabulary dimension: shape {tuple(weight.shape)}")
    flat = _check_targets(targets, tuple(hidden.shape[:-1]), vocab, spec.ignore_index, "hidden")
    weights = _check_token_weights(token_weights, targets, hidden.device)
    outputs = _apply(spec, flat, weights, hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return _finish(outputs, flat.view(targets.shape), spec, vocab, weights)


def mile_loss(logits, targets, *, gamma: float = 1.0, sigma: float = 1.0, **kwargs):
    """MiLe loss from logits: CE weighted by ``(sigma + H)^gamma``, H the detached predictive entropy.

    ``loss = sum_i w_i CE_i / sum_i w_i`` over non-ignored tokens, w_i = (sigma + H_i)^gamma, computed from
    logits (N, V) and targets (N,) (or (..., V) and (...)) without (N, V) temporaries;
    ``normalize="paper"`` reproduces the official code. Other keywords: :func:`token_weighted_loss`.

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
