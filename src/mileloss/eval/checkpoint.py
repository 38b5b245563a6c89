"""Find and validate what ``mileloss eval`` evaluates: a run folder or a Hugging Face checkpoint folder.

A run folder (written by ``mileloss train``) holds the model in ``final/``; any folder with a ``config.json``,
model weights and tokenizer files (``save_pretrained`` of a model and its tokenizer) is a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from mileloss.eval.errors import CheckpointError, EvalDataError, TokenizerMismatchError

logger = logging.getLogger(__name__)

__all__ = ["Checkpoint", "check_tokenizer_matches", "load_model", "resolve_checkpoint"]

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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

    @property
    def default_out_dir(self) -> Path:
        """``RUN_DIR/eval`` for a run, ``CHECKPOINT/eval`` for a bare checkpoint."""
        return (self.run_dir if self.run_dir is not None else self.path) / "eval"


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Locate the model of a run folder or validate a checkpoint folder.

    Raises:
        CheckpointError: if the folder does not exist, has no ``config.json`` or weights, or no tokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint folder")
    run_dir = None
    if (path / "final" / "config.json").is_file():
        run_dir, path = path, path / "final"
    elif not (path / "config.json").is_file():
        hint = " (a run folder whose training has not finished has no final/ yet)" if (
            path / "metrics.jsonl").is_file() else ""
        raise CheckpointError(f"{path}: neither {path / 'final' / 'config.json'} nor {path / 'config.json'} "
                              f"exists{hint}")
    elif path.name == "final" and (path.parent / "config.yaml").is_file():
        run_dir = path.parent
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path}: no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: checkpoint has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}); "
            f"save it beside the model with tokenizer.save_pretrained({str(path)!r})"
        )
    run_info = {}
    if (path / "mileloss_run.json").is_file():
        run_info = json.loads((path / "mileloss_run.json").read_text())
    return Checkpoint(path=path, run_dir=run_dir, run_info=run_info)


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
    model_vocab = AutoTokenizer.from_pretrained(str(checkpoint_dir)).get_vocab()
    data_vocab = AutoTokenizer.from_pretrained(str(data_tokenizer_dir)).get_vocab()
    if model_vocab == data_vocab:
        return
    differing = sorted(set(model_vocab.items()) ^ set(data_vocab.items()), key=lambda item: item[1])[:5]
    raise TokenizerMismatchError(
        f"the checkpoint {checkpoint_dir} was not trained on tokens of {data_tokenizer_dir}: its tokenizer has "
        f"{len(model_vocab)} entries, the data's {len(data_vocab)}; e.g. differing (token, id) pairs {differing}. "
        f"Evaluate with the data directory the model was trained on."
    )


def load_model(checkpoint: Checkpoint, *, device: str = "cpu", dtype: str = "float32"):
    """Load the causal LM of ``checkpoint`` in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise CheckpointError(f"--dtype {dtype!r} is not a torch dtype (use float32, bfloat16 or float16)") from None
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=torch_dtype)
    return model.to(device).eval()
