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


def train_here(args: list[str], resume: bool = False):
    """Run ``mileloss.train`` in this process on ``args`` (overrides) and restore torch's thread count after it
    (a run sets ``run.num_threads``), so that later tests run with the threads they started with."""
    import torch

    from mileloss.train import load_config, train

    threads = torch.get_num_threads()
    try:
        return train(load_config(None, args), resume=resume)
    finally:
        torch.set_num_threads(threads)


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


# A training process that pauses at a chosen point so that a test can SIGKILL it there. It is written by the test
# into its tmp_path and run with `python SCRIPT PLAN_JSON OVERRIDES...`; PLAN_JSON holds "ready" (a file created when
# the pause point is reached), "resume", and one pause point: "after_step": k (after step k is logged, evaluated and
# checkpointed), "checkpoint_stage": [k, stage] (inside the checkpoint write of step k, see checkpoint.StageCallback),
# or "checkpoint_bytes": [k, n] (after n bytes of step k's checkpoint reached the temporary file).
PAUSING_TRAINER = '''
import json
import sys
import time
from pathlib import Path

import mileloss.train.checkpoint as checkpoint
from mileloss.train import TrainHooks, load_config, train

plan = json.loads(sys.argv[1])
ready = Path(plan["ready"])
current = {"step": 0}


def pause():
    ready.write_text("paused")
    time.sleep(600)


def step_start(step, model):
    current["step"] = step


def step_end(step):
    if step == plan.get("after_step"):
        pause()


def checkpoint_stage(stage, path):
    step, wanted = plan.get("checkpoint_stage", (None, None))
    if stage == wanted and f"step_{step:08d}" in path.name:
        pause()


if "checkpoint_bytes" in plan:
    step, size = plan["checkpoint_bytes"]
    write = checkpoint._HashingWriter.write

    def write_then_pause(self, data):
        count = write(self, data)
        if current["step"] == step and self.size >= size:
            self.flush()
            pause()
        return count

    checkpoint._HashingWriter.write = write_then_pause

hooks = TrainHooks(step_start=step_start, step_end=step_end, checkpoint_stage=checkpoint_stage)
train(load_config(None, sys.argv[2:]), resume=plan.get("resume", False), hooks=hooks)
'''


def run_and_kill_at(tmp_path: Path, args: list[str], timeout: float = 240.0, while_paused=None, **plan) -> None:
    """Run the pausing trainer with ``plan``; SIGKILL it once it pauses (fail if it ends or never gets there).

    ``while_paused(pid)``, if given, runs while the trainer is paused (holding its run folder), before the kill.
    """
    import json
    import signal
    import time

    script = tmp_path / "pausing_trainer.py"
    script.write_text(PAUSING_TRAINER)
    ready = tmp_path / "paused"
    ready.unlink(missing_ok=True)
    command = [sys.executable, str(script), json.dumps({"ready": str(ready), **plan}), *[str(a) for a in args]]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"training ended (rc {process.returncode}) before the pause: "
                                     f"{process.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"pause point {plan} not reached in {timeout}s")
            time.sleep(0.05)
        if while_paused is not None:
            while_paused(process.pid)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:  # a failed check above: do not leave the trainer behind
            process.kill()
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
