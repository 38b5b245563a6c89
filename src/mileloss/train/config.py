"""Training configuration: dataclasses loaded from YAML with ``key.sub=value`` overrides.

A config file has one mapping per section (``model``, ``data``, ``loss``, ``optim``, ``run``); every field
has a default, documented by the docstring under it. The presets ship inside the package
(``mileloss/configs/<name>.yaml``: tiny, small, 468M, 1.2B, 6.7B) and are named without a path; a path to a
YAML file of one's own works the same way (an existing file wins over a preset of the same name). Overrides
come from the command line::

    mileloss train tiny loss.kind=mile loss.gamma=0.5 run.out=runs/mile
    mileloss train --config tiny --run.max_steps 200
    mileloss train my-tiny.yaml run.out=runs/mine

An unknown key is a :class:`ConfigKeyError` naming the nearest valid key; a value out of range is a
:class:`ConfigValueError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from mileloss.errors import (
    BatchScheduleError,
    ConfigError,
    ConfigKeyError,
    ConfigNotFoundError,
    ConfigValueError,
)

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
    "ConfigNotFoundError",
    "apply_overrides",
    "config_presets",
    "derive_grad_accum_steps",
    "load_config",
    "preset_config_path",
    "resolve_config",
    "parse_override_args",
]


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigValueError(f"{key}: {message}")


# Integers must fit a signed 64-bit integer: torch and numpy take them as C longs.
MAX_INT = 2**63 - 1
MAX_THREADS = 1024
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_types(config: Any, section: str) -> None:
    """Every field of a section dataclass must have its annotated type exactly (checked before any range).

    A bool is not accepted for an int or float field (``True`` would silently become 1); an int is accepted for a
    float field and converted; floats must be finite; ints must fit 64 bits. Raises :class:`ConfigValueError`
    naming the key and the value.
    """
    for name, hint in _field_types(type(config)).items():
        key, value = f"{section}.{name}", getattr(config, name)
        args = typing.get_args(hint)
        if value is None:
            _check(type(None) in args, key, "may not be null")
            continue
        base = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
        if typing.get_origin(base) is tuple:
            _check(isinstance(value, (tuple, list)) and len(value) == len(typing.get_args(base)), key,
                   f"must be a list of {len(typing.get_args(base))} numbers, got {value!r}")
            items = [_typed_scalar(item, float, key) for item in value]
            setattr(config, name, tuple(items))
        else:
            setattr(config, name, _typed_scalar(value, base, key))


def _typed_scalar(value: Any, base: type, key: str) -> Any:
    if base is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif base is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        _check(-MAX_INT - 1 <= value <= MAX_INT, key, f"must fit in 64 bits, got {value}")
    elif base is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        value = float(value)
        _check(math.isfinite(value), key, f"must be a finite number, got {value}")
    elif base is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


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

        _check_types(self, "model")
        _check(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        _check(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size",
               f"must be positive, got {self.vocab_size}")
        _check(self.num_hidden_layers is None or self.num_hidden_layers > 0, "model.num_hidden_layers",
               f"must be > 0, got {self.num_hidden_layers}")
        _check(self.initializer_range is None or self.initializer_range > 0, "model.initializer_range",
               f"must be > 0, got {self.initializer_range}")


@dataclasses.dataclass
class DataConfig:
    dir: str = "data/shakespeare"
    """Data directory written by ``mileloss data`` (manifest.json, tokenizer/, token shards)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the manifest before training."""

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _check(bool(self.dir.strip()) and "\0" not in self.dir, "data.dir",
               f"must be a non-empty path, got {self.dir!r}")


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
        _check_types(self, "loss")
        _check(self.kind in ("ce", "focal", "mile"), "loss.kind", f"must be ce, focal or mile, got {self.kind!r}")
        _check(self.gamma >= 0, "loss.gamma", f"must be >= 0, got {self.gamma}")
        _check(self.sigma >= 0, "loss.sigma", f"must be >= 0, got {self.sigma}")
        _check(self.normalize in ("weighted", "paper"), "loss.normalize",
               f"must be weighted or paper, got {self.normalize!r}")
        _check(self.chunk_size is None or self.chunk_size > 0, "loss.chunk_size", f"must be > 0, got {self.chunk_size}")


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
        _check_types(self, "optim")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two values in [0, 1), got {list(self.betas)}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")


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
    tokens_per_step: int | None = None
    """Global batch in tokens per optimizer step (the paper: 1,048,576 for 468M and 1.2B, 4,194,304 for 6.7B).
    When set, ``grad_accum_steps`` is derived at start-up: tokens_per_step / (batch_size * seq_len * world size),
    which must be a whole number (else :class:`~mileloss.errors.BatchScheduleError`); the same config then keeps
    the same global batch on 8 or 128 GPUs. ``null``: the global batch follows from ``grad_accum_steps``."""
    grad_accum_steps: int | None = None
    """Micro-batches per optimizer step; tokens per step = batch_size * seq_len * grad_accum_steps * world size.
    ``null``: derived from ``tokens_per_step`` when that is set, else 1. Set both only if they agree (the
    resolved config a run saves has both); ``tokens_per_step`` is the one the run honours."""
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
    parallel: str = "ddp"
    """How ``torchrun`` processes share the work: ``ddp`` (every rank holds the whole model, its gradients and
    AdamW state: fastest while that fits, e.g. the tiny/small presets and 468M on large GPUs) or ``fsdp`` (FSDP2,
    ``torch.distributed.fsdp.fully_shard``: one unit per decoder layer plus the root, built on the meta device and
    materialised shard by shard, so each rank holds 1/world of the parameters, gradients and optimizer state;
    choose it when the model does not fit one device under DDP, i.e. 1.2B and 6.7B). The loss and the gradients
    are those of one process on the whole batch either way. A single process ignores it. Under ``fsdp`` the
    checkpoints are sharded (DCP format, ``checkpoints/step_N/``); ``--resume`` takes either kind."""
    reshard_after_forward: bool = True
    """``fsdp`` only: free each layer's gathered parameters after its forward and gather them again in backward
    (less memory, one more all-gather per layer); ``false`` keeps them until backward (ZeRO-2-like)."""

    def __post_init__(self) -> None:
        _check_types(self, "run")
        _check(bool(self.out.strip()) and "\0" not in self.out, "run.out",
               f"must be a non-empty path, got {self.out!r}")
        _check(0 <= self.seed <= MAX_INT, "run.seed", f"must be an integer in [0, 2**63), got {self.seed}")
        _check(self.max_steps is not None or self.max_tokens is not None, "run.max_steps",
               "set run.max_steps or run.max_tokens")
        _check(self.max_steps is None or self.max_steps > 0, "run.max_steps", f"must be > 0, got {self.max_steps}")
        _check(self.max_tokens is None or self.max_tokens > 0, "run.max_tokens", f"must be > 0, got {self.max_tokens}")
        _check(self.batch_size > 0, "run.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.seq_len is None or self.seq_len > 1, "run.seq_len", f"must be > 1, got {self.seq_len}")
        _check(self.grad_accum_steps is None or self.grad_accum_steps > 0, "run.grad_accum_steps",
               f"must be > 0, got {self.grad_accum_steps}")
        _check(self.tokens_per_step is None or self.tokens_per_step > 0, "run.tokens_per_step",
               f"must be > 0, got {self.tokens_per_step}")
        for key in ("eval_every", "checkpoint_every", "log_every"):
            _check(getattr(self, key) >= 0, f"run.{key}", f"must be >= 0 (0: never), got {getattr(self, key)}")
        _check(self.eval_batches > 0, "run.eval_batches", f"must be > 0, got {self.eval_batches}")
        _check(self.keep_checkpoints > 0, "run.keep_checkpoints", f"must be > 0, got {self.keep_checkpoints}")
        _check(self.dtype in ("auto", "bf16", "fp32"), "run.dtype", f"must be auto, bf16 or fp32, got {self.dtype!r}")
        _check(bool(_DEVICE.match(self.device)), "run.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.num_threads is None or 0 < self.num_threads <= MAX_THREADS, "run.num_threads",
               f"must be in [1, {MAX_THREADS}], got {self.num_threads}")
        _check(self.parallel in ("ddp", "fsdp"), "run.parallel", f"must be ddp or fsdp, got {self.parallel!r}")


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
    match = difflib.get_close_matches(str(key), list(candidates), n=1, cutoff=0.5)
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
    if typing.get_origin(base) is tuple:
        items = value
        if isinstance(value, str):
            try:
                items = yaml.safe_load(value)
            except yaml.YAMLError:
                items = value
        if not isinstance(items, (list, tuple)):
            raise ConfigValueError(f"{key}: must be a list such as [0.9, 0.95], got {value!r}")
        return tuple(_coerce_scalar(item, float, key) for item in items)
    return _coerce_scalar(value, base, key)


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _coerce_scalar(value: Any, base: type, key: str) -> Any:
    """One value read from YAML or the command line, converted to ``base`` without silent reinterpretation."""
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    problem = ConfigValueError(f"{key}: must be {what}, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise problem
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigValueError(f"{key}: must be a string, got {value!r} (quote it in YAML)")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise problem
    if base is float:
        try:
            return float(value)
        except ValueError:
            raise problem from None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)  # "12" or a huge integer, exactly
        except ValueError:
            pass
    try:
        number = float(value)  # 1e6 or "1e6"
    except ValueError:
        raise problem from None
    if not number.is_integer():
        raise problem
    return int(number)


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
        merged.setdefault(section, {})[name] = _parse_override(key, text)
    return merged


def _parse_override(key: str, text: Any) -> Any:
    """A command-line value: raw text for string fields (``run.out=1.10`` stays "1.10"), else parsed as YAML."""
    if not isinstance(text, str):
        return text
    section, name = key.split(".", 1)
    if _field_types(SECTIONS[section])[name] is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]
        raise ConfigValueError(f"{key}: cannot read {text!r} ({reason})") from None


def derive_grad_accum_steps(run: RunConfig, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step for ``world_size`` processes with sequences of ``seq_len`` tokens.

    With ``run.tokens_per_step`` set: ``tokens_per_step / (batch_size * seq_len * world_size)``, which must be a
    positive whole number; an explicit ``run.grad_accum_steps`` must then give the same global batch. Without it:
    ``run.grad_accum_steps`` (``null``: 1).

    Raises:
        BatchScheduleError: the division leaves a remainder or a zero, or the two keys disagree; the message
            names the numbers and the nearest global batches that divide.
    """
    if world_size < 1:
        raise ConfigValueError(f"world size must be >= 1, got {world_size}")
    if run.tokens_per_step is None:
        return run.grad_accum_steps if run.grad_accum_steps is not None else 1
    micro = run.batch_size * seq_len * world_size
    accum, remainder = divmod(run.tokens_per_step, micro)
    where = (f"run.batch_size={run.batch_size} x run.seq_len={seq_len} x {world_size} process(es) = {micro:,} "
             f"tokens per micro-batch")
    if remainder or accum == 0:
        lower, upper = accum * micro, (accum + 1) * micro
        nearest = f"{upper:,}" if accum == 0 else f"{lower:,} or {upper:,}"
        raise BatchScheduleError(
            f"run.tokens_per_step={run.tokens_per_step:,} is not a whole number of micro-batches ({where}): "
            f"choose run.tokens_per_step={nearest.replace(',', '')}, or a batch size / process count that divides it")
    if run.grad_accum_steps is not None and run.grad_accum_steps != accum:
        raise BatchScheduleError(
            f"run.grad_accum_steps={run.grad_accum_steps} gives {run.grad_accum_steps * micro:,} tokens per step but "
            f"run.tokens_per_step={run.tokens_per_step:,} ({where}) needs {accum}: set run.grad_accum_steps=null "
            f"(derived) or run.tokens_per_step=null")
    return accum


