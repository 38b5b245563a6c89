"""Pretraining: config dataclasses, the training loop, checkpoints and the final export.

>>> from mileloss.train import load_config, train
>>> run_dir = train(load_config("tiny", ["loss.kind=mile", "run.out=runs/mile"]))  # doctest: +SKIP
"""

from mileloss.train.checkpoint import CheckpointChecksumError, CheckpointError, UnsafeCheckpointError
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
from mileloss.train.loop import NonFiniteLossError, TrainHooks, train
from mileloss.train.preflight import PreflightError, ResumeMismatchError, VocabMismatchError
from mileloss.train.rundir import FolderBusyError, NoCheckpointError, OutputFolderError, RunFolderNotEmptyError

__all__ = [
    "CheckpointChecksumError",
    "CheckpointError",
    "ConfigError",
    "ConfigKeyError",
    "ConfigValueError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "NoCheckpointError",
    "NonFiniteLossError",
    "OptimConfig",
    "PreflightError",
    "ResumeMismatchError",
    "RunConfig",
    "FolderBusyError",
    "OutputFolderError",
    "RunFolderNotEmptyError",
    "TrainConfig",
    "TrainHooks",
    "UnsafeCheckpointError",
    "VocabMismatchError",
    "load_config",
    "train",
]
