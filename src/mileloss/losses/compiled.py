"""The element-wise work of one chunk as one pure function, compiled by ``torch.compile`` (inductor).

The eager engine (:func:`mileloss.losses.chunked.chunk_row_stats` and :func:`chunk_logit_grad`) runs a dozen
separate passes over each (chunk, V) block: max, subtract, exp, sum, multiply for the entropy, the gradient,
the one-hot scatter, the softcap's chain rule. :func:`chunk_math` states the same formulas on whole tensors,
with no in-place operation and no host synchronisation, so that inductor fuses them into a few kernels (C++
with OpenMP on CPU, Triton on CUDA): one sweep for the row reductions and one that writes the gradient. The
GEMMs stay outside, in BLAS/cuBLAS (the heads of ``chunked.py``).

Buffers: the compiled function writes the chunk's logit gradient over the buffer it read the logits from (the
fused path: the GEMM's output, so the fused path holds one (chunk, V) buffer, as PyTorch's
``F.linear_cross_entropy`` does) or straight into the caller's gradient rows (from logits: no (chunk, V)
buffer at all). Inductor lowers the final ``copy_`` into the store of the fused kernel.

Compilation happens once per (variant, options, dtype, chunk shape): a full chunk is compiled with static
shapes, the ragged last chunk (and a batch smaller than one chunk) once more with a dynamic row dimension.
Each key gets its own copy of the function's code object, so that dynamo's per-code recompile limit (8) is
counted per key and a process that uses many option sets never silently falls back.

Switch: ``compile="auto" | True | False`` on every loss (``auto`` consults the environment variable
``MILELOSS_COMPILE`` = ``0`` / ``1`` / ``auto``, then :func:`auto_compile`). If compilation fails (no C++
compiler, an unsupported platform, an inductor error), one ``RuntimeWarning`` is issued and the process
continues on the eager path.
"""

from __future__ import annotations

import functools
import math
import os
import types
import warnings
from typing import NamedTuple

import torch

from mileloss.errors import ParameterError
from mileloss.losses.weights import log_token_weight, log_weight_derivative

_LOG_CLAMP = math.log(1e-8)
_FLOOR = -1.0e4

ENV = "MILELOSS_COMPILE"
# auto compiles a chunk of at least this many elements (rows x V), on these devices; see auto_compile
AUTO_MIN_ELEMENTS = 1 << 20
AUTO_DEVICES = ("cpu",)


class ChunkOptions(NamedTuple):
    """The options that change the per-chunk math (a hashable key of the compile cache)."""

    weighting: str
    gamma: float
    sigma: float
    paper: bool
    detach_weight: bool
    softcap: float | None
    label_smoothing: float
    exact_tail: bool
    needs_entropy: bool


def chunk_options(spec) -> ChunkOptions:
    return ChunkOptions(spec.weighting, spec.gamma, spec.sigma, spec.normalize == "paper", spec.detach_weight,
                        spec.softcap, spec.label_smoothing, spec.exact_tail, spec.needs_entropy)


# ---------------------------------------------------------------------------------------------------
# the math


