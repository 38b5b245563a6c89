"""The pretraining loop: a LLaMA-style model trained with CE, focal or MiLe loss on token shards.

    mileloss train tiny loss.kind=mile run.out=runs/mile
    torchrun --nproc_per_node 2 -m mileloss train tiny      # DDP, same global batch
    torchrun --nproc_per_node 2 -m mileloss train 1.2B run.parallel=fsdp     # FSDP2, sharded (DCP) checkpoints

One optimizer step = ``grad_accum_steps`` micro-batches per process. The loss is computed from the last hidden
states with the fused LM-head loss (the (tokens, vocab) logits never exist). With ``loss.normalize=weighted``
each micro-batch back-propagates its unnormalised sum ``sum_i w_i CE_i`` and the gradients are divided once by
the global ``sum_i w_i`` after the last micro-batch (``WeightNormalizer``), so the step's gradient equals that
of one process on the whole global batch, whatever the accumulation and world size.

With ``run.parallel=fsdp`` (and more than one process) the model is built on the meta device, sharded with
FSDP2 (``mileloss.train.distributed.shard_model``) and materialised shard by shard with the weights the
single-process model gets from the same seed (``mileloss.models.materialize_model``); the gradients are sharded
``DTensor``s, which the normaliser rescales and :func:`~mileloss.train.distributed.clip_gradients` clips by their
global norm. Its checkpoints are sharded (``mileloss.train.dcp``: DCP format, each rank writes its shards).

Resuming takes the newest complete checkpoint of either kind (``step_N.pt`` of a single process or DDP, sharded
``step_N/`` of FSDP) into any of the three setups, and into another number of processes as long as the global batch
(``run.batch_size x run.grad_accum_steps x processes`` windows per step) is unchanged: the data position is counted
in windows of the global order, so the resumed run reads exactly the windows the uninterrupted run would have.

The run folder is claimed first (``mileloss.train.rundir``): a lock, then a fresh run needs an empty folder (or
``overwrite``), ``resume`` needs a complete checkpoint. Callers may pass :class:`TrainHooks`: callbacks at the
start and end of each step and between writing and committing a checkpoint (progress reporting; tests that
interrupt a run at a known point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mileloss.errors import NonFiniteLossError
from mileloss.losses import WeightNormalizer, linear_token_weighted_loss
from mileloss.models import build_model, materialize_model
from mileloss.run_folder import RunFolder
from mileloss.train.checkpoint import (
    CheckpointError,
    StageCallback,
    check_training_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from mileloss.train.config import TrainConfig, save_config
from mileloss.train.dcp import apply_full_state, is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from mileloss.train.distributed import DistributedContext, clip_gradients, init_distributed, shard_model
from mileloss.train.export import export_final
from mileloss.train.metrics import MetricsLogger
from mileloss.train.preflight import (
    PreparedRun,
    ResumeMismatchError,
    check_resume_compatible,
    data_fingerprint,
    prepare_run,
)
from mileloss.train.rundir import NoCheckpointError, claim_run_folder
from mileloss.train.schedule import build_scheduler

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "LanguageModelLoss", "TrainHooks", "build_optimizer", "train", "validation_loss"]


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """Optional callbacks into :func:`train`; each runs on every rank unless said otherwise."""

    step_start: Callable[[int, torch.nn.Module], None] | None = None
    """``(step, model)`` before optimizer step ``step`` (1-based); ``model`` is the ``LlamaForCausalLM``."""
    step_end: Callable[[int], None] | None = None
    """``(step)`` after the step is logged, evaluated and checkpointed."""
    checkpoint_stage: StageCallback | None = None
    """``(stage, path)`` inside each checkpoint write, on the main process (see ``checkpoint.StageCallback``; a
    sharded checkpoint calls it at ``"shards_written"`` and ``"manifest_written"``, with the staging folder)."""


class LanguageModelLoss(torch.nn.Module):
    """``LlamaForCausalLM`` body + fused LM-head loss in one ``forward`` (so DDP sees one module).

    ``forward(input_ids (B, T), labels (B, T))`` returns ``(loss, stats)`` from
    :func:`mileloss.losses.linear_token_weighted_loss` with the given reduction.
    """

    def __init__(self, model: torch.nn.Module, loss: dict, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.loss, self.autocast_dtype = model, loss, autocast_dtype

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "sum", process_group=None,
                loss: dict | None = None):
        """``loss``, if given, replaces the configured loss options (validation: ``{"weighting": "ce"}``)."""
        hidden = self.model.model(input_ids=input_ids).last_hidden_state  # (B, T, D)
        weight = self.model.lm_head.weight  # (V, D)
        if self.autocast_dtype is not None:  # low-precision GEMMs in the loss, fp32 softmax math inside it
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_token_weighted_loss(
                hidden, weight, labels, reduction=reduction, return_stats=True, process_group=process_group,
                **(self.loss if loss is None else loss)
            )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant: safe under DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (none on norms and biases, as in the paper)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused kernels on CUDA; the foreach path elsewhere (both are exact AdamW)
    options = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps, **options)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, run: PreparedRun, context: DistributedContext) -> float:
    """Plain cross-entropy (nats/token) over the first ``run.eval_batches`` global validation batches.

    ``model`` is the :class:`LanguageModelLoss` (not wrapped in DDP; under FSDP2 it is the sharded root, whose
    forward gathers the parameters).

    A global batch has ``batch_size * world_size`` rows and rank r evaluates its rows ``[r * B, (r + 1) * B)``,
    so the value does not depend on how the batch is spread over processes.
    """
    from mileloss.data import iter_eval_batches

    cfg = run.config.run
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    rows = slice(context.rank * cfg.batch_size, (context.rank + 1) * cfg.batch_size)
    batches = iter_eval_batches(run.manifest, split="val", batch_size=cfg.batch_size * context.world_size,
                                seq_len=cfg.seq_len, max_batches=cfg.eval_batches)
    for input_ids, labels in batches:
        input_ids, labels = input_ids[rows], labels[rows]
        if len(input_ids) == 0:  # the last, partial global batch may not reach this rank
            continue
        with run.autocast():
            _, stats = model(input_ids.to(run.device), labels.to(run.device), reduction="sum",
                             loss={"weighting": "ce"})
        totals += torch.stack([stats.weighted_ce_sum.double(), stats.valid_count.double()])
    context.all_reduce_sum(totals)
    model.train()
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def train_step(wrapped: torch.nn.Module, loader, run: PreparedRun, context: DistributedContext) -> torch.Tensor:
    """Forward/backward of ``grad_accum_steps`` micro-batches; leaves exact gradients in ``.grad``.

    Returns the step's global loss (0-d float64; the weighted mean over every token of every rank).
    """
    cfg = run.config
    accum = cfg.run.grad_accum_steps
    paper = cfg.loss.normalize == "paper"
    normalizer = None if paper else WeightNormalizer(process_group=context.group)
    scale = 1.0 / (cfg.run.batch_size * cfg.run.seq_len * accum)
    paper_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    non_finite = torch.zeros((), dtype=torch.float64, device=run.device)  # > 0 if any micro-batch loss is NaN/inf
    for micro in range(accum):
        input_ids, labels = (t.to(run.device, non_blocking=True) for t in loader.next_batch())
        last = micro == accum - 1
        # DDP and FSDP: reduce the gradients only once, after the last micro-batch
        sync = contextlib.nullcontext()
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
            wrapped.set_requires_gradient_sync(last)
        elif not last and context.world_size > 1:
            sync = wrapped.no_sync()
        with sync:
            with run.autocast():
                if paper:  # the official code: per-micro-batch mean, alpha averaged over ranks
                    loss, _ = wrapped(input_ids, labels, reduction="mean", process_group=context.group)
                else:
                    loss, stats = wrapped(input_ids, labels, reduction="sum")
            (loss / accum if paper else loss * scale).backward()
        non_finite += (~torch.isfinite(loss.detach())).double()
        if paper:
            paper_loss += loss.detach().double() / accum
        else:
            normalizer.add(stats, scale)
    parameters = [p for p in wrapped.parameters() if p.grad is not None]
    if paper:
        loss = context.all_reduce_sum(paper_loss) / context.world_size
    else:
        loss = normalizer.rescale_gradients_(parameters)
    # a NaN weight sum must not pass for an empty batch: flag it explicitly (on every rank)
    if context.all_reduce_sum(non_finite) > 0:
        return torch.full_like(loss, float("nan"))
    return loss


def _saved_config_for(state: dict, run: PreparedRun, context, path: Path) -> dict:
    """The checkpoint's config, with the batch keys of this run if only the split of the same global batch differs.

    The world size may change when ``batch_size x grad_accum_steps x processes`` (windows per optimizer step) stays
    the same: with ``loss.normalize=weighted`` the step's gradient is then that of the same global batch. Under
    ``loss.normalize=paper`` (a mean per micro-batch) the micro-batch itself must stay: ``batch_size x processes``
    and ``grad_accum_steps`` unchanged.
    """
    saved, cfg = state["config"], run.config.run
    saved_run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
    old_world = state["world_size"]
    if old_world == context.world_size:
        return saved
    try:
        old_batch, old_accum = int(saved_run["batch_size"]), int(saved_run["grad_accum_steps"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: malformed checkpoint config (run.batch_size, run.grad_accum_steps)") from None
    old_rows, rows = old_batch * old_accum * old_world, cfg.batch_size * cfg.grad_accum_steps * context.world_size
    paper = run.config.loss.normalize == "paper"
    same = old_rows == rows and (not paper or (old_batch * old_world == cfg.batch_size * context.world_size
                                              and old_accum == cfg.grad_accum_steps))
    if not same:
        what = ("run.batch_size x processes and run.grad_accum_steps (loss.normalize=paper averages per "
                "micro-batch)") if paper else "run.batch_size x run.grad_accum_steps x processes"
        raise ResumeMismatchError(
            f"cannot resume from {path}: written by {old_world} process(es) with run.batch_size={old_batch} "
            f"run.grad_accum_steps={old_accum}, now {context.world_size} with run.batch_size={cfg.batch_size} "
            f"run.grad_accum_steps={cfg.grad_accum_steps}: the global batch would change; keep {what} equal "
            f"(e.g. run.batch_size={old_batch * old_world // context.world_size} if it divides)")
    return {**saved, "run": {**saved_run, "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps}}


def _resume(run: PreparedRun, model, optimizer, scheduler, loader, context, sharded_model: bool) -> tuple[int, int]:
    """Load the newest checkpoint (either kind) into this run's model, optimizer, scheduler, loader and RNGs."""
    path = latest_checkpoint(run.checkpoint_dir)
    if context.world_size > 1:  # every rank must resume from the same checkpoint (they all see run.out)
        from mileloss.train.dcp import gather_from_ranks

        names = gather_from_ranks(context, None if path is None else path.name)
        if len(set(names)) > 1:
            raise NoCheckpointError(f"--resume: the ranks see different newest checkpoints in {run.checkpoint_dir} "
                                    f"({', '.join(f'rank {r}: {n}' for r, n in enumerate(names))}); run.out must be "
                                    f"the same folder for every rank (one machine or a shared file system)")
    if path is None:  # rank 0 found one when it claimed the folder: this rank does not see the same files
        raise NoCheckpointError(f"--resume: rank {context.rank} finds no complete checkpoint in {run.checkpoint_dir}")
    if is_sharded_checkpoint(path):  # a collective: every rank verifies its share, then DCP reshards
        from mileloss.train.dcp import read_sharded_trainer_state, verify_sharded_checkpoint

        verify_sharded_checkpoint(path, context)
        state = read_sharded_trainer_state(path)
    else:
        state = load_checkpoint(path, map_location="cpu" if sharded_model else run.device)
    check_training_state(state, path, sharded=is_sharded_checkpoint(path))
    if state.get("data") != data_fingerprint(run.manifest):
        raise ResumeMismatchError(f"cannot resume from {path}: data.dir {run.config.data.dir} holds other data than "
                                  f"the run was trained on (the shards' checksums differ)")
    check_resume_compatible(_saved_config_for(state, run, context, path), run.config, path)
    if is_sharded_checkpoint(path):
        load_sharded_checkpoint(path, model, optimizer, context, verified=True)
    else:
        try:
            if sharded_model:  # a whole .pt (one process or DDP) into FSDP shards
                apply_full_state(model, optimizer, state["model"], state["optimizer"])
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{path}: the saved model or optimizer state does not fit this run: "
                                  f"{reason}") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: malformed scheduler state ({type(error).__name__}: {error})") from None
    try:
        loader.load_state_dict(state["loader"])
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: malformed data-loader state ({type(error).__name__}: {error})") from None
    set_rng_state(state["rng"])
    logger.info("resumed from %s (step %d, written by %d process(es))", path, state["step"], state["world_size"])
    return state["step"], state["tokens"]


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, hooks: TrainHooks | None = None) -> Path:
    """Train a model as ``config`` says and return the run directory (with ``final/`` exported).

    All input problems (missing data, bad checksums, vocab mismatch, unusable run folder...) raise before the
    first step.

    Args:
        config: the validated configuration.
        resume: continue from the newest complete, verified checkpoint in ``run.out/checkpoints``.
        overwrite: a fresh run into a ``run.out`` that holds a previous run: remove that run's files first (only
            files mileloss train writes; refused if the folder holds anything else).
        hooks: optional callbacks (see :class:`TrainHooks`).

    Raises:
        OutputFolderError: ``run.out`` is busy (another trainer), not empty without ``overwrite``, holds foreign files
            with ``overwrite``, has no checkpoint with ``resume``, or cannot be written.
        CheckpointError: the checkpoint to resume from is unreadable, corrupted or unsafe.
        NonFiniteLossError: the loss became NaN/inf (the newest checkpoint on disk stays valid).
    """
    context, device = init_distributed(config.run.device)
    try:
        return _train(config, resume, overwrite, hooks or TrainHooks(), context, device)
    finally:
        context.destroy()


