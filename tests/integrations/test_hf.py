"""The Hugging Face bridge: patched models and compute_loss_func give the reference loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mileloss.integrations.hf import make_compute_loss_func, patch_causal_lm, shift_labels, unpatch_causal_lm
from mileloss.models import build_model
from tests.reference import token_weighted_loss_reference

VOCAB = 97


def _mile_float64(logits: torch.Tensor, targets: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
    """MiLe written out by hand in float64: sum_i w_i CE_i / sum_i w_i, w_i = (sigma + H_i)^gamma detached."""
    logits, valid = logits.double(), targets != -100
    log_probs = torch.log_softmax(logits[valid], dim=-1)
    ce = -log_probs.gather(-1, targets[valid][:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).detach()
    weight = (sigma + entropy) ** gamma
    return (weight * ce).sum() / weight.sum()


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("tiny", VOCAB, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=4).double()
    input_ids = torch.randint(0, VOCAB, (3, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -2:] = -100
    return model, input_ids, labels


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["ce", "focal", "mile"])
def test_patched_model_loss_and_grads_match_reference_on_logits(model_and_batch, kind):
    model, input_ids, labels = model_and_batch
    model.train()
    logits = model(input_ids).logits  # unpatched forward: (B, T, V)
    targets = shift_labels(labels)
    expected = token_weighted_loss_reference(logits.reshape(-1, VOCAB), targets.reshape(-1), weighting=kind,
                                             gamma=0.7, sigma=0.5)
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    patch_causal_lm(model, loss=kind, gamma=0.7, sigma=0.5)
    outputs = model(input_ids, labels=labels)
    assert outputs.logits is None  # training mode: logits never built
    outputs.loss.backward()
    torch.testing.assert_close(outputs.loss, expected, rtol=1e-10, atol=1e-12)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-8, atol=1e-12, msg=name)


def test_patched_mile_equals_hand_written_float64_mile(model_and_batch):
    model, input_ids, labels = model_and_batch
    logits = model(input_ids).logits.detach()
    expected = _mile_float64(logits.reshape(-1, VOCAB), shift_labels(labels).reshape(-1), gamma=1.0, sigma=1.0)
    patch_causal_lm(model, loss="mile")
    torch.testing.assert_close(model(input_ids, labels=labels).loss.detach(), expected, rtol=1e-10, atol=1e-12)


def test_patched_model_in_eval_mode_returns_logits_and_unpatch_restores_hf_loss(model_and_batch):
    model, input_ids, labels = model_and_batch
    original = model(input_ids, labels=labels)
    patch_causal_lm(model, loss="ce").eval()
    patched = model(input_ids, labels=labels)
    torch.testing.assert_close(patched.logits, original.logits)
    # CE == HF's own loss (which upcasts to float32)
    torch.testing.assert_close(patched.loss.float(), original.loss, rtol=1e-6, atol=1e-7)
    assert model(input_ids).loss is None  # no labels: the original forward
    unpatch_causal_lm(model)
    assert "forward" not in vars(model)


def test_compute_loss_func_matches_hf_convention_with_num_items_in_batch(model_and_batch):
    model, input_ids, labels = model_and_batch
    outputs = model(input_ids)
    targets = shift_labels(labels)
    count = int((targets != -100).sum())
    ce = make_compute_loss_func("ce")(outputs, labels, num_items_in_batch=torch.tensor(2 * count))
    expected = F.cross_entropy(outputs.logits.reshape(-1, VOCAB).double(), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(ce.double(), expected / (2 * count))
    mile = make_compute_loss_func("mile", gamma=1.0, sigma=1.0)(outputs, labels)
    reference = _mile_float64(outputs.logits.reshape(-1, VOCAB), targets.reshape(-1), 1.0, 1.0)
    torch.testing.assert_close(mile.double(), reference, rtol=1e-6, atol=1e-8)


def test_patch_rejects_unknown_loss_and_models_without_lm_head(model_and_batch):
    model, _, _ = model_and_batch
    with pytest.raises(ValueError, match="loss must be one of"):
        patch_causal_lm(model, loss="entropy")
    with pytest.raises(ValueError, match="get_output_embeddings"):
        patch_causal_lm(torch.nn.Linear(2, 2))


def test_registered_transformers_loss_is_selected_by_loss_type_and_takes_hf_keywords(model_and_batch):
    from transformers.loss.loss_utils import LOSS_MAPPING

    from mileloss.integrations import register_transformers_loss, transformers_loss_function

    model, input_ids, labels = model_and_batch
    targets = shift_labels(labels)
    logits = model(input_ids).logits.detach()
    expected = token_weighted_loss_reference(logits.reshape(-1, VOCAB), targets.reshape(-1), weighting="mile",
                                             gamma=1.5, sigma=0.5)
    key = register_transformers_loss("mile", gamma=1.5, sigma=0.5)
    try:
        assert key == "ForCausalLM_mileloss_mile_g1.5_s0.5"
        model.loss_type = key  # what selects model.loss_function
        torch.testing.assert_close(model(input_ids, labels=labels).loss.double(), expected, rtol=1e-6, atol=1e-8)
    finally:
        del LOSS_MAPPING[key]
    function = transformers_loss_function("mile", gamma=1.5, sigma=0.5)
    count = int((targets != -100).sum())
    # HF's keywords: vocab_size, num_items_in_batch (loss * local count / N), shift_labels (flat or (B, T))
    scaled = function(logits, labels, vocab_size=VOCAB, num_items_in_batch=torch.tensor(2 * count))
    torch.testing.assert_close(scaled.double(), expected / 2, rtol=1e-6, atol=1e-8)
    given = function(logits, None, vocab_size=VOCAB, shift_labels=targets.reshape(-1))
    torch.testing.assert_close(given.double(), expected, rtol=1e-6, atol=1e-8)
