"""Config loading: YAML files, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mileloss.errors import ConfigNotFoundError
from mileloss.models import PRESETS
from mileloss.train.config import (
    ConfigKeyError,
    ConfigValueError,
    config_presets,
    load_config,
    parse_override_args,
    preset_config_path,
)

ROOT = Path(__file__).resolve().parents[2]


def train_main(argv: list[str]) -> int:
    from mileloss.cli import main

    return main(["train", *argv])


CONFIGS = sorted((ROOT / "src" / "mileloss" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_command(path):
    config = load_config(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    name = path.name.removesuffix(".yaml")
    assert config.run.out and any(f"mileloss train {name} " in line for line in header)
    assert config.model.preset == name


def test_every_model_preset_has_a_packaged_config_addressable_by_name():
    assert config_presets() == sorted(PRESETS) == sorted(p.name.removesuffix(".yaml") for p in CONFIGS)
    for name in config_presets():
        assert preset_config_path(name).read_text() == (CONFIGS[0].parent / f"{name}.yaml").read_text()
        assert load_config(name) == load_config(CONFIGS[0].parent / f"{name}.yaml")
    assert load_config("tiny.yaml", ["run.out=x"]).run.out == "x"


def test_the_configs_live_once_in_the_package_not_at_the_repository_root():
    assert not (ROOT / "configs").exists()


def test_an_existing_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("run:\n  out: mine\n")
    assert load_config("tiny").run.out == "mine"
    assert load_config("tiny.yaml").run.out == "runs/tiny"


def test_an_unknown_name_lists_the_presets_and_a_missing_path_is_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigNotFoundError, match=r"'tiniest'.*presets: 1.2B, 468M, 6.7B, small, tiny"):
        load_config("tiniest")
    for missing in ("configs/tiny.yaml", "mine.yaml", tmp_path / "tiny"):
        with pytest.raises(ConfigNotFoundError, match="config file not found.*presets are named without a path"):
            load_config(missing)


def test_train_cli_takes_a_preset_name_positionally_or_with_config(tmp_path, capsys):
    for argv in (["tiniest", f"run.out={tmp_path}/r"], ["--config", "tiniest", f"run.out={tmp_path}/r"]):
        assert train_main(argv) == 2
        assert "presets: 1.2B, 468M, 6.7B, small, tiny" in capsys.readouterr().err


def test_shipped_paper_configs_use_the_paper_optimizer():
    config = load_config("468M")
    assert (config.optim.lr, config.optim.betas, config.optim.weight_decay, config.optim.warmup_steps) == (
        3e-4, (0.9, 0.95), 0.1, 2000)
    assert (config.run.batch_size, config.run.tokens_per_step, config.run.seq_len) == (32, 1_048_576, 1024)
    assert config.run.grad_accum_steps is None  # derived at start-up from tokens_per_step and the world size


@pytest.mark.parametrize(("name", "tokens_per_step", "steps", "gpus", "accum"), [
    ("468M", 1_048_576, 100_000, 16, 2), ("1.2B", 1_048_576, 100_000, 32, 2), ("6.7B", 4_194_304, 25_000, 128, 1)])
def test_paper_presets_follow_the_paper_schedule(name, tokens_per_step, steps, gpus, accum):
    from mileloss.train.preflight import resolve_schedule

    config = load_config(name)
    assert (config.run.tokens_per_step, config.run.max_steps) == (tokens_per_step, steps)
    # the paper's GPU count gives the paper's accumulation (paper.md: 32x2x16, 16x2x32, 16x1x128)
    resolved = resolve_schedule(config, gpus)
    assert resolved.run.grad_accum_steps == accum
    run = resolved.run
    assert run.batch_size * run.seq_len * run.grad_accum_steps * gpus == tokens_per_step
    assert 104e9 < tokens_per_step * steps < 106e9  # ~105B tokens each


def test_grad_accum_is_derived_from_tokens_per_step_and_the_world_size():
    from mileloss.train.config import derive_grad_accum_steps

    config = load_config(None, ["run.batch_size=4", "run.seq_len=128", "run.tokens_per_step=4096"])
    assert [derive_grad_accum_steps(config.run, 128, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    # without tokens_per_step: grad_accum_steps as given, 1 when unset
    assert derive_grad_accum_steps(load_config(None, ["run.grad_accum_steps=3"]).run, 128, 4) == 3
    assert derive_grad_accum_steps(load_config(None).run, 128, 4) == 1


def test_tokens_per_step_that_does_not_divide_is_a_named_error():
    from mileloss.errors import BatchScheduleError, ConfigError
    from mileloss.train.config import derive_grad_accum_steps

    config = load_config(None, ["run.batch_size=4", "run.seq_len=128", "run.tokens_per_step=4096"])
    with pytest.raises(BatchScheduleError,
                       match=r"run.tokens_per_step=4,096 .* 3 process\(es\) = 1,536 .*3072 or 4608"):
        derive_grad_accum_steps(config.run, 128, 3)
    with pytest.raises(BatchScheduleError, match=r"choose run.tokens_per_step=8192"):  # one micro-batch is too big
        derive_grad_accum_steps(config.run, 128, 16)
    assert issubclass(BatchScheduleError, ConfigError)


def test_tokens_per_step_and_grad_accum_must_agree_when_both_are_set():
    from mileloss.errors import BatchScheduleError
    from mileloss.train.config import derive_grad_accum_steps

    agree = load_config(None, ["run.batch_size=4", "run.seq_len=128", "run.tokens_per_step=4096",
                               "run.grad_accum_steps=4"])
    assert derive_grad_accum_steps(agree.run, 128, 2) == 4  # a saved, resolved config has both: it reloads
    disagree = load_config(None, ["run.batch_size=4", "run.seq_len=128", "run.tokens_per_step=4096",
                                  "run.grad_accum_steps=2"])
    with pytest.raises(BatchScheduleError, match=r"run.grad_accum_steps=2 gives 2,048 .* needs 4: set "
                                                 r"run.grad_accum_steps=null"):
        derive_grad_accum_steps(disagree.run, 128, 2)


def test_bad_tokens_per_step_values_name_the_key():
    for value in ("0", "-4096", "1.5", "true", "lots"):
        with pytest.raises(ConfigValueError, match="run.tokens_per_step"):
            load_config(None, [f"run.tokens_per_step={value}"])
    with pytest.raises(ConfigValueError, match="run.grad_accum_steps"):
        load_config(None, ["run.grad_accum_steps=0"])


def test_train_refuses_a_tokens_per_step_that_does_not_divide_before_touching_run_out(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    code = train_main(["tiny", f"data.dir={data_dir}", f"run.out={out}", "run.batch_size=4", "run.seq_len=32",
                       "run.tokens_per_step=1000", "run.max_steps=1"])
    assert code == 2
    assert "run.tokens_per_step=1,000 is not a whole number of micro-batches" in capsys.readouterr().err
    assert not out.exists()


def test_overrides_in_both_spellings_are_typed_by_the_field():
    config = load_config(None, ["loss.kind=focal", "--loss.gamma", "2", "optim.lr=1e-3", "--run.compile=true",
                                "optim.betas=[0.8, 0.9]", "run.seq_len=null", "run.max_tokens=1e6"])
    assert config.loss.kind == "focal" and config.loss.gamma == 2.0 and isinstance(config.loss.gamma, float)
    assert config.optim.lr == 1e-3 and config.run.compile is True and config.optim.betas == (0.8, 0.9)
    assert config.run.seq_len is None and config.run.max_tokens == 1_000_000


def test_unknown_override_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigKeyError, match="did you mean 'loss.gamma'"):
        load_config(None, ["loss.gama=2"])


def test_unknown_key_in_yaml_names_file_and_nearest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  max_step: 10\n")
    with pytest.raises(ConfigKeyError, match=r"bad.yaml.*run.max_step.*did you mean 'run.max_steps'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [("loss.kind=entropy", "loss.kind"), ("optim.lr=0", "optim.lr"), ("run.batch_size=0", "run.batch_size"),
     ("loss.gamma=-1", "loss.gamma"), ("run.max_steps=abc", "run.max_steps"), ("model.preset=huge", "model.preset")],
)
def test_bad_values_raise_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_override_parser_rejects_a_bare_word():
    assert parse_override_args(["a.b=1", "--c.d", "2"]) == {"a.b": "1", "c.d": "2"}
    with pytest.raises(ConfigKeyError, match="key.sub=value"):
        parse_override_args(["a.b"])


def test_cli_reports_unknown_key_before_training(capsys, tmp_path):
    assert train_main([str(CONFIGS[-1]), "run.outt=x"]) == 2
    assert "did you mean 'run.out'" in capsys.readouterr().err


def test_cli_accepts_the_config_file_positionally_or_with_the_config_flag(tmp_path, caplog, capsys):
    # both spellings reach the same check (the missing data directory), after the config parsed cleanly
    for argv in ([str(CONFIGS[-1]), f"data.dir={tmp_path / 'none'}", f"run.out={tmp_path / 'run'}"],
                 ["--config", str(CONFIGS[-1]), "--data.dir", str(tmp_path / "none"), f"--run.out={tmp_path}/run"]):
        caplog.clear()
        assert train_main(argv) in (1, 2)  # a named error: logged (status 1) or one line on stderr (status 2)
        assert f"data.dir '{tmp_path / 'none'}' does not exist" in caplog.text + capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "loss.gamma" in capsys.readouterr().out


def test_a_run_trains_and_resumes_with_the_derived_accumulation(data_dir, tmp_path):
    """tokens_per_step = 4 x 32 x 2: the loop sees grad_accum_steps = 2 (tokens logged per step say so); the saved
    config has both keys and reloads; a resume that would derive another accumulation is refused with the reason."""
    import json

    from mileloss.errors import ResumeMismatchError
    from mileloss.train import train
    from tests.train._train_utils import tiny_overrides

    out = tmp_path / "run"
    base = tiny_overrides(data_dir, out, **{"run.max_steps": 2, "run.checkpoint_every": 1, "run.eval_every": 0,
                                            "run.tokens_per_step": 256, "run.num_threads": 1})
    train(load_config(None, base))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["tokens"] for line in lines if "loss" in line] == [256, 512]
    saved = load_config(out / "config.yaml")
    assert (saved.run.tokens_per_step, saved.run.grad_accum_steps) == (256, 2)
    train(load_config(None, [*base, "run.max_steps=2"]), resume=True, overwrite=False)  # same schedule: accepted
    with pytest.raises(ResumeMismatchError, match=r"run.grad_accum_steps: checkpoint 2, now 1.*derived from "
                                                  r"run.tokens_per_step"):
        train(load_config(None, [*base, "run.batch_size=8"]), resume=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_tokens_per_step_run_started_on_two_ranks_resumes_on_one(data_dir, tmp_path):
    """2 ranks derive accumulation 1, one process derives 2: the same global batch, so resuming the 2-rank run's
    step-2 checkpoint in one process is accepted and the remaining steps keep 256 tokens each."""
    import json
    import shutil
    import subprocess
    import sys

    from mileloss.train import train
    from tests.train._train_utils import REPO, subprocess_env, tiny_overrides

    out = tmp_path / "run"
    overrides = tiny_overrides(data_dir, out, **{"run.max_steps": 4, "run.checkpoint_every": 2, "run.eval_every": 0,
                                                 "run.tokens_per_step": 256, "run.num_threads": 1})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mileloss", "train", *overrides, "--quiet"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_config(out / "config.yaml").run.grad_accum_steps == 1  # 256 / (4 x 32 x 2 ranks)
    # pretend the run stopped after step 2: drop what steps 3-4 wrote (this test's own files)
    for path in (out / "checkpoints").iterdir():
        if "4" in path.name.split(".")[0]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / "final")
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_00000002.json",
                                                                              "step_00000002.pt"]
    train(load_config(None, overrides), resume=True)
    assert "step_00000004.pt" in {path.name for path in (out / "checkpoints").iterdir()}  # steps 3-4 ran again
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["tokens"] for line in lines if "loss" in line] == [256, 512, 768, 1024]
    assert load_config(out / "config.yaml").run.grad_accum_steps == 2  # one process: 256 / (4 x 32)
