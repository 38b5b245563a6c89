"""Tokenizers: train a byte-level BPE, or load an existing Hugging Face tokenizer folder.

The trained tokenizer is GPT-2 style: text is split by the GPT-2 pre-tokenization regex, mapped to
bytes (so every string round-trips: ``decode(encode(text)) == text``), and merged by BPE learned on
the corpus. Its only special token is ``<|endoftext|>`` (id 0), used as eos, bos and pad; encoding
adds no special token. Training is deterministic: the same texts and vocabulary size give the same
``tokenizer.json`` byte for byte.

Saved folders load with ``transformers.AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mileloss.errors import TokenizerError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
NUM_BYTES = 256  # the byte-level alphabet; a vocabulary needs these plus eos


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Args:
        texts: the training text, any number of pieces (documents or parts of documents).
        vocab_size: the largest vocabulary to learn, eos and the 256 byte tokens included; training
            stops earlier if no pair of tokens occurs ``min_frequency`` times.
        min_frequency: the fewest occurrences for a pair of tokens to be merged.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``eos_token = "<|endoftext|>"``.

    Raises:
        TokenizerError: ``vocab_size`` is below 257.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < NUM_BYTES + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte-level BPE needs >= {NUM_BYTES + 1}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        learned = backend.get_vocab_size()
        logger.warning("tokenizer: learned %d tokens, fewer than the %d asked for", learned, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path):
    """Load a local Hugging Face tokenizer folder; it must define an eos token.

    Raises:
        TokenizerError: the folder is missing, does not load, or has no eos token.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder {path} does not exist")
    try:  # a local folder only, and never code from it (auto_map classes need trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds on a malformed folder; name the folder
        reason = " ".join(str(error).split())[:300]  # one line: transformers' messages span several
        raise TokenizerError(f"cannot load a tokenizer from {path}: {type(error).__name__}: {reason}") from error
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer at {path} has no eos token; documents are separated by eos")
    return tokenizer


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` into ``folder``, with a ``tokenizer_class`` every transformers version knows."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 writes its new class name "TokenizersBackend", which 4.x cannot resolve; the
    # classic name loads the same tokenizer in both.
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def tokenizer_vocab_size(tokenizer_or_folder) -> int:
    """The number of token ids (``len(tokenizer)``: vocabulary plus added tokens).

    A folder with a ``tokenizer.json`` is read with ``tokenizers`` alone (fast, no ``transformers``).
    """
    if not isinstance(tokenizer_or_folder, str | Path):
        return len(tokenizer_or_folder)
    folder = Path(tokenizer_or_folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return len(load_tokenizer(folder))


def encode_batch(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), as int64 arrays; batched in Rust when possible.

    ``encode_batch_fast`` (tokenizers >= 0.20) skips the character offsets, which we do not use.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(row, dtype=np.int64) for row in ids]
