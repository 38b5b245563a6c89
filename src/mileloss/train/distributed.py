"""Process-group setup for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA, initialised from the env variables.

A single process (``WORLD_SIZE`` unset or 1) runs without a process group.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from mileloss.train.config import ConfigValueError

logger = logging.getLogger(__name__)

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank 0 of 1 without ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs, checkpoints and exports."""
        return self.rank == 0

    @property
    def group(self):
        """The process group to all-reduce over, ``None`` for a single process."""
        return dist.group.WORLD if self.world_size > 1 else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def destroy(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<local_rank>``."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        preference = f"cuda:{local_rank}"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ConfigValueError(f"run.device: must be auto, cpu, cuda or cuda:N, got {preference!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigValueError(f"run.device={preference!r} but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigValueError(f"run.device={preference!r} but this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def init_distributed(device_preference: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group described by torchrun's env variables (if ``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), resolve_device(device_preference)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    logger.info("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return DistributedContext(rank, world_size, local_rank), device


def fsdp_mixed_precision(device: torch.device, autocast_dtype: torch.dtype | None):
    """bf16 parameters with fp32 gradient reduction on CUDA when the run trains in bf16; fp32 otherwise (CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and autocast_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(loss_module: torch.nn.Module, context: DistributedContext, device: torch.device,
                reshard_after_forward: bool, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) over all ranks: one unit per decoder layer, then the root ``loss_module``.

    The root unit holds the embedding, the final norm and the LM head: FSDP2 gathers them when the root's forward
    starts and frees them after its backward, so the fused loss sees the whole head weight only while it runs (the
    (tokens, vocab) logits never exist). Gradients are reduce-scattered as averages over ranks, like DDP's.
    Call it on a model built on the meta device, then :func:`mileloss.models.materialize_model`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (context.world_size,))
    policy = fsdp_mixed_precision(device, autocast_dtype)
    for layer in loss_module.model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(loss_module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return loss_module


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes FSDP2's sharded (``DTensor``) gradients: the global norm (a plain tensor)
    over all shards of all ranks, then every gradient scaled by ``min(1, max_norm / norm)``."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # a partial sum of this rank's shards: all-reduce it
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
    return norm
