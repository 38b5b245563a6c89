"""Sharded (DCP) checkpoints: the commit protocol, the checks before anything is unpickled, retention beside ``.pt``
checkpoints, ``--overwrite``, and the offline export. The multi-process tests (SIGKILL and resume under FSDP, 2 ranks
-> 1, DDP -> FSDP) spawn gloo ranks with torchrun."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mileloss.errors import (
    CheckpointChecksumError,
    CheckpointError,
    OutputFolderError,
    RunFolderNotEmptyError,
    UnsafeCheckpointError,
)
from mileloss.models import build_model
from mileloss.train.checkpoint import all_checkpoint_steps, latest_checkpoint, save_checkpoint
from mileloss.train.dcp import (
    MANIFEST,
    METADATA,
    load_sharded_checkpoint,
    read_metadata,
    save_sharded_checkpoint,
    sharded_checkpoint_steps,
    verify_sharded_checkpoint,
)
from mileloss.train.distributed import DistributedContext

PLAIN_STATE = {"tokens": 64, "scheduler": {"last_epoch": 2}, "loader": {"epoch": 0, "position": 8}, "config": {},
               "world_size": 1, "data": "fingerprint"}


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny", vocab_size=64, num_hidden_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


def _trained(seed: int = 0):
    model, optimizer = _model_and_optimizer(seed)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def _save(directory: Path, step: int, model, optimizer, keep: int = 2, on_stage=None) -> Path:
    return save_sharded_checkpoint(directory, step, model, optimizer, dict(PLAIN_STATE), keep=keep,
                                   context=DistributedContext(), on_stage=on_stage)


def _rewrite_manifest(folder: Path) -> None:
    """What a forger does after editing a file: make the manifest match it again."""
    import hashlib

    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_sharded_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    model, optimizer = _trained()
    folder = _save(tmp_path, 3, model, optimizer)
    assert folder.name == "step_00000003"
    assert sorted(p.name for p in folder.iterdir()) == [METADATA, "__0_0.distcp", MANIFEST, "trainer.pt"]
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)  # other weights, no optimizer state yet
    payload = load_sharded_checkpoint(folder, fresh, fresh_optimizer)
    assert (payload["step"], payload["tokens"], payload["loader"]) == (3, 64, PLAIN_STATE["loader"])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert loaded["param_groups"] == saved["param_groups"]


def test_a_write_stopped_before_the_rename_is_no_checkpoint_and_is_removed_by_the_next_save(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, 2, model, optimizer)

    class Killed(BaseException):
        pass

    for stage in ("shards_written", "manifest_written"):
        def stop(name, path, wanted=stage):
            if name == wanted:
                raise Killed

        with pytest.raises(Killed):
            _save(tmp_path, 4, model, optimizer, on_stage=stop)
        assert (tmp_path / ".step_00000004.staging").is_dir()  # what a killed writer leaves
        assert sharded_checkpoint_steps(tmp_path) == [2]
        assert latest_checkpoint(tmp_path).name == "step_00000002"
    _save(tmp_path, 4, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


def test_damaged_missing_or_extra_files_are_refused_before_anything_is_unpickled(tmp_path):
    model, optimizer = _trained()
    folder = _save(tmp_path, 2, model, optimizer)
    shard = folder / "__0_0.distcp"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointChecksumError, match="sha256 .* differs"):
        load_sharded_checkpoint(folder, *_model_and_optimizer())
    shard.write_bytes(original[:-10])
    with pytest.raises(CheckpointChecksumError, match="truncated"):
        verify_sharded_checkpoint(folder)
    shard.write_bytes(original)
    (folder / "__1_0.distcp").write_bytes(b"extra")
    with pytest.raises(CheckpointChecksumError, match="does not list"):
        verify_sharded_checkpoint(folder)
    (folder / "__1_0.distcp").unlink()
    shard.unlink()
    with pytest.raises(CheckpointChecksumError, match="missing"):
        verify_sharded_checkpoint(folder)
    shard.write_bytes(original)
    verify_sharded_checkpoint(folder)
    (folder / MANIFEST).unlink()  # no manifest: not a checkpoint at all
    assert sharded_checkpoint_steps(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        verify_sharded_checkpoint(folder)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_metadata_pickle_runs_nothing_even_with_a_matching_manifest(tmp_path):
    model, optimizer = _trained()
    folder = _save(tmp_path, 2, model, optimizer)
    marker = tmp_path / "code-ran"
    metadata = read_metadata(folder)
    metadata.storage_meta = _RunsCode(str(marker))  # inside an otherwise genuine index
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(folder)
    verify_sharded_checkpoint(folder)  # the checksums match: the allow-list is what stops it
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|not part of DCP"):
        load_sharded_checkpoint(folder, *_model_and_optimizer())
    assert not marker.exists()


def test_a_bytes_entry_in_the_index_is_refused_not_unpickled(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    model, optimizer = _trained()
    folder = _save(tmp_path, 2, model, optimizer)
    metadata = read_metadata(folder)
    name = next(key for key in metadata.state_dict_metadata if key.startswith("model."))
    metadata.state_dict_metadata[name] = BytesStorageMetadata()  # DCP would torch.load(weights_only=False) it
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match="non-tensor"):
        load_sharded_checkpoint(folder, *_model_and_optimizer())


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path):
    model, optimizer = _trained()
    folder = _save(tmp_path, 2, model, optimizer)
    other = build_model("tiny", vocab_size=80, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="does not fit this run.*shape"):
        load_sharded_checkpoint(folder, other, torch.optim.AdamW(other.parameters()))


def test_keep_counts_pt_and_sharded_checkpoints_together(tmp_path):
    model, optimizer = _trained()
    save_checkpoint(tmp_path, 1, {"model": {}}, keep=2)
    save_checkpoint(tmp_path, 2, {"model": {}}, keep=2)
    _save(tmp_path, 3, model, optimizer, keep=2)
    assert all_checkpoint_steps(tmp_path) == [2, 3]
    _save(tmp_path, 4, model, optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    save_checkpoint(tmp_path, 4, {"model": {}}, keep=2)  # a .pt of the same step supersedes the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004.json", "step_00000004.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"


def test_overwrite_removes_sharded_checkpoints_but_not_a_foreign_file_inside_one(tmp_path):
    from mileloss.train.rundir import _prepare_contents

    model, optimizer = _trained()
    run = tmp_path / "run"
    _save(run / "checkpoints", 2, model, optimizer)
    (run / "checkpoints" / ".step_00000004.staging").mkdir()
    (run / "checkpoints" / ".step_00000004.staging" / "__0_0.distcp").write_bytes(b"half")
    (run / "checkpoints" / "step_00000002" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderNotEmptyError, match="notes.txt"):
        _prepare_contents(run, resume=False, overwrite=True)
    assert (run / "checkpoints" / "step_00000002" / MANIFEST).exists()  # nothing removed
    (run / "checkpoints" / "step_00000002" / "notes.txt").unlink()
    _prepare_contents(run, resume=True, overwrite=False)  # a sharded checkpoint is something to resume from
    _prepare_contents(run, resume=False, overwrite=True)
    assert list(run.iterdir()) == []


def test_a_symlinked_step_folder_is_not_a_checkpoint_and_survives_pruning(tmp_path):
    model, optimizer = _trained()
    elsewhere = _save(tmp_path / "elsewhere", 9, model, optimizer)
    directory = tmp_path / "checkpoints"
    _save(directory, 2, model, optimizer)
    (directory / "step_00000009").symlink_to(elsewhere)
    assert sharded_checkpoint_steps(directory) == [2] and latest_checkpoint(directory).name == "step_00000002"
    _save(directory, 3, model, optimizer, keep=1)
    assert (elsewhere / MANIFEST).exists() and (directory / "step_00000009").is_symlink()


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory) -> Path:
    """A 2-step single-process run with a .pt checkpoint at each step."""
    out = tmp_path_factory.mktemp("single") / "run"
    train_here(tiny_overrides(data_dir, out, **{"run.max_steps": 2, "run.checkpoint_every": 1, "run.eval_every": 0,
                                                "run.num_threads": 1}))
    return out


def test_export_verb_writes_a_folder_from_pretrained_loads_with_the_checkpoint_logits(single_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from mileloss import cli
    from mileloss.train.checkpoint import load_checkpoint

    out = tmp_path / "exported"
    assert cli.main(["export", str(single_run), "--step", "1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "mileloss_run.json").read_text())["steps"] == 1
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = build_model("tiny", vocab_size=model.config.vocab_size, num_hidden_layers=2).eval()
    reference.load_state_dict(load_checkpoint(single_run / "checkpoints" / "step_00000001.pt")["model"])
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging folder left


def test_export_verb_refuses_bad_input_in_one_line_and_writes_nothing(single_run, tmp_path, capsys):
    from mileloss import cli

    def error(argv):
        assert cli.main(["export", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    out = str(tmp_path / "out")
    assert "does not exist" in error([str(tmp_path / "nope"), "--out", out])
    assert "no complete checkpoint of step 7" in error([str(single_run), "--step", "7", "--out", out])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert "not an empty folder" in error([str(single_run), "--out", str(tmp_path / "taken")])
    damaged = tmp_path / "damaged"
    shutil.copytree(single_run, damaged)
    pt = damaged / "checkpoints" / "step_00000002.pt"
    pt.write_bytes(pt.read_bytes()[:-1] + bytes([pt.read_bytes()[-1] ^ 1]))
    assert "differs" in error([str(damaged), "--out", out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "taken"]
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_two_exports_into_one_folder_never_mix_or_replace(single_run, tmp_path, monkeypatch):
    import mileloss.train.export as export

    out = tmp_path / "out"
    write = export.write_pretrained

    def other_export_finishes_first(*args, **kwargs):
        folder = write(*args, **kwargs)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"the other export")
        return folder

    monkeypatch.setattr(export, "write_pretrained", other_export_finishes_first)
    with pytest.raises(OutputFolderError, match="appeared while exporting"):
        export.export_checkpoint(single_run, out)
    assert (out / "model.safetensors").read_bytes() == b"the other export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # this export's staging folder removed


def test_a_disk_full_during_the_shard_write_fails_the_save_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _trained()
    _save(tmp_path, 2, model, optimizer)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError, match="writing the shards of .*step_00000004 failed.*No space left"):
        _save(tmp_path, 4, model, optimizer)
    assert sharded_checkpoint_steps(tmp_path) == [2]
    monkeypatch.undo()
    verify_sharded_checkpoint(tmp_path / "step_00000002")
    _save(tmp_path, 4, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


PAUSING_EXPORT = '''
import sys, time
from pathlib import Path
import mileloss.train.export as export

write = export.write_pretrained


def write_then_pause(model, folder, *args, **kwargs):
    write(model, folder, *args, **kwargs)
    Path(sys.argv[3]).write_text("paused")
    time.sleep(600)


export.write_pretrained = write_then_pause
export.export_checkpoint(sys.argv[1], sys.argv[2])
'''


def test_an_export_killed_before_its_rename_leaves_no_out_and_its_leftover_is_removed_next_time(single_run,
                                                                                                  tmp_path):
    from tests.train._train_utils import subprocess_env

    script, ready, out = tmp_path / "pausing_export.py", tmp_path / "ready", tmp_path / "models" / "m"
    script.write_text(PAUSING_EXPORT)
    process = subprocess.Popen([sys.executable, str(script), str(single_run), str(out), str(ready)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the export never paused"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        process.stderr.close()
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [f".m.export-{process.pid}"]  # complete, but never renamed
    from mileloss.train.export import export_checkpoint

    export_checkpoint(single_run, out)
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert (out / "mileloss_run.json").is_file()


def test_leftover_export_folders_of_impossible_pids_are_removed_only_when_they_hold_export_files(single_run,
                                                                                                  tmp_path):
    from mileloss.train.export import export_checkpoint

    out = tmp_path / "models" / "m"
    ours, theirs = out.parent / ".m.export-99999999999999999999", out.parent / ".m.export-99999999999999999998"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (theirs / "notes.txt").write_text("not an export file")
    export_checkpoint(single_run, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [theirs.name, "m"]
    assert (theirs / "notes.txt").read_text() == "not an export file"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sharded_checkpoint_of_a_cuda_bf16_step_loads_on_cuda_and_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64, num_hidden_layers=1).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    folder = _save(tmp_path, 1, model, optimizer)
    for device in ("cuda", "cpu"):
        fresh = build_model("tiny", vocab_size=64, num_hidden_layers=1).to(device)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        load_sharded_checkpoint(folder, fresh, fresh_optimizer)
        for name, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[name].cpu(), value.cpu()), (device, name)
        exp_avg = [s["exp_avg"] for s in fresh_optimizer.state.values()]
        assert all(t.device.type == device for t in exp_avg) and len(exp_avg) == len(list(fresh.parameters()))


# --- multi-process: torchrun with gloo ranks -------------------------------------------------------------------------

from tests.train._train_utils import REPO, subprocess_env, tiny_overrides, train_here  # noqa: E402

FSDP = {"run.max_steps": 6, "run.checkpoint_every": 2, "run.keep_checkpoints": 3, "run.eval_every": 3,
        "run.num_threads": 1, "run.parallel": "fsdp", "run.batch_size": 2}

PAUSING_RANK = '''
import json, os, sys, time
from pathlib import Path
import torch.distributed as dist
from mileloss.train import TrainHooks, load_config, train

plan = json.loads(sys.argv[1])


def pause():
    rank = int(os.environ.get("RANK", "0"))
    Path(plan["ready"] + f"-{rank}").write_text(str(os.getpid()))
    time.sleep(600)


def step_end(step):
    if step == plan.get("after_step"):
        pause()


def checkpoint_stage(stage, path):
    step, wanted = plan.get("checkpoint_stage", (None, None))
    if stage == wanted and path.name.startswith(f".step_{step:08d}"):
        pause()


train(load_config(None, sys.argv[2:]), resume=plan.get("resume", False),
      hooks=TrainHooks(step_end=step_end, checkpoint_stage=checkpoint_stage))
'''


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _kill_fsdp_run_at(tmp_path: Path, args: list[str], ranks: int, **plan) -> None:
    """Run 2 FSDP ranks; once ``ranks`` of them pause at the plan's point, SIGKILL every rank, then torchrun."""
    script = tmp_path / "pausing_rank.py"
    script.write_text(PAUSING_RANK)
    ready = tmp_path / "paused"
    for old in tmp_path.glob("paused-*"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               json.dumps({"ready": str(ready), **plan}), *[str(a) for a in args]]
    process = subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while len(list(tmp_path.glob("paused-*"))) < ranks:
            if process.poll() is not None:
                raise AssertionError(f"ranks ended before the pause {plan}: {process.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, f"pause point {plan} not reached"
            time.sleep(0.05)
        time.sleep(0.2)  # the pid file is written before the sleep
        for marker in tmp_path.glob("paused-*"):
            os.kill(int(marker.read_text()), signal.SIGKILL)  # the paused rank itself
    finally:
        try:  # torchrun sees a rank die, stops the others and exits
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)
        process.stderr.close()


