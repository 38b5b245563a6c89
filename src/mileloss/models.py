"""LLaMA-style causal language models used for MiLe pretraining.

Every preset is a ``transformers.LlamaConfig`` with untied embeddings, RMSNorm (eps 1e-5), SiLU and random
initialisation. The paper's three shapes (468M, 1.2B, 6.7B; Su et al. 2024, released configs) keep the paper's
initializer range 1e-2; the two small presets for CPU experiments use the transformers default 0.02.

>>> model = build_model("tiny", vocab_size=4096)
>>> count_parameters(model) > 1_000_000
True

Parameter count of a preset with vocab V, hidden D, L layers, intermediate I (no biases):
``2 V D`` (embedding + LM head) ``+ L (4 D^2 + 3 D I + 2 D)`` (attention, SwiGLU MLP, two RMSNorms) ``+ D``
(final norm).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mileloss.errors import UnknownPresetError

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "ModelPreset", "build_model", "count_parameters", "materialize_model", "model_config",
           "UnknownPresetError"]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """Shape of one LLaMA-style model (the fields map onto ``LlamaConfig``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    seq_len: int
    """Context length the preset is trained with (also ``max_position_embeddings``)."""
    initializer_range: float = 0.02


PRESETS: dict[str, ModelPreset] = {
    # 1.9M parameters with a 4k vocab, 2.9M with 8k: ~4.5k tokens/s on 2 CPU cores (vocab 8192, batch 16 x 128).
    "tiny": ModelPreset(128, 4, 4, 384, seq_len=128),
    # ~34M parameters with an 8k vocab: a few hours on a laptop CPU, minutes on a GPU.
    "small": ModelPreset(512, 8, 8, 1376, seq_len=512),
    # The paper's shapes (released configs 468M.json, 1B.json, 7B.json).
    "468M": ModelPreset(1024, 24, 16, 4096, seq_len=1024, initializer_range=1e-2),
    "1.2B": ModelPreset(2048, 16, 8, 8192, seq_len=1024, initializer_range=1e-2),
    "6.7B": ModelPreset(4096, 32, 32, 11008, seq_len=2048, initializer_range=1e-2),
}


def get_preset(name: str) -> ModelPreset:
    """Look up a preset by name, raising :class:`UnknownPresetError` that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def model_config(preset: str, vocab_size: int, **overrides) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset.

    Args:
        preset: a key of :data:`PRESETS`.
        vocab_size: number of token ids (from the data manifest).
        **overrides: any ``LlamaConfig`` field, e.g. ``num_hidden_layers=2`` or ``initializer_range=0.02``.
    """
    shape = get_preset(preset)
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.seq_len,
        initializer_range=shape.initializer_range,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(preset: str, vocab_size: int, **overrides) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of the given preset (on the current default device).

    Build under ``torch.device("meta")`` to inspect a large preset without allocating its weights.
    """
    config = model_config(preset, vocab_size, **overrides)
    model = LlamaForCausalLM(config)
    logger.info("built %s model: %s parameters", preset, f"{count_parameters(model):,}")
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (each shared tensor counted once; works on meta-device models)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen or (trainable_only and not parameter.requires_grad):
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def materialize_model(model: LlamaForCausalLM, seed: int, device: torch.device | str) -> LlamaForCausalLM:
    """Give a model built on the meta device (and possibly sharded since) the weights of ``build_model`` under
    ``torch.manual_seed(seed)``, one parameter at a time.

    The model is moved with ``to_empty(device=device)``, then every parameter receives the values the
    single-process ``build_model`` draws for it with the same seed (the global CPU generator is re-seeded with
    ``seed`` and left where ``build_model`` leaves it). A sharded parameter (an FSDP2 ``DTensor``) keeps only its
    own shard of the full tensor, so a rank holds at most one whole parameter at a time (the largest: the embedding
    or the LM head), never the whole model. The draws replay what ``LlamaForCausalLM(config)`` does: the
    constructors of the body's ``nn.Linear``/``nn.Embedding`` modules draw their default init, ``LlamaModel``'s
    ``post_init`` draws N(0, initializer_range) for each of them, then the LM head's constructor and the outer
    ``post_init`` draw for the head; RMSNorm weights are ones and the rotary buffers are recomputed.
    ``tests/train/test_fsdp.py`` checks the result against ``build_model`` exactly.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = torch.device(device)
    std = model.config.initializer_range
    model.to_empty(device=device)

    def assign(parameter: torch.nn.Parameter, full: torch.Tensor) -> None:
        full = full.to(device=device, dtype=parameter.dtype)
        if isinstance(parameter, DTensor):
            full = distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
            parameter.to_local().copy_(full)
        else:
            parameter.copy_(full)

    def constructor_draws(modules) -> None:
        for module in modules:
            if isinstance(module, torch.nn.Linear):
                if module.bias is not None:
                    raise NotImplementedError("materialize_model: nn.Linear with a bias is not replayed")
                torch.nn.init.kaiming_uniform_(torch.empty(module.weight.shape), a=math.sqrt(5))
            elif isinstance(module, torch.nn.Embedding):
                torch.empty(module.weight.shape).normal_()

    def init_draws(modules) -> None:
        for module in modules:
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                assign(module.weight, torch.empty(module.weight.shape).normal_(0.0, std))
            elif "RMSNorm" in type(module).__name__:
                assign(module.weight, torch.ones(module.weight.shape))
            elif "RotaryEmbedding" in type(module).__name__:
                with torch.device("cpu"):
                    fresh = type(module)(config=module.config)
                for name, buffer in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buffer)

    body, head = list(model.model.modules()), [model.lm_head]
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise RuntimeError("materialize_model: to_empty left meta tensors")
    torch.manual_seed(seed)
    with torch.no_grad():
        constructor_draws(body)
        init_draws(body)
        constructor_draws(head)
        init_draws(head)
    return model
