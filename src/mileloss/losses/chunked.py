"""The one engine: token-weighted cross-entropy over row chunks, from logits or fused with the LM head.

For row i with logits z (V,), m = max z, e = exp(z - m), d = sum e, target y and log-weight lw_i = log w_i:

    CE_i  = log d - (z_y - m)                 H_i = log d - sum(e * (z - m)) / d      (both >= 0)
    loss  = sum_i exp(lw_i - s) CE_i * scale                 dloss/dz_i = exp(lw_i - s) * scale * (p_i - onehot(y_i))

with a shift ``s`` and a ``scale`` from :func:`loss_scale`: for a weighted mean s = max_i lw_i and
scale = 1 / sum_i exp(lw_i - s), so no weight is ever formed outside [0, 1] (see ``weights.py``).
A -inf logit has p = 0 and adds nothing to d or H (0 * -inf is taken as 0); a +inf or NaN logit makes
its row NaN.

Rows are processed ``chunk_size`` at a time in two reusable fp32 (chunk, V) buffers, so nothing of size
(N, V) is allocated besides the gradient of the logits (on the fused path, not even that; from logits with
``inplace_backward``, the gradient overwrites the logits). On the fused path, when the weights are detached and
a scalar is returned, the gradient is built *during* the forward pass (one pass, the GEMM run once): each
chunk's rows are weighted by exp(lw_i - R), with R a fixed shift where the log-weights have a known range
(``weights.single_pass_shift``) or else the running maximum of the log-weights so far, in which case the (V, D)
accumulators are rescaled when R grows (as online softmax rescales its partial sums); the backward multiplies
row i by exp(R_i - s) * scale. Everything else (every loss from logits, ``reduction="none"``,
``detach_weight=False``, a z-loss) saves O(N) row statistics and makes the gradient in backward: from the saved
row maxima and log-denominators in one sweep per chunk when the weight is detached, else by recomputing the
chunk's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mileloss.losses import compiled as _compiled
from mileloss.losses.weights import log_token_weight, log_weight_derivative, log_weight_shift, single_pass_shift

_LOG_CLAMP = math.log(1e-8)  # the official code clamps the softmax to [1e-8, 1] before its log
_FLOOR = -1.0e4  # z - max below this has exp() == 0 exactly in float32 and float64: a -inf logit's stand-in


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
    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    compile: bool | str = "auto"  # the per-chunk math compiled (True), eager (False), or as measured ("auto")
    inplace_backward: bool = False  # from logits: the backward writes the gradient over the logits

    @property
    def needs_entropy(self) -> bool:
        """MiLe's weight needs it; the per-token stats report it for every weighting."""
        return self.weighting == "mile" or self.return_stats

    @property
    def exact_tail(self) -> bool:
        """Whether the weight reads the tail of a confident row: 1 - p_y (focal) or a small H next to a small
        sigma (MiLe, sigma < 1). Then sum_{v != argmax} e_v is summed without the 1 of the maximum (one more
        pass), so CE and H of a row with 1 - p_max ~ 1e-7 keep float32 *relative* precision instead of the
        ~1e-7 absolute error of log(1 + tail) rounded as 1 + tail (which is what F.cross_entropy has)."""
        return self.gamma != 0.0 and (self.weighting == "focal" or (self.weighting == "mile" and self.sigma < 1.0))

    @property
    def single_pass(self) -> bool:
        """Gradient built in forward: possible when the normaliser is a constant for autograd."""
        return self.detach_weight and self.reduction != "none" and self.z_loss == 0.0


def default_chunk_size(num_rows: int, vocab: int, hidden_dim: int | None, device: torch.device,
                       compiled: bool = False) -> int:
    """Rows per chunk. CPU: two fp32 (C, V) buffers of ~4 MiB each stay cache-friendly, but GEMMs on the
    fused path want >= 512 rows; the compiled path from logits holds no (C, V) buffer and takes 256 rows
    (fewer calls, each with a few microseconds of guard checks). CUDA: Liger's aspect-ratio rule
    C ~ N / ceil(V / D)."""
    if device.type == "cuda":
        ratio = math.ceil(vocab / max(hidden_dim or 1024, 1))
        rows = 2 ** math.ceil(math.log2(max(math.ceil(num_rows / ratio), 1)))
        return int(min(max(rows, 64), 4096))
    if hidden_dim is not None:
        return 512
    if compiled:
        return 256
    rows = (4 << 20) // (4 * max(vocab, 1))
    return int(min(max(rows, 8), 1024))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (so that float64 gradchecks are exact)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# heads: where a chunk's logits come from and where its logit-gradient goes