def _train(config: TrainConfig, resume: bool, overwrite: bool, hooks: TrainHooks, context: DistributedContext,
           device: torch.device) -> Path:
    run = prepare_run(config, context, device)
    lock = claim_run_folder(run.run_dir, context, device, resume=resume, overwrite=overwrite)
    try:
        return _train_in(run, resume, hooks, context, device)
    finally:
        if lock is not None:
            lock.release()


def _train_in(run: PreparedRun, resume: bool, hooks: TrainHooks, context: DistributedContext,
              device: torch.device) -> Path:
    config, cfg = run.config, run.config.run
    from mileloss.data import TokenBatchLoader

    fsdp = cfg.parallel == "fsdp" and context.world_size > 1
    torch.manual_seed(cfg.seed)
    if fsdp:  # no rank ever holds the whole model: shapes on the meta device, then each rank's shards
        with torch.device("meta"):
            model = build_model(config.model.preset, **run.model_kwargs)
    else:
        model = build_model(config.model.preset, **run.model_kwargs).to(device)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    loss_wrapper = LanguageModelLoss(model, run.loss_kwargs, run.autocast_dtype)
    if fsdp:
        shard_model(loss_wrapper, context, device, cfg.reshard_after_forward, run.autocast_dtype)
        materialize_model(model, cfg.seed, device)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, warmup_steps=config.optim.warmup_steps, total_steps=cfg.max_steps,
                                min_lr_ratio=config.optim.min_lr_ratio)
    loader = TokenBatchLoader(run.manifest, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              seed=cfg.seed, rank=context.rank, world_size=context.world_size)
    step, tokens = _resume(run, model, optimizer, scheduler, loader, context, fsdp) if resume else (0, 0)
    if cfg.compile:
        model.model.compile()
    wrapped = loss_wrapper
    if context.world_size > 1 and not fsdp:
        wrapped = DistributedDataParallel(loss_wrapper, device_ids=[device.index] if device.type == "cuda" else None)
    if context.is_main:
        save_config(config, RunFolder(run.run_dir).config)
    metrics = MetricsLogger(run.run_dir, resume_step=step if resume else None) if context.is_main else None
    fingerprint = data_fingerprint(run.manifest)

    progress = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not (cfg.progress and context.is_main))
    interval_seconds, interval_tokens = 0.0, 0  # training time only: eval and checkpoints excluded
    model.train()
    while step < cfg.max_steps:
        step_start = time.perf_counter()
        if hooks.step_start is not None:
            hooks.step_start(step + 1, model)
        loss = train_step(wrapped, loader, run, context)
        if not math.isfinite(float(loss)):
            last = latest_checkpoint(run.checkpoint_dir)
            raise NonFiniteLossError(
                f"non-finite training loss {float(loss)} at step {step + 1}; stopped before the optimizer step "
                f"(last good checkpoint: {last or 'none'})"
            )
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(model.parameters(), clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += run.tokens_per_step
        interval_tokens += run.tokens_per_step
        interval_seconds += time.perf_counter() - step_start

        if context.is_main and cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
            speed = interval_tokens / max(interval_seconds, 1e-9)
            metrics.log("train", step=step, tokens=tokens, loss=float(loss), lr=lr, grad_norm=float(grad_norm),
                        tokens_per_second=speed, time=time.time())
            progress.set_postfix(loss=f"{float(loss):.4f}", tok_s=f"{speed:,.0f}")
            interval_seconds, interval_tokens = 0.0, 0
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            val_loss = validation_loss(loss_wrapper, run, context)
            if context.is_main:
                metrics.log("val", step=step, tokens=tokens, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700)))
                logger.info("step %d: val_loss %.4f", step, val_loss)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            state = {"tokens": tokens, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                     "config": config.to_dict(), "world_size": context.world_size, "data": fingerprint}
            if fsdp:  # every rank writes its shards; rank 0 commits
                save_sharded_checkpoint(run.checkpoint_dir, step, model, optimizer, state, keep=cfg.keep_checkpoints,
                                        context=context, on_stage=hooks.checkpoint_stage)
            elif context.is_main:
                state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
                save_checkpoint(run.checkpoint_dir, step, state, keep=cfg.keep_checkpoints,
                                on_stage=hooks.checkpoint_stage)
            context.barrier()
        progress.update(1)
        if hooks.step_end is not None:
            hooks.step_end(step)
    progress.close()
    full_state = None
    if fsdp:  # a collective: every rank sends its shards, rank 0 receives the whole state on CPU and writes it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if context.is_main:
        metrics.close()
        export_final(model, run, steps=step, tokens=tokens, state_dict=full_state)
    context.barrier()
    return run.run_dir
