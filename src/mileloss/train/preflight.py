"""Checks and resolution done before the first training step.

Every problem a run can detect up front raises here, before any model is built: a missing data directory,
a manifest whose shards fail their checksums, a split too short for one window, a model vocabulary that
differs from the data's, a tokenizer larger than the manifest's vocabulary, or a resume from a checkpoint of
another configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from mileloss.models import get_preset
from mileloss.train.config import TrainConfig
from mileloss.train.distributed import DistributedContext

logger = logging.getLogger(__name__)

__all__ = ["PreflightError", "VocabMismatchError", "ResumeMismatchError", "PreparedRun", "prepare_run"]


class PreflightError(ValueError):
    """The run cannot start: the message names the file or config key at fault."""


class VocabMismatchError(PreflightError):
    """The model's vocabulary (config or tokenizer) differs from the data manifest's."""


class ResumeMismatchError(PreflightError):
    """``--resume`` found a checkpoint written with a different configuration."""


@dataclasses.dataclass
class PreparedRun:
    """A validated config with everything derived from it and the data."""

    config: TrainConfig
    """The resolved config: vocab size, sequence length and step count filled in."""
    manifest: Any
    """The data directory's ``mileloss.data.ShardManifest``."""
    run_dir: Path
    device: torch.device
    world_size: int
    autocast_dtype: torch.dtype | None
    """bf16 when mixed precision is on (CUDA under ``run.dtype=auto``), else ``None`` (fp32)."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        run = self.config.run
        return run.batch_size * run.seq_len * run.grad_accum_steps * self.world_size

    @property
    def model_kwargs(self) -> dict[str, Any]:
        model = self.config.model
        kwargs: dict[str, Any] = {"vocab_size": model.vocab_size}
        if model.num_hidden_layers is not None:
            kwargs["num_hidden_layers"] = model.num_hidden_layers
        if model.initializer_range is not None:
            kwargs["initializer_range"] = model.initializer_range
        kwargs["max_position_embeddings"] = max(self.config.run.seq_len, get_preset(model.preset).seq_len)
        return kwargs

    @property
    def loss_kwargs(self) -> dict[str, Any]:
        loss = self.config.loss
        return {"weighting": loss.kind, "gamma": loss.gamma, "sigma": loss.sigma, "normalize": loss.normalize,
                "chunk_size": loss.chunk_size}

    def autocast(self):
        """Context manager for the forward pass (bf16 autocast or nothing)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def load_checked_manifest(data_dir: str | Path, verify: bool):
    """The manifest of ``data_dir`` with its shards checked, or a :class:`PreflightError` saying what to do."""
    from mileloss.data import load_manifest

    path = Path(data_dir)
    if not path.is_dir():
        raise PreflightError(f"data.dir {str(path)!r} does not exist; create it with `mileloss data --out {path} ...`")
    if not (path / "manifest.json").is_file():
        raise PreflightError(f"data.dir {str(path)!r} has no manifest.json; was it written by `mileloss data`?")
    return load_manifest(path, verify=verify)  # raises ShardChecksumError / ManifestError (ValueErrors)


def _split_tokens(manifest, split: str) -> int:
    splits = manifest.splits
    if split not in splits:
        raise PreflightError(f"{manifest.path}: manifest has no {split!r} split (splits: {sorted(splits)})")
    entry = splits[split]
    return int(entry["num_tokens"] if isinstance(entry, dict) else entry.num_tokens)


def check_tokenizer(manifest) -> None:
    """The tokenizer folder must exist and fit in the manifest's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(manifest.tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise PreflightError(f"tokenizer folder {tokenizer_dir} named by {manifest.path} is missing")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > manifest.vocab_size:
        raise VocabMismatchError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the manifest says vocab_size="
            f"{manifest.vocab_size}: the shards were not written with this tokenizer"
        )


def resolve_config(config: TrainConfig, manifest, world_size: int) -> TrainConfig:
    """Fill in ``model.vocab_size``, ``run.seq_len`` and ``run.max_steps`` (from ``run.max_tokens``)."""
    model, run = config.model, config.run
    if model.vocab_size is not None and model.vocab_size != manifest.vocab_size:
        raise VocabMismatchError(
            f"model.vocab_size={model.vocab_size} but the data manifest {manifest.path} has vocab_size="
            f"{manifest.vocab_size}; remove model.vocab_size to take it from the data"
        )
    seq_len = run.seq_len or get_preset(model.preset).seq_len
    max_steps = run.max_steps
    if run.max_tokens is not None:
        max_steps = math.ceil(run.max_tokens / (run.batch_size * seq_len * run.grad_accum_steps * world_size))
    return dataclasses.replace(
        config,
        model=dataclasses.replace(model, vocab_size=manifest.vocab_size),
        run=dataclasses.replace(run, seq_len=seq_len, max_steps=max_steps),
    )


def prepare_run(config: TrainConfig, context: DistributedContext, device: torch.device) -> PreparedRun:
    """Validate data and config; create the run directory (rank 0). Raises before any training happens."""
    manifest = load_checked_manifest(config.data.dir, config.data.verify_checksums)
    check_tokenizer(manifest)
    config = resolve_config(config, manifest, context.world_size)
    seq_len = config.run.seq_len
    for split in ("train", "val"):
        available = _split_tokens(manifest, split)
        if available < seq_len + 1:
            raise PreflightError(
                f"the {split!r} split of {manifest.path} has {available} tokens, fewer than run.seq_len + 1 = "
                f"{seq_len + 1}: use a larger corpus or a smaller run.seq_len"
            )
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    use_bf16 = config.run.dtype == "bf16" or (config.run.dtype == "auto" and device.type == "cuda")
    run_dir = Path(config.run.out)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    context.barrier()
    return PreparedRun(config, manifest, run_dir, device, context.world_size, torch.bfloat16 if use_bf16 else None)


# Differences in these keys are allowed when resuming: they do not change the steps already taken.
_RESUMABLE_CHANGES = {"run.max_steps", "run.max_tokens", "run.eval_every", "run.eval_batches", "run.checkpoint_every",
                      "run.keep_checkpoints", "run.log_every", "run.progress", "run.out", "run.compile",
                      "run.num_threads", "run.device", "data.dir", "data.verify_checksums"}


def check_resume_compatible(saved: dict[str, dict], current: TrainConfig, path: Path) -> None:
    """Raise :class:`ResumeMismatchError` if the checkpoint's config differs in a key that changes training."""
    now = current.to_dict()
    differences = [
        f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, now {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if f"{section}.{key}" not in _RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value
    ]
    if differences:
        raise ResumeMismatchError(f"cannot resume from {path}: the config differs in " + "; ".join(differences))
