"""The ``torch.autograd.Function`` around the chunk loop of :mod:`mileloss.losses.chunked`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mileloss.losses.chunked import (
    LinearHead,
    LogitsHead,
    LossSpec,
    _all_reduce,
    _inverse_or_zero,
    _world_size,
    compute_dtype,
    loss_scale,
    run_chunks,
)
from mileloss.losses.weights import log_weight_shift

STAT_KEYS = ("ce", "entropy", "log_weight", "lse", "row_max", "correct")


class TokenStats(NamedTuple):
    """Per-token diagnostics from the same pass that computed the loss (no second pass).

    Per token, shaped like ``targets``, detached, float32 (float64 for float64 inputs):
        ce, entropy, lse: CE_i (label-smoothed when ``label_smoothing`` > 0: the CE the weight multiplies),
        H_i (of the unclamped softmax, except in paper mode) and logsumexp(z_i), all of the capped logits
        under a ``softcap``; ce is 0 at ignored positions.
        weight: w_i = exp(log_weight_i), times the caller's t_i when ``token_weights`` is given; 0 at ignored
        positions; inf where w_i exceeds the dtype (gamma = 40 at V = 32000 gives ~1e42): use ``log_weight``.
        log_weight: log w_i (+ log t_i), -inf at ignored positions.
        max_logit: max_v z_iv (of the capped logits under a ``softcap``); exp(max_logit - lse) is the top-1
        probability.   correct: bool, the target's logit equals the row maximum (top-1 accuracy without the
        logits; a tie counts as correct, where ``argmax`` would pick the first); False at ignored positions.
    0-d float64 sums over *this* process's tokens only (sum them over micro-batches / all-reduce them to
    normalise exactly; see ``WeightNormalizer``):
        weight_sum = sum_i w_i exp(-c),  weighted_ce_sum = sum_i w_i CE_i exp(-c),  valid_count (the number
        of valid tokens, or sum_i t_i over them with ``token_weights``),
        z_loss_sum = z_loss * exp(-c) * sum_i t_i lse_i^2 (0 without z-loss): the z-loss part of a
        ``reduction="sum"`` loss, on the scale of weighted_ce_sum,
        log_weight_shift = c, the fixed shift of the unnormalised outputs (``weights.log_weight_shift``:
        0 for ce/focal and for MiLe unless (sigma + ln V)^gamma > 2^32). The ratio of the two sums is the
        weighted-mean loss whatever c is.
    """

    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor
    lse: torch.Tensor
    weight_sum: torch.Tensor
    valid_count: torch.Tensor
    weighted_ce_sum: torch.Tensor
    log_weight: torch.Tensor
    log_weight_shift: torch.Tensor
    z_loss_sum: torch.Tensor | None = None
    max_logit: torch.Tensor | None = None
    correct: torch.Tensor | None = None


class ForwardResult(NamedTuple):
    loss: torch.Tensor
    stats: dict
    shift: torch.Tensor  # 0-d float64: the loss is scale * sum_i exp(lw_i - shift) CE_i
    scale: torch.Tensor  # 0-d float64
    global_loss: torch.Tensor  # 0-d float64, normalised over all ranks
    head: object
    running: torch.Tensor | None  # single pass: the shift the head's sums over tokens are relative to; else None
    z_scale: torch.Tensor | None  # 0-d float64: the z-loss term is z_scale * sum_i t_i lse_i^2 (None: no z-loss)
    z_sum: torch.Tensor | None  # 0-d float64: sum_i t_i lse_i^2 over this process's valid tokens


def token_mass(targets: torch.Tensor, spec: LossSpec, token_weights: torch.Tensor | None) -> torch.Tensor:
    """t_i (float64, (N,)) at valid tokens, 0 at ignored ones; t_i = 1 without caller's token weights."""
    valid = targets != spec.ignore_index
    if token_weights is None:
        return valid.double()
    return torch.where(valid, token_weights.double(), torch.zeros((), dtype=torch.float64, device=valid.device))


def z_loss_scale(spec: LossSpec, mass: torch.Tensor, lse: torch.Tensor, vocab: int):
    """(z_scale, z_sum), 0-d float64: the z-loss term added to the loss is ``z_scale * z_sum`` with
    z_sum = sum_i t_i lse_i^2 over this process's valid tokens and

        mean (any normalize): z_scale = z_loss * world / sum_i t_i   (sums over all ranks: the global mean,
                              times the world size so that DDP's gradient averaging is exact)
        "sum" / "none":       z_scale = z_loss * exp(-c)            (c the fixed shift of the weighted terms,
                              so that WeightNormalizer's division by the shifted weight sum does not depend on c)
    """
    lse = lse.double()
    terms = torch.where(mass > 0, mass * lse * lse, torch.zeros_like(lse))  # an ignored NaN row stays out
    z_sum = terms.sum()
    if spec.reduction == "mean":
        totals = _all_reduce(torch.stack([z_sum, mass.sum()]), spec.process_group)
        z_scale = spec.z_loss * _world_size(spec.process_group) * _inverse_or_zero(totals[1])
    else:
        shift = log_weight_shift(spec.weighting, spec.gamma, spec.sigma, vocab)
        z_scale = torch.tensor(spec.z_loss * math.exp(-shift), dtype=torch.float64, device=lse.device)
    return z_scale, z_sum


