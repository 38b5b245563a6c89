"""Tokenizers: train a byte-level BPE, or load a pretrained one (a ``tokenizer.json`` file or a folder).

The trained tokenizer is GPT-2 style: text is split by the GPT-2 pre-tokenization regex, mapped to
bytes (so every string round-trips: ``decode(encode(text)) == text``), and merged by BPE learned on
the corpus. Its only special token is ``<|endoftext|>`` (id 0), used as eos, bos and pad; encoding
adds no special token. Training is deterministic: the same texts and vocabulary size give the same
``tokenizer.json`` byte for byte.

Saved folders load with ``transformers.AutoTokenizer.from_pretrained(folder)``.

A pretrained tokenizer (``--tokenizer PATH``) is a local Hugging Face tokenizer folder, or a bare
``tokenizer.json`` file (e.g. LLaMA's 32000-token vocabulary): for a bare file the eos (and bos, unk) token
is recognised by name among its special tokens (``EOS_NAMES``, ``BOS_NAMES``); a file whose eos cannot be
named that way is refused (give a folder whose ``tokenizer_config.json`` names it). A path that does
not exist and reads ``org/name`` is taken as a hub id, loaded when the hub is reachable (an error naming
it otherwise). No code from a tokenizer runs (``trust_remote_code`` is never set).

Special tokens between documents (``DocumentSpecials``, recorded in the manifest as ``specials`` and
checked again at train time): the text of a document is encoded with ``add_special_tokens=False`` and
with special-token strings *inside the text* encoded as plain text (``encode_special_tokens``), so the
text alone never yields a special id. Around each document we then write what the tokenizer's own
post-processor would add around a text (its template, found by encoding one probe word with and without
special tokens), followed by eos unless that template already ends with eos. A GPT-2 style tokenizer
(ours: the template adds nothing) gives ``text <|endoftext|>`` per document; a LLaMA-style tokenizer
(template ``<s> $A``) gives ``<s> text </s>``. Each special is inserted once, by us; the
post-processor itself never runs on the data.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mileloss.errors import TokenizerError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
NUM_BYTES = 256  # the byte-level alphabet; a vocabulary needs these plus eos
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")  # in order of preference
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
UNK_NAMES = ("<unk>", "<|unk|>")
PROBE_TEXT = "probe"  # encoded with and without special tokens to read the tokenizer's own template
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")  # org/name, nothing else


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
    """Load a local Hugging Face tokenizer folder or a bare ``tokenizer.json`` file; it must define an eos token.

    Raises:
        TokenizerError: the path is missing, does not load, or has no eos token.
    """
    text = str(path)
    path = Path(path)
    if path.is_file():
        return _load_tokenizer_file(path)
    if not path.exists() and HUB_ID.fullmatch(text):
        return _load_hub_tokenizer(text)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer {path} does not exist (give a tokenizer folder or a tokenizer.json file)")
    from transformers import AutoTokenizer

    try:  # a local folder only, and never code from it (auto_map classes need trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds on a malformed folder; name the folder
        reason = " ".join(str(error).split())[:300]  # one line: transformers' messages span several
        raise TokenizerError(f"cannot load a tokenizer from {path}: {type(error).__name__}: {reason}") from error
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer at {path} has no eos token; documents are separated by eos")
    return tokenizer


def _load_hub_tokenizer(hub_id: str):
    """A tokenizer by hub id (``org/name``), when the hub is reachable; no remote code runs."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=False)
    except Exception as error:  # offline, unknown id, gated model: transformers raises many kinds
        reason = " ".join(str(error).split())[:300]
        raise TokenizerError(
            f"tokenizer {hub_id!r}: no such local folder or file, and the hub id cannot be loaded "
            f"({type(error).__name__}: {reason})"
        ) from error
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer {hub_id} has no eos token; documents are separated by eos")
    return tokenizer


