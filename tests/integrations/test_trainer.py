"""MiLeTrainer: a real ``train()`` with gradient accumulation k = 2 equals one step on the whole batch (k = 1);
the plain Trainer's deviation for MiLe is measured (and is zero for CE, which it normalises exactly)."""

from __future__ import annotations

import pytest
import torch
import transformers

from mileloss.errors import TrainerSetupError
from mileloss.integrations import MiLeTrainer, apply_mileloss

# transformers' Trainer (TrainingArguments) needs accelerate; the minimum-versions environment has none
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

# MiLeTrainer overrides hooks of transformers 5.x's Trainer; older versions are refused (tested below)
needs_hooks = pytest.mark.skipif(not hasattr(transformers.Trainer, "_get_grad_norm"),
                                 reason=f"transformers {transformers.__version__}: Trainer has no _get_grad_norm")
VOCAB = 53
EXAMPLES, LENGTH = 8, 12


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.5)  # peaked, varied predictions: weights differ
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    """Rows with very different numbers of target tokens (masked prompts), so micro-batch means differ."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for index in range(EXAMPLES):
        input_ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
        labels = input_ids.clone()
        labels[: (index * 5) % (LENGTH - 2)] = -100
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                     "labels": labels})
    return rows


def train(tmp_path, trainer_class, loss, accumulation, max_grad_norm=0.0, steps=2, per_device=None, ddp=False):
    """Two SGD steps on 4 rows each (k micro-batches of 4 / k); returns (final parameters, logged losses).
    SGD, not Adam: Adam would hide a wrong gradient scale. With clipping the update's norm is lr * max_grad_norm,
    so lr is larger there to keep the update well above the float32 rounding of the parameters."""
    model = apply_mileloss(tiny_llama(), loss=loss, gamma=1.5, sigma=0.5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{trainer_class.__name__}-{loss}-{accumulation}"), use_cpu=True,
        per_device_train_batch_size=per_device or 4 // accumulation, gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.05 if max_grad_norm == 0 else 1.0, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=max_grad_norm,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=7, dataloader_num_workers=0,
        **({"ddp_backend": "gloo"} if ddp else {}),
    )
    trainer = trainer_class(model=model, args=args, train_dataset=dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if max_grad_norm:  # the clip did act (the logged norm is the one before clipping)
        assert all(entry["grad_norm"] > 2 * max_grad_norm for entry in trainer.state.log_history if "loss" in entry)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, losses


def deviation(params, reference, initial) -> float:
    """|| update - reference update || / || reference update ||, over all parameters."""
    num = sum(float(((params[n] - reference[n]) ** 2).sum()) for n in params)
    den = sum(float(((reference[n] - initial[n]) ** 2).sum()) for n in params)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def initial():
    return {name: p.detach().clone() for name, p in tiny_llama().named_parameters()}


@needs_hooks
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])  # no clipping (the _get_grad_norm path); clipping
@pytest.mark.parametrize("loss", ["mile", "focal"])
def test_mile_trainer_with_accumulation_equals_one_step_on_the_whole_batch(tmp_path, initial, loss, max_grad_norm):
    one, one_losses = train(tmp_path, MiLeTrainer, loss, 1, max_grad_norm)
    two, two_losses = train(tmp_path, MiLeTrainer, loss, 2, max_grad_norm)
    assert deviation(two, one, initial) < 1e-5
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the logged loss is the exact weighted mean of each step, the same however the step was accumulated
    assert len(one_losses) == len(two_losses) == 2
    assert two_losses == pytest.approx(one_losses, rel=1e-5)


@needs_hooks
def test_plain_trainer_is_exact_for_ce_but_not_for_mile_and_the_deviation_is_measured(tmp_path, initial, capsys):
    ce_one, _ = train(tmp_path, transformers.Trainer, "ce", 1, steps=1)
    ce_two, _ = train(tmp_path, transformers.Trainer, "ce", 2, steps=1)
    assert deviation(ce_two, ce_one, initial) < 1e-5
    one, _ = train(tmp_path, transformers.Trainer, "mile", 1, steps=1)
    two, _ = train(tmp_path, transformers.Trainer, "mile", 2, steps=1)
    measured = deviation(two, one, initial)  # one SGD step without clipping: the relative gradient error
    exact, _ = train(tmp_path, MiLeTrainer, "mile", 2, steps=1)
    with capsys.disabled():
        print(f"\nplain Trainer, MiLe gamma=1.5 sigma=0.5, k=2 vs k=1: relative gradient deviation {measured:.2e}; "
              f"MiLeTrainer {deviation(exact, one, initial):.2e}")
    assert measured > 1e-3  # the plain Trainer is measurably inexact here, so the test above can tell


@needs_hooks
def test_mile_trainer_refuses_an_unpatched_model_and_a_compute_loss_func(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TrainerSetupError, match="apply_mileloss"):
        MiLeTrainer(model=tiny_llama(), args=args, train_dataset=dataset())
    with pytest.raises(TrainerSetupError, match="compute_loss_func"):
        MiLeTrainer(model=apply_mileloss(tiny_llama()), args=args, train_dataset=dataset(),
                    compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, loss: str, accumulation: int,
                plain: bool = False) -> None:
    """One process of a 2-process gloo run: per-device batch 4 / (world * k), k micro-batches per step."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pathlib import Path

    trainer_class = transformers.Trainer if plain else MiLeTrainer
    params, losses = train(Path(out_dir), trainer_class, loss, accumulation, per_device=4 // (world * accumulation),
                           ddp=True)
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == world  # the Trainer did run data-parallel
    if rank == 0:
        torch.save((params, losses), Path(out_dir) / f"ddp-{loss}-{accumulation}{'-plain' if plain else ''}.pt")
    dist.destroy_process_group()