def chunk_math(src, bias, targets, valid, log_t, running, coef_ce, coef_logw, coef_z, *, opts: ChunkOptions,
               mode: str):
    """Row statistics of one chunk and, unless ``mode == "stats"``, its logit gradient; pure (no mutation).
    Mode "lse" skips the statistics: see :func:`chunk_grad_from_stats`.

    Args:
        src: (C, V) logits of any float dtype (upcast to fp32, fp64 stays fp64), without the bias.
        bias: (V,) or None.   targets: (C,) int64, ignored rows replaced by 0.   valid: (C,) bool.
        log_t: (C,) log of the caller's token weights, or None.
        running: 0-d, the running maximum of the log-weights of earlier chunks (mode "weight").
        coef_ce, coef_logw, coef_z: (C,) per-row coefficients (mode "coefs"; the latter two may be None).
        mode: "stats" (no gradient), "weight" (the single pass: coef_ce_i = exp(lw_i - R), R the running
            maximum including this chunk), "coefs" (the recompute backward's given coefficients).
        In mode "lse", ``log_t`` and ``running`` are the (C,) row maxima and log-denominators saved by the
        forward pass (see :func:`chunk_grad_from_stats`).
    Returns:
        (grad or None, stats dict of (C,) tensors: ce, entropy, log_weight, log_weight_all, lse, row_max,
        log_d, correct; the new running maximum or None). The formulas are those of ``chunked.chunk_row_stats`` and
        ``chunked.chunk_logit_grad``, whose docstrings derive them.
    """
    z, tanh = _capped(src, bias, opts)
    if mode == "lse":
        return chunk_grad_from_stats(z, tanh, targets, log_t, running, coef_ce, coef_z, opts=opts), {}, None
    dtype = z.dtype
    vocab = z.shape[1]
    if opts.exact_tail:
        rowmax, top = z.max(dim=1, keepdim=True)
    else:
        rowmax = z.amax(dim=1, keepdim=True)
    shifted = z - rowmax  # a -inf logit stays -inf; a +inf or NaN maximum makes the row NaN
    e = torch.exp(shifted)
    if opts.exact_tail:
        cols = _columns(vocab, z.device)
        tail = torch.where(cols == top.to(cols.dtype), torch.zeros_like(e), e).sum(dim=1) + (rowmax - rowmax).view(-1)
        d, log_d = tail + 1.0, torch.log1p(tail)
    else:
        d = e.sum(dim=1)
        log_d = d.log()
    picked = shifted.gather(1, targets[:, None]).squeeze(1)
    nll = torch.where(valid, log_d - picked, torch.zeros_like(log_d))
    ce = nll
    eps = opts.label_smoothing
    if eps:
        uniform = log_d - shifted.sum(dim=1) / vocab
        ce = torch.where(valid, (1.0 - eps) * nll + eps * uniform, torch.zeros_like(nll))
    entropy = torch.zeros_like(d)
    clamped = None
    if opts.needs_entropy:
        if opts.detach_weight or opts.weighting != "mile":
            # 0 * -inf (a -inf logit, p = 0) counts as 0; a NaN row has a NaN d and stays NaN through it
            product = torch.where(e > 0, e * shifted, torch.zeros_like(e))
        else:
            clamped = shifted.clamp_min(_FLOOR)  # finite stand-in for -inf; read again by the gradient
            product = e * clamped
        entropy = log_d - product.sum(dim=1) / d
        if opts.paper:  # H(clamp(p, 1e-8, 1)) - H(p), see chunked._clamp_correction
            log_p = shifted - log_d[:, None]
            small = log_p < _LOG_CLAMP
            clamped_term = small.sum(dim=1).to(dtype) * (-1e-8 * _LOG_CLAMP)
            exact = torch.where(small & (e > 0), e * log_p, torch.zeros_like(e)).sum(dim=1) / d
            entropy = entropy + (clamped_term + exact)
    log_weight_all = log_token_weight(opts.weighting, entropy, nll, opts.gamma, opts.sigma)
    if log_t is not None:
        log_weight_all = log_weight_all + log_t
    log_weight = torch.where(valid, log_weight_all, torch.full_like(log_weight_all, -math.inf))
    lse = rowmax.view(-1) + log_d
    stats = dict(ce=ce, entropy=entropy, log_weight=log_weight, log_weight_all=log_weight_all, lse=lse,
                 row_max=rowmax.view(-1), log_d=log_d, correct=valid & (picked == 0))
    if mode == "stats":
        return None, stats, None
    grown = None
    if mode == "weight":
        grown = torch.maximum(running, log_weight.max())  # NaN propagates
        base = torch.where(grown == -math.inf, torch.zeros_like(grown), grown)
        coef_ce, coef_logw, coef_z = torch.exp(log_weight - base), None, None
    a_p = a_y = coef_ce
    if eps:
        a_y = coef_ce * (1.0 - eps)
    if coef_logw is not None and opts.weighting == "focal":
        b = coef_logw * log_weight_derivative("focal", entropy, nll, opts.gamma, opts.sigma) * torch.exp(-nll)
        a_p, a_y = a_p - b, a_y - b
    if coef_z is not None:
        a_p = a_p + 2.0 * coef_z * lse
    # the softmax is exp'd afresh from the logits and the row statistics, not read back from ``e``: then no
    # (C, V) intermediate outlives the reductions, and the gradient overwrites the only (C, V) buffer
    p = torch.exp(shifted - log_d[:, None])
    if coef_logw is not None and opts.weighting == "mile":
        c = coef_logw * log_weight_derivative("mile", entropy, nll, opts.gamma, opts.sigma)
        if clamped is None:
            clamped = shifted.clamp_min(_FLOOR)
        softmax_term = p * (a_p[:, None] - c[:, None] * (clamped - (log_d - entropy)[:, None]))
    else:
        softmax_term = p * a_p[:, None]
    return _logit_gradient(softmax_term, targets, a_y, coef_ce, tanh, eps), stats, grown