PRESET_CONFIG_PACKAGE = "mileloss"
PRESET_CONFIG_FOLDER = "configs"
"""The packaged presets live in ``mileloss/configs/<name>.yaml`` (package data, in the wheel)."""


def _preset_folder():
    return importlib.resources.files(PRESET_CONFIG_PACKAGE) / PRESET_CONFIG_FOLDER


def config_presets() -> list[str]:
    """The names of the configs shipped inside the package (``tiny``, ``small``, ``468M``, ``1.2B``, ``6.7B``)."""
    folder = _preset_folder()
    if not folder.is_dir():
        return []
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def preset_config_path(name: str) -> Path:
    """The packaged YAML file of preset ``name`` (``tiny`` or ``tiny.yaml``).

    Raises:
        ConfigNotFoundError: listing the packaged presets.
    """
    stem = str(name).removesuffix(".yaml")
    presets = config_presets()
    if stem not in presets:
        raise ConfigNotFoundError(f"config {name!r} is neither a file nor a packaged preset; "
                                 f"presets: {', '.join(presets) or '(none installed)'}, or give a path to a YAML file")
    return Path(str(_preset_folder() / f"{stem}.yaml"))  # a wheel installs package data as plain files


def _looks_like_a_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith(("~", ".")) or (
        name.endswith((".yaml", ".yml")) and name.removesuffix(".yaml") not in config_presets())


