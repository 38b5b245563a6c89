"""Hostile use of `mileloss train` (issue 7, training parts; issue 8 item 5): each test reproduces a reported bug.

Run folders (a fresh run into an old one, --overwrite, locks, run.out=.), checkpoints read from disk (crafted
pickles, bit flips, truncation, lost checksum records), schedule changes on --resume, config values that gave a
traceback or a silently wrong value, and the test-only environment hooks that were in production code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mileloss.cli import main as cli
from mileloss.run_folder import LOCK as LOCK_NAME
from mileloss.train import (
    CheckpointChecksumError,
    ConfigValueError,
    FolderBusyError,
    NoCheckpointError,
    OutputFolderError,
    ResumeMismatchError,
    RunFolderNotEmptyError,
    TrainHooks,
    UnsafeCheckpointError,
    load_config,
    train,
)
from mileloss.train.checkpoint import checkpoint_steps, load_checkpoint
from mileloss.train.metrics import read_metrics
from tests.train._train_utils import REPO, run_and_kill_at, tiny_overrides
from tests.train.conftest import make_words_data


def train_main(argv):
    return cli(["train", *map(str, argv)])

SHORT = {"run.max_steps": 4, "run.checkpoint_every": 2, "run.eval_every": 0}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The generated corpus of the training tests (vocab 512, ~25k training tokens)."""
    return make_words_data(tmp_path_factory)


def _config(data: Path, out: Path, **extra):
    return load_config(None, tiny_overrides(data, out, **{**SHORT, **extra}))


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), links by their target: to show nothing changed."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(folder))] = "link:" + os.readlink(path)
        elif path.is_file():
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints 2 and 4, final/)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_config(data_dir, out))
    return out


@pytest.fixture
def old_run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# ---------------------------------------------------------------------------------------------------- run folder


def test_fresh_run_into_a_previous_run_is_refused_and_changes_nothing(data_dir, old_run):
    before = _tree(old_run)
    with pytest.raises(RunFolderNotEmptyError, match=r"already holds .*--resume.*--overwrite.*another run") as error:
        train(_config(data_dir, old_run, **{"run.seed": 5}))
    _one_line(error)
    assert _tree(old_run) == before


def test_cli_reports_the_refusal_in_one_line(data_dir, old_run, capsys):
    assert train_main(tiny_overrides(data_dir, old_run, **SHORT)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mileloss train: error: run.out") and "\n" not in err


def test_overwrite_replaces_the_previous_run_and_a_later_resume_continues_the_new_one(data_dir, old_run):
    leftovers = [".metrics.csv.99-0123abcd.tmp", "checkpoints/.step_00000009.pt.tmp-99",
                 "checkpoints/step_00000009.json", ".mileloss-train.lock.stale-1-deadbeef",
                 "final/.mileloss_run.json.5-0123abcd.tmp"]
    for name in leftovers:  # what killed trainers leave: recognised as ours
        (old_run / name).write_text("partial")
    new = _config(data_dir, old_run, **{"run.seed": 5, "run.max_steps": 3, "run.checkpoint_every": 1})
    train(new, overwrite=True)
    assert not any((old_run / name).exists() for name in leftovers)
    # before: the old run's step 4 outlived the new steps 1-3, which were pruned as "older", and --resume took it
    assert checkpoint_steps(old_run / "checkpoints") == [2, 3]
    assert load_checkpoint(old_run / "checkpoints" / "step_00000003.pt")["config"]["run"]["seed"] == 5
    assert [line["step"] for line in read_metrics(old_run / "metrics.jsonl", "train")] == [1, 2, 3]
    assert json.loads((old_run / "final" / "mileloss_run.json").read_text())["steps"] == 3
    assert not (old_run / LOCK_NAME).exists()
    with pytest.raises(ResumeMismatchError, match=r"run.seed: checkpoint 5, now 111"):
        train(_config(data_dir, old_run, **{"run.max_steps": 3, "run.checkpoint_every": 1}), resume=True)
    train(new, resume=True)  # the new run, already at its last step: exports again, nothing else
    assert [line["step"] for line in read_metrics(old_run / "metrics.jsonl", "train")] == [1, 2, 3]


@pytest.mark.parametrize("plant", ["notes.txt", "eval/perplexity.json", "checkpoints/mine.pt", "final/sub/x.bin",
                                   "link", "config.yaml"])
def test_overwrite_refuses_a_folder_holding_files_mileloss_did_not_write(data_dir, old_run, tmp_path, plant):
    target = old_run / plant
    if plant == "link":  # a symbolic link is never followed nor removed
        (tmp_path / "precious").mkdir()
        (tmp_path / "precious" / "data.txt").write_text("keep me")
        target.symlink_to(tmp_path / "precious")
    elif plant == "config.yaml":  # another tool's config.yaml
        target.write_text("learning_rate: 0.1\nlayers: 3\n")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("mine")
    before = _tree(old_run)
    with pytest.raises(RunFolderNotEmptyError, match=r"--overwrite: .* did not write .*" + plant.split("/")[0]) as err:
        train(_config(data_dir, old_run), overwrite=True)
    assert "nothing was removed" in _one_line(err)
    assert _tree(old_run) == before
    assert (tmp_path / "precious" / "data.txt").exists() if plant == "link" else True


@pytest.mark.distributed
def test_under_ddp_a_refusal_by_rank_0_stops_every_rank_without_a_hang(data_dir, old_run):
    from tests.train._train_utils import subprocess_env

    before = _tree(old_run)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mileloss",
               "train", *tiny_overrides(data_dir, old_run, **{**SHORT, "run.batch_size": 2}), "--quiet"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "mileloss train: error: [rank 0] run.out" in result.stderr
    assert "mileloss train: error: [rank 1] rank 0 could not claim run.out" in result.stderr  # told by rank 0
    assert _tree(old_run) == before


def _write_lock(run_dir: Path, **record) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "someone-else", **record}))
    return path


