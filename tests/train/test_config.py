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
    assert (config.run.batch_size, config.run.grad_accum_steps, config.run.seq_len) == (32, 2, 1024)


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
