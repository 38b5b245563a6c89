"""The "will it fit?" plan (mileloss.train.plan, ``mileloss train --dry-run``) against hand computation.

Every expected number below is written out from the paper's shapes (docs: ../shared/docs/paper.md; V = 32000,
untied embeddings), not computed with plan.py's helpers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mileloss.errors import BatchScheduleError, PlanError
from mileloss.models import build_model, count_parameters
from mileloss.train.config import load_config
from mileloss.train.plan import ModelShape, memory_per_rank, parse_memory, plan_training

GB = 10**9

# (preset, parameters, world size of the paper, micro-batch, seq, accumulation, tokens per step, steps)
PAPER = [
    # 468M: 2*32000*1024 = 65,536,000; layer 4*1024^2 + 3*1024*4096 + 2*1024 = 16,779,264, x 24 = 402,702,336;
    # + 1024 (final norm)
    ("468M", 65_536_000 + 402_702_336 + 1024, 16, 32, 1024, 2, 1_048_576, 100_000),
    # 1.2B: 2*32000*2048 = 131,072,000; layer 4*2048^2 + 3*2048*8192 + 2*2048 = 67,112,960, x 16 = 1,073,807,360
    ("1.2B", 131_072_000 + 1_073_807_360 + 2048, 32, 16, 1024, 2, 1_048_576, 100_000),
    # 6.7B: 2*32000*4096 = 262,144,000; layer 4*4096^2 + 3*4096*11008 + 2*4096 = 202,383,360, x 32 = 6,476,267,520
    ("6.7B", 262_144_000 + 6_476_267_520 + 4096, 128, 16, 2048, 1, 4_194_304, 25_000),
]


def test_the_hand_counts_are_the_papers_sizes():
    assert [row[1] for row in PAPER] == [468_239_360, 1_204_881_408, 6_738_415_616]


@pytest.mark.parametrize(("preset", "params", "gpus", "micro", "seq", "accum", "tokens", "steps"), PAPER,
                         ids=[row[0] for row in PAPER])
def test_paper_presets_plan_matches_hand_computation(preset, params, gpus, micro, seq, accum, tokens, steps):
    plan = plan_training(load_config(preset), gpus, 32000, gpu_memory=80 * GB)
    assert plan.parameters == params
    assert (plan.micro_batch, plan.seq_len, plan.grad_accum_steps) == (micro, seq, accum)
    assert plan.tokens_per_step == tokens and plan.max_steps == steps
    assert plan.total_tokens == tokens * steps == {1_048_576: 104_857_600_000, 4_194_304: 104_857_600_000}[tokens]
    assert plan.training_flops == 6 * params * tokens * steps
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
    # ddp: fp32 parameters, gradients (4 bytes each) and AdamW's two moments (8 bytes) per parameter, on every rank
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4 * params, 4 * params, 8 * params)
    # fsdp: the same, divided by the world size (these sizes divide exactly: 468M/16, 1.2B/32, 6.7B/128)
    assert params % gpus == 0
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (4 * params // gpus, 4 * params // gpus,
                                                                 8 * params // gpus)


def test_468m_buffers_and_activations_by_hand():
    plan = plan_training(load_config("468M"), 16, 32000, gpu_memory=80 * GB)
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
    n = 468_239_360
    # ddp buffers: DDP's fp32 buckets (4N) + bf16 autocast copies of every matrix but the embedding:
    # 2 * (N - 32000*1024 - 49 norms * 1024) = 2 * 435,421,184
    assert ddp.buffers == 4 * n + 870_842_368
    # activations, b*s = 32 * 1024 = 32768 tokens, bf16 (e = 2), fp32 residual under autocast (r = 4):
    # per layer 32768 * (2 * (6*1024 + 4*4096) + 4*1024*4) + 4 * 16 heads * 32768 = 2,015,363,072; x 24 layers
    layers = 24 * 2_015_363_072
    # fused loss: hidden grad 4*32768*1024 + head grad 4*32000*1024 + bf16 hidden 2*32768*1024
    # + two fp32 chunk buffers of 1024 rows (CUDA rule: ceil(32000/1024) = 32, 32768/32 = 1024) x 32000
    loss = 134_217_728 + 131_072_000 + 67_108_864 + 2 * 4 * 1024 * 32000
    outside = 4 * 1024 * 4 * 32768 + 4 * 32768 * 1024  # final norm, embedding output
    assert ddp.activations == layers + loss + outside == 49_634_344_960
    # fsdp, bf16 param_dtype: residual in bf16 (r = 2): per layer 32768 * (45056 + 8192) + 2,097,152
    fsdp_layers = 24 * (32768 * 53248 + 2_097_152)
    assert fsdp.activations == fsdp_layers + loss + (4 * 1024 * 2 * 32768 + 2 * 32768 * 1024)
    # fsdp buffers: root (2*32000*1024 + 1024) and two layers gathered in bf16, root + one layer's fp32 grads
    root, layer = 65_537_024, 16_779_264
    assert fsdp.buffers == 2 * (root + 2 * layer) + 4 * (root + layer)


def test_6_7b_activation_checkpointing_keeps_only_layer_inputs_plus_one_layer():
    config = load_config("6.7B")
    assert config.model.gradient_checkpointing
    shape = ModelShape.of_preset("6.7B", 32000)
    with_ckpt = memory_per_rank(shape, "fsdp", 128, micro_batch=16, seq_len=2048, bf16=True, checkpointing=True)
    without = memory_per_rank(shape, "fsdp", 128, micro_batch=16, seq_len=2048, bf16=True, checkpointing=False)
    tokens, h = 16 * 2048, 4096
    per_layer = tokens * (2 * (6 * h + 4 * 11008) + 4 * h * 2) + 4 * 32 * tokens
    assert without.activations - with_ckpt.activations == 32 * per_layer - (32 * tokens * h * 2 + per_layer)


def test_the_6_7b_model_fits_80gb_only_sharded():
    plan = plan_training(load_config("6.7B"), 128, 32000, gpu_memory=80 * GB)
    assert plan.fits == {"ddp": False, "fsdp": True}  # 16 bytes x 6.7e9 = 108 GB of model state alone under ddp
    assert plan.memory["ddp"].model_state == 16 * 6_738_415_616
    tiny_gpu = plan_training(load_config("6.7B"), 128, 32000, gpu_memory=8 * GB)
    assert tiny_gpu.fits == {"ddp": False, "fsdp": False}
    assert plan_training(load_config("6.7B"), 128, 32000).fits is None  # no GPU size given: no verdict


def test_plan_raises_the_trainers_schedule_error_for_a_world_size_that_does_not_divide():
    with pytest.raises(BatchScheduleError, match="run.tokens_per_step=4,194,304"):
        plan_training(load_config("6.7B"), 3, 32000)
    with pytest.raises(PlanError, match="--world-size must be >= 1"):
        plan_training(load_config("6.7B"), 0, 32000)


@pytest.mark.parametrize(("text", "expected"), [("80GB", 80 * GB), ("80GiB", 80 * 2**30), ("81559MiB", 81559 * 2**20),
                                                ("1.5TB", 1_500_000_000_000), (" 40 gb ", 40 * GB), ("1024", 1024)])
def test_gpu_memory_sizes_are_read_with_their_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-80GB", "80XB", "0GB", "nanGB", "1e3GB", "80 G B", "0.1"])
def test_unreadable_gpu_memory_is_a_plan_error(text):
    with pytest.raises(PlanError, match="--gpu-memory"):
        parse_memory(text)


@pytest.mark.parametrize("preset", ["tiny", "468M"])
def test_plan_parameter_count_equals_the_meta_device_model(preset):
    with torch.device("meta"):
        exact = count_parameters(build_model(preset, vocab_size=32000, num_hidden_layers=3))
    config = load_config(preset, ["model.num_hidden_layers=3"])
    assert plan_training(config, 1, 32000).parameters == exact


# ------------------------------------------------------------------------------------------------------------
# the command line: no data, nothing written


def _train(argv, capsys):
    from mileloss.cli import main

    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_json_for_6_7b_needs_no_data_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/pile does not exist here; run.out must not be created
    code, out, err = _train(["6.7B", "--dry-run", "--json", "model.vocab_size=32000", "--world-size", "128",
                             "--gpu-memory", "80GB"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["parameters"] == 6_738_415_616
    assert (plan["tokens_per_step"], plan["max_steps"], plan["total_tokens"]) == (4_194_304, 25_000, 104_857_600_000)
    assert plan["training_flops"] == 6 * 6_738_415_616 * 104_857_600_000
    assert plan["memory_per_rank"]["fsdp"]["parameters"] == 4 * 6_738_415_616 // 128
    assert plan["fits"] == {"ddp": False, "fsdp": True} and plan["gpu_memory"] == 80 * GB
    assert list(tmp_path.iterdir()) == []


def test_dry_run_text_names_every_quantity(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _train(["468M", "--dry-run", "model.vocab_size=32000", "--world-size=8", "--gpu-memory=80GiB"],
                            capsys)
    assert code == 0, err
    assert "468,239,360 parameters" in out
    assert "gradient accumulation 4" in out  # 1,048,576 / (32 x 1024 x 8)
    assert "tokens per optimizer step: 1,048,576" in out and "total tokens: 104,857,600,000" in out
    assert "training FLOPs (6 x parameters x tokens): 2.946e+20" in out  # 6 * 468,239,360 * 104,857,600,000
    for row in ("parameters (fp32)", "gradients (fp32)", "AdamW state (fp32)", "activations", "total",
                "fits (<= 90% of 80.00 GiB)"):
        assert row in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_takes_the_vocabulary_from_the_data_manifest(data_dir, capsys):
    code, out, err = _train(["tiny", "--dry-run", "--json", f"data.dir={data_dir}"], capsys)
    assert code == 0, err
    assert json.loads(out)["shape"]["vocab"] == 512


def test_dry_run_reads_the_world_size_from_torchruns_environment(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    code, out, err = _train(["468M", "--dry-run", "--json", "model.vocab_size=32000"], capsys)
    assert code == 0, err
    assert (json.loads(out)["world_size"], json.loads(out)["grad_accum_steps"]) == (16, 2)
    code, out, err = _train(["468M", "--dry-run", "--json", "model.vocab_size=32000", "--world-size", "8"], capsys)
    assert code == 0 and json.loads(out)["world_size"] == 8  # the option wins over the environment


def test_dry_run_for_one_process_says_which_column_applies(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = _train(["tiny", "--dry-run", "model.vocab_size=512"], capsys)
    assert code == 0, err
    assert "world size 1," in out and "one process trains without DDP or FSDP" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["tiny", "--dry-run", "data.dir=nowhere"], "--dry-run needs the vocabulary size: set model.vocab_size=N"),
    (["6.7B", "--dry-run", "model.vocab_size=32000", "--world-size", "3"], "is not a whole number of micro-batches"),
    (["6.7B", "--dry-run", "model.vocab_size=32000", "--world-size", "0"], "--world-size must be >= 1"),
    (["6.7B", "--dry-run", "model.vocab_size=32000", "--gpu-memory", "eighty"], "--gpu-memory: cannot read"),
    (["tiny", "--dry-run", "data.dir=broken"], "manifest.json: not valid JSON"),  # the vocabulary from a bad file
    (["tiny", "--dry-run", "model.vocab_size=512", "run.tokens_per_step=4096", "run.grad_accum_steps=3"],
     "run.grad_accum_steps=3 gives 6,144 tokens per step"),
])
def test_dry_run_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"format": "mileloss-shards"')  # cut short
    code, out, err = _train(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["tiny", "--json"], ["tiny", "--world-size", "2"], ["tiny", "--gpu-memory", "8GB"],
                                  ["tiny", "--dry-run", "--resume"], ["tiny", "--dry-run", "--overwrite"]])
def test_plan_options_without_dry_run_or_with_resume_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train(argv, capsys)
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------------------------------
# multi-node: scripts/slurm_train.sh


SLURM_SCRIPT = __import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "slurm_train.sh"


def test_slurm_script_is_valid_bash():
    import subprocess

    assert subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True).returncode == 0


def _fake_cluster(tmp_path, fail_plan: bool = False):
    """srun, scontrol and python stand-ins that record their arguments (one line each) in calls.txt."""
    import os
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    plan_status = "exit 2" if fail_plan else "exit 0"
    scripts = {
        "scontrol": "printf 'gpu-node-07\\ngpu-node-08\\n'",
        "srun": f'echo "srun $*" >> {log}',
        "fakepython": f'echo "python $*" >> {log}; case "$*" in *--dry-run*) {plan_status};; esac',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_GPUS_ON_NODE": "8", "PYTHON": "fakepython",
           "HOME": str(tmp_path)}
    return env, log


def test_slurm_script_starts_one_torchrun_per_node_with_a_c10d_rendezvous_on_the_first_node(tmp_path):
    import subprocess

    env, log = _fake_cluster(tmp_path)
    result = subprocess.run(["bash", str(SLURM_SCRIPT), "1.2B", "loss.kind=mile", "--resume"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan, launch = log.read_text().splitlines()
    assert plan == "python -m mileloss train 1.2B loss.kind=mile --dry-run --world-size 16"  # no --resume
    assert launch == ("srun --kill-on-bad-exit=1 fakepython -m torch.distributed.run --nnodes 2 --nproc_per_node 8 "
                      "--rdzv_backend c10d --rdzv_endpoint gpu-node-07:29500 --rdzv_id 4242 --max_restarts 0 "
                      "-m mileloss train 1.2B loss.kind=mile --resume")
    assert "2 node(s) x 8 GPU(s) = 16 processes" in result.stdout


def test_slurm_script_stops_before_srun_when_the_plan_refuses_the_schedule(tmp_path):
    import subprocess

    env, log = _fake_cluster(tmp_path, fail_plan=True)
    result = subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["python"]  # srun never ran
    # without arguments the script's CONFIG line is used
    assert "train 468M loss.kind=mile run.out=runs/468M-mile --dry-run --world-size 16" in log.read_text()


def test_slurm_script_outside_a_job_says_how_to_submit_it(tmp_path):
    import subprocess

    env, _ = _fake_cluster(tmp_path)
    del env["SLURM_JOB_ID"]
    result = subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr


# ------------------------------------------------------------------------------------------------------------
# the scale benchmarks in their quick modes (slow: each starts fresh processes)


@pytest.mark.slow
def test_gpu_fsdp_script_trains_the_tiny_preset_on_cpu_with_one_fsdp_rank(tmp_path):
    import subprocess
    import sys

    from tests.train._train_utils import REPO, subprocess_env

    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_fsdp.py"), "--device", "cpu", "--small", "--out",
               str(out)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parameters"] == 984_192 and report["timed_steps"] == 3 and report["dtype"] == "fp32"
    assert report["tokens_per_second"] > 0 and report["mfu"] == pytest.approx(
        6 * 984_192 * report["tokens_per_second"] / 989e12)
    assert all(math.isfinite(loss) for loss in report["losses"]) and report["losses"][-1] < report["losses"][0]
    again = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a result


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_scale_quick_mode_measures_half_the_model_state_per_fsdp_rank():
    import subprocess
    import sys

    from tests.train._train_utils import REPO, subprocess_env

    command = [sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--small", "--steps", "1"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert "model state per rank, fsdp (largest rank) / ddp: 0.50x (target <= 0.6x): pass" in result.stdout, (
        result.stdout + result.stderr[-3000:])
    assert "984,192 parameters" in result.stdout