def test_a_lock_held_by_a_live_trainer_stops_a_second_one(data_dir, tmp_path):
    lock = _write_lock(tmp_path / "run", pid=os.getpid(), started=0.0)
    with pytest.raises(FolderBusyError, match=rf"in use by mileloss train pid {os.getpid()} on ") as error:
        train(_config(data_dir, tmp_path / "run"))
    _one_line(error)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME] and "someone-else" in lock.read_text()


def test_a_lock_of_another_host_is_never_taken_over(data_dir, tmp_path):
    _write_lock(tmp_path / "run", pid=1, host="elsewhere.example")
    with pytest.raises(FolderBusyError, match=r"pid 1 on elsewhere.example .*delete the lock"):
        train(_config(data_dir, tmp_path / "run"))


def test_an_empty_lock_is_reported_not_taken_over(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("")
    with pytest.raises(FolderBusyError, match="empty or unreadable"):
        train(_config(data_dir, tmp_path / "run"))


def test_a_lock_naming_a_pid_no_process_can_have_is_stale_not_a_traceback(data_dir, tmp_path, caplog):
    _write_lock(tmp_path / "run", pid=10**20)  # beyond a C long: os.kill raises OverflowError, not "no such process"
    with caplog.at_level(logging.WARNING, logger="mileloss.train.rundir"):
        train(_config(data_dir, tmp_path / "run"))
    assert "taking over the stale lock" in caplog.text and not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_trainer_is_taken_over_with_a_warning(data_dir, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "run", pid=dead.pid)
    with caplog.at_level(logging.WARNING, logger="mileloss.train.rundir"):
        train(_config(data_dir, tmp_path / "run"))
    assert f"taking over the stale lock {tmp_path / 'run' / LOCK_NAME} of mileloss train pid {dead.pid}" in caplog.text
    assert checkpoint_steps(tmp_path / "run" / "checkpoints") == [2, 4] and not (tmp_path / "run" / LOCK_NAME).exists()


def test_two_trainers_on_one_folder_and_a_kill_before_the_first_checkpoint(data_dir, tmp_path, caplog):
    """A second trainer (fresh, --overwrite or --resume) stops while the first holds the folder; after the first is
    SIGKILLed before any checkpoint, --resume says there is none, a fresh run refuses, --overwrite starts over."""
    out = tmp_path / "run"
    args = tiny_overrides(data_dir, out, **{"run.num_threads": 1})
    seen = []

    def second_trainer(pid: int) -> None:
        before = _tree(out)
        for kwargs in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(FolderBusyError, match=rf"in use by mileloss train pid {pid} on ") as error:
                train(load_config(None, args), **kwargs)
            seen.append(_one_line(error))
        assert _tree(out) == before  # its temporary files and logs untouched

    run_and_kill_at(tmp_path, args, after_step=2, while_paused=second_trainer)
    assert len(seen) == 3 and (out / LOCK_NAME).exists() and not checkpoint_steps(out / "checkpoints")
    with pytest.raises(NoCheckpointError, match=r"--resume: no complete checkpoint in .*checkpoints; start a fresh run "
                                                r"without --resume and with --overwrite"):
        train(load_config(None, args), resume=True)
    with pytest.raises(RunFolderNotEmptyError, match="already holds config.yaml, metrics.csv, metrics.jsonl"):
        train(load_config(None, args))
    with caplog.at_level(logging.WARNING, logger="mileloss.train.rundir"):
        train(load_config(None, [*args, "run.max_steps=4", "run.eval_every=0"]), overwrite=True)
    assert "taking over the stale lock" in caplog.text
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl", "train")] == [1, 2, 3, 4]
    assert checkpoint_steps(out / "checkpoints") == [4]


def test_resume_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(NoCheckpointError, match="does not exist; start a fresh run without --resume"):
        train(_config(data_dir, tmp_path / "absent"), resume=True)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoCheckpointError, match=r"no complete checkpoint in .*start a fresh run without --resume$"):
        train(_config(data_dir, tmp_path / "empty"), resume=True)


