"""Pretraining: config dataclasses, the training loop, checkpoints and the final export.

>>> from mileloss.train import load_config, train
>>> run_dir = train(load_config("configs/tiny.yaml", ["loss.kind=mile", "run.out=runs/mile"]))  # doctest: +SKIP
"""

from mileloss.train.config import (
    ConfigError,
    ConfigKeyError,
    ConfigValueError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from mileloss.train.loop import NonFiniteLossError, train
from mileloss.train.preflight import PreflightError, ResumeMismatchError, VocabMismatchError

__all__ = [
    "ConfigError",
    "ConfigKeyError",
    "ConfigValueError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "PreflightError",
    "ResumeMismatchError",
    "RunConfig",
    "TrainConfig",
    "VocabMismatchError",
    "load_config",
    "train",
]
