"""Will it fit? The memory, token and FLOP budget of a training config, from the model's shapes alone.

``mileloss train CONFIG --dry-run`` prints :func:`plan_training`'s result; everything here is pure arithmetic on
the preset's shapes (no data, no weights), so the numbers can be checked by hand (``tests/train/test_plan.py``
does, for the paper's three presets).

**Parameters** (LLaMA, untied embeddings, no biases; vocab V, hidden h, L layers, intermediate I)::

    N = 2 V h  +  L (4 h^2 + 3 h I + 2 h)  +  h
        embedding + LM head, attention (q, k, v, o), SwiGLU MLP (gate, up, down), two RMSNorms per layer, final norm

e.g. 6.7B with V = 32000: N = 6,738,415,616.

**Model state per rank** (the trainer keeps fp32 parameters; bf16 is autocast, or FSDP2's bf16 ``param_dtype``)::

    ddp:   parameters 4 N, gradients 4 N, AdamW state 8 N (exp_avg, exp_avg_sq),
           buffers: DDP's gradient buckets 4 N (gradient_as_bucket_view is off) + under bf16 the autocast copies
           of the matrices 2 (N - V h - norms) (kept for backward)
    fsdp:  parameters 4 N / W, gradients 4 N / W, AdamW state 8 N / W (W = world size),
           buffers: the gathered units in the compute dtype (p = 2 bytes under bf16, else 4): the root unit
           (embedding, final norm, LM head: gathered for the whole forward, since the loss runs inside the root's
           forward, and again for the whole backward) and two decoder layers (the one running and the one
           prefetched) with ``reshard_after_forward``, else every unit (p N); plus the fp32 unsharded gradients
           of the root and one layer before their reduce-scatter.

**Activations per rank** (one micro-batch of b sequences of s tokens; e = 2 bytes under bf16, else 4; r the
bytes of the residual stream: 4 while the parameters are fp32 under autocast, 2 under FSDP's bf16 ``param_dtype``).
Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer Models* (arXiv 2205.05198,
section 4.1) count the tensors each transformer layer keeps for backward: ``s b h (34 + 5 a s / h)`` bytes for a
GPT layer with 16-bit activations (11 s b h + 5 a s^2 b for attention, 19 s b h for the GeLU MLP, 4 s b h for the
two LayerNorms). The same count for our layer: attention through SDPA/flash (the a s^2 score, softmax and
dropout terms vanish: only the logsumexp, 4 a s b bytes, is kept), no dropout (no masks), a SwiGLU MLP and
RMSNorms computed in the residual dtype::

    per layer = s b [ e (6 h + 4 I) + 4 h r ] + 4 a s b
                e: norm outputs 2h, q k v 3h, attention output h; gate, SiLU(gate), up, product 4I
                r: each RMSNorm's input and normalised value, 2 norms x 2h

With activation checkpointing (``model.gradient_checkpointing``) a layer keeps only its input, ``s b h r``, and
one layer's full activations exist at a time while it is recomputed in backward::

    layers = L s b h r + per layer          (instead of L x per layer)

Our fused loss never materialises the (s b, V) logits; it keeps the hidden states' gradient (4 s b h), the LM
head's fp32 gradient accumulated in forward (4 V h), the low-precision copy of the hidden states (e s b h) and two
fp32 chunk buffers of (C, V) (C the loss's CUDA chunk rows, ``losses.chunked.default_chunk_size``); plus the
final norm (4 h r s b) and the embedding output (r s b h).

**Fits** when the sum is at most 90 % of the GPU's memory: the other 10 % stands for the CUDA context, the
caching allocator's fragmentation and NCCL's buffers, none of which is counted above. It is an estimate of
the steady state, not a guarantee: ``torch.compile`` or another attention kernel changes the activations.

**Tokens and FLOPs**: tokens per optimizer step = b s grad_accum W; total = steps x that; training FLOPs
= 6 N tokens (forward 2 N, backward 4 N per token; attention's s^2 term not included), the usual estimate
(Kaplan et al. 2020).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mileloss.errors import PlanError
from mileloss.models import get_preset

__all__ = ["ModelShape", "MemoryEstimate", "TrainingPlan", "activation_bytes", "memory_per_rank",
           "parse_memory", "plan_training", "FIT_FRACTION"]

FIT_FRACTION = 0.9
"""The share of the GPU's memory the estimate may use (the rest: CUDA context, fragmentation, NCCL)."""

