"""Model presets: shapes and parameter counts (large presets built on the meta device, never allocated)."""

from __future__ import annotations

import pytest
import torch

from mileloss.models import PRESETS, UnknownPresetError, build_model, count_parameters, model_config


def _expected_count(vocab: int, hidden: int, layers: int, intermediate: int) -> int:
    # embedding + untied LM head, then per layer: q,k,v,o (4 D^2), SwiGLU gate/up/down (3 D I), 2 RMSNorms
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


@pytest.mark.parametrize(
    ("preset", "vocab", "low", "high"),
    [("tiny", 4096, 1e6, 3e6), ("small", 8192, 20e6, 40e6), ("468M", 32000, 460e6, 475e6),
     ("1.2B", 32000, 1.15e9, 1.25e9), ("6.7B", 32000, 6.6e9, 6.8e9)],
)
def test_preset_parameter_counts_match_the_llama_formula(preset, vocab, low, high):
    shape = PRESETS[preset]
    with torch.device("meta"):
        model = build_model(preset, vocab)
    count = count_parameters(model)
    assert count == _expected_count(vocab, shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size)
    assert low <= count <= high


def test_paper_presets_use_the_paper_shapes_and_init_range():
    assert (PRESETS["468M"].hidden_size, PRESETS["468M"].num_hidden_layers, PRESETS["468M"].num_attention_heads) == (
        1024, 24, 16)
    assert PRESETS["6.7B"].intermediate_size == 11008 and PRESETS["6.7B"].seq_len == 2048
    for name in ("468M", "1.2B", "6.7B"):
        config = model_config(name, 32000)
        assert config.initializer_range == 1e-2
        assert config.tie_word_embeddings is False and config.rms_norm_eps == 1e-5 and config.hidden_act == "silu"


def test_tiny_model_has_untied_embeddings_and_runs_forward():
    torch.manual_seed(0)
    model = build_model("tiny", 512)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.randint(0, 512, (2, 16))).logits
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()


def test_unknown_preset_error_lists_the_valid_names():
    with pytest.raises(UnknownPresetError, match="tiny"):
        build_model("huge", 100)


def test_the_paper_presets_have_their_exact_sizes_with_a_32000_vocabulary():
    # issue 10: the 6.7B preset has exactly 6,738,415,616 parameters (untied embeddings, V = 32000)
    counts = {}
    for name in ("468M", "1.2B", "6.7B"):
        with torch.device("meta"):
            counts[name] = count_parameters(build_model(name, 32000))
    assert counts == {"468M": 468_239_360, "1.2B": 1_204_881_408, "6.7B": 6_738_415_616}