def _logit_gradient(softmax_term, targets, a_y, coef_ce, tanh, eps: float):
    """softmax_term - a_y onehot(y) - coef_ce eps / V, times 1 - tanh^2 under a softcap: what every logit gradient
    of the engine adds to its (C, V) softmax term (``chunked.chunk_logit_grad`` derives it)."""
    vocab = softmax_term.shape[1]
    cols = _columns(vocab, softmax_term.device)
    grad = softmax_term - torch.where(cols == targets.to(cols.dtype)[:, None], a_y[:, None],
                                      torch.zeros_like(softmax_term))
    if eps:
        grad = grad - (coef_ce * (eps / vocab))[:, None]
    if tanh is not None:
        grad = grad - grad * (tanh * tanh)
    return grad


def _columns(vocab: int, device) -> torch.Tensor:
    """(1, V) column indices, int32 (half the width of int64 in the vectorised compare against the targets)."""
    return torch.arange(vocab, device=device, dtype=torch.int32)[None, :]


def _capped(src, bias, opts: ChunkOptions):
    """(z, tanh): the chunk's logits in the compute dtype, plus the bias, capped to c tanh(z / c) under a
    softcap c (tanh kept for the chain rule; None without a softcap)."""
    z = src.to(torch.promote_types(src.dtype, torch.float32))
    if bias is not None:
        z = z + bias.to(z.dtype)
    if opts.softcap is None:
        return z, None
    tanh = torch.tanh(z / opts.softcap)
    return tanh * opts.softcap, tanh


def chunk_grad_from_stats(z, tanh, targets, row_max, log_d, coef_ce, coef_z, *, opts: ChunkOptions):
    """The logit gradient of sum_i [coef_ce_i CE_i + coef_z_i lse_i^2] from the forward pass's row statistics:
    the backward of a detached weight, with no reduction over the vocabulary (one read of the logits, one write).

    Args:
        z: (C, V) the capped logits in the compute dtype, tanh: (C, V) or None (from :func:`_capped`).
        targets: (C,) int64 (ignored rows replaced by 0; their coefficients are 0).
        row_max, log_d: (C,) m_i = max_v z_iv and log d_i = log sum_v exp(z_iv - m_i), as the forward computed
            them, so that p = exp((z - m) - log d) is rounded exactly as the forward's softmax was.
        coef_ce: (C,).   coef_z: (C,) or None.
    Returns (C, V): a_p p - (1 - eps) coef_ce onehot(y) - coef_ce eps / V, a_p = coef_ce + 2 coef_z lse, times
    1 - tanh^2 under a softcap (``chunked.chunk_logit_grad`` derives it).
    """
    eps = opts.label_smoothing
    a_p = coef_ce if coef_z is None else coef_ce + 2.0 * coef_z * (row_max + log_d)
    a_y = coef_ce * (1.0 - eps) if eps else coef_ce
    p = torch.exp((z - row_max[:, None]) - log_d[:, None])
    return _logit_gradient(p * a_p[:, None], targets, a_y, coef_ce, tanh, eps)


def _write_back(src, out, bias, targets, valid, log_t, running, coef_ce, coef_logw, coef_z, *, opts, mode):
    """The compiled entry point: the gradient goes into ``out`` (which may be ``src`` itself)."""
    grad, stats, grown = chunk_math(src, bias, targets, valid, log_t, running, coef_ce, coef_logw, coef_z,
                                    opts=opts, mode=mode)
    if out is not None and grad is not None:
        out.copy_(grad)
    return stats, grown


