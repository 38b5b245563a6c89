"""Export of a run: ``save_pretrained`` safetensors + tokenizer that ``AutoModelForCausalLM`` / ``lm_eval --model hf``
load as they are.

* At the end of training, :func:`export_final` writes ``RUN_DIR/final`` (under FSDP from the state gathered onto
  rank 0).
* Offline, :func:`export_checkpoint` (``mileloss export RUN_DIR --out DIR``) converts a checkpoint of either kind
  (``step_N.pt`` or a sharded ``step_N/``, any world size) in one process, without a process group or a GPU: the
  checkpoint is verified against its checksums first and read without running code (see
  :mod:`mileloss.train.checkpoint` and :mod:`mileloss.train.dcp`); the model is rebuilt from the config saved *in
  the checkpoint*. The folder is written beside ``--out`` as ``.NAME.export-PID`` and renamed onto ``--out`` when
  complete, so ``--out`` never holds half an export; an existing non-empty ``--out`` is refused, never replaced. A
  staging folder of a killed export (its process gone, holding only export files) is removed by the next export.

``mileloss_run.json`` (see :mod:`mileloss.run_folder`) records how the model was trained, the identity of its
training data included, and is written last: its presence means the export is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mileloss.data.tokenizer import save_tokenizer
from mileloss.errors import CheckpointError, NoCheckpointError, OutputFolderError
from mileloss.run_folder import RUN_INFO, RunFolder, data_identity, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["export_checkpoint", "export_final", "write_pretrained"]


def _run_info(config, data_dir: Path, steps: int, tokens: int) -> dict:
    return {
        "loss": {"kind": config.loss.kind, "gamma": config.loss.gamma, "sigma": config.loss.sigma,
                 "normalize": config.loss.normalize},
        "data_dir": str(data_dir),
        "data": data_identity(data_dir),
        "steps": steps,
        "tokens": tokens,
        "seed": config.run.seed,
        "model": {"preset": config.model.preset, "vocab_size": config.model.vocab_size,
                  "seq_len": config.run.seq_len},
    }


def write_pretrained(model: torch.nn.Module, folder: Path, run, steps: int, tokens: int,
                     state_dict: dict | None = None) -> Path:
    """``save_pretrained`` model + tokenizer, then ``mileloss_run.json`` (last), into ``folder``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    # mileloss_run.json marks a complete export: it goes first and comes back last, so a kill in between never
    # leaves the summary of an earlier export beside half-written weights
    (folder / RUN_INFO).unlink(missing_ok=True)
    model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    # save_tokenizer: a tokenizer_class that transformers 4.x loads too (5.x writes "TokenizersBackend")
    save_tokenizer(AutoTokenizer.from_pretrained(str(run.manifest.tokenizer_dir)), folder)
    info = _run_info(run.config, Path(run.config.data.dir).resolve(), steps, tokens)
    write_atomic(folder / RUN_INFO, json.dumps(info, indent=2) + "\n")
    return folder


def export_final(model: torch.nn.Module, run, steps: int, tokens: int, state_dict: dict | None = None) -> Path:
    """Write ``save_pretrained`` model + tokenizer and ``mileloss_run.json`` into ``run.run_dir / "final"``.

    Args:
        model: the trained ``LlamaForCausalLM`` (not wrapped in DDP).
        run: the :class:`~mileloss.train.preflight.PreparedRun`.
        steps, tokens: optimizer steps and training tokens done.
        state_dict: the full weights to write instead of ``model``'s own (an FSDP-sharded model's gathered state).
    """
    final = RunFolder(run.run_dir).final
    write_pretrained(model, final, run, steps, tokens, state_dict)
    logger.info("exported %s", final)
    return final


def _checkpoint_of(run_dir: Path, step: int | None) -> Path:
    from mileloss.train.checkpoint import checkpoint_path, latest_checkpoint, record_path
    from mileloss.train.dcp import MANIFEST, sharded_checkpoint_path

    directory = RunFolder(run_dir).checkpoints
    if step is None:
        path = latest_checkpoint(directory)
        if path is None:
            raise NoCheckpointError(f"{run_dir} has no complete checkpoint in {directory}")
        return path
    sharded, single = sharded_checkpoint_path(directory, step), checkpoint_path(directory, step)
    if (sharded / MANIFEST).is_file():
        return sharded
    if single.is_file() and record_path(single).is_file():
        return single
    raise NoCheckpointError(f"{directory} has no complete checkpoint of step {step}")


