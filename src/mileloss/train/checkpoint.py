"""Resumable checkpoints: plain data only, checksummed, written atomically.

A checkpoint of step N is a pair in ``RUN_DIR/checkpoints``:

* ``step_0000000N.pt``: one ``torch.save`` file holding the model, optimiser, scheduler and data-loader states,
  every RNG state (python, numpy, torch, CUDA; stored as tensors and ints), the step, the token count and the
  resolved config (a plain dict). It holds nothing but tensors, dicts, lists, tuples, strings and numbers, and is
  read with ``torch.load(weights_only=True)``: a file that asks the unpickler to build any other object (a
  crafted pickle with ``__reduce__``) is refused with :class:`UnsafeCheckpointError`, and nothing in it runs.
* ``step_0000000N.json``: its record, ``{"format", "version", "step", "file", "bytes", "sha256"}``. The file's
  size and sha256 are checked before it is unpickled: a truncated or bit-flipped checkpoint is refused with
  :class:`CheckpointChecksumError`, never resumed.

Writing order: the ``.pt`` goes to a temporary file (hashed as it is written, flushed, fsynced), then the record
is written and renamed into place, then the ``.pt`` is renamed onto its final name and the directory is fsynced.
The rename of the ``.pt`` is the commit: a process killed at any moment leaves either the previous checkpoints
or the new complete pair. What a killed writer can leave behind (a temporary file, a record without its
``.pt``) is not a checkpoint: :func:`checkpoint_steps` lists only complete pairs, and the next
:func:`save_checkpoint` removes the leftovers. A ``.pt`` found without its record (its record lost or deleted)
is likewise incomplete: it is skipped with a warning and the previous complete checkpoint is used.

Under ``run.parallel=fsdp`` a checkpoint is a folder ``step_0000000N/`` in Distributed Checkpoint format instead
(:mod:`mileloss.train.dcp`). Both kinds may sit side by side (a DDP run resumed under FSDP, or back):
:func:`latest_checkpoint` returns the newest complete one of either kind, and ``run.keep_checkpoints`` counts both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mileloss.errors import CheckpointChecksumError, CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointChecksumError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "check_training_state",
    "checkpoint_steps",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_plain",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

_NAME = re.compile(r"^step_(\d{8})\.pt$")
_RECORD_NAME = re.compile(r"^step_(\d{8})\.json$")
_TEMPORARY = re.compile(r"^\.step_\d{8}\.(pt|json)\.tmp-\d+$")
FORMAT = "mileloss-checkpoint"
VERSION = 2
_REQUIRED = ("step", "tokens", "model", "optimizer", "scheduler", "loader", "config", "world_size", "rng")
_BLOCK = 16 * 2**20

# (stage, path): "payload_written" once the temporary .pt is complete and fsynced (path: the temporary file);
# "record_written" once the record is in place but the .pt not yet renamed (path: the record).
StageCallback = Callable[[str, Path], None]


def rng_state() -> dict[str, Any]:
    """Every random-number-generator state a training step may consume, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    name, key, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`.

    Raises:
        CheckpointError: ``state`` is not what :func:`rng_state` returns.
    """
    try:
        # the checkpoint may have been loaded onto a GPU (map_location): RNG states are set from CPU tensors
        python, numpy_state = state["python"], state["numpy"]
        internal = tuple(int(v) for v in python["internal"].cpu().tolist())
        key = numpy_state["key"].cpu().numpy().astype(np.uint32)
        python_state = (int(python["version"]), internal, python["gauss"])
        numpy_tuple = (str(numpy_state["name"]), key, int(numpy_state["position"]), int(numpy_state["has_gauss"]),
                       float(numpy_state["cached_gaussian"]))
        torch_state = state["torch"].cpu()
        cuda_states = [s.cpu() for s in state["cuda"]] if "cuda" in state and torch.cuda.is_available() else None
        random.setstate(python_state)
        np.random.set_state(numpy_tuple)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"malformed RNG state in checkpoint: {type(error).__name__}: {error}") from None


class _HashingWriter:
    """File wrapper that hashes and counts what ``torch.save`` writes (it only writes and flushes, in order)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        count = self.handle.write(data)
        self.digest.update(memoryview(data)[:count])
        self.size += count
        return count

    def flush(self) -> None:
        self.handle.flush()


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Any], Any]) -> Any:
    """Run ``write(handle)`` on a fresh file ``path``, then flush and fsync it; returns what ``write`` returned."""
    with open(path, "xb") as handle:
        result = write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return result


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def record_path(checkpoint: Path) -> Path:
    """The checksum record beside a checkpoint: ``step_N.pt`` -> ``step_N.json``."""
    return Path(checkpoint).with_suffix(".json")


def _steps(directory: Path, pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name))}


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints (``.pt`` and its record) in ``directory``, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(_steps(directory, _NAME) & _steps(directory, _RECORD_NAME))


def incomplete_steps(directory: Path) -> list[int]:
    """Steps whose ``.pt`` has no record (not a checkpoint: its record was lost)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(_steps(directory, _NAME) - _steps(directory, _RECORD_NAME))


def remove_leftovers(directory: Path) -> None:
    """Remove what killed writers leave: temporary files, records without a ``.pt``, ``.pt`` without a record.

    Only names this module writes are touched; the caller holds the run folder's lock.
    """
    pts, records = _steps(directory, _NAME), _steps(directory, _RECORD_NAME)
    for entry in directory.iterdir():
        if _TEMPORARY.match(entry.name):
            entry.unlink(missing_ok=True)
    for step in records - pts:
        record_path(checkpoint_path(directory, step)).unlink(missing_ok=True)
    for step in pts - records:
        logger.warning("removing incomplete checkpoint %s (no checksum record)", checkpoint_path(directory, step))
        checkpoint_path(directory, step).unlink(missing_ok=True)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int,
                    on_stage: StageCallback | None = None) -> Path:
    """Write ``state`` (plus format tag, step and RNG states) as the checkpoint of ``step``; keep the newest ``keep``.

    ``state`` must hold plain data only (tensors, dicts, lists, tuples, strings, numbers, None): the loader
    refuses anything else. Leftovers of a killed writer are removed first. ``on_stage(stage, path)``, if given,
    is called at the two points between writing and committing (see ``StageCallback``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    from mileloss.train import dcp

    dcp.remove_leftovers(directory)  # staging folders of a killed sharded writer (a run resumed without fsdp)
    path = checkpoint_path(directory, step)
    record = record_path(path)
    # an existing pair of this step is replaced: remove the .pt first so that no moment pairs it with a new record
    path.unlink(missing_ok=True)
    record.unlink(missing_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "rng": rng_state(), **state, "step": step}
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    record_tmp = directory / f".{record.name}.tmp-{os.getpid()}"
    try:
        def write_payload(handle):
            writer = _HashingWriter(handle)
            torch.save(payload, writer)
            return writer.digest.hexdigest(), writer.size

        digest, size = _write_durably(tmp, write_payload)
        if on_stage is not None:
            on_stage("payload_written", tmp)
        text = json.dumps({"format": FORMAT, "version": VERSION, "step": step, "file": path.name, "bytes": size,
                           "sha256": digest}, indent=2) + "\n"
        _write_durably(record_tmp, lambda handle: handle.write(text.encode()))
        os.replace(record_tmp, record)
        _fsync_directory(directory)
        if on_stage is not None:
            on_stage("record_written", record)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        record_tmp.unlink(missing_ok=True)
        if not path.exists():
            record.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    from mileloss.train.dcp import remove_folder, sharded_checkpoint_path

    sharded = sharded_checkpoint_path(directory, step)
    if sharded.is_dir() and not sharded.is_symlink():  # a sharded checkpoint of the same step is superseded
        remove_folder(sharded)
    prune_checkpoints(directory, keep)
    logger.info("checkpoint written: %s", path)
    return path


def _read_record(path: Path) -> dict[str, Any]:
    record = record_path(path)
    if not record.is_file():
        raise CheckpointError(
            f"{path} has no checksum record {record.name}: the checkpoint is incomplete (its writer was killed, or "
            f"it was written by a mileloss older than checkpoint version {VERSION}); refusing to load it"
        )
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read checksum record {record}: {error}") from None
    expected = {"format": FORMAT, "version": VERSION, "file": path.name}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in expected.items()) or not (
            isinstance(data.get("bytes"), int) and isinstance(data.get("sha256"), str)):
        raise CheckpointError(f"{record} is not the checksum record of a {FORMAT} version {VERSION} for {path.name}")
    return data


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check ``path`` against its record (size, sha256) without unpickling it; returns the record.

    Raises:
        CheckpointError: no readable record (an incomplete checkpoint).
        CheckpointChecksumError: the file's size or sha256 differs from the record.
    """
    path = Path(path)
    record = _read_record(path)
    try:
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointChecksumError(
                f"{path} has {size} bytes but its record {record_path(path).name} says {record['bytes']}: the "
                f"file is truncated or corrupted; refusing to resume from it"
            )
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if digest.hexdigest() != record["sha256"]:
        raise CheckpointChecksumError(
            f"{path}: sha256 {digest.hexdigest()} differs from {record['sha256']} in its record "
            f"{record_path(path).name}: the file is corrupted; refusing to resume from it"
        )
    return record


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, after checking it against its record.

    The file is unpickled with ``torch.load(weights_only=True)``: only tensors and plain containers are built.

    Raises:
        CheckpointError: no record (incomplete), unreadable file, or not a mileloss checkpoint of this version.
        CheckpointChecksumError: the file differs from its record (truncated or corrupted).
        UnsafeCheckpointError: the file asks for objects beyond plain data (it is not loaded).
    """
    path = Path(path)
    verify_checkpoint(path)
    payload = read_plain(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} (this code reads {VERSION})")
    if not isinstance(payload.get("step"), int):
        raise CheckpointError(f"{path}: malformed checkpoint (step {payload.get('step')!r})")
    return payload


def read_plain(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, nothing else is built.

    Call it after the file's checksum was verified.

    Raises:
        UnsafeCheckpointError: the file asks for any other object (it is not loaded).
        CheckpointError: the file cannot be read as a ``torch.save`` file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[-1].strip() if str(error).strip() else type(error).__name__
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data ({reason})"
        ) from None
    except Exception as error:  # checksummed but unreadable: written by something else
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, ``.pt`` pairs and sharded folders alike."""
    from mileloss.train.dcp import remove_folder, sharded_checkpoint_path, sharded_checkpoint_steps

    sharded = set(sharded_checkpoint_steps(directory))
    for old in sorted(set(checkpoint_steps(directory)) | sharded)[:-keep]:
        checkpoint_path(directory, old).unlink(missing_ok=True)  # the .pt first: a record alone is not a checkpoint
        record_path(checkpoint_path(directory, old)).unlink(missing_ok=True)
        if old in sharded:
            folder = sharded_checkpoint_path(directory, old)
            (folder / "mileloss_checkpoint.json").unlink(missing_ok=True)  # the manifest first: then not a checkpoint
            remove_folder(folder)


def check_training_state(payload: dict[str, Any], path: Path, sharded: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` has everything a resumed training run needs.

    ``sharded``: ``payload`` is the plain-data part of a sharded checkpoint (model and optimizer tensors are in its
    DCP files, the optimizer's hyper-parameters in ``param_groups``).
    """
    required = [k for k in _REQUIRED if k not in ("model", "optimizer")] + ["param_groups"] if sharded else _REQUIRED
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; it cannot resume training")
    if not isinstance(payload["config"], dict) or not isinstance(payload["world_size"], int) or not isinstance(
            payload["tokens"], int) or payload["step"] < 1 or payload["tokens"] < 0:
        raise CheckpointError(f"{path}: malformed checkpoint (step, tokens, config or world_size of the wrong type "
                              f"or out of range)")


def latest_checkpoint(directory: Path) -> Path | None:
    """Path of the newest complete checkpoint, ``step_N.pt`` (with its record) or sharded ``step_N/`` (with its
    manifest), or ``None``.

    A newer ``.pt`` without a record, or ``step_N/`` without a manifest, is incomplete: skipped with a warning.
    """
    from mileloss.train.dcp import incomplete_sharded_steps, sharded_checkpoint_path, sharded_checkpoint_steps

    plain, sharded = checkpoint_steps(directory), sharded_checkpoint_steps(directory)
    newest = max(plain[-1:] + sharded[-1:], default=-1)
    path = None if newest < 0 else (
        sharded_checkpoint_path(directory, newest) if newest in sharded else checkpoint_path(directory, newest))
    for step in incomplete_steps(directory):
        if step > newest:
            logger.warning("ignoring incomplete checkpoint %s (no checksum record %s); using %s",
                           checkpoint_path(directory, step), record_path(checkpoint_path(directory, step)).name,
                           path.name if path else "none")
    for step in incomplete_sharded_steps(directory):
        if step > newest:
            logger.warning("ignoring incomplete sharded checkpoint %s (no manifest); using %s",
                           sharded_checkpoint_path(directory, step), path.name if path else "none")
    return path


def all_checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints of both kinds, ascending."""
    from mileloss.train.dcp import sharded_checkpoint_steps

    return sorted(set(checkpoint_steps(directory)) | set(sharded_checkpoint_steps(directory)))
