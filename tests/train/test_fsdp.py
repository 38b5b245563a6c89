"""FSDP2 (``run.parallel=fsdp``): meta-device init equals the single-process init, and two gloo ranks reproduce
the single-process loss curve, gradient clipping and export included."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mileloss.errors import ConfigValueError
from mileloss.models import build_model, materialize_model
from mileloss.train import load_config
from mileloss.train.distributed import fsdp_mixed_precision
from mileloss.train.metrics import read_metrics
from tests.train._train_utils import REPO, subprocess_env, tiny_overrides, train_here

STEPS = {"run.max_steps": 4, "run.eval_every": 0, "run.checkpoint_every": 0, "run.grad_accum_steps": 2,
         "run.num_threads": 1}


def test_parallel_key_accepts_ddp_and_fsdp_only(data_dir, tmp_path):
    assert load_config(None, tiny_overrides(data_dir, tmp_path)).run.parallel == "ddp"
    config = load_config(None, tiny_overrides(data_dir, tmp_path, **{"run.parallel": "fsdp",
                                                                     "run.checkpoint_every": 0,
                                                                     "run.reshard_after_forward": "false"}))
    assert (config.run.parallel, config.run.reshard_after_forward) == ("fsdp", False)
    with pytest.raises(ConfigValueError, match="run.parallel: must be ddp or fsdp"):
        load_config(None, tiny_overrides(data_dir, tmp_path, **{"run.parallel": "zero3"}))


def test_fsdp_accepts_checkpoints_now_that_they_are_sharded(data_dir, tmp_path):
    config = load_config(None, tiny_overrides(data_dir, tmp_path, **{"run.parallel": "fsdp"}))  # checkpoint_every=4
    assert (config.run.parallel, config.run.checkpoint_every) == ("fsdp", 4)  # DCP: tests/train/test_fsdp_checkpoint


def test_mixed_precision_is_bf16_with_fp32_reduction_on_cuda_only():
    cpu = fsdp_mixed_precision(torch.device("cpu"), torch.bfloat16)
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)
    cuda = fsdp_mixed_precision(torch.device("cuda"), torch.bfloat16)
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp32 = fsdp_mixed_precision(torch.device("cuda"), None)
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)


def test_materialize_model_gives_the_weights_of_build_model_with_the_same_seed():
    torch.manual_seed(3)
    reference = build_model("tiny", vocab_size=300, num_hidden_layers=2)
    after_reference = torch.rand(4)
    with torch.device("meta"):
        model = build_model("tiny", vocab_size=300, num_hidden_layers=2)
    materialize_model(model, 3, "cpu")
    assert torch.equal(torch.rand(4), after_reference)  # the generator is left where build_model leaves it
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for (name, buffer), (_, expected_buffer) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buffer, expected_buffer), name


SHARDED_INIT = '''
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mileloss.models import build_model
from mileloss.train.distributed import DistributedContext
from mileloss.train.loop import LanguageModelLoss
from mileloss.models import materialize_model
from mileloss.train.distributed import shard_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
with torch.device("meta"):
    model = build_model("tiny", vocab_size=300, num_hidden_layers=3)
full_numel = sum(p.numel() for p in model.parameters())
wrapper = LanguageModelLoss(model, {"weighting": "mile"})
shard_model(wrapper, DistributedContext(rank, world), torch.device("cpu"), True, None)
materialize_model(model, 11, "cpu")
local = sum(p.to_local().numel() for p in model.parameters())
assert local <= full_numel // world + 1000, (local, full_numel)  # each rank holds its half (plus padding)
gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
torch.manual_seed(11)
reference = build_model("tiny", vocab_size=300, num_hidden_layers=3).state_dict()
assert sorted(gathered) == sorted(reference), sorted(set(gathered) ^ set(reference))
for name, value in reference.items():
    assert torch.equal(gathered[name], value), name
print(f"rank {rank}: {local} of {full_numel} parameters, gathered state equals build_model")
dist.destroy_process_group()
'''


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.distributed
def test_meta_init_shards_the_model_and_gathers_to_the_single_process_weights(tmp_path):
    script = tmp_path / "sharded_init.py"
    script.write_text(SHARDED_INIT)
    result = _torchrun(str(script))
    assert result.stdout.count("gathered state equals build_model") == 2, result.stdout


@pytest.mark.distributed
def test_two_fsdp_ranks_reproduce_the_single_process_loss_curve_and_export(data_dir, tmp_path):
    from safetensors.torch import load_file

    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    train_here(tiny_overrides(data_dir, single, **{**STEPS, "run.batch_size": 4}))
    _torchrun("-m", "mileloss", "train", *tiny_overrides(data_dir, fsdp, **{**STEPS, "run.batch_size": 2}),
              "run.parallel=fsdp", "--quiet")

    expected, got = read_metrics(single / "metrics.jsonl"), read_metrics(fsdp / "metrics.jsonl")
    assert [(line["kind"], line["step"], line["tokens"]) for line in got] == [
        (line["kind"], line["step"], line["tokens"]) for line in expected]
    assert max(line["grad_norm"] for line in expected if line["kind"] == "train") > 1.0  # clipping was active
    for mine, theirs in zip(got, expected, strict=True):
        for key in ("loss", "grad_norm") if mine["kind"] == "train" else ("val_loss",):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, mine)
    # the exported weights (gathered from the shards) after 4 steps: the tolerance of the DDP test
    weights = load_file(fsdp / "final" / "model.safetensors")
    reference = load_file(single / "final" / "model.safetensors")
    assert sorted(weights) == sorted(reference)
    worst = max(((weights[name] - value).abs().max().item(), name) for name, value in reference.items())
    assert worst[0] < 1e-4, f"largest parameter difference {worst[0]:.2e} in {worst[1]}"


NAN_AT_STEP_2 = '''
import math
import sys

import torch

from mileloss.train import TrainHooks, load_config, train


def step_start(step, model):
    if step == 2:  # one rank's shard of the final norm: every rank's loss becomes NaN once gathered
        shard = model.model.norm.weight.to_local()
        if shard.numel():
            with torch.no_grad():
                shard.fill_(math.nan)


train(load_config(None, sys.argv[1:]), hooks=TrainHooks(step_start=step_start))
'''


@pytest.mark.distributed
def test_nan_stop_under_fsdp_stops_every_rank_before_the_optimizer_step(data_dir, tmp_path):
    script = tmp_path / "nan_trainer.py"
    script.write_text(NAN_AT_STEP_2)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *tiny_overrides(data_dir, out, **{**STEPS, "run.batch_size": 2}), "run.parallel=fsdp"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.count("non-finite training loss nan at step 2") >= 2, result.stderr[-4000:]
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl")] == [1]
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_composes_with_activation_checkpointing_and_torch_compile(data_dir, tmp_path):
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    steps = {**STEPS, "run.max_steps": 2}
    train_here(tiny_overrides(data_dir, single, **{**steps, "run.batch_size": 4}))
    _torchrun("-m", "mileloss", "train", *tiny_overrides(data_dir, fsdp, **{**steps, "run.batch_size": 2}),
              "run.parallel=fsdp", "model.gradient_checkpointing=true", "run.compile=true", "--quiet")
    expected, got = read_metrics(single / "metrics.jsonl"), read_metrics(fsdp / "metrics.jsonl")
    train_lines = [(mine, theirs) for mine, theirs in zip(got, expected, strict=True) if mine["kind"] == "train"]
    assert len(train_lines) == 2
    for mine, theirs in train_lines:  # inductor may reorder float sums: a looser tolerance than the eager test
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4), mine
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3), mine
