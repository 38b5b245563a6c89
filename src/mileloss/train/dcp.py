"""Sharded checkpoints (``run.parallel=fsdp``) in Distributed Checkpoint (DCP) format: atomic, checksummed, and
read without running anything from disk.

A sharded checkpoint of step N is a folder ``RUN_DIR/checkpoints/step_0000000N/`` holding:

* ``__R_I.distcp`` and ``.metadata``: what ``torch.distributed.checkpoint.save`` writes for the model and the
  AdamW state (``{"model": ..., "optimizer": ...}``, fully-qualified parameter names, each rank its own shards).
  Only tensors go in: the DCP part holds no pickled Python objects besides its ``.metadata`` index.
* ``trainer.pt``: the rest of the training state as plain data (step, tokens, optimizer hyper-parameters, scheduler,
  data-loader position, RNG states, resolved config, world size, data fingerprint), written with ``torch.save``
  and read with ``torch.load(weights_only=True)``.
* ``mileloss_checkpoint.json``: the manifest ``{"format", "version", "step", "world_size", "files": {name:
  {"bytes", "sha256"}}}`` of every other file in the folder.

Writing: every rank writes its shards into a staging folder ``.step_0000000N.staging`` (its own shards' sizes and
sha256 are computed by the rank that wrote them, in parallel); rank 0 then writes ``trainer.pt`` and the manifest
(each flushed and fsynced) and renames the staging folder onto ``step_0000000N``. That rename is the commit: a
process killed at any moment leaves the previous checkpoints plus, at worst, a staging folder, which is not a
checkpoint (:func:`sharded_checkpoint_steps` lists only ``step_N`` folders with a manifest) and which the next save
removes. ``run.out`` must be a folder every rank sees (one machine, or a shared file system), as for any DCP
checkpoint; a rank whose shards rank 0 cannot see fails the save with :class:`CheckpointError`.

Reading runs no code from disk. DCP reads ``.metadata`` with :func:`pickle.load` and would read a "bytes" entry
with ``torch.load(weights_only=False)``; so, before DCP reads anything: (1) every file is checked against the
manifest (names, sizes, sha256: a truncated, bit-flipped, missing or extra file is refused with
:class:`CheckpointChecksumError`), the ranks sharing the hashing; (2) ``.metadata`` is unpickled here by an
allow-list unpickler that builds only DCP's own metadata records, ``torch.Size``, dtypes, layouts and paths
(anything else, e.g. a crafted ``__reduce__``, raises :class:`UnsafeCheckpointError`, the manifest
notwithstanding: the checksum guards against damage, the allow-list against a forged file); (3) every entry to load
must be a tensor entry in that index, and the load planner refuses any "bytes" read. DCP then receives the
already-checked index (it does not unpickle the file again) and reads the tensors with ``torch.load(weights_only=
True)``.

Loading reshards: the checkpoint of W ranks loads into any number of FSDP ranks, into DDP ranks or into one process
(each then receives whole tensors). A plain ``.pt`` checkpoint (single process or DDP) loads into an FSDP model
through :func:`apply_full_state`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mileloss.errors import CheckpointChecksumError, CheckpointError, UnsafeCheckpointError
from mileloss.train import checkpoint as plain

logger = logging.getLogger(__name__)

__all__ = ["apply_full_state", "is_sharded_checkpoint", "load_sharded_checkpoint", "read_sharded_trainer_state",
           "save_sharded_checkpoint", "sharded_checkpoint_path", "sharded_checkpoint_steps",
           "verify_sharded_checkpoint"]

FORMAT = "mileloss-dcp-checkpoint"
VERSION = 1
MANIFEST = "mileloss_checkpoint.json"
TRAINER = "trainer.pt"
METADATA = ".metadata"
DIR_NAME = re.compile(r"^step_(\d{8})$")
STAGING = re.compile(r"^\.step_(\d{8})\.(staging|old-[0-9a-f]{8})$")  # a killed writer's, or a replaced checkpoint
SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
CONTENT = (SHARD_FILE, re.compile(rf"^({re.escape(METADATA)}|{re.escape(TRAINER)}|{re.escape(MANIFEST)})$"),
           re.compile(r"^(__\d+)?\.metadata\.tmp$"), re.compile(r"^\.[\w.]+\.tmp-\d+$"))
"""Names this module (and DCP inside it) writes in a checkpoint or staging folder."""
_BLOCK = 16 * 2**20


def sharded_checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def is_sharded_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and not Path(path).is_symlink() and bool(DIR_NAME.match(Path(path).name))


def sharded_checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the committed sharded checkpoints (``step_N/`` holding a manifest) in ``directory``, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir()  # a symbolic link is never one of ours
                  if (m := DIR_NAME.match(p.name)) and p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file())


def incomplete_sharded_steps(directory: Path) -> list[int]:
    """``step_N/`` folders without a manifest (not checkpoints: emptied or tampered with by hand)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir()
                  if (m := DIR_NAME.match(p.name)) and p.is_dir() and not (p / MANIFEST).is_file())


