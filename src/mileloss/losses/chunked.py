"""The one engine: token-weighted cross-entropy over row chunks, from logits or fused with the LM head.

For row i with logits z (V,), m = max z, e = exp(z - m), d = sum e, target y and weight w:

    CE_i  = log d - (z_y - m)                 H_i = log d - sum(e * (z - m)) / d
    loss  = sum_i w_i CE_i / normaliser       dloss/dz_i = (w_i / normaliser) * (softmax(z_i) - onehot(y_i))

Rows are processed ``chunk_size`` at a time in two reusable fp32 (chunk, V) buffers, so nothing of size
(N, V) is allocated besides the gradient of the logits (and, on the fused path, not even that). When the
weights are detached and a scalar is returned, the gradient is built *during* the forward pass (one pass);
``reduction="none"`` and ``detach_weight=False`` save O(N) row statistics and recompute chunks in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mileloss.losses.weights import token_weight, weight_derivative

_LOG_CLAMP = math.log(1e-8)  # the official code clamps the softmax to [1e-8, 1] before its log


@dataclass(frozen=True)
class LossSpec:
    """Everything about the loss that is not a tensor."""

    weighting: str = "mile"
    gamma: float = 1.0
    sigma: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    normalize: str = "weighted"
    detach_weight: bool = True
    process_group: Any = field(default=None, compare=False)
    chunk_size: int | None = None
    return_stats: bool = False

    @property
    def needs_entropy(self) -> bool:
        """MiLe's weight needs it; the per-token stats report it for every weighting."""
        return self.weighting == "mile" or self.return_stats

    @property
    def single_pass(self) -> bool:
        """Gradient built in forward: possible when the normaliser is a constant for autograd."""
        return self.detach_weight and self.reduction != "none"


def default_chunk_size(num_rows: int, vocab: int, hidden_dim: int | None, device: torch.device) -> int:
    """Rows per chunk. CPU: two fp32 (C, V) buffers of ~4 MiB each stay cache-friendly, but GEMMs on the
    fused path want >= 512 rows. CUDA: Liger's aspect-ratio rule C ~ N / ceil(V / D)."""
    if device.type == "cuda":
        ratio = math.ceil(vocab / max(hidden_dim or 1024, 1))
        rows = 2 ** math.ceil(math.log2(max(math.ceil(num_rows / ratio), 1)))
        return int(min(max(rows, 64), 4096))
    if hidden_dim is not None:
        return 512
    rows = (4 << 20) // (4 * max(vocab, 1))
    return int(min(max(rows, 8), 1024))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (so that float64 gradchecks are exact)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# heads: where a chunk's logits come from and where its logit-gradient goes


class LogitsHead:
    """Logits given: z = logits[rows]; the gradient is written row-block by row-block into (N, V)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.num_rows, self.vocab = logits.shape
        self.hidden_dim = None
        self.grad_logits: torch.Tensor | None = None

    def chunk_logits(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        out.copy_(self.logits[start:stop])  # upcast to the compute dtype; never modify the caller's logits
        return out

    def gradient_buffer(self, scratch: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Where the chunk's fp32 gradient is built: straight into the result when it is fp32."""
        if self.grad_logits is not None and self.grad_logits.dtype == scratch.dtype:
            return self.grad_logits[start:stop]
        return scratch

    def allocate_grads(self, needs: tuple[bool, ...]) -> None:
        self.grad_logits = torch.empty_like(self.logits) if needs[0] else None

    def accumulate(self, grad_z: torch.Tensor, start: int, stop: int) -> None:
        if self.grad_logits is not None and grad_z.data_ptr() != self.grad_logits[start:stop].data_ptr():
            self.grad_logits[start:stop].copy_(grad_z)

    def grads(self) -> tuple[torch.Tensor | None, ...]:
        return (self.grad_logits,)

    def output_dtypes(self) -> tuple[torch.dtype | None, ...]:
        return (self.logits.dtype,)


