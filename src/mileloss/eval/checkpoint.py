"""Find and validate what ``mileloss eval`` evaluates: a run folder or a Hugging Face checkpoint folder.

A run folder (written by ``mileloss train``) holds the model in ``final/``; any folder with a ``config.json``,
model weights and tokenizer files (``save_pretrained`` of a model and its tokenizer) is a checkpoint.

Nothing read from the folder can run code: models and tokenizers load with ``trust_remote_code=False``, weights
from safetensors where present, and pickled ``*.bin`` weights are first opened with ``torch.load(weights_only=True)``
(which refuses anything but tensors and plain containers) before transformers sees them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

from mileloss.errors import CheckpointError, EvalArgumentError, EvalDataError, TokenizerMismatchError
from mileloss.run_folder import FINAL, RUN_INFO, RunFolder, read_json_object

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "Checkpoint", "LossSettings", "check_pickled_weights", "check_tokenizer_matches", "load_model",
           "model_sizes", "resolve_checkpoint", "run_loss_settings", "torch_dtype"]

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Values of ``--dtype``."""
LOSS_KINDS = ("ce", "focal", "mile")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A validated model folder.

    Attributes:
        path: the folder with ``config.json``, weights and tokenizer.
        run_dir: the training run folder it belongs to (``path`` = ``run_dir/final``), or None.
        run_info: contents of ``mileloss_run.json`` (loss, data_dir, steps, tokens, seed) or {}.
    """

    path: Path
    run_dir: Path | None
    run_info: dict


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Locate the model of a run folder or validate a checkpoint folder.

    Raises:
        CheckpointError: if the folder does not exist, has no ``config.json`` or weights, or no tokenizer.
    """
    path, run = Path(path), RunFolder(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint folder")
    run_dir = None
    if (run.final / "config.json").is_file():
        run_dir, path = path, run.final
    elif not (path / "config.json").is_file():
        hint = " (a run whose training has not finished has no final/ yet)" if run.metrics_jsonl.is_file() else ""
        raise CheckpointError(f"{path}: neither {run.final / 'config.json'} nor {path / 'config.json'} exists{hint}")
    elif path.name == FINAL and RunFolder(path.parent).config.is_file():
        run_dir = path.parent
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path}: no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: checkpoint has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}); "
            f"save it beside the model with tokenizer.save_pretrained({str(path)!r})"
        )
    run_info = _read_json_object(path / RUN_INFO) if (path / RUN_INFO).is_file() else {}
    return Checkpoint(path=path, run_dir=run_dir, run_info=run_info)