def is_own_content(name: str) -> bool:
    return any(pattern.match(name) for pattern in CONTENT)


def remove_folder(folder: Path) -> bool:
    """Remove a checkpoint or staging ``folder`` if it holds only names this module writes; else leave it, warn and
    return False (nothing is removed that mileloss did not write)."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    foreign = [e.name for e in entries if not (is_own_content(e.name) and e.is_file() and not e.is_symlink())]
    if foreign or folder.is_symlink():
        logger.warning("not removing %s: it holds files mileloss did not write (%s)", folder, ", ".join(foreign[:4]))
        return False
    for entry in entries:
        entry.unlink(missing_ok=True)
    folder.rmdir()
    return True


def remove_leftovers(directory: Path) -> None:
    """Remove staging folders of killed writers and folders of replaced checkpoints (the caller holds the lock)."""
    for entry in Path(directory).iterdir():
        if STAGING.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            remove_folder(entry)


def _sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _agree(context, failure: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed; the failing rank raises its own error, the others name it."""
    if context.world_size > 1:
        flag = torch.tensor([0.0 if failure is None else 1.0 + context.rank])
        flags = [torch.zeros(1) for _ in range(context.world_size)]
        dist.all_gather(flags, flag, group=_cpu_group())
        failed = [int(f.item()) - 1 for f in flags if f.item() > 0]
        if failure is None and failed:
            raise CheckpointError(f"{what} failed on rank {failed[0]} (its log says why)")
    if failure is not None:
        raise failure


_GLOO: dict = {}