_FP32 = 4


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes that fix a LLaMA model's size."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int

    @classmethod
    def of_preset(cls, preset: str, vocab: int, num_hidden_layers: int | None = None) -> ModelShape:
        shape = get_preset(preset)
        return cls(vocab, shape.hidden_size, num_hidden_layers or shape.num_hidden_layers,
                   shape.num_attention_heads, shape.intermediate_size)

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: q, k, v, o (4 h^2), gate, up, down (3 h I), two RMSNorm weights (2 h)."""
        h = self.hidden
        return 4 * h * h + 3 * h * self.intermediate + 2 * h

    @property
    def root_parameters(self) -> int:
        """Embedding, LM head (untied) and the final norm: FSDP's root unit."""
        return 2 * self.vocab * self.hidden + self.hidden

    @property
    def norm_parameters(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return self.root_parameters + self.layers * self.layer_parameters


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held by one rank (see the module docstring for every term)."""

    parallel: str
    world_size: int
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int

    @property
    def model_state(self) -> int:
        """Parameters + gradients + optimizer state: what FSDP divides by the world size."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + self.buffers + self.activations

    def to_dict(self) -> dict[str, int | str]:
        return {**dataclasses.asdict(self), "model_state": self.model_state, "total": self.total}


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, *, compute_bytes: int, residual_bytes: int,
                     checkpointing: bool, chunk_rows: int | None = None) -> int:
    """Activation bytes of one micro-batch (module docstring: Korthikanti et al. 2022, adapted)."""
    h, inter, tokens = shape.hidden, shape.intermediate, micro_batch * seq_len
    e, r = compute_bytes, residual_bytes
    per_layer = tokens * (e * (6 * h + 4 * inter) + 4 * h * r) + _FP32 * shape.heads * tokens
    if checkpointing:
        layers = shape.layers * tokens * h * r + per_layer
    else:
        layers = shape.layers * per_layer
    if chunk_rows is None:
        chunk_rows = cuda_chunk_rows(tokens, shape.vocab, h)
    chunks = 2 * _FP32 * min(chunk_rows, tokens) * shape.vocab
    loss = _FP32 * tokens * h + _FP32 * shape.vocab * h + e * tokens * h + chunks
    outside = 4 * h * r * tokens + r * tokens * h
    return layers + loss + outside


def cuda_chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """The fused loss's rows per chunk on CUDA (the same rule as ``losses.chunked.default_chunk_size``)."""
    import torch

    from mileloss.losses.chunked import default_chunk_size

    return default_chunk_size(rows, vocab, hidden, torch.device("cuda"))  # a device name: no CUDA needed


