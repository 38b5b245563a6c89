"""Checks and resolution done before the first training step.

Every problem a run can detect up front raises here, before any model is built: a missing data directory,
a manifest whose shards fail their checksums, a split too short for one window, a model vocabulary that
differs from the data's, a tokenizer larger than the manifest's vocabulary, or a resume from a checkpoint of
another configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from mileloss.errors import PreflightError, ResumeMismatchError, TokenizerMismatchError, VocabMismatchError
from mileloss.models import get_preset
from mileloss.train.config import TrainConfig, derive_grad_accum_steps
from mileloss.train.distributed import DistributedContext
from mileloss.train.rundir import check_out_path

logger = logging.getLogger(__name__)

__all__ = ["PreflightError", "VocabMismatchError", "ResumeMismatchError", "PreparedRun", "prepare_run",
           "resolve_schedule"]


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
    if path.exists() and not path.is_dir():
        raise PreflightError(f"data.dir {str(path)!r} is a file, not a data folder written by `mileloss data`")
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


def check_document_specials(manifest, model_vocab_size: int | None = None) -> None:
    """The special ids the manifest says surround each document must be those its tokenizer implies, fit the
    model's vocabulary, and be where the shards put them (first and last token of the train split).

    A manifest without ``specials`` (written before they were recorded) had eos after each document: accepted.

    Raises:
        TokenizerMismatchError: ``specials`` malformed, or not what the data folder's tokenizer gives
            (``mileloss.data.tokenizer.document_specials``), or the shards do not start/end with them.
        VocabMismatchError: a special id is not below ``model_vocab_size`` or the manifest's vocab_size.
    """
    from mileloss.data.shards import read_split
    from mileloss.data.tokenizer import DocumentSpecials, document_specials, load_tokenizer

    recorded = manifest.extra.get("specials")
    if recorded is None:
        return
    where = manifest.manifest_path
    try:
        specials = DocumentSpecials.from_json(recorded)
        ids = [*specials.document_start, *specials.document_end, specials.eos_token_id]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) or not \
                specials.document_end or specials.document_end[-1] != specials.eos_token_id:
            raise TypeError("ids")
    except (KeyError, TypeError, AttributeError) as error:
        raise TokenizerMismatchError(f"{where}: 'specials' is malformed ({error})") from error
    if specials.eos_token_id != manifest.eos_token_id:
        raise TokenizerMismatchError(f"{where}: specials.eos_token_id {specials.eos_token_id} differs from "
                                     f"eos_token_id {manifest.eos_token_id}")
    for limit, what in ((manifest.vocab_size, "the manifest's vocab_size"), (model_vocab_size, "model.vocab_size")):
        if limit is not None and max(ids) >= limit:
            raise VocabMismatchError(f"{where}: special token id {max(ids)} is not below {what} {limit}")
    actual = document_specials(load_tokenizer(manifest.tokenizer_dir))
    if actual != specials:
        raise TokenizerMismatchError(
            f"{where}: the manifest says {specials.describe()}, but its tokenizer {manifest.tokenizer_dir} gives "
            f"{actual.describe()}: the data was not written with this tokenizer; prepare it again with `mileloss data`"
        )
    train = read_split(manifest, "train", check_ids=False)
    ends_a_document = manifest.extra.get("split_by") != "token_position"  # else the split ends mid-document
    if len(train) and ((specials.document_start and int(train[0]) != specials.document_start[0])
                       or (ends_a_document and int(train[len(train) - 1]) != specials.document_end[-1])):
        raise TokenizerMismatchError(
            f"{where}: the train split starts with id {int(train[0])} and ends with {int(train[len(train) - 1])}, "
            f"but the manifest says {specials.describe()}"
        )


def resolve_schedule(config: TrainConfig, world_size: int) -> TrainConfig:
    """Fill in ``run.seq_len`` (the preset's), ``run.grad_accum_steps`` (derived from ``run.tokens_per_step`` for
    ``world_size`` processes, see :func:`~mileloss.train.config.derive_grad_accum_steps`) and ``run.max_steps``
    (from ``run.max_tokens``). Needs no data: ``mileloss train --dry-run`` plans with it too.

    Raises:
        BatchScheduleError: ``run.tokens_per_step`` is not a whole number of micro-batches, or disagrees with an
            explicit ``run.grad_accum_steps``.
    """
    run = config.run
    seq_len = run.seq_len or get_preset(config.model.preset).seq_len
    accum = derive_grad_accum_steps(run, seq_len, world_size)
    max_steps = run.max_steps
    if run.max_tokens is not None:
        max_steps = math.ceil(run.max_tokens / (run.batch_size * seq_len * accum * world_size))
    return dataclasses.replace(
        config, run=dataclasses.replace(run, seq_len=seq_len, max_steps=max_steps, grad_accum_steps=accum))


def resolve_config(config: TrainConfig, manifest, world_size: int) -> TrainConfig:
    """Fill in ``model.vocab_size`` (from the data) and the schedule (:func:`resolve_schedule`)."""
    model = config.model
    if model.vocab_size is not None and model.vocab_size != manifest.vocab_size:
        raise VocabMismatchError(
            f"model.vocab_size={model.vocab_size} but the data manifest {manifest.path} has vocab_size="
            f"{manifest.vocab_size}; remove model.vocab_size to take it from the data"
        )
    config = dataclasses.replace(config, model=dataclasses.replace(model, vocab_size=manifest.vocab_size))
    return resolve_schedule(config, world_size)


def prepare_run(config: TrainConfig, context: DistributedContext, device: torch.device) -> PreparedRun:
    """Validate ``run.out``, the data and the config. Raises before any training happens; writes nothing.

    The run folder is created and locked afterwards by :func:`mileloss.train.rundir.claim_run_folder`.
    """
    run_dir = check_out_path(config.run.out)
    manifest = load_checked_manifest(config.data.dir, config.data.verify_checksums)
    check_tokenizer(manifest)
    config = resolve_config(config, manifest, context.world_size)
    check_document_specials(manifest, config.model.vocab_size)
    seq_len = config.run.seq_len
    for split in ("train", "val"):
        available = _split_tokens(manifest, split)
        if available < seq_len + 1:
            raise PreflightError(
                f"the {split!r} split of {manifest.path} has {available} tokens, fewer than run.seq_len + 1 = "
                f"{seq_len + 1}: use a larger corpus or a smaller run.seq_len"
            )
    windows = (_split_tokens(manifest, "train") - 1) // seq_len
    global_batch = config.run.batch_size * context.world_size
    if global_batch > windows:
        raise PreflightError(
            f"run.batch_size={config.run.batch_size} x {context.world_size} process(es) = {global_batch} sequences "
            f"per batch, more than the {windows} sequences of run.seq_len={seq_len} in the 'train' split of "
            f"{manifest.path}: every batch would repeat the data; use a smaller run.batch_size or a larger corpus"
        )
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    use_bf16 = config.run.dtype == "bf16" or (config.run.dtype == "auto" and device.type == "cuda")
    return PreparedRun(config, manifest, run_dir, device, context.world_size, torch.bfloat16 if use_bf16 else None)


# Differences in these keys are allowed when resuming: they do not change the steps already taken or to come.
# run.max_tokens may differ as long as the resolved run.max_steps (compared) is the same; data.dir may move, the
# data itself is compared by its fingerprint.
# model.gradient_checkpointing and loss.chunk_size change memory use only (a run that runs out of memory may lower
# them and resume). run.parallel and run.reshard_after_forward change how ranks share the model, not the math.
_RESUMABLE_CHANGES = {"run.max_tokens", "run.eval_every", "run.eval_batches", "run.checkpoint_every",
                      "run.keep_checkpoints", "run.log_every", "run.progress", "run.out", "run.compile",
                      "run.num_threads", "run.device", "data.dir", "data.verify_checksums",
                      "model.gradient_checkpointing", "loss.chunk_size", "run.parallel", "run.reshard_after_forward"}
# Keys that define the learning-rate schedule of the steps to come: the scheduler is rebuilt from the config, so
# resuming with another value would silently bend the cosine curve mid-run.
_SCHEDULE_KEYS = {"run.max_steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio"}


def data_fingerprint(manifest) -> str:
    """sha256 over the vocabulary size and every shard's (file, tokens, sha256): the data a run trains on."""
    shards = {name: [[s.file, s.num_tokens, s.sha256] for s in manifest.split(name).shards]
              for name in sorted(manifest.splits)}
    text = json.dumps({"vocab_size": manifest.vocab_size, "splits": shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_resume_compatible(saved: dict[str, dict], current: TrainConfig, path: Path) -> None:
    """Raise :class:`ResumeMismatchError` if the checkpoint's config differs in a key that changes training.

    Schedule-defining keys (``run.max_steps``, ``optim.lr``, ``optim.warmup_steps``, ``optim.min_lr_ratio``) are
    refused like every other training key: a run continues the schedule it started. To train longer, start a new
    run (another ``run.out``) with the larger ``run.max_steps``.
    """
    now = current.to_dict()
    differences = [
        (f"{section}.{key}", saved.get(section, {}).get(key) if isinstance(saved.get(section), dict) else None, value)
        for section, values in now.items()
        for key, value in values.items()
        if f"{section}.{key}" not in _RESUMABLE_CHANGES and (
            not isinstance(saved.get(section), dict) or saved[section].get(key) != value)
    ]
    if not differences:
        return
    listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, old, new in differences)
    schedule = sorted(key for key, _, _ in differences if key in _SCHEDULE_KEYS)
    why = (f" ({', '.join(schedule)} define{'s' if len(schedule) == 1 else ''} the learning-rate schedule the run "
           f"continues)") if schedule else ""
    keep = " ".join(f"{key}={old!r}" for key, old, _ in differences)
    if "run.max_steps" in schedule and current.run.max_tokens is not None:  # max_tokens sets max_steps
        steps, tokens = saved["run"]["max_steps"], saved["run"].get("max_tokens")
        keep = keep.replace(f"run.max_steps={steps!r}", f"run.max_tokens={tokens!r}" if tokens is not None
                            else f"run.max_tokens=null run.max_steps={steps!r}")
    derived = ""
    if "run.grad_accum_steps" in {key for key, _, _ in differences} and current.run.tokens_per_step is not None:
        derived = (" (run.grad_accum_steps is derived from run.tokens_per_step / (run.batch_size x run.seq_len x "
                   "world size): resume with the run.batch_size the run started with)")
    raise ResumeMismatchError(
        f"cannot resume from {path}: the config differs in {listed}{why}{derived}; resume with {keep}, or start a "
        f"new run in another run.out"
    )
