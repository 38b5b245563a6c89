"""Fault tolerance: a run killed with SIGKILL and resumed reproduces the uninterrupted loss curve bitwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mileloss.run_folder import LOCK as LOCK_NAME
from mileloss.train.checkpoint import checkpoint_steps, load_checkpoint
from mileloss.train.metrics import read_metrics
from tests.train._train_utils import run_and_kill_at, run_training, tiny_overrides, train_here

# One thread: CPU float reductions are then bitwise reproducible across processes.
THREADS = {"run.num_threads": 1}


@pytest.fixture
def uninterrupted(data_dir, tmp_path) -> Path:
    """The reference run, in this process (same single thread as the subprocesses)."""
    out = tmp_path / "uninterrupted"
    train_here(tiny_overrides(data_dir, out, **THREADS))
    return out


def _curve(run_dir: Path) -> list[tuple]:
    """Every logged number except wall-clock ones, step by step."""
    lines = read_metrics(run_dir / "metrics.jsonl")
    return [(line["kind"], line["step"], line["tokens"], line.get("loss"), line.get("lr"), line.get("grad_norm"),
             line.get("val_loss")) for line in lines]


def test_resume_after_sigkill_matches_uninterrupted_curve(data_dir, tmp_path, uninterrupted):
    """Killed four times: between steps, in the middle of a checkpoint's bytes, with the checkpoint written but
    uncommitted, and with its record committed but not the checkpoint; each time the folder holds only complete,
    verified checkpoints, the stale lock is taken over, and the resumed run gives the same curve bitwise."""
    out = tmp_path / "killed"
    args = tiny_overrides(data_dir, out, **THREADS)

    run_and_kill_at(tmp_path, args, after_step=6)  # checkpoint 4 is written; steps 5-6 logged, not checkpointed
    assert checkpoint_steps(out / "checkpoints") == [4]
    assert (out / LOCK_NAME).exists()  # left by the killed trainer
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl", "train")][-1] == 6

    run_and_kill_at(tmp_path, args, resume=True, checkpoint_bytes=[8, 1 << 19])
    assert [p.name for p in (out / "checkpoints").glob(".step_00000008.pt.tmp-*")]  # half a file, not a checkpoint
    assert checkpoint_steps(out / "checkpoints") == [4]

    run_and_kill_at(tmp_path, args, resume=True, checkpoint_stage=[8, "payload_written"])
    assert checkpoint_steps(out / "checkpoints") == [4]

    run_and_kill_at(tmp_path, args, resume=True, checkpoint_stage=[8, "record_written"])
    assert (out / "checkpoints" / "step_00000008.json").exists()  # a record without its checkpoint
    assert checkpoint_steps(out / "checkpoints") == [4]
    assert load_checkpoint(out / "checkpoints" / "step_00000004.pt")["step"] == 4

    run_training(args, resume=True)
    assert _curve(out) == _curve(uninterrupted)
    assert checkpoint_steps(out / "checkpoints") == [8, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000008.json", "step_00000008.pt", "step_00000012.json", "step_00000012.pt"]  # leftovers removed
    assert not (out / LOCK_NAME).exists()  # released at the end
    final = load_checkpoint(out / "checkpoints" / "step_00000012.pt")["model"]
    reference = load_checkpoint(uninterrupted / "checkpoints" / "step_00000012.pt")["model"]
    assert all(torch.equal(final[name], value) for name, value in reference.items())