def _in_place(src, bias, targets, valid, log_t, running, coef_ce, coef_logw, coef_z, *, opts, mode):
    """As :func:`_write_back` with ``out`` = ``src`` (a separate function: dynamo sees one input, mutated)."""
    grad, stats, grown = chunk_math(src, bias, targets, valid, log_t, running, coef_ce, coef_logw, coef_z,
                                    opts=opts, mode=mode)
    if grad is not None:
        src.copy_(grad)
    return stats, grown


# ---------------------------------------------------------------------------------------------------
# the switch, the cache and the fallback

_CACHE: dict = {}
_FAILED: list[str] = []  # the reason compilation was given up in this process (at most one entry)


def compile_setting(value) -> str | bool:
    """The ``compile`` argument checked: True, False or "auto" (named ParameterError otherwise)."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ParameterError(f"compile must be True, False or 'auto', got {type(value).__name__} {value!r}")


def _environment() -> str:
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "false", "no", "off"):
        return "0"
    if raw in ("1", "true", "yes", "on"):
        return "1"
    raise ParameterError(f"environment variable {ENV} must be 0, 1 or auto, got {os.environ[ENV]!r}")


def auto_compile(rows: int, vocab: int, device: torch.device) -> bool:
    """``compile="auto"``: compiled where it was measured faster than eager (docs/benchmarks.md, loss engine):
    chunks of at least ``AUTO_MIN_ELEMENTS`` (2^20) logits on CPU, where the same-run ratio compiled / eager was
    0.30x from logits (N = 4096, V = 32000) and 0.90x fused (D = 512), with a third less memory fused. Below
    2^20 logits per chunk the measurements were mixed (0.6x to 2.2x on a loaded machine) and a compilation
    (seconds) is not paid back by a short run or a test. CUDA is not in ``AUTO_DEVICES`` until
    ``benchmarks/gpu_check.py`` has measured it (its rows "mile" and "mile_eager"); ``compile=True`` works there."""
    return device.type in AUTO_DEVICES and rows * vocab >= AUTO_MIN_ELEMENTS


def wants_compile(setting, rows: int, vocab: int, device: torch.device) -> bool:
    """Whether the chunk loop should try the compiled function: the argument, then ``MILELOSS_COMPILE``."""
    if _FAILED or not _dynamo_supported():
        return False
    if setting is True:
        return True
    if setting is False:
        return False
    env = _environment()
    if env != "auto":
        return env == "1"
    return auto_compile(rows, vocab, device)


@functools.lru_cache(maxsize=1)
def _dynamo_supported() -> bool:
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # noqa: BLE001 - an import or platform error means: no compile
        return False


def _fresh_copy(fn, **keywords):
    """``fn`` with its own code object and ``keywords`` as its keyword-only defaults: dynamo keeps its compiled
    entries (and counts its recompile limit) per code object, so every cache key gets its own."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = dict(keywords)
    return copy


def compiled(variant: str, opts: ChunkOptions, mode: str, signature: tuple = ()):
    """The compiled function for (variant "in_place" | "write_back", options, mode, ``signature``), built once.
    ``signature`` (V, dtype, device type from the chunk loop) gives every vocabulary size and dtype its own code
    object too, so that dynamo's limit of 8 entries per code object is not reached by a process that uses many."""
    key = (variant, opts, mode, signature)
    fn = _CACHE.get(key)
    if fn is None:
        base = _in_place if variant == "in_place" else _write_back
        fn = torch.compile(_fresh_copy(base, opts=opts, mode=mode), fullgraph=True)
        _CACHE[key] = fn
    return fn


def give_up(error: BaseException) -> None:
    """Record a compilation failure: one warning, then the eager path for the rest of the process."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    _FAILED.append(f"{type(error).__name__}: {first}")
    warnings.warn(f"mileloss: torch.compile of the per-chunk loss math failed ({_FAILED[0]}); using the eager "
                  f"path from now on (set {ENV}=0 or compile=False to skip the attempt)", RuntimeWarning,
                  stacklevel=3)


def mark_ragged(*tensors) -> None:
    """A chunk shorter than the full chunk: compile its row dimension as dynamic (once for every length)."""
    for t in tensors:
        if t is not None and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
