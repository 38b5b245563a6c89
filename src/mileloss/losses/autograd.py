"""The ``torch.autograd.Function`` around the chunk loop of :mod:`mileloss.losses.chunked`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mileloss.losses.chunked import LinearHead, LogitsHead, LossSpec, compute_dtype, loss_scale, run_chunks

STAT_KEYS = ("ce", "entropy", "weight", "lse")


class TokenStats(NamedTuple):
    """Per-token diagnostics from the same pass that computed the loss (no second pass).

    ce, entropy, weight, lse: float32 (float64 for float64 inputs), detached, shaped like ``targets``;
    ``weight`` is 0 at ignored positions
    (``ce`` too). weight_sum = sum of weights, valid_count = number of non-ignored targets,
    weighted_ce_sum = sum of weight * ce: 0-d float64 tensors over *this* process's tokens only
    (sum them over micro-batches / all-reduce them to normalise exactly; see ``WeightNormalizer``).
    """

    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor
    lse: torch.Tensor
    weight_sum: torch.Tensor
    valid_count: torch.Tensor
    weighted_ce_sum: torch.Tensor


def _make_head(tensors):
    return LogitsHead(tensors[0]) if len(tensors) == 1 else LinearHead(*tensors)


def _forward(spec: LossSpec, targets: torch.Tensor, tensors, needs: tuple[bool, ...]):
    """Run the loop; returns (loss, stats dict, scale, global_loss, head with grads if single pass)."""
    head = _make_head(tensors)
    n = head.num_rows
    keys = STAT_KEYS + (("weight_all",) if spec.normalize == "paper" else ())
    dtype = compute_dtype(tensors[0].dtype)
    stats = {key: torch.zeros(n, dtype=dtype, device=targets.device) for key in keys}
    single_pass = any(needs) and spec.single_pass
    if single_pass:
        head.allocate_grads(needs)
    run_chunks(head, targets, spec, coefs="weight" if single_pass else None, stats_out=stats)
    valid = targets != spec.ignore_index
    scale, global_loss = loss_scale(spec, stats, valid)
    per_token = stats["weight"] * stats["ce"]
    if spec.reduction == "none":
        loss = per_token * scale
    else:
        loss = per_token.double().sum() * scale.double()
    return loss.to(tensors[0].dtype), stats, scale, global_loss, head


class TokenWeightedLossFunction(torch.autograd.Function):
    """Forward: loss and per-row stats. Backward: the gradients built in forward, scaled in place by
    ``grad_output`` (single pass), or one more chunk sweep with per-row coefficients (recompute)."""

    @staticmethod
    def forward(ctx, spec: LossSpec, targets: torch.Tensor, *tensors):
        needs = tuple(ctx.needs_input_grad[2:])
        loss, stats, scale, global_loss, head = _forward(spec, targets, tensors, needs)
        ctx.spec, ctx.scale, ctx.applied_factor = spec, scale, None
        if spec.single_pass:
            ctx.grads, ctx.grad_dtypes = head.grads(), head.output_dtypes()
        else:
            ctx.save_for_backward(targets, stats["weight"], stats["ce"], global_loss, *tensors[:2])
            ctx.bias = tensors[2] if len(tensors) == 3 else None
            ctx.grads = ()
        outputs = (loss, stats["ce"], stats["entropy"], stats["weight"], stats["lse"])
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        spec = ctx.spec
        if spec.single_pass:
            # the gradients were built in forward without the normaliser; scale them in place (no copy).
            # A second backward (retain_graph, gradcheck) rescales a copy by the ratio of the factors.
            factor = grad_loss.to(ctx.scale.dtype) * ctx.scale
            if ctx.applied_factor is None:
                ctx.applied_factor = factor
                return (None, None, *_cast(tuple(None if g is None else g.mul_(factor) for g in ctx.grads),
                                           ctx.grad_dtypes))
            if float(ctx.applied_factor) == 0.0:
                raise RuntimeError("mileloss: a second backward after a zero grad_output cannot recover the "
                                   "gradient (it is scaled in place); recompute the loss instead")
            ratio = factor / ctx.applied_factor
            return (None, None, *_cast(tuple(None if g is None else g * ratio for g in ctx.grads),
                                       ctx.grad_dtypes))
        targets, weight, ce, global_loss, *saved = ctx.saved_tensors
        tensors = (*saved, ctx.bias) if len(saved) == 2 else tuple(saved)
        valid = targets != spec.ignore_index
        go = grad_loss.to(weight.dtype) * ctx.scale  # (N,) for reduction "none", else 0-d
        coef_ce = go * weight
        coef_weight = None
        if not spec.detach_weight:
            weighted_mean = spec.reduction == "mean" and spec.normalize == "weighted"
            centre = global_loss.to(weight.dtype) if weighted_mean else 0.0
            coef_weight = torch.where(valid, go * (ce - centre), torch.zeros_like(ce))
        head = _make_head(tensors)
        head.allocate_grads(tuple(ctx.needs_input_grad[2:]))
        run_chunks(head, targets, spec, coefs=(coef_ce, coef_weight))
        return (None, None, *_cast(head.grads(), head.output_dtypes()))


def _cast(grads, dtypes):
    """Gradients in the inputs' dtypes (a no-op where they already are)."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))
