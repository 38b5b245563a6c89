"""apply_mileloss with a sharded LM head: FSDP2 (the head in the root unit, or its own unit) on 2 gloo processes
gives the loss and gradients of the unsharded model; a DeepSpeed ZeRO-3 partition (emulated with the attributes
and hooks DeepSpeed documents) is gathered by the head's own forward hooks; a head nothing gathers is refused by
name; the head never runs in a narrower dtype than its operands."""

from __future__ import annotations

import enum
import socket

import pytest
import torch
import transformers

import mileloss.integrations.hf as hf
from mileloss.errors import UnsupportedModelError
from mileloss.integrations import apply_mileloss
from mileloss.integrations.hf import shift_labels
from tests.conftest import assert_close
from tests.reference import token_weighted_loss_reference

VOCAB = 61


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.3)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def rank_batch(rank: int):
    generator = torch.Generator().manual_seed(10 + rank)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, : 2 + 3 * rank] = -100  # different token counts per rank
    return input_ids, labels


def reference_grads(model, batches, kind="mile"):
    """Mean over the ranks' batches of the float64 reference loss on the unpatched logits: what FSDP's gradient
    averaging gives when each rank back-propagates its own mean loss."""
    model.zero_grad(set_to_none=True)
    losses = []
    for input_ids, labels in batches:
        logits = model(input_ids).logits
        loss = token_weighted_loss_reference(logits.reshape(-1, VOCAB), shift_labels(labels).reshape(-1),
                                             weighting=kind, gamma=1.5, sigma=0.5) / len(batches)
        loss.backward()
        losses.append(float(loss) * len(batches))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return losses, grads


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine = hf.linear_token_weighted_loss
    try:
        results = {}
        for head_unit in (False, True):
            model = tiny_llama()
            expected_losses, expected = reference_grads(model, [rank_batch(r) for r in range(world)])
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            if head_unit:
                fully_shard(model.lm_head, mesh=mesh)  # the head in its own unit: sharded outside its forward
            fully_shard(model, mesh=mesh)
            apply_mileloss(model, loss="mile", gamma=1.5, sigma=0.5, chunk_size=5)
            outside = type(model.lm_head.weight).__name__
            seen = []

            def recording(hidden, weight, *args, seen=seen, **kwargs):
                seen.append((type(weight).__name__, tuple(weight.shape)))
                return engine(hidden, weight, *args, **kwargs)

            hf.linear_token_weighted_loss = recording
            input_ids, labels = rank_batch(rank)
            for _ in range(2):  # twice: the second forward finds the head resharded again
                model.zero_grad(set_to_none=True)
                outputs = model(input_ids, labels=labels)
                assert outputs.logits is None
                outputs.loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            results[head_unit] = {"outside": outside, "seen": seen, "loss": float(outputs.loss), "grads": grads,
                                  "expected_loss": expected_losses[rank], "expected": expected}
        torch.save(results, f"{out}.{rank}")
    finally:
        hf.linear_token_weighted_loss = engine
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_on_two_gloo_processes_gives_the_unsharded_loss_and_gradients(tmp_path):
    """Both layouts (lm_head in the root unit; lm_head its own unit) in one 2-process run. About 35 s on 2 shared
    cores: slow."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    import torch.multiprocessing as mp

    out = tmp_path / "fsdp2"
    mp.spawn(_fsdp_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    for rank in range(2):
        for head_unit, result in torch.load(f"{out}.{rank}").items():
            what = f"rank {rank}, {'head in its own unit' if head_unit else 'head in the root unit'}"
            assert result["outside"] == "DTensor", what  # sharded between forwards in both layouts
            # inside the fused loss the weight was the whole (vocab, D) matrix, a plain tensor
            assert result["seen"] == [("Parameter", (VOCAB, 32))] * 2, what
            assert_close(torch.tensor(result["loss"]), torch.tensor(result["expected_loss"]), torch.float32,
                         what=f"FSDP2 loss, {what}")
            assert result["grads"].keys() == result["expected"].keys()
            for name, grad in result["grads"].items():
                assert_close(grad, result["expected"][name], torch.float32, what=f"FSDP2 grad {name}, {what}",
                             atol=1e-5)


def _fsdp1_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for use_orig_params in (False, True):
            model = tiny_llama()
            expected_losses, expected = reference_grads(model, [rank_batch(r) for r in range(world)])
            apply_mileloss(model, loss="mile", gamma=1.5, sigma=0.5)
            model.lm_head = FullyShardedDataParallel(model.lm_head, use_orig_params=use_orig_params,
                                                     device_id=torch.device("cpu"))
            input_ids, labels = rank_batch(rank)
            outputs = model(input_ids, labels=labels)
            outputs.loss.backward()
            flat = model.lm_head._flat_param  # this rank's shard of the flattened head weight and its gradient
            start = rank * flat.numel()
            wanted = expected["lm_head.weight"].flatten()[start:start + flat.numel()]
            results[use_orig_params] = {
                "loss": float(outputs.loss), "expected_loss": expected_losses[rank],
                "head": (flat.grad[: wanted.numel()].clone(), wanted),
            }
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp1_head_unit_with_and_without_orig_params_gives_the_unsharded_gradients(tmp_path):
    """FullyShardedDataParallel around lm_head: between forwards its weight is a 1-d shard (use_orig_params=True)
    or a (vocab, D) view whose storage FSDP freed (False); both are gathered by running the loss as its forward.
    The loss is this rank's reference loss, and the head's reduce-scattered gradient shard equals that shard of the
    unsharded reference (averaged over the ranks' batches). About 40 s on 2 shared cores: slow."""
    import torch.multiprocessing as mp

    out = tmp_path / "fsdp1"
    mp.spawn(_fsdp1_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    for rank in range(2):
        for use_orig_params, result in torch.load(f"{out}.{rank}").items():
            what = f"rank {rank}, use_orig_params={use_orig_params}"
            assert_close(torch.tensor(result["loss"]), torch.tensor(result["expected_loss"]), torch.float32,
                         what=f"FSDP1 loss, {what}")
            assert_close(*result["head"], torch.float32, what=f"FSDP1 head grad shard, {what}", atol=1e-5)


class ZeroParamStatus(enum.Enum):  # DeepSpeed's names (deepspeed.runtime.zero.partition_parameters)
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def zero3_partition(module: torch.nn.Linear) -> list[str]:
    """Make ``module.weight`` look and behave as DeepSpeed ZeRO-3 documents its parameters: outside the module's
    forward its data is an empty partition with ``ds_status`` NOT_AVAILABLE (``ds_shape`` / ``ds_numel`` give the
    full size); the module's forward pre-hook fetches it, the forward hook releases it, and a hook on the outputs
    fetches it again for the backward. Returns the log of fetches and releases."""
    weight, log = module.weight, []
    full = weight.detach().clone()
    weight.ds_id, weight.ds_shape, weight.ds_numel = 0, full.shape, full.numel()

    def fetch(*_):
        weight.data, weight.ds_status = full, ZeroParamStatus.AVAILABLE
        log.append("fetch")

    def release(*_):
        weight.data, weight.ds_status = torch.empty(0, dtype=full.dtype), ZeroParamStatus.NOT_AVAILABLE
        log.append("release")

    def after_forward(mod, args, output):
        release()
        outputs = output if isinstance(output, tuple) else (output,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: (fetch(), grad)[1])

    module.register_forward_pre_hook(fetch)
    module.register_forward_hook(after_forward)
    release()
    log.clear()
    return log


def batch():
    input_ids, labels = rank_batch(0)
    return input_ids, labels


@pytest.mark.parametrize("chunk_size", [None, 4])  # one pass, and chunks recomputed in the backward
def test_a_zero3_partitioned_head_is_fetched_by_its_own_forward_hooks_and_gives_the_reference(chunk_size):
    model = tiny_llama()
    input_ids, labels = batch()
    _, expected = reference_grads(model, [(input_ids, labels)])
    expected_loss = token_weighted_loss_reference(model(input_ids).logits.reshape(-1, VOCAB),
                                                  shift_labels(labels).reshape(-1), weighting="mile", gamma=1.5,
                                                  sigma=0.5)
    model.zero_grad(set_to_none=True)
    log = zero3_partition(model.lm_head)
    apply_mileloss(model, loss="mile", gamma=1.5, sigma=0.5, chunk_size=chunk_size)
    loss = model(input_ids, labels=labels).loss
    assert model.lm_head.weight.numel() == 0  # released again after the fused loss
    loss.backward()
    assert log[:2] == ["fetch", "release"] and log[2] == "fetch"
    assert_close(loss, expected_loss, torch.float32, what="ZeRO-3 loss")
    for name, param in model.named_parameters():
        assert_close(param.grad, expected[name], torch.float32, what=f"ZeRO-3 grad {name}", atol=1e-5)
    assert "forward" not in vars(model.lm_head)  # the temporary forward is gone


def test_a_sharded_head_that_nothing_gathers_is_refused_naming_what_it_is():
    model = apply_mileloss(tiny_llama())
    input_ids, labels = batch()
    weight = model.lm_head.weight
    partition = torch.nn.Parameter(torch.zeros(0))
    partition.ds_id, partition.ds_status, partition.ds_shape = 0, ZeroParamStatus.NOT_AVAILABLE, weight.shape
    model.lm_head.weight = partition  # a ZeRO-3 partition without DeepSpeed's hooks
    with pytest.raises(UnsupportedModelError, match=r"ZeRO-3 partition \(ds_status NOT_AVAILABLE.*nothing gathers"):
        model(input_ids, labels=labels)
    assert "forward" not in vars(model.lm_head)  # restored even after the refusal
    model.lm_head.weight = torch.nn.Parameter(weight.detach()[:, :16].clone())  # a tensor-parallel column shard
    with pytest.raises(UnsupportedModelError, match=r"of shape \(61, 16\), not \(vocab, 32\)"):
        model(input_ids, labels=labels)


def test_an_fp32_head_on_a_bf16_body_runs_in_fp32_and_a_bf16_head_in_bf16(engine_dtypes):
    seen = engine_dtypes
    model = tiny_llama()
    model.model.to(torch.bfloat16)  # bf16 body, fp32 head (as with an fp32-kept lm_head)
    input_ids, labels = batch()
    apply_mileloss(model, loss="ce")
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    assert seen == [(torch.float32, torch.float32)] and model.lm_head.weight.grad.dtype == torch.float32
    hidden = model.model(input_ids).last_hidden_state.float()
    expected = token_weighted_loss_reference(model.lm_head(hidden).reshape(-1, VOCAB),
                                             shift_labels(labels).reshape(-1), weighting="ce")
    assert_close(loss, expected, torch.float32, what="fp32 head on bf16 body")
    seen.clear()
    model.to(torch.bfloat16)(input_ids, labels=labels)
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def test_an_instance_forward_already_on_the_head_is_put_back_after_the_gathered_loss():
    """accelerate's hooks (device maps, offload) replace ``module.forward`` on the instance: the temporary forward
    must leave exactly that one in place, also when the loss raises."""
    model = tiny_llama()
    input_ids, labels = batch()
    zero3_partition(model.lm_head)
    calls = []
    original = model.lm_head.forward

    def instance_forward(hidden):
        calls.append(hidden.shape)
        return original(hidden)

    model.lm_head.forward = instance_forward
    apply_mileloss(model, loss="ce")
    loss = model(input_ids, labels=labels).loss
    assert loss.ndim == 0 and vars(model.lm_head)["forward"] is instance_forward
    with pytest.raises(ValueError):
        model(input_ids, labels=torch.full_like(labels, VOCAB + 5))  # a target out of range: the engine raises
    assert vars(model.lm_head)["forward"] is instance_forward
    model.eval()
    assert model(input_ids, labels=labels).logits.shape == (*input_ids.shape, VOCAB)  # eval logits: its forward
    assert calls


def _deepspeed_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_llama()
    expected_losses, expected = reference_grads(model, [rank_batch(r) for r in range(world)])
    apply_mileloss(model, loss="mile", gamma=1.5, sigma=0.5)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    weight = engine.module.lm_head.weight
    outside = (tuple(weight.shape), getattr(weight.ds_status, "name", None), tuple(weight.ds_shape))
    input_ids, labels = rank_batch(rank)
    loss = engine(input_ids=input_ids, labels=labels).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    torch.save({"outside": outside, "loss": float(loss), "expected_loss": expected_losses[rank], "grads": grads,
                "expected": expected}, f"{out}.{rank}")


@pytest.mark.slow
@pytest.mark.distributed
def test_real_deepspeed_zero3_on_two_gloo_processes_gives_the_unsharded_loss_and_gradients(tmp_path):
    """DeepSpeed is not a dependency (its CPU engine runs with DS_ACCELERATOR=cpu and gloo); where it is installed,
    a real ZeRO-3 engine partitions the head (0-size data, NOT_AVAILABLE outside its forward) and the fused loss,
    run as the head's forward, gives every full gradient of the unsharded reference."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    import torch.multiprocessing as mp

    out = tmp_path / "zero3"
    mp.spawn(_deepspeed_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        assert result["outside"] == ((0,), "NOT_AVAILABLE", (VOCAB, 32))
        assert_close(torch.tensor(result["loss"]), torch.tensor(result["expected_loss"]), torch.float32,
                     what=f"ZeRO-3 loss, rank {rank}")
        for name, grad in result["grads"].items():
            assert_close(grad, result["expected"][name], torch.float32, what=f"ZeRO-3 grad {name}", atol=1e-5)


def test_the_gathered_path_builds_no_tokens_by_vocab_tensor_either():
    from tests.integrations.test_families import _LargestLogits

    model = tiny_llama()
    zero3_partition(model.lm_head)
    apply_mileloss(model, loss="mile", chunk_size=8)
    input_ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with _LargestLogits() as seen:
        model(input_ids, labels=input_ids).loss.backward()
    # a (chunk, V) block or the head weight's transpose (D, V), D = 32 < 64 tokens
    assert 0 < seen.largest <= 32 * VOCAB < input_ids.numel() * VOCAB