def _curve(run_dir: Path) -> list[tuple]:
    from mileloss.train.metrics import read_metrics

    return [(line["kind"], line["step"], line["tokens"], line.get("loss"), line.get("lr"), line.get("grad_norm"),
             line.get("val_loss")) for line in read_metrics(run_dir / "metrics.jsonl")]


def _close(curve: list[tuple], reference: list[tuple], rel: float = 1e-5) -> None:
    assert [c[:3] for c in curve] == [r[:3] for r in reference]
    for mine, theirs in zip(curve, reference, strict=True):
        for a, b in zip(mine[3:], theirs[3:], strict=True):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=rel)), (mine, theirs)


@pytest.fixture(scope="module")
def fsdp_reference(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank FSDP run (6 steps, sharded checkpoints at 2, 4, 6)."""
    out = tmp_path_factory.mktemp("fsdp") / "reference"
    _torchrun(["-m", "mileloss", "train", *tiny_overrides(data_dir, out, **FSDP), "--quiet"])
    return out


def _branch(reference: Path, into: Path, keep_until: int) -> Path:
    """A copy of the reference run as if it had stopped after the checkpoint of step ``keep_until``."""
    shutil.copytree(reference, into)
    shutil.rmtree(into / "final")
    for folder in (into / "checkpoints").iterdir():
        if int(folder.name.split("_")[1].split(".")[0]) > keep_until:
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    return into


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_run_killed_between_steps_and_inside_checkpoint_writes_resumes_to_the_same_curve(
        data_dir, tmp_path, fsdp_reference):
    out = tmp_path / "killed"
    args = tiny_overrides(data_dir, out, **FSDP)
    _kill_fsdp_run_at(tmp_path, args, ranks=2, after_step=3)  # checkpoint 2 committed, step 3 logged
    assert sharded_checkpoint_steps(out / "checkpoints") == [2]
    _kill_fsdp_run_at(tmp_path, args, ranks=1, resume=True, checkpoint_stage=[4, "shards_written"])
    assert sharded_checkpoint_steps(out / "checkpoints") == [2]
    assert (out / "checkpoints" / ".step_00000004.staging").is_dir()
    _kill_fsdp_run_at(tmp_path, args, ranks=1, resume=True, checkpoint_stage=[4, "manifest_written"])
    assert sharded_checkpoint_steps(out / "checkpoints") == [2]  # complete, but not renamed: not a checkpoint
    _torchrun(["-m", "mileloss", "train", *args, "--resume", "--quiet"])
    assert _curve(out) == _curve(fsdp_reference)  # bitwise: same ranks, same reductions
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004", "step_00000006"]  # the staging folder removed
    from safetensors.torch import load_file

    weights, reference = load_file(out / "final" / "model.safetensors"), load_file(
        fsdp_reference / "final" / "model.safetensors")
    assert all(torch.equal(weights[name], value) for name, value in reference.items())


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_resumes_in_one_process_and_exports(data_dir, tmp_path, fsdp_reference):
    from mileloss.train.export import export_checkpoint

    out = _branch(fsdp_reference, tmp_path / "one", keep_until=2)
    # one process takes both ranks' rows: the same global batch
    train_here(tiny_overrides(data_dir, out, **{**FSDP, "run.batch_size": 4}), resume=True)
    _close(_curve(out), _curve(fsdp_reference))
    assert latest_checkpoint(out / "checkpoints").name == "step_00000006.pt"

    # the sharded checkpoint of step 6 (written by 2 ranks) exported offline gives the weights and logits of the
    # export the FSDP run gathered at its end
    from transformers import AutoModelForCausalLM

    exported = export_checkpoint(fsdp_reference, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    gathered = AutoModelForCausalLM.from_pretrained(fsdp_reference / "final").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gathered(ids).logits)
    with pytest.raises(OutputFolderError, match="not an empty folder"):
        export_checkpoint(fsdp_reference, exported)
    huggingface = pytest.importorskip("lm_eval.models.huggingface")  # what `lm_eval --model hf` builds
    harness = huggingface.HFLM(pretrained=str(exported), tokenizer=str(exported), device="cpu", batch_size=1,
                               dtype="float32")
    with torch.no_grad():
        assert torch.equal(harness._model_call(ids), gathered(ids).logits)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_another_world_size_with_another_global_batch_is_refused(data_dir, tmp_path, fsdp_reference):
    from mileloss.errors import ResumeMismatchError
    from mileloss.train import load_config, train

    out = _branch(fsdp_reference, tmp_path / "one", keep_until=2)
    with pytest.raises(ResumeMismatchError, match=r"global batch would change.*run.batch_size=4"):
        train(load_config(None, tiny_overrides(data_dir, out, **FSDP)), resume=True)  # 1 x 2 rows, not 2 x 2


@pytest.mark.distributed
@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(data_dir, tmp_path, fsdp_reference):
    out = tmp_path / "ddp"
    ddp = {**FSDP, "run.parallel": "ddp", "run.max_steps": 6}
    first = tiny_overrides(data_dir, out, **ddp)
    _kill_fsdp_run_at(tmp_path, first, ranks=2, after_step=3)  # DDP checkpoint step_2.pt
    assert latest_checkpoint(out / "checkpoints").name == "step_00000002.pt"
    _torchrun(["-m", "mileloss", "train", *tiny_overrides(data_dir, out, **FSDP), "--resume", "--quiet"])
    _close(_curve(out), _curve(fsdp_reference))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002.json", "step_00000002.pt", "step_00000004", "step_00000006"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(data_dir, tmp_path, single_run):
    out = tmp_path / "two"
    shutil.copytree(single_run, out)
    shutil.rmtree(out / "final")
    for name in ("step_00000002.pt", "step_00000002.json"):
        (out / "checkpoints" / name).unlink()
    settings = {"run.max_steps": 2, "run.checkpoint_every": 1, "run.eval_every": 0, "run.num_threads": 1,
                "run.parallel": "fsdp", "run.batch_size": 2}  # 2 ranks x 2 rows: the 4 rows of the one process
    _torchrun(["-m", "mileloss", "train", *tiny_overrides(data_dir, out, **settings), "--resume", "--quiet"])
    _close(_curve(out), _curve(single_run))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000001.json", "step_00000001.pt", "step_00000002"]
