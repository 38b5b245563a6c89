"""apply_mileloss on a peft.PeftModel: LoRA in the body is fused (loss and adapter gradients equal the reference on
the unpatched PEFT model's logits; MiLeTrainer exact under accumulation); adapters on the head are refused."""

from __future__ import annotations

import pytest
import torch
import transformers

from mileloss.errors import UnsupportedModelError
from mileloss.integrations import MiLeTrainer, apply_mileloss, unpatch_causal_lm
from mileloss.integrations.hf import shift_labels
from tests.conftest import assert_close
from tests.reference import token_weighted_loss_reference

peft = pytest.importorskip("peft")

VOCAB = 53


def lora_model(target_modules=("q_proj", "v_proj")):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    # init_lora_weights=False: B is random too, so the adapters change the logits and get full gradients
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules),
                           init_lora_weights=False)
    return peft.get_peft_model(model, lora).train()


def batch():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :6] = -100
    return input_ids, labels


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("kind", ["mile", "ce"])
def test_lora_model_loss_and_adapter_grads_equal_reference_on_unpatched_logits(kind):
    model = lora_model()
    input_ids, labels = batch()
    logits = model(input_ids=input_ids).logits
    expected = token_weighted_loss_reference(logits.reshape(-1, VOCAB), shift_labels(labels).reshape(-1),
                                             weighting=kind, gamma=1.5, sigma=0.5)
    expected.backward()
    expected_grads = trainable_grads(model)
    assert expected_grads and all("lora_" in name for name in expected_grads)
    model.zero_grad(set_to_none=True)

    assert apply_mileloss(model, loss=kind, gamma=1.5, sigma=0.5) is model  # the wrapper comes back
    outputs = model(input_ids=input_ids, labels=labels)
    assert outputs.logits is None
    outputs.loss.backward()
    assert_close(outputs.loss, expected, torch.float32, what=f"lora {kind} loss")
    actual = trainable_grads(model)
    assert actual.keys() == expected_grads.keys()
    for name, grad in actual.items():
        assert_close(grad, expected_grads[name], torch.float32, what=f"lora {kind} grad {name}", atol=1e-5)
    unpatch_causal_lm(model)
    assert "forward" not in vars(model.get_base_model())


def test_adapters_on_the_head_are_refused_naming_it():
    with pytest.raises(UnsupportedModelError, match="PEFT adapter or modules_to_save on the head"):
        apply_mileloss(lora_model(target_modules=("q_proj", "lm_head")))


@pytest.mark.skipif(not hasattr(transformers.Trainer, "_get_grad_norm"), reason="MiLeTrainer needs transformers 5")
def test_mile_trainer_on_a_lora_model_with_accumulation_equals_one_step_on_the_whole_batch(tmp_path):
    generator = torch.Generator().manual_seed(3)
    rows = []
    for index in range(4):
        input_ids = torch.randint(0, VOCAB, (12,), generator=generator)
        labels = input_ids.clone()
        labels[: index * 3] = -100
        rows.append({"input_ids": input_ids, "labels": labels})
    results = {}
    for accumulation in (1, 2):
        model = apply_mileloss(lora_model(), loss="mile", gamma=1.5, sigma=0.5)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(accumulation)), use_cpu=True, per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to="none", disable_tqdm=True,
        )
        MiLeTrainer(model=model, args=args, train_dataset=rows).train()
        results[accumulation] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    initial = {n: p.detach() for n, p in lora_model().named_parameters() if p.requires_grad}
    assert any(not torch.equal(results[1][n], initial[n]) for n in initial)  # the step did move the adapters
    for name in results[1]:
        torch.testing.assert_close(results[2][name], results[1][name], rtol=1e-5, atol=1e-6, msg=name)
