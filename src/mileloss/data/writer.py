"""Tokenize documents once and write them as token shards plus a manifest.

The pass is streaming: documents are read one at a time, encoded in batches (in Rust, in parallel),
and appended to the current shard of their split; a shard is closed at ``max_shard_tokens``. Memory
stays bounded by one batch of text, whatever the corpus size.

Train/val split, by document: document i goes to val when ``u(seed, i) < val_fraction``, where
``u`` is a uniform number in [0, 1) from a keyed hash (blake2b) of the seed and the index, so the
assignment depends on nothing but (seed, index, val_fraction). With ``val_fraction > 0`` and two or
more documents, the last document is moved to whichever split would otherwise be empty. A corpus of
a single document is split by token position instead: its last ``val_fraction`` of tokens become val.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mileloss.data.corpora import Document
from mileloss.data.shards import (
    SPLITS,
    TOKEN_COUNTS_FILE,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    hash_and_count,
    shard_name,
    write_atomic,
)
from mileloss.data.tokenizer import encode_batch
from mileloss.errors import EmptyCorpusError, TokenizerError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_TOKENS = 100_000_000
BATCH_CHARS = 2**20  # text per encode_batch call
MOVE_BLOCK_TOKENS = 8 * 2**20


def document_split(seed: int, index: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for document ``index``: a seeded hash, uniform in [0, 1), against the fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, key=b"mileloss-split").digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


class _ShardWriter:
    """Appends tokens to ``{split}_00000.bin``, ``{split}_00001.bin``, ... of at most ``max_tokens`` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_tokens: int):
        self.directory, self.split, self.dtype, self.max_tokens = directory, split, dtype, max_tokens
        self.shard_tokens: list[int] = []  # tokens in each shard written so far
        self.num_documents = 0
        self._handle = None

    @property
    def num_tokens(self) -> int:
        return sum(self.shard_tokens)

    def path(self, index: int) -> Path:
        return self.directory / shard_name(self.split, index)

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._handle is None or self.shard_tokens[-1] == self.max_tokens:
                self._open_next()
            room = self.max_tokens - self.shard_tokens[-1]
            self._handle.write(tokens[:room].tobytes())
            self.shard_tokens[-1] += min(room, len(tokens))
            tokens = tokens[room:]

    def _open_next(self) -> None:
        self.close()
        self.shard_tokens.append(0)
        self._handle = open(self.path(len(self.shard_tokens) - 1), "wb")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def truncate(self, keep: int) -> None:
        """Keep only the first ``keep`` tokens (shards past them are deleted)."""
        self.close()
        start = 0
        for index, count in enumerate(list(self.shard_tokens)):
            if start + count > keep:
                kept = max(0, keep - start)
                if kept:
                    with open(self.path(index), "r+b") as handle:
                        handle.truncate(kept * self.dtype.itemsize)
                else:
                    self.path(index).unlink()
                self.shard_tokens[index] = kept
            start += count
        self.shard_tokens = [count for count in self.shard_tokens if count]

    def read(self, start: int, stop: int, block: int = MOVE_BLOCK_TOKENS) -> Iterator[np.ndarray]:
        """Tokens ``[start, stop)`` of the closed split, in blocks."""
        offset = 0
        for index, count in enumerate(self.shard_tokens):
            tokens = np.memmap(self.path(index), dtype=self.dtype, mode="r", shape=(count,))
            for local in range(max(start - offset, 0), min(stop - offset, count), block):
                yield np.array(tokens[local : min(local + block, stop - offset, count)])
            offset += count
            del tokens


def _with_last_flag(documents: Iterable[Document]) -> Iterator[tuple[int, Document, bool]]:
    iterator = iter(documents)
    current = next(iterator, None)
    index = 0
    while current is not None:
        following = next(iterator, None)
        yield index, current, following is None
        current, index = following, index + 1


def _with_last_flag_pieces(document: Document) -> Iterator[tuple[str, bool]]:
    """The document's pieces, each with whether it is the last one (an empty document gives one "")."""
    pieces = document.chunks()
    current = next(pieces, "")
    for following in pieces:
        yield current, False
        current = following
    yield current, True