def model_sizes(checkpoint: Checkpoint) -> tuple[int | None, int | None]:
    """``(vocab_size, max_position_embeddings)`` from ``config.json``, read before any weight is loaded.

    Raises:
        CheckpointError: a ``config.json`` that is not a JSON object, or sizes that are not positive integers.
    """
    config = _read_json_object(checkpoint.path / "config.json")
    sizes = []
    for key in ("vocab_size", "max_position_embeddings"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{checkpoint.path / 'config.json'}: {key} must be a positive integer, got {value!r}")
        sizes.append(value)
    return sizes[0], sizes[1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json_object(path: Path) -> dict:
    value = read_json_object(path)
    if value is None:
        raise CheckpointError(f"{path}: not a readable JSON file holding an object")
    return value


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The token weighting a run was trained with: ``kind`` in ce / focal / mile, ``gamma``, ``sigma``.

    ``source`` says where they were read (``final/mileloss_run.json``, ``config.yaml``), or that a bare
    checkpoint carries none and the paper's MiLe gamma = sigma = 1 is reported.
    """

    kind: str = "mile"
    gamma: float = 1.0
    sigma: float = 1.0
    normalize: str = "weighted"
    source: str = "default: the checkpoint records no training loss; MiLe with the paper's gamma = sigma = 1"

    @property
    def formula(self) -> str:
        return {"ce": "1", "focal": "(1 - p_target) ** gamma", "mile": "(sigma + H) ** gamma"}[self.kind]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "formula": self.formula}


def _loss_section(section, where: str) -> dict:
    """Validated ``{"kind", "gamma", "sigma", "normalize"}`` of one ``loss`` mapping (keys it lacks are left out)."""
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: 'loss' must be a mapping, got {type(section).__name__}")
    found = {}
    if "kind" in section:
        if section["kind"] not in LOSS_KINDS:
            raise CheckpointError(f"{where}: loss.kind must be one of {LOSS_KINDS}, got {section['kind']!r}")
        found["kind"] = section["kind"]
    for name in ("gamma", "sigma"):
        if name in section:
            value = section[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CheckpointError(f"{where}: loss.{name} must be a finite number >= 0, got {value!r}")
            found[name] = float(value)
    if "normalize" in section:
        if not isinstance(section["normalize"], str):
            raise CheckpointError(f"{where}: loss.normalize must be a string, got {section['normalize']!r}")
        found["normalize"] = section["normalize"]
    return found


def run_loss_settings(checkpoint: Checkpoint) -> LossSettings:
    """The loss kind, gamma and sigma the checkpoint was trained with.

    Read from ``final/mileloss_run.json`` and, for a run folder, ``config.yaml`` (``yaml.safe_load``); where both
    name a value they must agree. A checkpoint with neither gets :class:`LossSettings`' default (stated as such).

    Raises:
        CheckpointError: a malformed file, a value of the wrong type, or the two files disagreeing.
    """
    sources: list[tuple[str, dict]] = []
    if "loss" in checkpoint.run_info:
        where = str(checkpoint.path / RUN_INFO)
        sources.append((where, _loss_section(checkpoint.run_info["loss"], where)))
    config_path = RunFolder(checkpoint.run_dir).config if checkpoint.run_dir is not None else None
    if config_path is not None and config_path.is_file():
        import yaml

        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise CheckpointError(f"{config_path}: not a readable YAML file ({_first_line(error)})") from error
        if config is not None and not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a mapping, got {type(config).__name__}")
        if config and "loss" in config:
            sources.append((str(config_path), _loss_section(config["loss"], str(config_path))))
    if not sources:
        return LossSettings()
    merged: dict = {}
    for where, found in sources:
        for key, value in found.items():
            if key in merged and merged[key][1] != value:
                raise CheckpointError(f"{merged[key][0]} says loss.{key}={merged[key][1]!r} but {where} says "
                                      f"{value!r}; which loss trained this model?")
            merged.setdefault(key, (where, value))
    if "kind" not in merged:
        raise CheckpointError(f"{sources[0][0]}: the loss section names no kind (ce, focal or mile)")
    values = {key: value for key, (_, value) in merged.items()}
    return LossSettings(**{"gamma": 1.0, "sigma": 1.0, "normalize": "weighted", **values},
                        source=" + ".join(where for where, _ in sources))


def check_tokenizer_matches(checkpoint_dir: str | Path, data_tokenizer_dir: str | Path) -> None:
    """Fail unless the checkpoint's tokenizer maps every token string to the same id as the data's tokenizer.

    Raises:
        EvalDataError: if ``data_tokenizer_dir`` is missing.
        TokenizerMismatchError: naming both folders, the vocabulary sizes and a few differing tokens.
    """
    from transformers import AutoTokenizer

    checkpoint_dir, data_tokenizer_dir = Path(checkpoint_dir), Path(data_tokenizer_dir)
    if not data_tokenizer_dir.is_dir():
        raise EvalDataError(f"{data_tokenizer_dir}: the data directory has no tokenizer folder")
    vocabularies = []
    for folder in (checkpoint_dir, data_tokenizer_dir):
        try:
            vocabularies.append(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False).get_vocab())
        except Exception as error:  # transformers and huggingface_hub raise many types for a malformed folder
            raise CheckpointError(f"{folder}: cannot load its tokenizer ({_first_line(error)})") from error
    model_vocab, data_vocab = vocabularies
    if model_vocab == data_vocab:
        return
    differing = sorted(set(model_vocab.items()) ^ set(data_vocab.items()), key=lambda item: item[1])[:5]
    raise TokenizerMismatchError(
        f"the checkpoint {checkpoint_dir} was not trained on tokens of {data_tokenizer_dir}: its tokenizer has "
        f"{len(model_vocab)} entries, the data's {len(data_vocab)}; e.g. differing (token, id) pairs {differing}. "
        f"Evaluate with the data directory the model was trained on."
    )


def torch_dtype(dtype: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` for the floating dtypes of :data:`DTYPES`.

    Raises:
        EvalArgumentError: for anything else (``int8``, ``no_such``).
    """
    import torch

    if dtype not in DTYPES:
        raise EvalArgumentError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def has_safetensors(checkpoint: Checkpoint) -> bool:
    return any((checkpoint.path / name).is_file() for name in WEIGHT_FILES[:2])


def check_pickled_weights(checkpoint: Checkpoint) -> None:
    """Unless the checkpoint has safetensors weights (which hold no code, and are what transformers then loads),
    open every pickled weight file with ``torch.load(weights_only=True)``: it refuses anything but tensors.

    transformers (>= 4.46, as pyproject admits) loads ``*.bin`` with ``weights_only=True`` too; checking here keeps
    that true whatever loads the checkpoint next (lm-eval included).

    Raises:
        CheckpointError: naming the file that is not plain tensors.
    """
    import pickle

    import torch

    if has_safetensors(checkpoint):
        return
    files = [checkpoint.path / "pytorch_model.bin"] if (checkpoint.path / "pytorch_model.bin").is_file() else []
    index_path = checkpoint.path / "pytorch_model.bin.index.json"
    if index_path.is_file():
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map parameter names to shard file names")
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{index_path}: shard {name!r} is not a file name inside {checkpoint.path}")
            files.append(checkpoint.path / name)
    for path in files:
        try:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(error):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
            found = re.search(r"(?i)unsupported (?:global: )?GLOBAL [\w.]+", str(error))  # what the pickle would call
            reason = found.group(0) if found else type(error).__name__
            raise CheckpointError(f"{path}: refused to load pickled weights that are not plain tensors "
                                  f"(torch.load weights_only=True: {reason}); use a safetensors checkpoint") from error


def load_model(checkpoint: Checkpoint, *, device: str = "cpu", dtype: str = "float32"):
    """Load the causal LM of ``checkpoint`` in eval mode on ``device``, in ``dtype``.

    No dtype is passed to ``from_pretrained`` (its ``torch_dtype=`` of transformers 4.x became ``dtype=`` in 5.x):
    the weights load in the library's default (float32 on 4.x, the saved dtype on 5.x) and are cast afterwards,
    which behaves the same on both.

    Raises:
        EvalArgumentError: a ``dtype`` outside :data:`DTYPES`.
        CheckpointError: pickled weights that are not plain tensors, or a model transformers cannot build
            without running code from the folder.
    """
    from transformers import AutoModelForCausalLM

    target_dtype = torch_dtype(dtype)
    check_pickled_weights(checkpoint)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), trust_remote_code=False,
                                                     use_safetensors=has_safetensors(checkpoint))
    except Exception as error:  # transformers and huggingface_hub raise many types for a malformed folder
        raise CheckpointError(f"{checkpoint.path}: cannot load the model ({_first_line(error)})") from error
    return model.to(device=device, dtype=target_dtype).eval()