class LinearHead:
    """Logits computed per chunk: z = hidden[rows] @ weight.T + bias. The (N, V) logits never exist.

    Gradients accumulate in the compute dtype (fp32 for bf16/fp16 inputs) and are cast to the inputs'
    dtypes once, after scaling, so a low-precision gradient is rounded once, as a plain ``F.linear`` +
    ``F.cross_entropy`` would round it. On CPU the GEMMs of low-precision inputs run in fp32 on a one-off
    fp32 copy of the weight (mixed-dtype CPU GEMMs are emulated and slow); on CUDA they stay in the inputs'
    dtype with fp32 outputs.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.num_rows, self.hidden_dim = hidden.shape
        self.vocab = weight.shape[0]
        self.dtype = compute_dtype(weight.dtype)
        self.upcast = weight.dtype != self.dtype and weight.device.type != "cuda"
        self.gemm_weight = weight.to(self.dtype) if self.upcast else weight
        self.grad_hidden = self.grad_weight = self.grad_bias = None

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        h = self.hidden[start:stop]
        return h.to(self.dtype) if self.upcast else h

    def chunk_logits(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        h = self._rows(start, stop)
        if h.dtype == out.dtype:
            torch.mm(h, self.gemm_weight.t(), out=out)  # (C, D) @ (D, V) -> (C, V), no new allocation
        else:
            out.copy_(h @ self.weight.t())  # CUDA low-precision GEMM, math in fp32 after
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def gradient_buffer(self, scratch: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return scratch

    def allocate_grads(self, needs: tuple[bool, ...]) -> None:
        zeros = lambda like: torch.zeros_like(like, dtype=self.dtype)  # noqa: E731
        self.grad_hidden = zeros(self.hidden) if needs[0] else None
        self.grad_weight = zeros(self.weight) if needs[1] else None
        self.grad_bias = zeros(self.bias) if needs[2] and self.bias is not None else None

    def accumulate(self, grad_z: torch.Tensor, start: int, stop: int) -> None:
        h = self._rows(start, stop)
        if h.dtype == grad_z.dtype:
            if self.grad_hidden is not None:
                torch.mm(grad_z, self.gemm_weight, out=self.grad_hidden[start:stop])  # (C, V) @ (V, D)
            if self.grad_weight is not None:
                self.grad_weight.addmm_(grad_z.t(), h)  # (V, C) @ (C, D)
        else:  # CUDA, low precision: GEMMs in the inputs' dtype, fp32 results
            g = grad_z.to(h.dtype)
            if self.grad_hidden is not None:
                self.grad_hidden[start:stop] = _mm_wide(g, self.weight, self.dtype)
            if self.grad_weight is not None:
                self.grad_weight.add_(_mm_wide(g.t(), h, self.dtype))
        if self.grad_bias is not None:
            self.grad_bias.add_(grad_z.sum(0))

    def grads(self) -> tuple[torch.Tensor | None, ...]:
        return (self.grad_hidden, self.grad_weight, self.grad_bias)

    def output_dtypes(self) -> tuple[torch.dtype | None, ...]:
        return (self.hidden.dtype, self.weight.dtype, None if self.bias is None else self.bias.dtype)


def _mm_wide(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with a ``dtype`` result (``out_dtype`` where this torch has it, else an upcast after)."""
    try:
        return torch.mm(a, b, out_dtype=dtype)
    except (TypeError, RuntimeError, NotImplementedError):
        return (a @ b).to(dtype)


# ---------------------------------------------------------------------------------------------------
# per-chunk math