def _load_weights(path: Path, data_dir: str | None):
    """(model with the checkpoint's weights, PreparedRun-like record, step, tokens); verified before unpickling."""
    from mileloss.models import build_model
    from mileloss.train.checkpoint import load_checkpoint
    from mileloss.train.config import TrainConfig
    from mileloss.train.dcp import (
        is_sharded_checkpoint,
        load_sharded_checkpoint,
        read_sharded_trainer_state,
        verify_sharded_checkpoint,
    )
    from mileloss.train.preflight import PreparedRun, load_checked_manifest

    sharded = is_sharded_checkpoint(path)
    if sharded:
        verify_sharded_checkpoint(path)
        state = read_sharded_trainer_state(path)
    else:
        state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("tokens"), int):
        raise CheckpointError(f"{path}: malformed checkpoint (config or tokens)")
    config = TrainConfig.from_dict(state["config"], source=f"the config saved in {path}")
    if data_dir is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, dir=str(data_dir)))
    manifest = load_checked_manifest(config.data.dir, verify=False)  # the tokenizer and the data's identity
    run = PreparedRun(config, manifest, path.parent.parent, torch.device("cpu"), 1, None)
    torch.manual_seed(config.run.seed)
    model = build_model(config.model.preset, **run.model_kwargs)
    if sharded:
        load_sharded_checkpoint(path, model, None, verified=True)
    else:
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as error:
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{path}: the saved weights do not fit the model of its config: {reason}") from None
    return model, run, state["step"], state["tokens"]


def _remove_stale_exports(out: Path) -> None:
    """Remove ``.NAME.export-PID`` folders beside ``out`` left by killed exports (their process is gone) that hold
    only what an export writes; anything else is left alone."""
    from mileloss.train.rundir import _FINAL_NAMES, _alive

    if not out.parent.is_dir():
        return
    prefix = f".{out.name}.export-"
    for entry in out.parent.iterdir():
        pid = entry.name[len(prefix):]
        if not (entry.name.startswith(prefix) and pid.isdigit()) or entry.is_symlink() or not entry.is_dir():
            continue
        if _alive(int(pid), None):  # a live export (or another user's process): not ours to touch
            continue
        files = list(entry.iterdir())
        if all(f.is_file() and not f.is_symlink() and any(p.match(f.name) for p in _FINAL_NAMES) for f in files):
            for f in files:
                f.unlink()
            entry.rmdir()
            logger.warning("removed %s, left by a killed export", entry)


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                      data_dir: str | None = None) -> Path:
    """Convert the newest checkpoint of ``run_dir`` (or that of ``step``) into a ``save_pretrained`` folder ``out``.

    Args:
        run_dir: a ``mileloss train`` run folder.
        out: the folder to create (absent or empty).
        step: the checkpoint's step (default: the newest complete one, of either kind).
        data_dir: the data folder, if it moved since training (its tokenizer is exported with the model).

    Raises:
        OutputFolderError: ``out`` exists and is not an empty folder (nothing is replaced), or cannot be written.
        NoCheckpointError: no complete checkpoint (of ``step``).
        CheckpointError and subclasses: the checkpoint is damaged, unsafe, or does not fit its config.
    """
    run_dir, out = Path(run_dir), Path(out).expanduser()
    if not run_dir.is_dir():
        raise NoCheckpointError(f"run folder {run_dir} does not exist")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise OutputFolderError(f"--out {out} already exists and is not an empty folder; nothing was replaced: choose "
                                f"a new folder")
    path = _checkpoint_of(run_dir, step)
    model, run, steps, tokens = _load_weights(path, data_dir)
    _remove_stale_exports(out)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise OutputFolderError(f"cannot write beside --out {out}: {error.strerror}") from None
    try:
        write_pretrained(model, staging, run, steps, tokens)
        try:
            os.rename(staging, out)  # onto an absent or empty folder only: another export's folder stays
        except OSError:
            raise OutputFolderError(f"--out {out} appeared while exporting (another export?); nothing was "
                                    f"replaced") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the staging folder is this process's own
        raise
    logger.info("exported %s (step %d) to %s", path, steps, out)
    return out
