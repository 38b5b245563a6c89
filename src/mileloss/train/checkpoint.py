"""Resumable checkpoints, written atomically.

A checkpoint is one ``torch.save`` file ``RUN_DIR/checkpoints/step_XXXXXXXX.pt`` holding the model, optimiser,
scheduler and data-loader states, every RNG state (python, numpy, torch, CUDA), the step, the token count and
the resolved config. Writing goes to a temporary file in the same directory, which is flushed and fsynced,
then ``os.replace``-d onto the final name and the directory is fsynced: a crash at any moment leaves either
the previous checkpoints or the new complete one, never a truncated ``step_*.pt``.

Test hook: with ``MILELOSS_TEST_CHECKPOINT_SLEEP=<step>:<seconds>`` the writer of that step's checkpoint sleeps
once, part-way through writing the temporary file, so a test can kill the process while a checkpoint is being
written.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^step_(\d{8})\.pt$")
FORMAT = "mileloss-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def rng_state() -> dict[str, Any]:
    """Every random-number-generator state a training step may consume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SleepOnceWriter:
    """File wrapper that pauses once after the first half-megabyte (the ``MILELOSS_TEST_CHECKPOINT_SLEEP`` hook)."""

    def __init__(self, handle, seconds: float):
        self.handle, self.seconds, self.written = handle, seconds, 0

    def write(self, data) -> int:
        count = self.handle.write(data)
        self.written += count
        if self.seconds and self.written >= (1 << 19):
            self.handle.flush()
            logger.warning("test hook: sleeping %.1fs inside a checkpoint write", self.seconds)
            time.sleep(self.seconds)
            self.seconds = 0.0
        return count

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_sleep(step: int) -> float:
    hook = os.environ.get("MILELOSS_TEST_CHECKPOINT_SLEEP", "")
    if not hook:
        return 0.0
    hook_step, seconds = hook.split(":")
    return float(seconds) if int(hook_step) == step else 0.0


def atomic_torch_save(obj: Any, path: Path, sleep: float = 0.0) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file (or none) or the complete new one.

    ``sleep`` > 0 pauses part-way through the write (test hook).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, _SleepOnceWriter(handle, sleep) if sleep else handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, ascending (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` (plus format tag, step and RNG states) as the checkpoint of ``step``; keep the newest ``keep``.

    Stale temporary files left by a killed writer are removed first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "step": step, "rng": rng_state(), **state}
    path = checkpoint_path(directory, step)
    atomic_torch_save(payload, path, sleep=_test_sleep(step))
    for old in checkpoint_steps(directory)[:-keep]:
        checkpoint_path(directory, old).unlink(missing_ok=True)
    logger.info("checkpoint written: %s", path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: unreadable file or not a mileloss checkpoint.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} (this code reads {VERSION})")
    return payload


def latest_checkpoint(directory: Path) -> Path | None:
    """Path of the newest complete checkpoint, or ``None``."""
    steps = checkpoint_steps(directory)
    return checkpoint_path(directory, steps[-1]) if steps else None
