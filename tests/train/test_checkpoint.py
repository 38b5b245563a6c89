"""Checkpoint files: atomic writes, keep-last-K, RNG round trip, clear errors on bad files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mileloss.train.checkpoint import (
    CheckpointChecksumError,
    CheckpointError,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_only_the_newest_checkpoints_are_kept_and_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".step_00000002.pt.tmp-999").write_bytes(b"half a file")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, keep=2)
    assert checkpoint_steps(tmp_path) == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002.json", "step_00000002.pt", "step_00000003.json", "step_00000003.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"].tolist() == [3.0, 3.0]


def test_checkpoint_restores_every_rng_state(tmp_path):
    from mileloss.train.checkpoint import set_rng_state

    save_checkpoint(tmp_path, 1, {}, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_truncated_or_foreign_files_raise_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.zeros(1000)}}, keep=1)
    path = latest_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointChecksumError, match="step_00000005.pt has 200 bytes.*truncated"):
        load_checkpoint(path)
    foreign = tmp_path / "other.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="no checksum record other.json"):
        load_checkpoint(foreign)
    # a foreign file that comes with a matching record is still not a mileloss checkpoint
    import hashlib
    import json

    (tmp_path / "other.json").write_text(json.dumps({
        "format": "mileloss-checkpoint", "version": 2, "step": 1, "file": "other.pt",
        "bytes": foreign.stat().st_size, "sha256": hashlib.sha256(foreign.read_bytes()).hexdigest()}))
    with pytest.raises(CheckpointError, match="not a mileloss-checkpoint"):
        load_checkpoint(foreign)


def test_resumed_metrics_drop_lines_after_the_checkpoint_and_a_cut_short_last_line(tmp_path):
    from mileloss.train.metrics import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log("train", step=step, tokens=step, loss=1.0, lr=0.1, grad_norm=1.0, tokens_per_second=1.0, time=0.0)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # killed mid-write
    MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    assert [line["step"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