def _load_tokenizer_file(path: Path):
    """A bare ``tokenizer.json``: bos/eos/unk recognised by name among its special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exceptions on a malformed file
        reason = " ".join(str(error).split())[:300]
        raise TokenizerError(f"{path}: not a tokenizers JSON file ({reason})") from error
    specials = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}

    def pick(names):
        return next((name for name in names if name in specials), None)

    eos = pick(EOS_NAMES)
    if eos is None:
        raise TokenizerError(
            f"{path}: no special token named like an eos ({', '.join(EOS_NAMES)}; it has "
            f"{sorted(specials)[:10]}): give a tokenizer folder whose tokenizer_config.json names eos_token"
        )
    kwargs = {"bos_token": pick(BOS_NAMES), "unk_token": pick(UNK_NAMES)}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        clean_up_tokenization_spaces=False,
        **{key: value for key, value in kwargs.items() if value is not None},
    )


@dataclass(frozen=True)
class DocumentSpecials:
    """The special ids written around every document (see the module docstring), as the manifest records them."""

    eos_token: str
    eos_token_id: int
    bos_token: str | None
    bos_token_id: int | None
    document_start: tuple[int, ...]  # ids before each document's text
    document_end: tuple[int, ...]  # ids after it (ends with eos_token_id)

    def to_json(self) -> dict:
        return {
            "policy": "text encoded without special tokens (special-token strings in the text encoded as text); "
            "document_start and document_end, from the tokenizer's own template plus eos, inserted around "
            "every document by mileloss",
            "eos_token": self.eos_token,
            "eos_token_id": self.eos_token_id,
            "bos_token": self.bos_token,
            "bos_token_id": self.bos_token_id,
            "document_start": list(self.document_start),
            "document_end": list(self.document_end),
        }

    @classmethod
    def from_json(cls, data: dict) -> DocumentSpecials:
        return cls(data["eos_token"], data["eos_token_id"], data["bos_token"], data["bos_token_id"],
                   tuple(data["document_start"]), tuple(data["document_end"]))

    def describe(self) -> str:
        return (f"before each document {list(self.document_start)}, after it {list(self.document_end)} "
                f"(eos {self.eos_token!r} = {self.eos_token_id}, bos {self.bos_token!r} = {self.bos_token_id})")


def document_specials(tokenizer) -> DocumentSpecials:
    """What to write around each document for ``tokenizer`` (a ``transformers`` fast tokenizer).

    Raises:
        TokenizerError: no eos, or a post-processor whose output does not contain the text's own ids.
    """
    if tokenizer.eos_token_id is None:
        raise TokenizerError("the tokenizer has no eos token; documents are separated by eos")
    backend = tokenizer.backend_tokenizer
    plain = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    templated = backend.encode(PROBE_TEXT, add_special_tokens=True).ids
    starts = [i for i in range(len(templated) - len(plain) + 1) if templated[i : i + len(plain)] == plain]
    if not plain or not starts:
        raise TokenizerError(
            f"the tokenizer's post-processor turns {plain} into {templated}: not the text with specials around it"
        )
    start = tuple(templated[: starts[0]])
    end = tuple(templated[starts[0] + len(plain) :])
    eos = int(tokenizer.eos_token_id)
    if not end or end[-1] != eos:
        end = (*end, eos)
    bos_id = tokenizer.bos_token_id
    return DocumentSpecials(
        eos_token=str(tokenizer.eos_token),
        eos_token_id=eos,
        bos_token=None if tokenizer.bos_token is None else str(tokenizer.bos_token),
        bos_token_id=None if bos_id is None else int(bos_id),
        document_start=tuple(int(i) for i in start),
        document_end=tuple(int(i) for i in end),
    )


def data_tokenizer_json(tokenizer) -> str:
    """The tokenizer as a JSON string for encoding data: special-token strings in the text stay text."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend.to_str()


class TextEncoder:
    """Encodes text pieces to ids with a tokenizer built from ``data_tokenizer_json`` (picklable by its JSON).

    ``encode_special_tokens`` is not kept by ``to_str``, so it is set again here.
    """

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.backend = Tokenizer.from_str(tokenizer_json)
        self.backend.encode_special_tokens = True
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._encode(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]


def pieces_are_exact(encode) -> bool:
    """Whether encoding a text cut before a space, piece by piece, gives the ids of the whole text.

    True for byte-level (GPT-2 style) pre-tokenization; a tokenizer that prepends a word marker to every
    input (SentencePiece/Metaspace style) gives other ids at a cut, which matters only for documents longer
    than one piece (``mileloss.data.corpora.BLOCK_CHARS``).
    """
    text = "one two  three\nfour"
    whole = encode([text])[0].tolist()
    cut = encode(["one two", "  three", "\nfour"])
    return whole == [int(i) for ids in cut for i in ids]


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