def chunk_row_stats(z: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, spec: LossSpec):
    """Row statistics of one chunk, in place.

    Args:
        z: (C, V) logits in the compute dtype (fp32, or fp64 for fp64 inputs); on return holds z - rowmax,
            or, for a detached MiLe weight, garbage (it is reused as scratch).
        e: (C, V) buffer of the same dtype; on return holds exp(z - rowmax).
        targets: (C,) int64 with ignored rows replaced by 0.   valid: (C,) bool.
    Returns:
        dict of (C,) tensors in the compute dtype: ce, entropy, weight (0 where ignored), lse, log_d, d, p_target,
        and weight_all (the paper-mode weight, counting ignored rows as the official code does).
    """
    rowmax = z.amax(dim=1, keepdim=True)
    z.sub_(rowmax)
    torch.exp(z, out=e)
    d = e.sum(dim=1)
    log_d = d.log()
    ce = log_d - z.gather(1, targets[:, None]).squeeze(1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    p_target = torch.exp(-ce)  # 1 at ignored rows, as in the official code (its ce is 0 there)
    entropy = torch.zeros_like(d)
    if spec.needs_entropy:
        correction = _clamp_correction(z, e, log_d, d) if spec.normalize == "paper" else 0.0
        # sum_v e_v (z_v - m) per row. Only a non-detached MiLe weight reads z again, so otherwise the product
        # overwrites z (no third (C, V) buffer); else vecdot (5x faster than a (1, V) @ (V, 1) bmm on CPU).
        if spec.detach_weight or spec.weighting != "mile":
            dot = z.mul_(e).sum(dim=1)
        else:
            dot = torch.linalg.vecdot(e, z)
        entropy = log_d - dot / d + correction
    weight_all = token_weight(spec.weighting, entropy, p_target, spec.gamma, spec.sigma)
    weight = torch.where(valid, weight_all, torch.zeros_like(weight_all))
    return dict(ce=ce, entropy=entropy, weight=weight, weight_all=weight_all, lse=rowmax.view(-1) + log_d,
                log_d=log_d, d=d, p_target=p_target)


def _clamp_correction(z: torch.Tensor, e: torch.Tensor, log_d: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """H(clamp(p, 1e-8, 1)) - H(p): entries with p < 1e-8 contribute -1e-8 log 1e-8 instead of -p log p."""
    log_p = z - log_d[:, None]  # (C, V) temporary: paper mode only
    small = log_p < _LOG_CLAMP
    clamped_term = small.sum(1).to(z.dtype) * (-1e-8 * _LOG_CLAMP)
    exact_term = torch.where(small, e * log_p, torch.zeros_like(log_p)).sum(1) / d
    return clamped_term + exact_term


def chunk_logit_grad(
    z: torch.Tensor, e: torch.Tensor, out: torch.Tensor, stats: dict, targets: torch.Tensor,
    coef_ce: torch.Tensor, coef_weight: torch.Tensor | None, spec: LossSpec,
) -> torch.Tensor:
    """Gradient of sum_i [coef_ce_i * CE_i + coef_weight_i * w_i] w.r.t. the chunk's logits, into ``out``.

    d CE_i / dz = p - onehot(y)                          (the cross-entropy part)
    d w_i / dz  = w'(H) * (-p * (log p + H))             (mile, only when the weight is not detached)
                = w'(p_t) * p_t * (onehot(y) - p)         (focal: the same shape as the CE part)
    ``z``/``e`` come from :func:`chunk_row_stats` (``z`` is only read for a non-detached MiLe weight);
    ``out`` may alias ``e``.
    """
    a = coef_ce
    if coef_weight is not None and spec.weighting == "focal":
        dw = weight_derivative("focal", stats["entropy"], stats["p_target"], spec.gamma, spec.sigma)
        a = a - coef_weight * dw * stats["p_target"]
    if coef_weight is not None and spec.weighting == "mile":
        # grad = p * (a - c * (log p + H)) - a * onehot, c = coef_weight * w'(H); log p = z - log d
        c = coef_weight * weight_derivative("mile", stats["entropy"], stats["p_target"], spec.gamma, spec.sigma)
        z.sub_((stats["log_d"] - stats["entropy"])[:, None]).mul_(-c[:, None]).add_(a[:, None])
        torch.mul(e, z, out=out).div_(stats["d"][:, None])
    else:
        torch.mul(e, (a / stats["d"])[:, None], out=out)  # a * softmax
    out.scatter_add_(1, targets[:, None], -a[:, None])  # the one-hot part: C entries, no V-wide write
    return out


# ---------------------------------------------------------------------------------------------------
# the chunk loop


def run_chunks(head, targets: torch.Tensor, spec: LossSpec, coefs=None, stats_out: dict | None = None):
    """One sweep over all rows. With ``coefs=(coef_ce, coef_weight)`` (each (N,) or None) also writes the
    logit gradient of sum_i coef_ce_i CE_i + coef_weight_i w_i into ``head``; ``coefs="weight"`` uses
    coef_ce = w (the unnormalised single-pass gradient). Fills ``stats_out`` with (N,) fp32 row stats."""
    n, vocab = head.num_rows, head.vocab
    device = targets.device
    chunk = spec.chunk_size or default_chunk_size(n, vocab, head.hidden_dim, device)
    dtype = compute_dtype(head.output_dtypes()[0])
    z_buf = torch.empty((min(chunk, n), vocab), dtype=dtype, device=device)
    e_buf = torch.empty_like(z_buf)
    valid_all = targets != spec.ignore_index
    safe_all = torch.where(valid_all, targets, torch.zeros_like(targets))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        z = head.chunk_logits(z_buf[:rows], start, stop)
        e = e_buf[:rows]
        safe, valid = safe_all[start:stop], valid_all[start:stop]
        stats = chunk_row_stats(z, e, safe, valid, spec)
        if stats_out is not None:
            for key in stats_out:
                stats_out[key][start:stop] = stats[key]
        if coefs is None:
            continue
        if coefs == "weight":
            coef_ce, coef_weight = stats["weight"], None
        else:
            coef_ce = coefs[0][start:stop]
            coef_weight = None if coefs[1] is None else coefs[1][start:stop]
        out = head.gradient_buffer(e, start, stop)
        grad_z = chunk_logit_grad(z, e, out, stats, safe, coef_ce, coef_weight, spec)
        head.accumulate(grad_z, start, stop)


# ---------------------------------------------------------------------------------------------------
# normalisation: one scale turns sum_i w_i CE_i into the loss


def _all_reduce(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def _world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def loss_scale(spec: LossSpec, stats: dict, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, global_loss): the loss is ``scale * sum_i w_i CE_i`` (``scale * w_i CE_i`` per token for
    reduction "none"); ``global_loss`` is the normalised loss over all ranks (used by the exact gradient of a
    non-detached weight). With a process group, "weighted"/"none" means are multiplied by the world size so
    that DDP's gradient averaging yields exactly the single-process gradient of the concatenated batch."""
    weight, ce = stats["weight"].double(), stats["ce"].double()
    num, den_w, count = (weight * ce).sum(), weight.sum(), valid.sum().double()
    if spec.normalize == "paper":
        # alpha = 1 / mean(w over all positions), then the mean over all positions, ignored ones included
        n_all = torch.tensor(float(valid.numel()), dtype=torch.float64, device=valid.device)
        den_all = stats["weight_all"].double().sum()
        alpha = torch.where(den_all > 0, n_all / den_all, torch.zeros_like(den_all))
        if spec.process_group is not None:  # the official code averages the ranks' alphas
            alpha = _all_reduce(alpha.clone(), spec.process_group) / _world_size(spec.process_group)
        if spec.reduction != "mean":
            return alpha.to(stats["ce"].dtype), alpha * num
        scale = torch.where(n_all > 0, alpha / n_all.clamp_min(1), torch.zeros_like(alpha))
        return scale.to(stats["ce"].dtype), scale * num
    if spec.reduction != "mean":
        return torch.ones((), dtype=stats["ce"].dtype, device=valid.device), num
    totals = _all_reduce(torch.stack([num, den_w if spec.normalize == "weighted" else count]), spec.process_group)
    global_num, global_den = totals[0], totals[1]
    inv = torch.where(global_den > 0, 1.0 / global_den.clamp_min(1e-300), torch.zeros_like(global_den))
    return (inv * _world_size(spec.process_group)).to(stats["ce"].dtype), global_num * inv