def resolve_config(path: str | Path) -> Path:
    """An existing file as given; else the packaged preset of that name.

    Raises:
        ConfigNotFoundError: a path (with a folder or a ``.yaml``/``.yml`` suffix) that does not exist, or a bare
            name that is no packaged preset; the message lists the presets.
    """
    if Path(path).is_file():
        return Path(path)
    name = str(path)
    if isinstance(path, Path) or _looks_like_a_path(name):
        presets = ", ".join(config_presets())
        raise ConfigNotFoundError(f"config file not found: {path} (the packaged presets are named without a path: "
                                  f"{presets})")
    return preset_config_path(name)


def load_config(path: str | Path | None = None, overrides: dict[str, str] | list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply overrides and validate.

    Args:
        path: YAML file with sections model/data/loss/optim/run, or the name of a packaged preset
            (:func:`config_presets`: ``tiny``, ``small``, ...); an existing file wins over a preset of the same
            name. ``None`` uses the defaults.
        overrides: ``{"loss.kind": "mile"}`` or a list such as ``["loss.kind=mile", "--run.seed", "3"]``.
    Raises:
        ConfigNotFoundError: ``path`` is neither an existing file nor a packaged preset (the message lists them).
        ConfigKeyError, ConfigValueError: unknown key / bad value, naming the key.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        path = resolve_config(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            reason = " ".join(str(error).split())
            raise ConfigValueError(f"{path}: cannot read the config file as YAML: {reason}") from None
        if not isinstance(raw, dict):
            raise ConfigValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigKeyError(f"{path}: unknown section {section!r}{_suggest(str(section), SECTIONS)}")
            if values is not None and not isinstance(values, dict):
                raise ConfigValueError(f"{path}: section {section!r} must be a mapping of keys, got {values!r}")
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
    """Write the resolved config as YAML (atomically: a kill leaves the old file or the new one)."""
    from mileloss.run_folder import write_atomic

    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
