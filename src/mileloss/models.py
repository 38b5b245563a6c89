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

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mileloss.errors import UnknownPresetError

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "ModelPreset", "build_model", "count_parameters", "model_config", "UnknownPresetError"]


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
