"""Helpers of the training tests: tiny run overrides and running ``mileloss train`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(data_dir: Path, out: Path, **extra) -> list[str]:
    """Overrides for a 2-layer tiny model, 4 x 32-token batches, 12 steps, deterministic on one CPU thread."""
    values = {
        "data.dir": data_dir, "run.out": out, "model.preset": "tiny", "model.num_hidden_layers": 2,
        "run.batch_size": 4, "run.seq_len": 32, "run.max_steps": 12, "run.eval_every": 6, "run.eval_batches": 2,
        "run.checkpoint_every": 4, "run.log_every": 1, "run.progress": "false", "run.device": "cpu",
        "optim.warmup_steps": 3, "optim.lr": 3e-3, "loss.kind": "mile",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def train_command(args: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "mileloss", "train", *args, *(["--resume"] if resume else []), "--quiet"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(extra)
    return env


def run_training(args: list[str], resume: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run ``mileloss train`` in a fresh process and fail the test with its stderr if it fails."""
    result = subprocess.run(train_command(args, resume), env=subprocess_env(**env), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
