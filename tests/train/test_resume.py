"""Fault tolerance: a run killed with SIGKILL and resumed reproduces the uninterrupted loss curve bitwise."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mileloss.train import load_config, train
from mileloss.train.checkpoint import checkpoint_steps, load_checkpoint
from mileloss.train.metrics import read_metrics
from tests.train._train_utils import run_training, subprocess_env, tiny_overrides, train_command

# One thread: CPU float reductions are then bitwise reproducible across processes.
THREADS = {"run.num_threads": 1}


@pytest.fixture
def uninterrupted(data_dir, tmp_path) -> Path:
    """The reference run, in this process (same single thread as the subprocesses)."""
    out = tmp_path / "uninterrupted"
    threads = torch.get_num_threads()
    try:
        train(load_config(None, tiny_overrides(data_dir, out, **THREADS)))
    finally:
        torch.set_num_threads(threads)
    return out


def _curve(run_dir: Path) -> list[tuple]:
    """Every logged number except wall-clock ones, step by step."""
    lines = read_metrics(run_dir / "metrics.jsonl")
    return [(line["kind"], line["step"], line["tokens"], line.get("loss"), line.get("lr"), line.get("grad_norm"),
             line.get("val_loss")) for line in lines]


def _start_and_kill_when(args: list[str], ready, env: dict[str, str], timeout: float = 120.0) -> None:
    """Start ``mileloss train``; SIGKILL it as soon as ``ready()`` is true."""
    process = subprocess.Popen(train_command(args), env=subprocess_env(**env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"training ended (rc {process.returncode}) before the kill point: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("kill point not reached in time")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def test_resume_after_sigkill_matches_uninterrupted_curve(data_dir, tmp_path, uninterrupted):
    """Killed twice: once after a checkpoint, once while writing one; each time resumed; same curve bitwise."""
    out = tmp_path / "killed"
    args = tiny_overrides(data_dir, out, **THREADS)

    def after_step_6() -> bool:  # checkpoint 4 is written; steps 5-6 are logged but not checkpointed
        path = out / "metrics.jsonl"
        try:
            return path.exists() and any(line["step"] == 6 for line in read_metrics(path, "train"))
        except ValueError:  # a line being written
            return False

    _start_and_kill_when(args, after_step_6, {"MILELOSS_TEST_SLEEP_AFTER_STEP": "6:60"})
    assert checkpoint_steps(out / "checkpoints") == [4]

    def writing_checkpoint_8() -> bool:
        return any((out / "checkpoints").glob(".step_00000008.pt.tmp-*"))

    _start_and_kill_when([*args, "--resume"], writing_checkpoint_8, {"MILELOSS_TEST_CHECKPOINT_SLEEP": "8:60"})
    assert checkpoint_steps(out / "checkpoints") == [4]  # the half-written file is not a checkpoint
    assert load_checkpoint(out / "checkpoints" / "step_00000004.pt")["step"] == 4

    run_training(args, resume=True)
    assert _curve(out) == _curve(uninterrupted)
    assert checkpoint_steps(out / "checkpoints") == [8, 12]
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the stale temporary file was cleaned up