def test_resume_and_overwrite_together_are_refused(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*tiny_overrides(data_dir, tmp_path / "run"), "--resume", "--overwrite"])
    assert exit_info.value.code == 2 and "--resume and --overwrite contradict" in capsys.readouterr().err
    with pytest.raises(OutputFolderError, match="contradict"):
        train(_config(data_dir, tmp_path / "run"), resume=True, overwrite=True)


@pytest.mark.parametrize("out", [".", "..", "/", "{cwd}", "sub/.."])
def test_run_out_may_not_be_the_current_folder_or_above(data_dir, tmp_path, monkeypatch, out):
    cwd = tmp_path / "work" / "project"
    cwd.mkdir(parents=True)
    (cwd / "sub").mkdir()
    (cwd / "precious.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    before = _tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match=r"run.out=.* is (the current folder|the filesystem root)"):
            train(_config(data_dir, Path(out.format(cwd=cwd))), overwrite=overwrite)
    assert _tree(tmp_path) == before


def test_run_out_that_is_a_file_or_below_a_file_or_unwritable(data_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputFolderError, match=r"run.out='.*file' is a file, not a folder"):
        train(_config(data_dir, tmp_path / "file"))
    with pytest.raises(OutputFolderError, match=r"run.out='.*file/run': .*file is a file, not a folder"):
        train(_config(data_dir, tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "not a folder"
    # /sys refuses new entries even to root: a real unwritable place
    with pytest.raises(OutputFolderError, match=r"cannot create run.out /sys/mileloss-run: "):
        train(_config(data_dir, Path("/sys/mileloss-run")))
    with pytest.raises(OutputFolderError, match=r"cannot write in run.out /sys/kernel: "):
        train(_config(data_dir, Path("/sys/kernel")))


# ---------------------------------------------------------------------------------------------------- checkpoints


def _record(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def _rewrite_record(checkpoint: Path) -> None:
    """What an attacker who can write the folder does: a record that matches the file."""
    record = json.loads(_record(checkpoint).read_text())
    record.update(bytes=checkpoint.stat().st_size, sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    _record(checkpoint).write_text(json.dumps(record))


class _Payload:
    """Unpickling this calls open(marker, "w"): creating the marker proves foreign code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("with_record", [True, False])
def test_a_crafted_checkpoint_runs_no_code_on_resume(data_dir, old_run, tmp_path, with_record):
    marker = tmp_path / "pwned"
    checkpoint = old_run / "checkpoints" / "step_00000004.pt"
    torch.save({"format": "mileloss-checkpoint", "version": 2, "step": 4, "model": _Payload(marker)}, checkpoint)
    if with_record:
        _rewrite_record(checkpoint)
    before = _tree(old_run)
    expected = (UnsafeCheckpointError, "holds objects other than tensors") if with_record else (
        CheckpointChecksumError, "corrupted|truncated")
    with pytest.raises(expected[0], match=expected[1]) as error:
        train(_config(data_dir, old_run), resume=True)
    _one_line(error)
    assert not marker.exists()
    assert _tree(old_run) == before
    torch.load(checkpoint, weights_only=False)  # the attack is real: an unsafe load does run it
    assert marker.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_checkpoint_is_refused_not_resumed(data_dir, old_run, damage):
    checkpoint = old_run / "checkpoints" / "step_00000004.pt"
    raw = bytearray(checkpoint.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one bit in the middle of a tensor
    checkpoint.write_bytes({"flip": bytes(raw), "truncate": bytes(raw[: len(raw) // 2]), "empty": b""}[damage])
    before = _tree(old_run)
    pattern = r"sha256 \w+ differs .*corrupted" if damage == "flip" else r"has \d+ bytes .* truncated or corrupted"
    with pytest.raises(CheckpointChecksumError, match="step_00000004.pt.*" + pattern) as error:
        train(_config(data_dir, old_run), resume=True)
    _one_line(error)
    assert _tree(old_run) == before  # metrics not truncated, nothing pruned


def test_a_checkpoint_without_its_record_is_skipped_for_the_previous_one(data_dir, old_run, finished, caplog):
    """The record is committed before the .pt, so a kill never leaves this; a lost record makes the .pt incomplete:
    the previous complete checkpoint is used, with a warning, and the curve is the uninterrupted one."""
    (old_run / "checkpoints" / "step_00000004.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mileloss.train.checkpoint"):
        train(_config(data_dir, old_run), resume=True)
    assert "ignoring incomplete checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    assert checkpoint_steps(old_run / "checkpoints") == [2, 4]
    assert read_metrics(old_run / "metrics.jsonl", "train") != []
    assert [(x["step"], x["loss"]) for x in read_metrics(old_run / "metrics.jsonl", "train")] == [
        (x["step"], x["loss"]) for x in read_metrics(finished / "metrics.jsonl", "train")]


def test_a_checkpoint_of_the_old_format_is_not_unpickled(data_dir, tmp_path):
    import numpy as np

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"format": "mileloss-checkpoint", "version": 1, "step": 4, "rng": {"numpy": np.random.get_state()}},
               out / "checkpoints" / "step_00000004.pt")
    with pytest.raises(NoCheckpointError, match=r"steps \[4\] have no checksum record: incomplete, or written by an "
                                                r"older mileloss"):
        train(_config(data_dir, out), resume=True)


@pytest.mark.parametrize(("damage", "message"), [
    ("model", "the saved model or optimizer state does not fit this run"),
    ("optimizer", "the saved model or optimizer state does not fit this run"),
    ("loader", "malformed data-loader state"), ("step", "malformed checkpoint")])
def test_a_checksummed_checkpoint_with_a_malformed_state_is_a_named_error(data_dir, old_run, damage, message):
    """Plain data that passes the checksum (written by save_checkpoint) but does not fit: an error, no traceback."""
    from mileloss.train.checkpoint import CheckpointError, save_checkpoint

    directory = old_run / "checkpoints"
    state = {k: v for k, v in load_checkpoint(directory / "step_00000004.pt").items()
             if k not in ("format", "version", "step", "rng")}
    step = 4
    if damage == "step":  # the only checkpoint says it is of step 0
        for path in directory.iterdir():
            path.unlink()
        step = 0
    else:
        state[damage] = {"model": [1, 2], "optimizer": {"state": 3}, "loader": {"seed": 111}}[damage]
    save_checkpoint(directory, step, state, keep=5)
    with pytest.raises(CheckpointError, match=rf"step_0000000\d.pt: {message}") as error:
        train(_config(data_dir, old_run), resume=True)
    _one_line(error)


def test_set_rng_state_rejects_a_malformed_state():
    from mileloss.train.checkpoint import CheckpointError, rng_state, set_rng_state

    state = rng_state()
    for broken in ({**state, "python": 1}, {**state, "numpy": {"key": [1]}}, {k: v for k, v in state.items()
                                                                              if k != "torch"}):
        with pytest.raises(CheckpointError, match="malformed RNG state in checkpoint"):
            set_rng_state(broken)


def test_metrics_lines_that_are_not_ours_are_dropped_on_resume_not_a_traceback(data_dir, old_run, caplog):
    path = old_run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "[1, 2]", '{"kind": "train"}', *lines[1:]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="mileloss.train.metrics"):
        train(_config(data_dir, old_run), resume=True)
    assert caplog.text.count("dropping an unreadable line") == 2
    assert [line["step"] for line in read_metrics(path, "train")] == [1, 2, 3, 4]


def test_a_failed_export_leaves_no_summary_beside_half_written_weights(data_dir, old_run, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    assert (old_run / "final" / "mileloss_run.json").exists()
    with pytest.raises(OSError, match="No space left"):
        train(_config(data_dir, old_run), resume=True)  # a finished run, resumed: exports again
    assert not (old_run / "final" / "mileloss_run.json").exists()  # final/ no longer claims to be complete
    assert not (old_run / LOCK_NAME).exists()


def test_a_home_relative_run_out_goes_to_the_home_folder(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train(_config(data_dir, Path("~/runs/x")))
    assert checkpoint_steps(tmp_path / "home" / "runs" / "x" / "checkpoints") == [2, 4]
    assert not (tmp_path / "~").exists()


def test_a_batch_larger_than_the_data_is_refused_before_training(data_dir, tmp_path):
    from mileloss.train import PreflightError

    # before: the loader looped for hours assembling 10**11 rows from ~780 windows
    with pytest.raises(PreflightError, match=r"run.batch_size=100000000000 x 1 process\(es\) .* more than the \d+ "
                                             r"sequences of run.seq_len=32"):
        train(_config(data_dir, tmp_path / "run", **{"run.batch_size": 10**11}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 24.6 GiB"), torch.OutOfMemoryError("CUDA out of memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 140737488355328 bytes")])
def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error):
    import mileloss.train.loop

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(mileloss.train.loop, "train", exhausted)
    assert train_main([f"run.out={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mileloss train: error: out of memory") and "run.batch_size" in err and "\n" not in err
    monkeypatch.setattr(mileloss.train.loop, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not disguised as memory problems
        train_main([f"run.out={tmp_path / 'run'}"])


# ---------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("override", "key", "old"), [
    ("run.max_steps=8", "run.max_steps", 4), ("optim.warmup_steps=10", "optim.warmup_steps", 3),
    ("optim.min_lr_ratio=0.5", "optim.min_lr_ratio", 0.1), ("optim.lr=0.01", "optim.lr", 0.003)])
def test_resume_refuses_a_changed_learning_rate_schedule(data_dir, old_run, override, key, old):
    before = _tree(old_run)
    with pytest.raises(ResumeMismatchError, match=rf"{key}: checkpoint {old}, now .*learning-rate schedule.*resume "
                                                  rf"with {key}={old}, or start a new run in another run.out") as error:
        train(load_config(None, [*tiny_overrides(data_dir, old_run, **SHORT), override]), resume=True)
    _one_line(error)
    assert _tree(old_run) == before


def test_resume_with_another_token_budget_names_the_budget_to_keep(data_dir, old_run):
    # 4 steps of 4 x 32 tokens; max_tokens takes precedence over max_steps, so the way back is the old budget
    with pytest.raises(ResumeMismatchError, match=r"run.max_steps: checkpoint 4, now 8 .*resume with "
                                                  r"run.max_tokens=null run.max_steps=4, or start a new run"):
        train(_config(data_dir, old_run, **{"run.max_tokens": 8 * 4 * 32}), resume=True)
    train(_config(data_dir, old_run, **{"run.max_tokens": 4 * 4 * 32 - 5}), resume=True)  # the same 4 steps: fine


def test_resume_accepts_memory_only_changes(data_dir, old_run):
    train(_config(data_dir, old_run, **{"model.gradient_checkpointing": "true", "loss.chunk_size": 16,
                                         "run.keep_checkpoints": 1}), resume=True)


def test_resume_accepts_moved_data_but_refuses_other_data(data_dir, old_run, tmp_path):
    from mileloss.data import prepare_corpus

    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    train(_config(moved, old_run), resume=True)  # same shards in another folder: allowed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text(" ".join(f"word{i % 97} token{i % 13}." for i in range(20000)))
    prepare_corpus([str(tmp_path / "other")], tmp_path / "other-data", vocab_size=512, progress=False)
    with pytest.raises(ResumeMismatchError, match="holds other data than the run was trained on"):
        train(_config(tmp_path / "other-data", old_run), resume=True)


# ---------------------------------------------------------------------------------------------------- config values

BAD_OVERRIDES = [
    ("run.device=cuda:abc", "run.device", "'cuda:abc'"), ("run.device=mps", "run.device", "'mps'"),
    ("run.seed=-1", "run.seed", "-1"), ("run.seed=9223372036854775808", "run.seed", "9223372036854775808"),
    ("run.seed=1.5", "run.seed", "1.5"), ("run.seed=true", "run.seed", "True"),
    ("optim.lr=inf", "optim.lr", "inf"), ("optim.lr=.nan", "optim.lr", "nan"), ("optim.lr=-1", "optim.lr", "-1"),
    ("optim.lr=true", "optim.lr", "True"), ("run.batch_size=true", "run.batch_size", "True"),
    ("run.batch_size=2.5", "run.batch_size", "2.5"), ("run.max_steps=1e400", "run.max_steps", "1e400"),
    ("optim.betas=[true, 0.9]", "optim.betas", "True"), ("optim.betas=[0.9", "optim.betas", "[0.9"),
    ("optim.betas=[.nan, 0.9]", "optim.betas", "nan"), ("optim.betas=[0.9]", "optim.betas", "0.9"),
    ("optim.betas=5", "optim.betas", "5"), ("optim.eps=.inf", "optim.eps", "inf"),
    ("optim.weight_decay=.nan", "optim.weight_decay", "nan"), ("optim.grad_clip=.inf", "optim.grad_clip", "inf"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio", "2.0"), ("optim.warmup_steps=false", "optim.warmup_steps", "False"),
    ("loss.gamma=.inf", "loss.gamma", "inf"), ("loss.sigma=true", "loss.sigma", "True"),
    ("loss.chunk_size=true", "loss.chunk_size", "True"), ("model.vocab_size=true", "model.vocab_size", "True"),
    ("model.num_hidden_layers=1.5", "model.num_hidden_layers", "1.5"),
    ("model.initializer_range=.inf", "model.initializer_range", "inf"),
    ("model.gradient_checkpointing=2", "model.gradient_checkpointing", "2"), ("run.compile=1", "run.compile", "1"),
    ("run.progress=maybe", "run.progress", "maybe"), ("run.num_threads=10000000", "run.num_threads", "10000000"),
    ("run.eval_batches=0", "run.eval_batches", "0"), ("run.out=", "run.out", "''"), ("data.dir=", "data.dir", "''"),
    ("run.grad_accum_steps=true", "run.grad_accum_steps", "True"), ("run.log_every=-1", "run.log_every", "-1"),
    ("data.verify_checksums=0", "data.verify_checksums", "0"),
    ("run.max_tokens=99999999999999999999999", "run.max_tokens", "99999999999999999999999"),
]


@pytest.mark.parametrize(("override", "key", "value"), BAD_OVERRIDES, ids=[c[0] for c in BAD_OVERRIDES])
def test_a_bad_config_value_is_one_line_naming_key_and_value(override, key, value, capsys, tmp_path):
    assert train_main([f"run.out={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"mileloss train: error: {key}") and value in err, err
    assert not (tmp_path / "run").exists()


def test_string_values_stay_as_typed():
    config = load_config(None, ["run.out=1.10", "data.dir=yes", "run.compile=yes", "run.max_tokens=1e6"])
    assert (config.run.out, config.data.dir, config.run.compile, config.run.max_tokens) == ("1.10", "yes", True, 10**6)


@pytest.mark.parametrize(("text", "message"), [
    (b"run: [1, 2\n", "cannot read the config file as YAML"), (b"\xff\xfe\x00binary", "cannot read the config file"),
    (b"run: [1, 2]\n", "section 'run' must be a mapping"), (b"1: {a: 1}\n", "unknown section 1"),
    (b"- run\n", "expected a mapping of sections, got list"), (b"run:\n  out: 1.10\n", "run.out: must be a string"),
    (b"run:\n  batch_size: yes\n", "run.batch_size: must be an integer, got True"),
])
def test_a_bad_config_file_is_one_line_naming_the_problem(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_a_cuda_device_that_is_not_there_is_named(data_dir, tmp_path):
    with pytest.raises(ConfigValueError, match=r"run.device='cuda:99' but (CUDA is not available|this machine has)"):
        train(_config(data_dir, tmp_path / "run", **{"run.device": "cuda:99"}))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- test hooks


def test_production_code_reads_no_test_environment_variables():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*.py") if "MILELOSS_TEST_" in p.read_text()]
    assert offenders == []


def test_hooks_see_every_step_and_every_checkpoint_stage(data_dir, tmp_path):
    events = []
    hooks = TrainHooks(step_start=lambda step, model: events.append(("start", step, type(model).__name__)),
                       step_end=lambda step: events.append(("end", step)),
                       checkpoint_stage=lambda stage, path: events.append((stage, path.name)))
    train(_config(data_dir, tmp_path / "run", **{"run.max_steps": 2, "run.checkpoint_every": 2}), hooks=hooks)
    assert events == [("start", 1, "LlamaForCausalLM"), ("end", 1), ("start", 2, "LlamaForCausalLM"),
                      ("payload_written", f".step_00000002.pt.tmp-{os.getpid()}"),
                      ("record_written", "step_00000002.json"), ("end", 2)]