def memory_per_rank(shape: ModelShape, parallel: str, world_size: int, *, micro_batch: int, seq_len: int,
                    bf16: bool, checkpointing: bool, reshard_after_forward: bool = True) -> MemoryEstimate:
    """Per-rank bytes of parameters, gradients, AdamW state, buffers and activations under ``ddp`` or ``fsdp``."""
    if parallel not in ("ddp", "fsdp"):
        raise PlanError(f"parallel must be ddp or fsdp, got {parallel!r}")
    if world_size < 1:
        raise PlanError(f"the world size must be >= 1, got {world_size}")
    n = shape.parameters
    e = 2 if bf16 else 4
    if parallel == "ddp":
        shards = 1
        buckets = _FP32 * n if world_size > 1 else 0  # a single process has no DDP wrapper
        autocast_copies = 2 * (n - shape.vocab * shape.hidden - shape.norm_parameters) if bf16 else 0
        buffers, residual = buckets + autocast_copies, _FP32
    else:
        shards = world_size
        gathered = shape.root_parameters + min(2, shape.layers) * shape.layer_parameters
        if not reshard_after_forward:
            gathered = n
        unsharded_grads = _FP32 * (shape.root_parameters + shape.layer_parameters)
        buffers = e * gathered + unsharded_grads
        residual = e  # FSDP2's param_dtype: the whole forward runs in it
    per_rank = math.ceil(n / shards)
    activations = activation_bytes(shape, micro_batch, seq_len, compute_bytes=e, residual_bytes=residual,
                                   checkpointing=checkpointing)
    return MemoryEstimate(parallel, world_size, _FP32 * per_rank, _FP32 * per_rank, 2 * _FP32 * per_rank, buffers,
                          activations)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """``80GB`` (10^9 bytes), ``80GiB`` (2^30), ``81559MiB``, ``1.5TB`` or a plain byte count -> bytes.

    Raises:
        PlanError: not a positive number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """
    match = _MEMORY.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise PlanError(f"--gpu-memory: cannot read {text!r}; write a size such as 80GB, 80GiB or 81559MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise PlanError(f"--gpu-memory: must be a positive size, got {text!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """What a config asks of the hardware: :func:`plan_training`'s result."""

    preset: str
    shape: ModelShape
    parameters: int
    world_size: int
    dtype: str
    parallel: str
    micro_batch: int
    seq_len: int
    grad_accum_steps: int
    tokens_per_step: int
    max_steps: int
    total_tokens: int
    training_flops: int
    gradient_checkpointing: bool
    memory: dict[str, MemoryEstimate]
    gpu_memory: int | None

    @property
    def fits(self) -> dict[str, bool] | None:
        """Per parallel mode: the estimate within ``FIT_FRACTION`` of ``gpu_memory`` (``None`` without one)."""
        if self.gpu_memory is None:
            return None
        return {mode: estimate.total <= FIT_FRACTION * self.gpu_memory for mode, estimate in self.memory.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "shape": dataclasses.asdict(self.shape), "parameters": self.parameters,
            "world_size": self.world_size, "dtype": self.dtype, "parallel": self.parallel,
            "micro_batch": self.micro_batch, "seq_len": self.seq_len, "grad_accum_steps": self.grad_accum_steps,
            "tokens_per_step": self.tokens_per_step, "max_steps": self.max_steps, "total_tokens": self.total_tokens,
            "training_flops": self.training_flops, "gradient_checkpointing": self.gradient_checkpointing,
            "memory_per_rank": {mode: estimate.to_dict() for mode, estimate in self.memory.items()},
            "gpu_memory": self.gpu_memory, "fit_fraction": FIT_FRACTION, "fits": self.fits,
        }


def plan_training(config, world_size: int, vocab_size: int, gpu_memory: int | None = None) -> TrainingPlan:
    """The plan of ``config`` (a :class:`~mileloss.train.config.TrainConfig`) on ``world_size`` processes.

    The schedule is resolved as training resolves it (``preflight.resolve_schedule``: the preset's sequence
    length, ``grad_accum_steps`` derived from ``run.tokens_per_step``, ``max_steps`` from ``run.max_tokens``).
    ``run.dtype=auto`` plans for a GPU (bf16). Raises :class:`~mileloss.errors.BatchScheduleError` like training.
    """
    from mileloss.train.preflight import resolve_schedule

    if world_size < 1:
        raise PlanError(f"--world-size must be >= 1, got {world_size}")
    if vocab_size < 1:
        raise PlanError(f"model.vocab_size must be >= 1, got {vocab_size}")
    resolved = resolve_schedule(config, world_size)
    run, model = resolved.run, resolved.model
    shape = ModelShape.of_preset(model.preset, vocab_size, model.num_hidden_layers)
    bf16 = run.dtype != "fp32"
    memory = {mode: memory_per_rank(shape, mode, world_size, micro_batch=run.batch_size, seq_len=run.seq_len,
                                    bf16=bf16, checkpointing=model.gradient_checkpointing,
                                    reshard_after_forward=run.reshard_after_forward)
              for mode in ("ddp", "fsdp")}
    tokens_per_step = run.batch_size * run.seq_len * run.grad_accum_steps * world_size
    total = tokens_per_step * run.max_steps
    return TrainingPlan(model.preset, shape, shape.parameters, world_size, "bf16" if bf16 else "fp32", run.parallel,
                        run.batch_size, run.seq_len, run.grad_accum_steps, tokens_per_step, run.max_steps, total,
                        6 * shape.parameters * total, model.gradient_checkpointing, memory, gpu_memory)