def _make_head(tensors, inplace: bool = False):
    return LogitsHead(tensors[0], inplace) if len(tensors) == 1 else LinearHead(*tensors)


def output_dtype(spec: LossSpec, input_dtype: torch.dtype) -> torch.dtype:
    """A mean is on the cross-entropy scale and comes back in the inputs' dtype; "sum" and "none" (sums of
    unnormalised weighted terms, which overflow float16 for a few thousand tokens) in the compute dtype:
    float32 for float16/bfloat16/float32 inputs, float64 for float64."""
    return input_dtype if spec.reduction == "mean" else compute_dtype(input_dtype)


def uses_single_pass(spec: LossSpec, tensors) -> bool:
    """Whether the gradient is built during the forward pass: on the fused path (its GEMM is not run twice)
    when ``spec.single_pass`` allows it. From logits the forward only reduces rows and the backward makes the
    gradient in one sweep from the saved row maxima and log-denominators: one (N, V) write instead of two
    (build, then rescale), and no (N, V) gradient held between forward and backward."""
    return spec.single_pass and len(tensors) > 1


def _forward(spec: LossSpec, targets: torch.Tensor, tensors, needs: tuple[bool, ...],
             token_weights: torch.Tensor | None = None) -> ForwardResult:
    """Run the loop once; the head holds the (unnormalised) gradients if the single pass applies.
    ``token_weights``: (N,) the caller's t_i >= 0 (checked), or None."""
    head = _make_head(tensors)
    n = head.num_rows
    single_pass = any(needs) and uses_single_pass(spec, tensors)
    keys = STAT_KEYS + (("log_weight_all",) if spec.normalize == "paper" else ()) + (
        ("row_shift",) if single_pass else ("log_d",) if any(needs) and spec.detach_weight else ())
    dtype = compute_dtype(tensors[0].dtype)
    stats = {key: torch.zeros(n, dtype=torch.bool if key == "correct" else dtype, device=targets.device)
             for key in keys}
    if single_pass:
        head.allocate_grads(needs)
    log_t = None if token_weights is None else token_weights.double().log().to(dtype)  # log 0 = -inf: excluded
    running = run_chunks(head, targets, spec, coefs="weight" if single_pass else None, stats_out=stats,
                         log_token_weights=log_t)
    valid = targets != spec.ignore_index
    mass = None if token_weights is None else token_mass(targets, spec, token_weights)
    shift, scale, global_loss = loss_scale(spec, stats, valid, head.vocab,
                                           count=None if mass is None else mass.sum())
    terms = torch.exp(stats["log_weight"].double() - shift) * stats["ce"].double()  # 0 where ignored
    loss = terms * scale if spec.reduction == "none" else terms.sum() * scale
    z_scale = z_sum = None
    if spec.z_loss:
        mass = token_mass(targets, spec, token_weights) if mass is None else mass
        z_scale, z_sum = z_loss_scale(spec, mass, stats["lse"], head.vocab)
        if spec.reduction == "none":
            lse = stats["lse"].double()
            loss = loss + torch.where(mass > 0, z_scale * mass * lse * lse, torch.zeros_like(lse))
        else:
            loss = loss + z_scale * z_sum
    loss = loss.to(output_dtype(spec, tensors[0].dtype))
    return ForwardResult(loss, stats, shift, scale, global_loss, head, running, z_scale, z_sum)


def _scale_in_place(grad: torch.Tensor, factor: torch.Tensor) -> None:
    # ``.data``: the saved tensor is modified without bumping its autograd version, so that a second backward
    # (retain_graph=True) can still unpack it; that backward knows the factor already applied
    grad.data.mul_(factor)


