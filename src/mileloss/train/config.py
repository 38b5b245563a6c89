"""Training configuration: dataclasses loaded from YAML with ``key.sub=value`` overrides.

A config file has one mapping per section (``model``, ``data``, ``loss``, ``optim``, ``run``); every field
has a default, documented by the docstring under it. Overrides come from the command line::

    mileloss train configs/tiny.yaml loss.kind=mile loss.gamma=0.5 run.out=runs/mile
    mileloss train --config configs/tiny.yaml --run.max_steps 200

An unknown key is a :class:`ConfigKeyError` naming the nearest valid key; a value out of range is a
:class:`ConfigValueError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ConfigKeyError",
    "ConfigValueError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_override_args",
]


class ConfigError(ValueError):
    """Base class of configuration errors."""


class ConfigKeyError(ConfigError):
    """A config key that does not exist."""


class ConfigValueError(ConfigError):
    """A config value of the wrong type or out of range."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigValueError(f"{key}: {message}")


@dataclasses.dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model shape: one of ``mileloss.models.PRESETS`` (tiny, small, 468M, 1.2B, 6.7B)."""
    vocab_size: int | None = None
    """Vocabulary size; ``null`` takes it from the data manifest (a different value is an error)."""
    num_hidden_layers: int | None = None
    """Override the preset's number of layers (``null`` keeps the preset)."""
    initializer_range: float | None = None
    """Override the preset's init standard deviation (``null`` keeps the preset: 0.02, or 1e-2 for paper shapes)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (the paper does this for 6.7B)."""

    def __post_init__(self) -> None:
        from mileloss.models import PRESETS

        _check(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        _check(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size", "must be positive")
        _check(self.num_hidden_layers is None or self.num_hidden_layers > 0, "model.num_hidden_layers", "must be > 0")
        _check(self.initializer_range is None or self.initializer_range > 0, "model.initializer_range", "must be > 0")


@dataclasses.dataclass
class DataConfig:
    dir: str = "data/shakespeare"
    """Data directory written by ``mileloss data`` (manifest.json, tokenizer/, token shards)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the manifest before training."""

    def __post_init__(self) -> None:
        _check(bool(self.dir), "data.dir", "must be a non-empty path")


@dataclasses.dataclass
class LossConfig:
    kind: str = "mile"
    """Token weighting: ``ce`` (plain cross-entropy), ``focal`` ((1-p)^gamma) or ``mile`` ((sigma+H)^gamma)."""
    gamma: float = 1.0
    """Exponent of the token weight (the paper uses 1.0)."""
    sigma: float = 1.0
    """Offset added to the entropy in MiLe's weight (the paper uses 1.0)."""
    normalize: str = "weighted"
    """``weighted`` (sum w*ce / sum w, exact across micro-batches and ranks) or ``paper`` (official quirks)."""
    chunk_size: int | None = None
    """Rows per chunk in the fused LM-head loss (``null``: the library's default)."""

    def __post_init__(self) -> None:
        _check(self.kind in ("ce", "focal", "mile"), "loss.kind", f"must be ce, focal or mile, got {self.kind!r}")
        _check(self.gamma >= 0 and math.isfinite(self.gamma), "loss.gamma", f"must be >= 0, got {self.gamma}")
        _check(self.sigma >= 0 and math.isfinite(self.sigma), "loss.sigma", f"must be >= 0, got {self.sigma}")
        _check(self.normalize in ("weighted", "paper"), "loss.normalize",
               f"must be weighted or paper, got {self.normalize!r}")
        _check(self.chunk_size is None or self.chunk_size > 0, "loss.chunk_size", "must be > 0")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (embeddings, projections, LM head); none on norms and biases."""
    warmup_steps: int = 2000
    """Linear warmup steps from 0 to ``lr``."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to ``lr * min_lr_ratio`` at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "must be two values in [0, 1)")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclasses.dataclass
class RunConfig:
    out: str = "runs/tiny"
    """Run directory: config.yaml, metrics.jsonl/csv, checkpoints/, final/."""
    seed: int = 111
    """Seed of model init and data order (the paper's data seed is 111)."""
    max_steps: int | None = 1000
    """Number of optimizer steps (set this or ``max_tokens``)."""
    max_tokens: int | None = None
    """Train for this many tokens instead (takes precedence): steps = ceil(max_tokens / tokens per step)."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    seq_len: int | None = None
    """Tokens per sequence (``null``: the model preset's context length)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; tokens per step = batch_size * seq_len * grad_accum_steps * world size."""
    eval_every: int = 100
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 20
    """Validation batches (of ``batch_size`` sequences) per evaluation."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (0: never)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Write a training metrics line every this many steps."""
    compile: bool = False
    """``torch.compile`` the transformer body."""
    dtype: str = "auto"
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (autocast) or ``fp32``."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    num_threads: int | None = None
    """CPU threads for torch (fix it for bitwise-reproducible CPU runs; ``null`` leaves torch's default)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""

    def __post_init__(self) -> None:
        _check(self.max_steps is not None or self.max_tokens is not None, "run.max_steps",
               "set run.max_steps or run.max_tokens")
        _check(self.max_steps is None or self.max_steps > 0, "run.max_steps", f"must be > 0, got {self.max_steps}")
        _check(self.max_tokens is None or self.max_tokens > 0, "run.max_tokens", f"must be > 0, got {self.max_tokens}")
        _check(self.batch_size > 0, "run.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.seq_len is None or self.seq_len > 1, "run.seq_len", f"must be > 1, got {self.seq_len}")
        _check(self.grad_accum_steps > 0, "run.grad_accum_steps", f"must be > 0, got {self.grad_accum_steps}")
        for key in ("eval_every", "checkpoint_every", "log_every", "eval_batches"):
            _check(getattr(self, key) >= 0, f"run.{key}", "must be >= 0")
        _check(self.keep_checkpoints > 0, "run.keep_checkpoints", "must be > 0")
        _check(self.dtype in ("auto", "bf16", "fp32"), "run.dtype", f"must be auto, bf16 or fp32, got {self.dtype!r}")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "run.device",
               "must be auto, cpu or cuda[:N]")
        _check(self.num_threads is None or self.num_threads > 0, "run.num_threads", "must be > 0")


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        result = {}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            result[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return result

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a nested dict, rejecting unknown sections/keys and coercing values to the field types."""
        if not isinstance(raw, dict):
            raise ConfigValueError(f"{source}: expected a mapping of sections {list(SECTIONS)}, "
                                   f"got {type(raw).__name__}")
        sections = {}
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigKeyError(f"{source}: unknown section {section!r}{_suggest(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigValueError(f"{source}: section {section!r} must be a mapping")
            sections[section] = values
        built = {}
        for section, section_cls in SECTIONS.items():
            kwargs = {}
            for key, value in sections.get(section, {}).items():
                kwargs[key] = _coerce(value, _field_types(section_cls), f"{section}.{key}")
            built[section] = section_cls(**kwargs)
        return cls(**built)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]


def _suggest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(candidates)}"


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _coerce(value: Any, types: dict[str, Any], key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type of ``key``."""
    name = key.split(".", 1)[1]
    if name not in types:
        section = key.split(".", 1)[0]
        candidates = [k for k in _all_keys() if k.startswith(section)] or _all_keys()
        raise ConfigKeyError(f"unknown config key {key!r}{_suggest(key, candidates)}")
    hint = types[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigValueError(f"{key}: may not be null")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is tuple:
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigValueError(f"{key}: cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def parse_override_args(args: list[str]) -> dict[str, str]:
    """``["loss.kind=mile", "--run.seed", "3", "--run.compile=true"]`` -> ``{"loss.kind": "mile", ...}``."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, value = key.split("=", 1)
        elif arg.startswith("--") and index + 1 < len(args):
            index += 1
            value = args[index]
        else:
            raise ConfigKeyError(f"cannot read override {arg!r}: expected key.sub=value or --key.sub value")
        overrides[key] = value
        index += 1
    return overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``raw`` with dotted ``overrides`` applied (values parsed as YAML)."""
    merged = {section: dict(values or {}) for section, values in raw.items()}
    valid = _all_keys()
    for key, text in overrides.items():
        if key not in valid:
            raise ConfigKeyError(f"unknown config key {key!r}{_suggest(key, valid)}")
        section, name = key.split(".", 1)
        merged.setdefault(section, {})[name] = yaml.safe_load(text) if isinstance(text, str) else text
    return merged


def load_config(path: str | Path | None = None, overrides: dict[str, str] | list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply overrides and validate.

    Args:
        path: YAML file with sections model/data/loss/optim/run; ``None`` uses the defaults.
        overrides: ``{"loss.kind": "mile"}`` or a list such as ``["loss.kind=mile", "--run.seed", "3"]``.
    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ConfigKeyError, ConfigValueError: unknown key / bad value, naming the key.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section in raw:
            if section not in SECTIONS:
                raise ConfigKeyError(f"{path}: unknown section {section!r}{_suggest(section, SECTIONS)}")
        for section, values in raw.items():
            for key in values or {}:
                dotted = f"{section}.{key}"
                if dotted not in _all_keys():
                    raise ConfigKeyError(f"{path}: unknown config key {dotted!r}{_suggest(dotted, _all_keys())}")
    if isinstance(overrides, list):
        overrides = parse_override_args(overrides)
    raw = apply_overrides(raw, overrides or {})
    return TrainConfig.from_dict(raw, source=source)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