def _cpu_group():
    """A gloo group for the small agreement messages (the default group may be NCCL, which needs CUDA tensors)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _GLOO.get("world") is not world:  # one per process group (a new one after destroy/init)
        _GLOO.update(world=world, group=dist.new_group(backend="gloo"))
    return _GLOO["group"]


def gather_from_ranks(context, value: Any) -> list[Any]:
    if context.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value, group=_cpu_group())  # in memory between ranks, never from disk
    return gathered


# --- reading .metadata without running code -------------------------------------------------------------------------

def _allowed(module: str, name: str):
    from torch.distributed.checkpoint import filesystem, metadata

    if module == "torch.distributed.checkpoint.metadata" and name in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        return getattr(metadata, name)
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        return filesystem._StorageInfo
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch.serialization" and name == "_get_layout":
        return _layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        return _path
    return None


def _layout(name: str):
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise UnsafeCheckpointError(f"unknown tensor layout {name!r} in DCP metadata")
    return layout


def _path(*parts):
    return os.path.join(*(str(p) for p in parts)) if parts else ""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")
        return found


def read_metadata(folder: Path):
    """The DCP index ``folder/.metadata`` unpickled with the allow-list (see the module docstring).

    Raises:
        UnsafeCheckpointError: the file asks for any other object.
        CheckpointError: it is not DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA
    try:
        data = path.read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, UnsafeCheckpointError) as error:
        raise UnsafeCheckpointError(f"refusing to load {path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - anything else a damaged pickle raises
        raise CheckpointError(f"cannot read DCP metadata {path}: {type(error).__name__}: {error}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
            metadata.storage_data, dict):
        raise CheckpointError(f"{path} is not DCP checkpoint metadata")
    return metadata


def _safe_reader(folder: Path, metadata):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    for info in metadata.storage_data.values():  # every read stays inside the checked folder
        if not isinstance(info, _StorageInfo) or not SHARD_FILE.match(str(info.relative_path)):
            raise UnsafeCheckpointError(f"{folder}/{METADATA}: a storage entry names {info!r}, not one of its shard "
                                        f"files")

    class CheckedReader(FileSystemReader):
        """DCP's file reader given the index this module already checked (DCP does not unpickle it again)."""

        def read_metadata(self, *args, **kwargs):
            return metadata

    return CheckedReader(folder)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        """DCP's load planner without its one unsafe path: a "bytes" entry would be read with torch.load of
        arbitrary pickles; this checkpoint format has none, so one is refused."""

        def load_bytes(self, read_item, value):
            raise UnsafeCheckpointError(f"refusing to unpickle the non-tensor entry {read_item.dest_index.fqn!r} "
                                        f"of a sharded checkpoint")

    return TensorsOnlyPlanner()


# --- writing ---------------------------------------------------------------------------------------------------------

def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _dcp_reason(error: Exception) -> str:
    """One line from DCP's ``CheckpointException`` (a traceback per failed rank) or any other error."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(sorted(failures.items())))
        inner = failure[0] if isinstance(failure, tuple) and failure else failure  # (exception, stack)
        return f"rank {rank}: {type(inner).__name__}: {' '.join(str(inner).split())[:300]}"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def save_sharded_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], keep: int, context,
                            on_stage: plain.StageCallback | None = None) -> Path:
    """Write the sharded checkpoint of ``step`` (a collective: every rank calls it); keep the newest ``keep``.

    ``state`` is the plain-data part (as for :func:`~mileloss.train.checkpoint.save_checkpoint`, without model and
    optimizer); rank 0's RNG states are added. ``on_stage(stage, path)`` runs on rank 0 at ``"shards_written"``
    (every shard in the staging folder, nothing else) and ``"manifest_written"`` (the staging folder complete, not
    yet renamed).

    Raises:
        CheckpointError: on every rank, if any rank could not write its part.
    """
    directory = Path(directory)
    final = sharded_checkpoint_path(directory, step)
    staging = directory / f".{final.name}.staging"
    failure = None
    if context.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            plain.remove_leftovers(directory)
            remove_leftovers(directory)
            if staging.exists():
                raise CheckpointError(f"cannot write {final}: {staging} holds files mileloss did not write")
            staging.mkdir()
        except (OSError, CheckpointError) as error:
            failure = error if isinstance(error, CheckpointError) else CheckpointError(
                f"cannot create {staging}: {error}")
    _agree(context, failure, f"creating {staging}")

    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _state_dicts(model, optimizer)
    param_groups = optimizer_state["param_groups"]
    writer = dcp.FileSystemWriter(staging, single_file_per_rank=True, sync_files=True, thread_count=1)
    try:
        with warnings.catch_warnings():  # one process (tests, tools) is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_state, "optimizer": optimizer_state["state"]}, storage_writer=writer,
                     no_dist=not (dist.is_available() and dist.is_initialized()))
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP raises every rank's failure on all
        reason = _dcp_reason(error)
        raise CheckpointError(f"writing the shards of {final} failed ({reason}); the previous checkpoints are "
                              f"intact, {staging.name} is removed by the next save") from None
    del model_state, optimizer_state
    mine = {}
    failure = None
    try:
        for entry in sorted(staging.iterdir()):
            if SHARD_FILE.match(entry.name) and entry.name.startswith(f"__{context.rank}_"):
                size, digest = _sha256(entry)
                mine[entry.name] = {"bytes": size, "sha256": digest}
    except OSError as error:
        failure = CheckpointError(f"rank {context.rank} cannot read back its shards in {staging}: {error}")
    _agree(context, failure, f"hashing the shards of {final}")
    files: dict[str, dict] = {}
    for part in gather_from_ranks(context, mine):
        files.update(part)
    failure = None
    if context.is_main:
        try:
            _commit(staging, final, directory, step, files, param_groups, state, context, keep, on_stage)
        except BaseException as error:  # noqa: BLE001 - re-raised on every rank by _agree
            failure = CheckpointError(f"cannot write {final}: {error}") if isinstance(error, OSError) else error
    _agree(context, failure, f"committing {final}")
    return final


def _commit(staging: Path, final: Path, directory: Path, step: int, files: dict, param_groups, state: dict,
            context, keep: int, on_stage) -> None:
    metadata = read_metadata(staging)  # the index just written must pass the reader's own allow-list
    referenced = {str(info.relative_path) for info in metadata.storage_data.values()}
    present = {entry.name for entry in staging.iterdir()}
    if not referenced <= set(files) or not referenced <= present:
        missing = sorted(referenced - (set(files) & present))
        raise CheckpointError(f"the shards {', '.join(missing[:4])} of {final} are not in {staging}: every rank must "
                              f"write into the same run.out (one machine or a shared file system)")
    for name in sorted(present - set(files) - {METADATA}):
        raise CheckpointError(f"{staging} holds {name}, which no rank wrote")
    if on_stage is not None:
        on_stage("shards_written", staging)
    size, digest = _sha256(staging / METADATA)
    files = {**files, METADATA: {"bytes": size, "sha256": digest}}
    payload = {"format": FORMAT, "version": VERSION, "rng": plain.rng_state(), **state, "step": step,
               "param_groups": param_groups}
    trainer = staging / TRAINER

    def write_payload(handle):
        writer = plain._HashingWriter(handle)
        torch.save(payload, writer)
        return writer.digest.hexdigest(), writer.size

    digest, size = plain._write_durably(trainer, write_payload)
    files[TRAINER] = {"bytes": size, "sha256": digest}
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": context.world_size,
                "files": dict(sorted(files.items()))}
    text = json.dumps(manifest, indent=2) + "\n"
    plain._write_durably(staging / MANIFEST, lambda handle: handle.write(text.encode()))
    plain._fsync_directory(staging)
    if on_stage is not None:
        on_stage("manifest_written", staging)
    if final.exists() or final.is_symlink():  # a checkpoint of this step from an abandoned branch: set it aside
        aside = directory / f".{final.name}.old-{os.urandom(4).hex()}"
        os.rename(final, aside)
        plain._fsync_directory(directory)
        remove_folder(aside)
    os.rename(staging, final)  # the commit
    plain._fsync_directory(directory)
    plain.checkpoint_path(directory, step).unlink(missing_ok=True)  # a .pt of the same step is superseded
    plain.record_path(plain.checkpoint_path(directory, step)).unlink(missing_ok=True)
    plain.prune_checkpoints(directory, keep)
    logger.info("sharded checkpoint written: %s", final)


# --- reading ---------------------------------------------------------------------------------------------------------

def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is not a complete sharded checkpoint; refusing to "
                              f"load it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    step = DIR_NAME.match(folder.name)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict) or (
            step is None or data.get("step") != int(step.group(1))) or not isinstance(data.get("world_size"), int):
        raise CheckpointError(f"{path} is not the manifest of a {FORMAT} for {folder.name}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: sharded checkpoint version {data.get('version')} (this code reads {VERSION})")
    for name, entry in data["files"].items():
        if not (isinstance(name, str) and is_own_content(name) and isinstance(entry, dict) and isinstance(
                entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)) or name == MANIFEST:
            raise CheckpointError(f"{path}: malformed entry for {name!r}")
    if METADATA not in data["files"] or TRAINER not in data["files"]:
        raise CheckpointError(f"{path} lists no {METADATA} or {TRAINER}")
    return data


def _check_file(path: Path, entry: dict) -> None:
    try:
        if path.is_symlink() or not path.is_file():
            raise CheckpointChecksumError(f"{path}, listed in {MANIFEST}, is missing; refusing to resume from "
                                          f"{path.parent.name}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointChecksumError(f"{path} has {size} bytes but {MANIFEST} says {entry['bytes']}: truncated or "
                                          f"corrupted; refusing to resume from it")
        _, digest = _sha256(path)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if digest != entry["sha256"]:
        raise CheckpointChecksumError(f"{path}: sha256 {digest} differs from {entry['sha256']} in {MANIFEST}: the file "
                                      f"is corrupted; refusing to resume from it")


def verify_sharded_checkpoint(folder: Path, context=None) -> dict[str, Any]:
    """Check every file of ``folder`` against its manifest, before anything in it is unpickled; returns the manifest.

    With a multi-rank ``context`` (a collective) the shard files are hashed by the ranks in turn and every rank
    learns the outcome; ``.metadata`` and ``trainer.pt`` are checked by every rank.

    Raises:
        CheckpointError: no readable manifest (incomplete), or a file the manifest does not list.
        CheckpointChecksumError: a listed file is missing, or its size or sha256 differs.
    """
    folder = Path(folder)
    rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
    failure, manifest = None, None
    try:
        manifest = _read_manifest(folder)
        listed = set(manifest["files"]) | {MANIFEST}
        extra = sorted(e.name for e in folder.iterdir() if e.name not in listed)
        if extra:
            raise CheckpointChecksumError(f"{folder} holds {', '.join(extra[:4])}, which its {MANIFEST} does not list; "
                                          f"refusing to resume from it")
        shards = sorted(name for name in manifest["files"] if name not in (METADATA, TRAINER))
        for name in [METADATA, TRAINER, *shards[rank::world]]:
            _check_file(folder / name, manifest["files"][name])
    except (CheckpointError, OSError) as error:
        failure = error if isinstance(error, CheckpointError) else CheckpointError(f"cannot read {folder}: {error}")
    if context is not None:
        _agree(context, failure, f"verifying {folder}")
    elif failure is not None:
        raise failure
    return manifest


def read_sharded_trainer_state(folder: Path) -> dict[str, Any]:
    """The plain-data part (``trainer.pt``) of a verified sharded checkpoint, with its format checked."""
    path = Path(folder) / TRAINER
    payload = plain.read_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"{path} is not the training state of a {FORMAT} version {VERSION}")
    if payload.get("step") != int(DIR_NAME.match(Path(folder).name).group(1)) or not isinstance(
            payload.get("param_groups"), list):
        raise CheckpointError(f"{path}: malformed training state (step or param_groups)")
    return payload


def load_sharded_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                            context=None, verified: bool = False) -> dict[str, Any]:
    """Verify ``folder`` and load it into ``model`` (FSDP-sharded, DDP's module or plain) and ``optimizer``.

    Every rank calls it (a collective when a process group exists). The checkpoint's world size need not be this
    run's: DCP reshards. Returns the plain-data training state (``trainer.pt``) with ``model``/``optimizer`` loaded.
    Pass ``optimizer=None`` to load the weights only (export); ``verified=True`` if :func:`verify_sharded_checkpoint`
    just passed for this folder (it is not hashed twice).

    Raises:
        CheckpointError, CheckpointChecksumError, UnsafeCheckpointError: see :func:`verify_sharded_checkpoint` and
            the module docstring; also when the saved tensors do not fit ``model``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    folder = Path(folder)
    if not verified:
        verify_sharded_checkpoint(folder, context)
    payload = read_sharded_trainer_state(folder)
    metadata = read_metadata(folder)
    if optimizer is None:
        model_state, optimizer_state = get_model_state_dict(model), None
        target = {"model": model_state}
    else:
        model_state, optimizer_state = _state_dicts(model, optimizer)
        target = {"model": model_state, "optimizer": optimizer_state["state"]}
    wanted = _flat_keys(target)
    saved = metadata.state_dict_metadata
    missing = [key for key in wanted if key not in saved]
    wrong = [key for key in wanted if key in saved and not isinstance(saved[key], TensorStorageMetadata)]
    if missing or wrong:
        what = "missing " + ", ".join(missing[:3]) if missing else "non-tensor " + ", ".join(wrong[:3])
        raise CheckpointError(f"{folder}: the saved model or optimizer state does not fit this run: {what}")
    for key in wanted:
        shape = tuple(saved[key].size)
        if shape != wanted[key]:
            raise CheckpointError(f"{folder}: the saved model or optimizer state does not fit this run: {key} has "
                                  f"shape {shape} in the checkpoint, {wanted[key]} in this model")
    try:
        with warnings.catch_warnings():  # one process (export, or resume without a process group) is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=_safe_reader(folder, metadata), planner=_safe_planner(),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP wraps rank failures (a BaseException)
        inner = getattr(error, "failures", None) or {}
        if any(isinstance(f[0] if isinstance(f, tuple) else f, UnsafeCheckpointError) for f in inner.values()) or (
                "UnsafeCheckpointError" in str(error)):
            raise UnsafeCheckpointError(f"refusing to load {folder}: it holds a non-tensor entry") from None
        raise CheckpointError(f"cannot load the sharded checkpoint {folder}: {_dcp_reason(error)}") from None
    if optimizer is None:
        set_model_state_dict(model, model_state)
        return payload
    groups = payload["param_groups"]
    if [g.get("params") for g in groups if isinstance(g, dict)] != [g["params"] for g in optimizer_state[
            "param_groups"]]:
        raise CheckpointError(f"{folder}: the saved optimizer's parameter groups do not fit this model")
    optimizer_state["param_groups"] = groups
    try:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{folder}: the saved model or optimizer state does not fit this run: {reason}") from None
    return payload


def _flat_keys(state: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """DCP's flattened names (``model.<fqn>``, ``optimizer.<fqn>.exp_avg``) and the full shape of each tensor."""
    from torch.distributed.tensor import DTensor

    keys: dict[str, tuple[int, ...]] = {}
    for name, value in state.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            keys.update(_flat_keys(value, key + "."))
        elif isinstance(value, torch.Tensor):
            keys[key] = tuple(value.shape) if not isinstance(value, DTensor) else tuple(value.size())
        else:
            raise CheckpointError(f"internal: non-tensor {key!r} in a sharded state")
    return keys


def apply_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optimizer_state: dict) -> None:
    """Load a whole (unsharded) model and ``optimizer.state_dict()`` of a ``.pt`` checkpoint into a sharded model.

    The ``.pt``'s optimizer state is keyed by parameter index (the order of ``build_optimizer``'s groups); it is
    re-keyed by parameter name first, then each rank keeps its shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    _, template = get_state_dict(model, optimizer)
    names = [name for group in template["param_groups"] for name in group["params"]]
    saved_groups = optimizer_state["param_groups"]
    indices = [index for group in saved_groups for index in group["params"]]
    if len(indices) != len(names) or [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in template["param_groups"]]:
        raise CheckpointError("the saved optimizer's parameter groups do not fit this model")
    by_index = dict(zip(indices, names, strict=True))
    state = {by_index[index]: value for index, value in optimizer_state["state"].items()}
    groups = [{**group, "params": [by_index[i] for i in group["params"]]} for group in saved_groups]
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))