class TokenWeightedLossFunction(torch.autograd.Function):
    """Forward: loss and per-row stats. Backward: the gradients built in forward, scaled in place
    (single pass), or one more chunk sweep with per-row coefficients (recompute).

    Everything backward needs is saved with ``save_for_backward``, so autograd frees it after the first
    backward (the (N, V) logit gradient then lives on only as ``.grad``), and a second backward without
    ``retain_graph=True`` raises PyTorch's "Trying to backward through the graph a second time" error.
    With ``retain_graph=True`` a second backward is supported and gives the same gradient again.
    """

    @staticmethod
    def forward(ctx, spec: LossSpec, targets: torch.Tensor, token_weights, *tensors):
        needs = tuple(ctx.needs_input_grad[3:])
        result = _forward(spec, targets, tensors, needs, token_weights)
        stats = result.stats
        ctx.spec, ctx.shift, ctx.scale = spec, result.shift, result.scale
        ctx.single_pass = result.running is not None  # the forward built the gradients (it returned a shift)
        if ctx.single_pass:
            head = result.head
            grads = head.grads()
            ctx.layout = tuple((g is not None, row) for g, row in zip(grads, head.row_wise, strict=True))
            ctx.grad_dtypes = head.output_dtypes()
            ctx.applied = None  # grad_output of the first backward, once applied
            ctx.save_for_backward(stats["row_shift"], result.running, *(g for g in grads if g is not None))
        else:
            row_stats = (stats["row_max"], stats["log_d"]) if "log_d" in stats else ()
            ctx.row_stats = len(row_stats)
            ctx.save_for_backward(targets, stats["log_weight"], stats["ce"], result.global_loss, *row_stats,
                                  *tensors[:2])
            ctx.bias = tensors[2] if len(tensors) == 3 else None
            ctx.token_weights, ctx.z_scale = token_weights, result.z_scale
        outputs = (result.loss, *(stats[key] for key in STAT_KEYS))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        if ctx.single_pass:
            return (None, None, None, *_single_pass_backward(ctx, grad_loss))
        return (None, None, None, *_recompute_backward(ctx, grad_loss))


def _single_pass_backward(ctx, grad_loss):
    """Row i of a row-wise gradient (logits, hidden) is multiplied by go * scale * exp(R_i - shift), a sum over
    tokens (fused weight, bias) by go * scale * exp(R_final - shift); R is the running shift of the forward.
    Unpacking the saved tensors raises PyTorch's own error on a second backward without retain_graph."""
    row_shift, running, *present = ctx.saved_tensors
    go = grad_loss.detach().to(torch.float64)
    if ctx.applied is not None:  # second backward (retain_graph=True): the gradients hold the first go
        if float(ctx.applied) == 0.0:
            raise RuntimeError("mileloss: a second backward after a zero grad_output cannot recover the "
                               "gradient (it is scaled in place); recompute the loss instead")
        ratio = go / ctx.applied
        scaled = iter(g * ratio.to(g.dtype) for g in present)
    else:
        ctx.applied = go
        dtype = row_shift.dtype
        row_factor = (go * ctx.scale * torch.exp(row_shift.double() - ctx.shift)).to(dtype)
        sum_factor = (go * ctx.scale * torch.exp(running.double() - ctx.shift)).to(dtype)
        for g, (_, row_wise) in zip(present, (item for item in ctx.layout if item[0]), strict=True):
            _scale_in_place(g, row_factor[:, None] if row_wise else sum_factor)
        scaled = iter(present)
    grads = tuple(next(scaled) if exists else None for exists, _ in ctx.layout)
    return _cast(grads, ctx.grad_dtypes)


def _recompute_backward(ctx, grad_loss):
    """One more sweep with coef_ce_i = go_i * scale * w_i' and, for a non-detached weight,
    coef_logw_i = go_i * scale * (CE_i - centre) * w_i', w_i' = exp(lw_i - shift) the forward's shifted
    weights and centre the weighted-mean loss (the derivative of sum w CE / sum w w.r.t. w_i is
    (CE_i - loss) / sum w); with a z-loss, coef_z_i = go_i * z_scale * t_i."""
    spec = ctx.spec
    targets, log_weight, ce, global_loss, *saved = ctx.saved_tensors
    row_stats, saved = (tuple(saved[:ctx.row_stats]) or None), saved[ctx.row_stats:]
    tensors = (*saved, ctx.bias) if len(saved) == 2 else tuple(saved)
    dtype = log_weight.dtype
    valid = targets != spec.ignore_index
    go = grad_loss.detach().to(torch.float64) * ctx.scale  # (N,) for reduction "none", else 0-d
    weight = torch.exp(log_weight.double() - ctx.shift)
    coef_ce = (go * weight).to(dtype)
    coef_logw = None
    if not spec.detach_weight:
        weighted_mean = spec.reduction == "mean" and spec.normalize == "weighted"
        centre = global_loss if weighted_mean else 0.0
        terms = go * (ce.double() - centre) * weight
        coef_logw = torch.where(valid, terms, torch.zeros_like(terms)).to(dtype)
    coef_z = None
    if ctx.z_scale is not None:
        coef_z = (grad_loss.detach().to(torch.float64) * ctx.z_scale
                  * token_mass(targets, spec, ctx.token_weights)).to(dtype)
    log_t = None if ctx.token_weights is None else ctx.token_weights.double().log().to(dtype)
    head = _make_head(tensors, inplace=spec.inplace_backward)
    head.allocate_grads(tuple(ctx.needs_input_grad[3:]))
    run_chunks(head, targets, spec, coefs=(coef_ce, coef_logw, coef_z), log_token_weights=log_t,
               row_stats=row_stats)
    return _cast(head.grads(), head.output_dtypes())


def _cast(grads, dtypes):
    """Gradients in the inputs' dtypes (a no-op where they already are)."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))
