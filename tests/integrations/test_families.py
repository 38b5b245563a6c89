"""apply_mileloss on a tiny random model of every supported family: the fused loss and gradients equal the float64
reference on the unpatched model's logits (plus the router auxiliary loss for MoE), HF's own CE, and no
(tokens, vocab) tensor is ever built in training; refused families name what is missing."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from mileloss.errors import UnsupportedModelError
from mileloss.integrations import FAMILIES, apply_mileloss, patch_causal_lm, unpatch_causal_lm
from mileloss.integrations.hf import shift_labels
from tests.conftest import assert_close
from tests.reference import token_weighted_loss_reference

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.3, num_experts_per_tok=2)

# family -> (config class, model class, config keyword arguments)
CONFIGS = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "OLMo 2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, **MOE)),
    "Qwen2-MoE": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_key_value_heads=2, num_experts=4,
                                                                moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=16, **MOE)),
    # softcap 2 and init 0.5: logits of a few units, so the cap changes them a lot
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=8,
                                                          final_logit_softcapping=2.0, initializer_range=0.5)),
    "Gemma 3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=8,
                                                              final_logit_softcapping=2.0, initializer_range=0.5)),
}
FAMILY_NAMES = list(CONFIGS)


def build(family: str, **overrides) -> torch.nn.Module:
    config_name, model_name, extra = CONFIGS[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).train()


def batch():
    """Three rows: a masked prompt, right padding (attention_mask 0, labels -100), a fully trained row."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 13), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, -4:] = -100
    return input_ids, attention_mask, labels


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_loss(model, input_ids, attention_mask, labels, kind, gamma, sigma):
    """The unpatched model: float64 reference of the weighted loss on its logits (+ coef * its aux loss)."""
    outputs = model(input_ids, attention_mask=attention_mask)
    targets = shift_labels(labels)
    loss = token_weighted_loss_reference(outputs.logits.reshape(-1, VOCAB), targets.reshape(-1), weighting=kind,
                                         gamma=gamma, sigma=sigma)
    if getattr(outputs, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * outputs.aux_loss.double()
    return loss


def test_every_verified_family_has_a_test():
    assert sorted(label for label, _ in FAMILIES.values()) == sorted(FAMILY_NAMES)


@pytest.mark.parametrize("kind", ["mile", "focal"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patched_loss_and_grads_equal_float64_reference_on_unpatched_logits(family, kind):
    model = build(family)
    input_ids, attention_mask, labels = batch()
    expected = reference_loss(model, input_ids, attention_mask, labels, kind, gamma=1.3, sigma=0.5)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    apply_mileloss(model, loss=kind, gamma=1.3, sigma=0.5)
    outputs = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert outputs.logits is None
    outputs.loss.backward()
    assert_close(outputs.loss, expected, torch.float32, what=f"{family} {kind} loss")
    actual_grads = grads(model)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in actual_grads.items():
        assert_close(grad, expected_grads[name], torch.float32, what=f"{family} {kind} grad {name}", atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patched_ce_equals_hf_own_loss_and_grads_with_num_items_in_batch(family):
    """HF's convention: with num_items_in_batch = N the CE term is the CE sum / N, the mean times count / N (MoE:
    plus coef * aux, unscaled). The unpatched forward of older transformers does not take num_items_in_batch, so
    the expected value scales HF's own mean here."""
    model = build(family)
    input_ids, attention_mask, labels = batch()
    count = int((shift_labels(labels) != -100).sum())
    for factor, extra in ((1, {}), (3, {"num_items_in_batch": torch.tensor(3 * count)})):
        unpatch_causal_lm(model).zero_grad(set_to_none=True)
        outputs = model(input_ids, attention_mask=attention_mask, labels=labels)
        aux = 0 if getattr(outputs, "aux_loss", None) is None else model.config.router_aux_loss_coef * outputs.aux_loss
        expected = (outputs.loss - aux) / factor + aux
        expected.backward()
        expected_grads = grads(model)
        patch_causal_lm(model, loss="ce").zero_grad(set_to_none=True)  # the old name is an alias
        loss = model(input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
        loss.backward()
        assert_close(loss, expected, torch.float32, what=f"{family} ce loss, N = {factor} x count")
        for name, grad in grads(model).items():
            assert_close(grad, expected_grads[name], torch.float32, what=f"{family} ce grad {name}", atol=1e-5)


def test_num_items_in_batch_scales_mile_by_local_over_global_count_and_shift_labels_is_used_as_given():
    model = apply_mileloss(build("Llama"), loss="mile")
    input_ids, attention_mask, labels = batch()
    targets = shift_labels(labels)
    count = int((targets != -100).sum())
    mean = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    scaled = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=4 * count).loss
    assert_close(scaled, mean / 4, torch.float32)
    # shift_labels (HF's keyword for already shifted targets): used instead of shifting labels
    given = model(input_ids, attention_mask=attention_mask, labels=torch.zeros_like(labels), shift_labels=targets).loss
    assert_close(given, mean, torch.float32)


class _LargestLogits(TorchDispatchMode):
    """Records the largest tensor with a last dimension of VOCAB (logits or their gradient) that any operator
    returns, forward and backward. VOCAB is prime, so no other tensor of these tiny models ends in it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[-1] == VOCAB:
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_step_never_builds_a_tokens_by_vocab_tensor(family):
    model = build(family)
    input_ids, attention_mask, labels = batch()
    full = input_ids.numel() * VOCAB
    with _LargestLogits() as unpatched:
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert unpatched.largest >= full  # the measurement sees HF's own (B, T, V) logits
    apply_mileloss(model, loss="mile", chunk_size=8)
    with _LargestLogits() as patched:
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    # what is left: a (chunk, V) block or the head weight's transpose (D, V), D = 32 < B * T = 39 tokens
    assert 0 < patched.largest <= max(8, SMALL["hidden_size"]) * VOCAB < full, (patched.largest, full)


@pytest.mark.parametrize("family", ["Gemma 2", "Gemma 3"])
def test_eval_mode_logits_are_softcapped_as_the_family_returns_them(family):
    model = build(family).eval()
    input_ids, attention_mask, labels = batch()
    original = model(input_ids, attention_mask=attention_mask, labels=labels)
    patched = apply_mileloss(model, loss="ce")(input_ids, attention_mask=attention_mask, labels=labels)
    assert float(original.logits.abs().max()) < 2.0
    assert_close(patched.logits, original.logits, torch.float32)
    assert_close(patched.loss, original.loss, torch.float32)


def test_eval_mode_returns_logits_and_moe_outputs_keep_aux_loss_and_router_logits():
    model = build("Mixtral")
    input_ids, attention_mask, labels = batch()
    original = model.eval()(input_ids, attention_mask=attention_mask, labels=labels)
    apply_mileloss(model, loss="ce")
    patched = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert_close(patched.logits, original.logits, torch.float32)
    assert_close(patched.aux_loss, original.aux_loss, torch.float32)
    assert_close(patched.loss, original.loss, torch.float32)
    assert len(patched.router_logits) == model.config.num_hidden_layers
    # output_router_logits=False per call: no aux loss, as in HF
    plain = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=False)
    assert plain.aux_loss is None
    assert model(input_ids, labels=labels, return_dict=False)[0].ndim == 0


def test_gemma_softcap_reaches_the_engine_and_an_engine_without_softcap_is_refused_naming_it(monkeypatch):
    import mileloss.integrations.hf as hf

    model = build("Gemma 2")
    input_ids, attention_mask, labels = batch()
    capped = apply_mileloss(model, loss="ce")(input_ids, attention_mask=attention_mask, labels=labels).loss
    model.config.final_logit_softcapping = None  # the same weights without the cap: a different loss
    uncapped = apply_mileloss(model, loss="ce")(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert abs(float(capped) - float(uncapped)) > 1e-3
    monkeypatch.setattr(hf, "REFUSED", {name: "a final-logit softcap: no `softcap` option" for name in hf.SOFTCAPPED})
    with pytest.raises(UnsupportedModelError, match="softcap"):
        apply_mileloss(build("Gemma 3"))


def test_unverified_family_and_odd_structures_are_refused_naming_what_is_missing():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    with pytest.raises(UnsupportedModelError, match="a verified family: its class \\(GPT2LMHeadModel\\)"):
        apply_mileloss(transformers.GPT2LMHeadModel(config))
    model = build("Llama")
    model.config.logit_scale = 0.5  # a logit transform after the head
    with pytest.raises(UnsupportedModelError, match="config.logit_scale"):
        apply_mileloss(model)
    model = build("Llama")
    model.lm_head = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="nn.Linear output embedding"):
        apply_mileloss(model)


def test_subclass_of_a_verified_family_is_accepted():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(build("Llama").config).train()
    input_ids, attention_mask, labels = batch()
    apply_mileloss(model, loss="ce")
    assert model(input_ids, attention_mask=attention_mask, labels=labels).loss.ndim == 0


def test_under_bf16_autocast_the_head_runs_in_bf16_as_hf_would_and_fp32_weights_get_fp32_grads(engine_dtypes):
    seen = engine_dtypes
    model = build("Llama")
    input_ids, attention_mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        apply_mileloss(model, loss="ce")
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    # an fp32 value, as HF's (which upcasts the bf16 logits), not a bf16-rounded one (bf16 steps are 1/32 near 4)
    assert loss.dtype == expected.dtype == torch.float32
    assert_close(loss, expected, torch.float32, what="bf16 autocast ce", rtol=1e-3)
    assert model.lm_head.weight.grad.dtype == torch.float32
    seen.clear()
    model(input_ids, attention_mask=attention_mask, labels=labels)  # outside autocast: fp32 again
    assert seen == [(torch.float32, torch.float32)]


def test_a_sharded_head_weight_is_refused_at_forward_naming_the_sharding():
    input_ids, attention_mask, labels = batch()
    model = apply_mileloss(build("Llama"))
    weight = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(0))  # what a ZeRO-3 partition looks like outside a gather
    model.lm_head.weight.ds_id = 0
    with pytest.raises(UnsupportedModelError, match="ZeRO-3"):
        model(input_ids, attention_mask=attention_mask, labels=labels)
    model.lm_head.weight = torch.nn.Parameter(weight.detach()[:, :16].clone())  # a column shard
    with pytest.raises(UnsupportedModelError, match=r"of shape \(61, 16\), not \(vocab, 32\)"):
        model(input_ids, attention_mask=attention_mask, labels=labels)