def write_shards(
    documents: Iterable[Document],
    tokenizer,
    out_dir: str | Path,
    *,
    vocab_size: int,
    eos_token_id: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    dtype: str | np.dtype | None = None,
    progress: bool = True,
) -> dict[str, SplitInfo]:
    """Tokenize ``documents`` into ``out_dir/{train,val}_NNNNN.bin`` and ``train_token_counts.npy``.

    Each document's tokens are followed by ``eos_token_id``. Output bytes depend only on the inputs.

    Args:
        documents: the corpus, read once.
        tokenizer: a ``transformers`` tokenizer (``mileloss.data.tokenizer``).
        vocab_size: number of token ids; picks the dtype and sizes the token counts.
        val_fraction: share of documents (or, for a single document, of tokens) that go to val.
        max_shard_tokens: the most tokens per shard file.
        dtype: force ``"uint16"`` or ``"uint32"`` (default: from ``vocab_size``).

    Returns:
        ``{"train": SplitInfo, "val": SplitInfo}`` with shard names, token counts and sha256.

    Raises:
        EmptyCorpusError: no document.
        TokenizerError: the tokenizer produced an id >= vocab_size, or one the dtype cannot hold.
    """
    out_dir = Path(out_dir)
    dtype = np.dtype(dtype).newbyteorder("<") if dtype is not None else dtype_for_vocab(vocab_size)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise TokenizerError(f"vocab_size {vocab_size} does not fit in {dtype.name} shards")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_shard_tokens < 1:
        raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    writers = {split: _ShardWriter(out_dir, split, dtype, max_shard_tokens) for split in SPLITS}
    eos = np.array([eos_token_id], dtype=np.int64)
    pending: list[tuple[str, str, bool]] = []  # (split, text piece, piece ends its document)
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)

    def flush() -> None:
        encoded = encode_batch(tokenizer, [piece for _, piece, _ in pending])
        for (split, _, ends_document), ids in zip(pending, encoded, strict=True):
            if len(ids) and (ids.max() >= vocab_size or ids.min() < 0):
                raise TokenizerError(f"tokenizer produced id {int(ids.max())}, outside vocab_size {vocab_size}")
            writers[split].write(ids)
            if ends_document:
                writers[split].write(eos)
                bar.update(1)
        pending.clear()

    num_documents = pending_chars = 0
    for index, document, is_last in _with_last_flag(documents):
        split = document_split(seed, index, val_fraction)
        if is_last and index == 0:
            split = "train"  # a lone document is split by token position below
        elif is_last and val_fraction > 0:
            for needed in SPLITS:  # give both splits a document (counts include pending ones)
                if writers[needed].num_documents == 0:
                    split = needed
        writers[split].num_documents += 1
        num_documents += 1
        for piece, ends_document in _with_last_flag_pieces(document):
            pending.append((split, piece, ends_document))
            pending_chars += len(piece)
            if pending_chars >= BATCH_CHARS:
                flush()
                pending_chars = 0
    flush()
    bar.close()
    for writer in writers.values():
        writer.close()
    if num_documents == 0:
        raise EmptyCorpusError("the corpus holds no document")
    if num_documents == 1 and val_fraction > 0:
        _split_single_document(writers["train"], writers["val"], val_fraction)
    return _finalize(writers, out_dir, vocab_size, dtype)


def _split_single_document(train: _ShardWriter, val: _ShardWriter, val_fraction: float) -> None:
    """Move the last ``val_fraction`` of the train tokens (at least one) to val."""
    total = train.num_tokens
    if total < 2:
        raise EmptyCorpusError(f"the corpus has {total} token(s): too few for a train and a val split")
    cut = total - max(1, round(total * val_fraction))
    for block in train.read(cut, total):
        val.write(block)
    val.close()
    train.truncate(cut)
    logger.info("single document: split by token position, %d train / %d val tokens", cut, total - cut)


def _finalize(writers: dict[str, _ShardWriter], out_dir: Path, vocab_size: int, dtype: np.dtype):
    """Hash every shard, count the training tokens, and describe the splits."""
    splits = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    for split, writer in writers.items():
        shards = []
        for index, num_tokens in enumerate(writer.shard_tokens):
            digest, shard_counts = hash_and_count(writer.path(index), dtype, vocab_size if split == "train" else None)
            if shard_counts is not None:
                counts += shard_counts
            shards.append(ShardInfo(writer.path(index).name, num_tokens, digest))
        splits[split] = SplitInfo(writer.num_tokens, shards, writer.num_documents)
    buffer = io.BytesIO()
    np.save(buffer, counts)
    write_atomic(out_dir / TOKEN_COUNTS_FILE, buffer.getvalue())
    return splits