@needs_hooks
@pytest.mark.distributed
@pytest.mark.parametrize("accumulation", [1, 2])
def test_mile_trainer_on_two_gloo_processes_equals_one_process(tmp_path, initial, accumulation):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), "mile", accumulation), nprocs=2, join=True)
    params, losses = torch.load(tmp_path / f"ddp-mile-{accumulation}.pt")
    one, one_losses = train(tmp_path, MiLeTrainer, "mile", 1)
    assert deviation(params, one, initial) < 1e-5
    for name in one:
        torch.testing.assert_close(params[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert losses == pytest.approx(one_losses, rel=1e-5)


def test_mile_trainer_refuses_a_transformers_without_the_hooks_it_overrides(tmp_path, monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_get_grad_norm", raising=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TrainerSetupError, match="_get_grad_norm, which transformers"):
        MiLeTrainer(model=apply_mileloss(tiny_llama()), args=args, train_dataset=dataset())


@needs_hooks
def test_mile_trainer_evaluate_reports_the_patched_models_weighted_mean(tmp_path):
    model = apply_mileloss(tiny_llama(), loss="mile", gamma=1.5, sigma=0.5)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                          per_device_eval_batch_size=EXAMPLES)
    metrics = MiLeTrainer(model=model, args=args, eval_dataset=dataset()).evaluate()
    rows = dataset()
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.stack([r["input_ids"] for r in rows]),
                                labels=torch.stack([r["labels"] for r in rows])).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


@needs_hooks
@pytest.mark.parametrize("loss", ["mile", "focal"])
def test_accumulation_4_equals_one_step_on_the_4x_batch_and_the_plain_trainer_deviation_is_measured(
        tmp_path, initial, loss, capsys):
    """k = 4 micro-batches of one row each vs one step on the 4 rows (two SGD steps, final weights). The plain
    Trainer with the same patched model (the per-micro-batch weighted means, scaled by local / global count) is
    measured against the same reference: the number the README quotes."""
    one, one_losses = train(tmp_path, MiLeTrainer, loss, 1)
    four, four_losses = train(tmp_path, MiLeTrainer, loss, 4)
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    exact = deviation(four, one, initial)
    assert exact < 1e-5
    assert four_losses == pytest.approx(one_losses, rel=1e-5)
    plain, _ = train(tmp_path, transformers.Trainer, loss, 4)
    measured = deviation(plain, one, initial)
    with capsys.disabled():
        print(f"\n{loss} gamma=1.5 sigma=0.5, gradient_accumulation_steps=4 vs one step on the 4x batch, relative "
              f"deviation of the 2-step update: plain Trainer {measured:.2e}, MiLeTrainer {exact:.2e}")
    assert measured > 10 * max(exact, 1e-7)  # the plain Trainer is measurably off, so the check above can tell


def _plain_trainer_step(tmp_path, model, accumulation, tag):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / tag), use_cpu=True, per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=7)
    transformers.Trainer(model=model, args=args, train_dataset=dataset()).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_loss_set_as_model_loss_function_runs_through_trainer_with_hf_keywords(tmp_path, initial, capsys):
    """transformers' own path: Trainer -> model.forward(num_items_in_batch=...) -> model.loss_function -> our
    function with HF's keywords. CE set as ``model.loss_function`` equals HF's own CE under the Trainer and is
    exact under accumulation. Selecting it by ``model.loss_type`` instead is measured: transformers 5.x's Trainer
    counts num_items_in_batch over the shifted labels only when loss_type maps to its own ForCausalLMLoss."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    from mileloss.integrations import register_transformers_loss, transformers_loss_function

    calls = []
    function = transformers_loss_function("ce")

    def recording(*args, **kwargs):
        calls.append(sorted(kwargs))
        return function(*args, **kwargs)

    hf_own = _plain_trainer_step(tmp_path, tiny_llama(), 1, "hf")
    results = {}
    for accumulation in (1, 2):
        model = tiny_llama()
        model.loss_function = recording
        results[accumulation] = _plain_trainer_step(tmp_path, model, accumulation, f"function-{accumulation}")
    assert calls and all({"num_items_in_batch", "vocab_size"} <= set(kwargs) for kwargs in calls)
    assert deviation(results[1], hf_own, initial) < 1e-5
    assert deviation(results[2], results[1], initial) < 1e-5

    key = register_transformers_loss("ce", name="ForCausalLM_mileloss_test_ce")
    try:
        model = tiny_llama()
        model.loss_type = key
        by_type = _plain_trainer_step(tmp_path, model, 1, "loss-type")
    finally:
        del LOSS_MAPPING[key]
    with capsys.disabled():
        print(f"\nCE selected by model.loss_type under transformers {transformers.__version__}'s Trainer: relative "
              f"update deviation from HF's own CE {deviation(by_type, hf_own, initial):.2e}; as model.loss_function "
              f"{deviation(results[1], hf_own, initial):.2e}")


@needs_hooks
@pytest.mark.slow
@pytest.mark.distributed
def test_plain_trainer_on_two_gloo_processes_is_off_for_mile_and_the_deviation_is_measured(tmp_path, initial, capsys):
    """The plain Trainer with the patched model on 2 processes (k = 1): each rank's weighted mean, averaged by DDP,
    against one process on the same global batch (MiLeTrainer k = 1, which is the plain Trainer's k = 1 too)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), "mile", 1, True), nprocs=2, join=True)
    params, _ = torch.load(tmp_path / "ddp-mile-1-plain.pt")
    one, _ = train(tmp_path, MiLeTrainer, "mile", 1)
    measured = deviation(params, one, initial)
    with capsys.disabled():
        print(f"\nplain Trainer, MiLe gamma=1.5 sigma=0.5, 2 gloo processes vs 1 process on the same global batch: "
              f"relative deviation of the 2-step update {measured:.2e}")
    assert measured > 1e-3