class LogitsHead:
    """Logits given: z = logits[rows]; the gradient is written row-block by row-block into (N, V): a new
    tensor, or with ``inplace`` the logits themselves (each chunk is read before its rows are overwritten)."""

    def __init__(self, logits: torch.Tensor, inplace: bool = False):
        self.logits, self.inplace = logits, inplace
        self.num_rows, self.vocab = logits.shape
        self.hidden_dim = None
        self.grad_logits: torch.Tensor | None = None
        self.row_wise = (True,)  # which of grads() has one row per token (the others sum over tokens)
        self.accumulates = False

    def chunk_logits(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        out.copy_(self.logits[start:stop])  # upcast to the compute dtype; never modify the caller's logits
        return out

    # the compiled path (compiled.py): it reads the rows as they are and writes the gradient into the result
    bias = None

    def raw_buffer(self, rows: int) -> None:
        return None

    def raw_logits(self, buffer, start: int, stop: int) -> torch.Tensor:
        return self.logits[start:stop]

    def compiled_out(self, raw: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        return None if self.grad_logits is None else self.grad_logits[start:stop]

    def gradient_buffer(self, scratch: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Where the chunk's fp32 gradient is built: straight into the result when it is fp32."""
        if self.grad_logits is not None and self.grad_logits.dtype == scratch.dtype:
            return self.grad_logits[start:stop]
        return scratch

    def allocate_grads(self, needs: tuple[bool, ...]) -> None:
        self.grad_logits = None if not needs[0] else self.logits if self.inplace else torch.empty_like(self.logits)

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
        self.row_wise = (True, False, False)
        self.accumulates = False

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

    def raw_buffer(self, rows: int) -> torch.Tensor:
        """The compiled path's one (chunk, V) buffer, in the GEMM's output dtype (bf16 for bf16 on CUDA)."""
        return torch.empty((rows, self.vocab), dtype=self.gemm_weight.dtype, device=self.weight.device)

    def raw_logits(self, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """h @ W.T into ``buffer`` (the bias is added inside the compiled function)."""
        return torch.mm(self._rows(start, stop), self.gemm_weight.t(), out=buffer)

    def compiled_out(self, raw: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return raw  # the gradient overwrites the logits it came from

    def allocate_grads(self, needs: tuple[bool, ...]) -> None:
        zeros = lambda like: torch.zeros_like(like, dtype=self.dtype)  # noqa: E731
        self.grad_hidden = zeros(self.hidden) if needs[0] else None
        self.grad_weight = zeros(self.weight) if needs[1] else None
        self.grad_bias = zeros(self.bias) if needs[2] and self.bias is not None else None
        self.accumulates = self.grad_weight is not None or self.grad_bias is not None

    def rescale_accumulators(self, ratio: float) -> None:
        """Multiply the sums over tokens (weight and bias gradients) by ``ratio`` (a new running shift)."""
        for grad in (self.grad_weight, self.grad_bias):
            if grad is not None:
                grad.mul_(ratio)

    def accumulate(self, grad_z: torch.Tensor, start: int, stop: int) -> None:
        h = self._rows(start, stop)
        if h.dtype == grad_z.dtype == self.dtype:
            if self.grad_hidden is not None:
                torch.mm(grad_z, self.gemm_weight, out=self.grad_hidden[start:stop])  # (C, V) @ (V, D)
            if self.grad_weight is not None:
                self.grad_weight.addmm_(grad_z.t(), h)  # (V, C) @ (C, D)
        else:  # CUDA, low precision: GEMMs in the inputs' dtype, fp32 results (grad_z fp32, or bf16 compiled)
            g = grad_z.to(h.dtype)
            if self.grad_hidden is not None:
                self.grad_hidden[start:stop] = _mm_wide(g, self.weight, self.dtype)
            if self.grad_weight is not None:
                self.grad_weight.add_(_mm_wide(g.t(), h, self.dtype))
        if self.grad_bias is not None:
            self.grad_bias.add_(grad_z.sum(0, dtype=self.dtype))

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


def chunk_row_stats(z: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, spec: LossSpec,
                    log_token_weights: torch.Tensor | None = None):
    """Row statistics of one chunk, in place.

    Args:
        z: (C, V) logits in the compute dtype (fp32, or fp64 for fp64 inputs); on return holds z - rowmax
            (floored at -1e4 for a non-detached MiLe weight, which reads it again), or else garbage (it is
            reused as scratch).
        e: (C, V) buffer of the same dtype; on return holds exp(z - rowmax) (0 for a -inf logit).
        targets: (C,) int64 with ignored rows replaced by 0.   valid: (C,) bool.
        log_token_weights: (C,) log t_i of the caller's token weights (-inf where t_i = 0), or None (t = 1).
    With ``spec.exact_tail`` the row maximum comes with its index and d = 1 + tail, log d = log1p(tail), with
    tail = sum over the other entries of e, summed without the maximum's 1 (see ``LossSpec.exact_tail``).
    Returns:
        dict of (C,) tensors in the compute dtype: ce (the cross-entropy the weight multiplies: with
        ``spec.label_smoothing`` = eps, (1 - eps) nll + eps (lse - mean_v z_v); 0 where ignored, +inf where the
        target's logit is -inf), nll (-log p_y, what focal's weight reads), entropy,
        log_weight (-inf where ignored; + log t_i with token weights), log_weight_all (the weight of every
        position, ignored ones included, as the official code counts them in paper mode), lse, log_d, d,
        p_target, row_max (m), correct (bool: a valid row whose target's logit equals m; a tie counts).
    """
    if spec.exact_tail:
        rowmax, top = z.max(dim=1, keepdim=True)  # NaN if any logit is NaN
    else:
        rowmax = z.amax(dim=1, keepdim=True)
    z.sub_(rowmax)  # a -inf logit stays -inf; a +inf (or all -inf) maximum makes the whole row NaN
    torch.exp(z, out=e)
    if spec.exact_tail:
        e.scatter_(1, top, 0.0)
        tail = e.sum(dim=1) + (rowmax.view(-1) - rowmax.view(-1))  # + NaN where the maximum is +inf
        e.scatter_(1, top, 1.0)
        d, log_d = tail + 1.0, torch.log1p(tail)
    else:
        d = e.sum(dim=1)  # >= 1: the maximum contributes exactly 1
        log_d = d.log()
    picked = z.gather(1, targets[:, None]).squeeze(1)  # z_y - m: exactly 0 iff the target's logit is the maximum
    nll = torch.where(valid, log_d - picked, torch.zeros_like(log_d))
    ce = nll
    if spec.label_smoothing:  # lse - mean_v z_v = log d - mean_v (z_v - m): one more (C, V) read, only here
        eps = spec.label_smoothing
        uniform = log_d - z.sum(dim=1) / z.shape[1]
        ce = torch.where(valid, (1.0 - eps) * nll + eps * uniform, torch.zeros_like(nll))
    entropy = torch.zeros_like(d)
    if spec.needs_entropy:
        correction = _clamp_correction(z, e, log_d, d) if spec.normalize == "paper" else 0.0
        # sum_v e_v (z_v - m) per row. Only a non-detached MiLe weight reads z again, so otherwise the product
        # overwrites z (no third (C, V) buffer); else vecdot (5x faster than a (1, V) @ (V, 1) bmm on CPU).
        if spec.detach_weight or spec.weighting != "mile":
            dot = _row_sum_of_products(z.mul_(e), d)
        else:
            z.clamp_min_(_FLOOR)  # finite stand-in for -inf (exp is 0 either way); keeps NaN rows NaN
            dot = torch.linalg.vecdot(e, z)
        entropy = log_d - dot / d + correction  # log d >= 0 and -dot >= 0: no cancellation, H >= 0
    log_weight_all = log_token_weight(spec.weighting, entropy, nll, spec.gamma, spec.sigma)
    if log_token_weights is not None:
        log_weight_all = log_weight_all + log_token_weights
    log_weight = torch.where(valid, log_weight_all, torch.full_like(log_weight_all, -math.inf))
    return dict(ce=ce, nll=nll, entropy=entropy, log_weight=log_weight, log_weight_all=log_weight_all,
                lse=rowmax.view(-1) + log_d, log_d=log_d, d=d, p_target=torch.exp(-nll),
                row_max=rowmax.view(-1), correct=valid & (picked == 0))


def _row_sum_of_products(product: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Row sums of ``e * (z - m)``, with the NaN of ``0 * -inf`` (a -inf logit: p = 0) counted as 0.

    Where d is finite the maximum is finite and no logit is NaN, so a NaN product can only be 0 * -inf; a
    row with a NaN or +inf logit has a NaN d and stays NaN through it. On CPU the plain sum runs first and
    only chunks holding such a row pay for ``nansum``; elsewhere ``nansum`` (no host synchronisation)."""
    if product.device.type != "cpu":
        return product.nansum(dim=1)
    dot = product.sum(dim=1)
    fix = torch.isnan(dot) & torch.isfinite(d)
    if bool(fix.any()):
        dot = torch.where(fix, product.nansum(dim=1), dot)
    return dot


def _clamp_correction(z: torch.Tensor, e: torch.Tensor, log_d: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """H(clamp(p, 1e-8, 1)) - H(p): entries with p < 1e-8 contribute -1e-8 log 1e-8 instead of -p log p.

    A -inf logit (p = 0) is such an entry: the official code's clamp turns its 0 into 1e-8 too."""
    log_p = z - log_d[:, None]  # (C, V) temporary: paper mode only
    small = log_p < _LOG_CLAMP
    clamped_term = small.sum(1).to(z.dtype) * (-1e-8 * _LOG_CLAMP)
    exact_term = torch.where(small, e * log_p, torch.zeros_like(log_p)).nansum(1) / d  # 0 * -inf -> 0
    return clamped_term + exact_term


def chunk_logit_grad(
    z: torch.Tensor, e: torch.Tensor, out: torch.Tensor, stats: dict, targets: torch.Tensor,
    coef_ce: torch.Tensor, coef_logw: torch.Tensor | None, spec: LossSpec, coef_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of sum_i [coef_ce_i CE_i + coef_logw_i log w_i + coef_z_i lse_i^2] w.r.t. the chunk's logits
    (the capped ones, under a softcap), into ``out``.

    d CE_i / dz     = p - (1 - eps) onehot(y) - eps / V          (the cross-entropy part, eps = label smoothing)
    d log w_i / dz  = lw'(H) * (-p * (log p + H))                 (mile, only when the weight is not detached)
                    = lw'(p_y) * p_y * (onehot(y) - p)           (focal)
    d lse_i^2 / dz  = 2 lse_i p                                   (z-loss)
    with lw' = d log w / d(statistic) (:func:`log_weight_derivative`); a caller wanting the derivative through
    w_i passes coef_logw_i = coef_w_i * w_i. ``z``/``e`` come from :func:`chunk_row_stats` (``z`` is only
    read for a non-detached MiLe weight); ``out`` may alias ``e``. Rows with p = 0 entries get 0 there.
    The gradient is ``a_p * p - a_y * onehot(y) - a_u / V`` with per-row coefficients; without smoothing,
    z-loss or a non-detached focal weight, a_p = a_y = coef_ce and a_u = 0 (no extra pass).
    """
    a_p = a_y = coef_ce
    eps = spec.label_smoothing
    if eps:
        a_y = coef_ce * (1.0 - eps)
    if coef_logw is not None and spec.weighting == "focal":
        b = coef_logw * log_weight_derivative("focal", stats["entropy"], stats["nll"], spec.gamma, spec.sigma) \
            * stats["p_target"]
        a_p, a_y = a_p - b, a_y - b
    if coef_z is not None:
        a_p = a_p + 2.0 * coef_z * stats["lse"]
    if coef_logw is not None and spec.weighting == "mile":
        # grad = p * (a_p - c * (log p + H)) - ..., c = coef_logw * lw'(H); log p = z - log d
        c = coef_logw * log_weight_derivative("mile", stats["entropy"], stats["nll"], spec.gamma, spec.sigma)
        z.sub_((stats["log_d"] - stats["entropy"])[:, None]).mul_(-c[:, None]).add_(a_p[:, None])
        torch.mul(e, z, out=out).div_(stats["d"][:, None])
    else:
        torch.mul(e, (a_p / stats["d"])[:, None], out=out)  # a_p * softmax
    out.scatter_add_(1, targets[:, None], -a_y[:, None])  # the one-hot part: C entries, no V-wide write
    if eps:
        out.sub_((coef_ce * (eps / out.shape[1]))[:, None])
    return out


# ---------------------------------------------------------------------------------------------------
# the chunk loop


def run_chunks(head, targets: torch.Tensor, spec: LossSpec, coefs=None, stats_out: dict | None = None,
               log_token_weights: torch.Tensor | None = None, row_stats=None):
    """One sweep over all rows; fills ``stats_out`` (a dict of (N,) tensors, keys from :func:`chunk_row_stats`).

    ``log_token_weights``: (N,) log t_i of the caller's token weights (added to every log-weight), or None.
    With ``spec.softcap`` = s each chunk's logits become s tanh(z / s) before anything else, and the logit
    gradient is multiplied by the derivative 1 - tanh(z / s)^2 before it reaches the head (a third
    (chunk, V) buffer holds the tanh; only when a softcap is set).

    ``coefs=(coef_ce, coef_logw, coef_z)`` (each (N,) or None): also writes into ``head`` the logit gradient
    of sum_i coef_ce_i CE_i + coef_logw_i log w_i + coef_z_i lse_i^2 (the backward of the recompute path).
    With ``row_stats=(row_max, log_d)`` ((N,) each, as the forward's ``stats_out`` got them) and no
    ``coef_logw``, no row statistic is recomputed: each chunk's gradient is one sweep that reads the logits
    once (p = exp(z - m - log d)) and writes the gradient once.

    ``coefs="weight"`` (the single pass): writes the gradient of sum_i exp(lw_i - R_i) CE_i, where R_i is
    the running maximum of the log-weights over the chunks up to row i's; ``stats_out["row_shift"]`` gets
    R_i (-inf while every weight so far is 0). The head's sums over tokens (fused weight and bias gradients)
    are rescaled by exp(R_old - R_new) whenever R grows, so at the end they are relative to the returned
    final R. That comparison reads R on the host (one synchronisation per chunk on CUDA), so where the
    log-weights have a known range (:func:`single_pass_shift`: CE and MiLe without token weights) R is that
    fixed shift from the start, never grows, and nothing is rescaled or read back.
    Returns the final R (0-d), or None.
    """
    n, vocab = head.num_rows, head.vocab
    device = targets.device
    chunk = spec.chunk_size or default_chunk_size(n, vocab, head.hidden_dim, device, compiled=True)
    use_compiled = n > 0 and _compiled.wants_compile(spec.compile, min(chunk, n), vocab, device)
    if not use_compiled and spec.chunk_size is None:
        chunk = default_chunk_size(n, vocab, head.hidden_dim, device)
    dtype = compute_dtype(head.output_dtypes()[0])
    rows_max = min(chunk, n)
    buffers = None if use_compiled else _eager_buffers(spec, rows_max, vocab, dtype, device)
    raw = head.raw_buffer(rows_max) if use_compiled else None
    opts = _compiled.chunk_options(spec)
    mode = "stats" if coefs is None else "weight" if coefs == "weight" else "coefs"
    if mode == "coefs" and row_stats is not None and coefs[1] is None:
        mode = "lse"
    valid_all = targets != spec.ignore_index
    safe_all = torch.where(valid_all, targets, torch.zeros_like(targets))
    fixed = None if log_token_weights is not None else single_pass_shift(spec.weighting, spec.gamma, spec.sigma,
                                                                           vocab)
    running = torch.full((), -math.inf if fixed is None else fixed, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        safe, valid = safe_all[start:stop], valid_all[start:stop]
        log_t = None if log_token_weights is None else log_token_weights[start:stop]
        row_max, log_d = (None, None) if mode != "lse" else (stat[start:stop] for stat in row_stats)
        if mode in ("coefs", "lse"):
            coef_ce, coef_logw, coef_z = (None if c is None else c[start:stop] for c in coefs)
        else:
            coef_ce = coef_logw = coef_z = None
        grad_z = None
        if use_compiled:
            try:
                src = head.raw_logits(None if raw is None else raw[:rows], start, stop)
                out = None if mode == "stats" else head.compiled_out(src, start, stop)
                # mode "lse" takes the saved row statistics where the others take log_t and running
                slots = (row_max, log_d) if mode == "lse" else (log_t, running)
                if rows != rows_max:
                    _compiled.mark_ragged(src, out, safe, valid, *slots, coef_ce, coef_logw, coef_z)
                signature = (vocab, src.dtype, None if out is None else out.dtype, device.type)
                with torch.no_grad():
                    if out is not None and out.data_ptr() == src.data_ptr():  # the fused buffer, or inplace
                        fn = _compiled.compiled("in_place", opts, mode, signature)
                        stats, grown = fn(src, head.bias, safe, valid, *slots, coef_ce, coef_logw, coef_z)
                    else:
                        fn = _compiled.compiled("write_back", opts, mode, signature)
                        stats, grown = fn(src, out, head.bias, safe, valid, *slots, coef_ce, coef_logw, coef_z)
                grad_z = out
            except Exception as error:  # noqa: BLE001 - any failure of inductor: warn once, then eager
                _compiled.give_up(error)
                use_compiled, raw = False, None
                buffers = _eager_buffers(spec, rows_max, vocab, dtype, device)
        if not use_compiled:
            z_buf, e_buf, cap_buf = buffers
            z = head.chunk_logits(z_buf[:rows], start, stop)
            e = e_buf[:rows]
            tanh = None
            if cap_buf is not None:  # z <- s tanh(z / s), the tanh kept for the gradient
                tanh = torch.div(z, spec.softcap, out=cap_buf[:rows]).tanh_()
                torch.mul(tanh, spec.softcap, out=z)
            if mode == "lse":  # p itself into e, so that chunk_logit_grad's e / d is p with d = 1
                torch.exp(z.sub_(row_max[:, None]).sub_(log_d[:, None]), out=e)
                stats = dict(d=torch.ones_like(log_d), lse=row_max + log_d)
            else:
                stats = chunk_row_stats(z, e, safe, valid, spec, log_t)
            if mode == "weight":
                grown = torch.maximum(running, stats["log_weight"].max())  # NaN propagates
        if stats_out is not None:
            for key in stats_out:
                if key != "row_shift":
                    stats_out[key][start:stop] = stats[key]
        if mode == "stats":
            continue
        if mode == "weight":
            if head.accumulates and fixed is None:
                old, new = float(running), float(grown)
                if old != -math.inf and not old == new:  # NaN compares unequal: the sums become NaN
                    head.rescale_accumulators(math.exp(old - new))
            running = grown
            if stats_out is not None and "row_shift" in stats_out:
                stats_out["row_shift"][start:stop] = running
            if not use_compiled:
                base = torch.where(running == -math.inf, torch.zeros_like(running), running)
                coef_ce = torch.exp(stats["log_weight"] - base)
        if not use_compiled:
            out = head.gradient_buffer(e, start, stop)
            grad_z = chunk_logit_grad(z, e, out, stats, safe, coef_ce, coef_logw, spec, coef_z)
            if tanh is not None:  # chain rule through s tanh(z / s): g <- g - g tanh^2 (two passes)
                grad_z.addcmul_(grad_z, tanh.square_(), value=-1.0)
        head.accumulate(grad_z, start, stop)
    return running if coefs == "weight" else None


def _eager_buffers(spec: LossSpec, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """The eager path's two (chunk, V) buffers (logits, exp) and, with a softcap, a third for the tanh."""
    z_buf = torch.empty((rows, vocab), dtype=dtype, device=device)
    return z_buf, torch.empty_like(z_buf), torch.empty_like(z_buf) if spec.softcap is not None else None


# ---------------------------------------------------------------------------------------------------
# normalisation: a shift and a scale turn sum_i exp(lw_i - shift) CE_i into the loss


def _all_reduce(values: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, op=op, group=group)
    return values


def _world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _max_or_neg_inf(values: torch.Tensor) -> torch.Tensor:
    if values.numel() == 0:
        return torch.full((), -math.inf, dtype=values.dtype, device=values.device)
    return values.max()


def _finite_or_zero(top: torch.Tensor) -> torch.Tensor:
    """A shift: the largest log-weight, or 0 when every weight is 0 (top = -inf). NaN stays NaN."""
    return torch.where(top == -math.inf, torch.zeros_like(top), top)


def _inverse_or_zero(value: torch.Tensor) -> torch.Tensor:
    """1 / value, with 0 for an empty normaliser (empty or all-ignored batch) and NaN for a NaN one."""
    return torch.where(value == 0, torch.zeros_like(value), 1.0 / value)


def loss_scale(spec: LossSpec, stats: dict, valid: torch.Tensor, vocab: int, count: torch.Tensor | None = None):
    """(shift, scale, global_loss), 0-d float64: the loss is ``scale * sum_i exp(lw_i - shift) CE_i``
    (``scale * exp(lw_i - shift) CE_i`` per token for reduction "none").

    * "weighted" mean: shift = max_i lw_i over all ranks (all-reduce MAX), scale = world / sum_i exp(lw_i - shift)
      (all-reduce SUM). The weighted mean is invariant to the shift, so this is exact for any weights.
    * "sum", "none" and the "none" (token-count) mean: shift = c from :func:`log_weight_shift` (fixed by the
      options and V), scale = 1 (or world / global count; ``count``, 0-d float64, replaces the number of
      valid tokens: the sum of the caller's token weights over them).
    * "paper": see :func:`_paper_scale`.

    ``global_loss`` is the normalised loss over all ranks (the centre of the exact gradient of a non-detached
    weight). With a process group, "weighted"/"none" means are multiplied by the world size so that DDP's
    gradient averaging yields exactly the single-process gradient of the concatenated batch.
    """
    log_weight, ce = stats["log_weight"].double(), stats["ce"].double()
    group = spec.process_group
    if spec.normalize == "paper":
        return _paper_scale(spec, stats, log_weight, ce)
    if spec.reduction == "mean" and spec.normalize == "weighted":
        top = _all_reduce(_max_or_neg_inf(log_weight), group, dist.ReduceOp.MAX)
        shift = _finite_or_zero(top)
        weight = torch.exp(log_weight - shift)
        totals = _all_reduce(torch.stack([(weight * ce).sum(), weight.sum()]), group)
    else:
        shift = torch.tensor(log_weight_shift(spec.weighting, spec.gamma, spec.sigma, vocab), dtype=torch.float64,
                             device=log_weight.device)
        weighted_ce = (torch.exp(log_weight - shift) * ce).sum()
        if spec.reduction != "mean":
            return shift, torch.ones_like(shift), weighted_ce
        count = valid.sum().double() if count is None else count
        totals = _all_reduce(torch.stack([weighted_ce, count]), group)
    inverse = _inverse_or_zero(totals[1])
    return shift, inverse * _world_size(group), totals[0] * inverse


def _paper_scale(spec: LossSpec, stats: dict, log_weight: torch.Tensor, ce: torch.Tensor):
    """The official formula: alpha = 1 / mean(w over all N positions), loss = mean over all positions of
    alpha w_i CE_i (ignored ones included, with CE = 0); under a process group alpha is replaced by the mean
    of the ranks' alphas. In logs: log alpha = log N - s - log sum_i exp(lw_i - s), s = max_i lw_i, so
    alpha * w_i = exp(log alpha + s) * exp(lw_i - s) stays in range; the ranks' alphas are averaged as
    exp(logmeanexp(log alpha)) (all-reduce MAX, then SUM). A rank whose weights are all 0 (no positions, or
    focal on only ignored ones) contributes alpha = 0, where the official code would divide by zero.
    """
    log_weight_all = stats["log_weight_all"].double()
    shift = _finite_or_zero(_max_or_neg_inf(log_weight_all))
    n_all = float(log_weight_all.numel())
    den_all = torch.exp(log_weight_all - shift).sum()
    minus_inf = torch.full_like(den_all, -math.inf)
    log_alpha = torch.where(den_all > 0, math.log(max(n_all, 1.0)) - shift - den_all.log(), minus_inf)
    log_alpha = torch.where(torch.isnan(den_all), den_all, log_alpha)
    group = spec.process_group
    if group is not None:  # the official code all-reduces alpha and divides by the world size
        top = _finite_or_zero(_all_reduce(log_alpha.clone(), group, dist.ReduceOp.MAX))
        total = _all_reduce(torch.exp(log_alpha - top), group)
        log_alpha = top + torch.log(total / _world_size(group))
    log_scale = log_alpha + shift  # alpha * w_i = exp(log_scale) * exp(lw_i - shift)
    if spec.reduction == "mean":
        log_scale = log_scale - math.log(max(n_all, 1.0))
    scale = torch.exp(log_scale)
    return shift, scale, scale * (torch.exp(log_weight - shift) * ce).sum()
