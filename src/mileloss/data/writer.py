"""Tokenize documents once and write them as token shards plus a manifest.

The pass is streaming: documents are read one at a time, their pieces (``Document.chunks``) gathered
into work units of about ``BATCH_CHARS`` characters in corpus order, each unit encoded (in this
process with ``workers=1``, else by ``workers`` spawned processes, one tokenizer thread each),
and the results appended in unit order to the current shard of their split; a shard is closed at
``max_shard_tokens``. The split, the counts and the order of the ids are decided in this process from
the document index alone, and a piece's ids do not depend on which unit or process encoded it, so the
shards are byte-identical for any ``workers``. Memory stays bounded by ``workers + 1`` units of text
and ids in flight, whatever the corpus size (``_Encoding``).

Around every document the writer puts ``DocumentSpecials.document_start`` / ``document_end``
(``mileloss.data.tokenizer``): e.g. nothing / eos for our byte-level BPE, bos / eos for LLaMA-style
tokenizers.

Train/val split, by document: document i goes to val when ``u(seed, i) < val_fraction``, where
``u`` is a uniform number in [0, 1) from a keyed hash (blake2b) of the seed and the index, so the
assignment depends on nothing but (seed, index, val_fraction). With ``val_fraction > 0`` and two or
more documents, the last document is moved to whichever split would otherwise be empty. A corpus of
a single document is split by token position instead: its last ``val_fraction`` of tokens become val.

Split stratified by domain (``stratify=True``, used whenever documents carry a domain): the k-th written
document of domain d (k = 0, 1, ...) goes to val when ``floor((k + 1) f + o_d) > floor(k f + o_d)``, with
``f = val_fraction`` and ``o_d`` a seeded hash of the domain in [0, 1): a systematic sample that sends
``f`` of every domain's documents to val (to within one document), so val keeps the per-domain shares of
train (up to document-length noise) and every domain with ``1 / f`` documents or more appears in val.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
from mileloss.data.tokenizer import DocumentSpecials, TextEncoder, data_tokenizer_json
from mileloss.errors import ConfigError, EmptyCorpusError, TokenizerError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_TOKENS = 100_000_000
BATCH_CHARS = 2**20  # characters of text per work unit (one encode call)
MOVE_BLOCK_TOKENS = 8 * 2**20
MAX_WORKERS = 256


def document_split(seed: int, index: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for document ``index``: a seeded hash, uniform in [0, 1), against the fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, key=b"mileloss-split").digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def stratified_split(seed: int, domain: str | None, k: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for the ``k``-th document of ``domain`` (see the module docstring)."""
    digest = hashlib.blake2b(f"{seed}:{domain}".encode(), digest_size=8, key=b"mileloss-strata").digest()
    offset = int.from_bytes(digest, "little") / 2**64
    return "val" if math.floor((k + 1) * val_fraction + offset) > math.floor(k * val_fraction + offset) else "train"


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


def _with_last_flag(items: Iterable) -> Iterator[tuple[object, bool]]:
    iterator = iter(items)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        yield current, following is None
        current = following


def _selected(documents: Iterable[Document], select) -> Iterator[tuple[int, Document, int]]:
    """(index in the corpus, document, copies) for each document written at least once."""
    for index, document in enumerate(documents):
        copies = 1 if select is None else select(index, document)
        if copies > 0:
            yield index, document, copies


def _with_last_flag_pieces(document: Document) -> Iterator[tuple[str, bool]]:
    """The document's pieces, each with whether it is the last one (an empty document gives one "")."""
    pieces = document.chunks()
    current = next(pieces, "")
    for following in pieces:
        yield current, False
        current = following
    yield current, True


def _worker_main(connection, tokenizer_json: str) -> None:
    """A tokenizing process: receive a unit's texts, send back ``("ok", ids)``, until ``None`` or end of pipe.

    One tokenizer thread (N workers use N cores); Ctrl-C is left to the main process, which stops the workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoder = TextEncoder(tokenizer_json)
    while True:
        try:
            texts = connection.recv()
        except (EOFError, OSError):  # the main process is gone (killed): nothing to do
            return
        if texts is None:
            return
        try:
            reply = ("ok", encoder(texts))
        except Exception as error:  # reported to the main process, which raises it as a named error
            reply = ("error", f"{type(error).__name__}: {error}")
        try:
            connection.send(reply)
        except OSError:  # the main process stopped listening (it is reporting another worker's death): exit quietly
            return


class _Encoding:
    """Work units encoded in order: inline (``workers=1``), or by ``workers`` spawned processes, one pipe each.

    Unit i goes to worker ``i % workers``, and only after the result of unit ``i - workers`` (that worker's
    previous unit) has been received: at most ``workers`` units are in flight, results come back in unit order,
    and no worker ever waits on another (no shared queue or lock a killed worker could leave held). A worker
    that dies is seen at once (its pipe ends) and raised as an ``OSError``; the main process dying ends
    every worker's pipe, and the workers exit.
    """

    def __init__(self, encoder: TextEncoder, workers: int):
        self.encoder, self.workers = encoder, workers
        self.connections, self.processes = [], []
        self.in_flight: deque = deque()  # (unit, worker index), oldest first
        self.next_worker = 0
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding Rust threads
            try:
                for _ in range(workers):
                    ours, theirs = context.Pipe(duplex=True)
                    process = context.Process(target=_worker_main, args=(theirs, encoder.tokenizer_json),
                                              daemon=True, name="mileloss-tokenize")
                    process.start()
                    theirs.close()  # only the worker holds its end: its death ends our reads
                    self.connections.append(ours)
                    self.processes.append(process)
            except BaseException:
                self.close(ok=False)
                raise

    def submit(self, unit, texts: list[str]) -> Iterator[tuple[object, list[np.ndarray]]]:
        """Queue one unit; yield ``(unit, ids)`` of the units now done, oldest first."""
        if self.workers == 1:
            yield unit, self.encoder(texts)
            return
        if len(self.in_flight) == self.workers:  # the next worker still holds the oldest unit
            yield self._receive_oldest()
        index = self.next_worker
        try:
            self.connections[index].send(texts)
        except OSError:  # BrokenPipeError: the worker is gone
            self._raise_dead(index)
        self.in_flight.append((unit, index))
        self.next_worker = (index + 1) % self.workers

    def drain(self) -> Iterator[tuple[object, list[np.ndarray]]]:
        while self.in_flight:
            yield self._receive_oldest()

    def _receive_oldest(self) -> tuple[object, list[np.ndarray]]:
        unit, index = self.in_flight.popleft()
        try:
            status, payload = self.connections[index].recv()
        except (EOFError, OSError):
            self._raise_dead(index)
        if status != "ok":
            raise TokenizerError(f"a tokenizing worker failed: {payload}")
        return unit, payload

    def _raise_dead(self, index: int):
        process = self.processes[index]
        process.join(timeout=5)
        raise OSError(
            f"a tokenizing worker process (pid {process.pid}) died with exit code {process.exitcode} "
            "(killed, or out of memory: fewer --workers need less)"
        ) from None

    def close(self, ok: bool) -> None:
        for connection in self.connections:
            try:
                if ok:
                    connection.send(None)
            except OSError:
                pass
            connection.close()  # a worker waiting for work sees the end of its pipe and exits
        for process in self.processes:
            process.join(timeout=10 if ok else 1)
            if process.is_alive():
                process.kill()
                process.join()
        self.connections, self.processes = [], []


def write_shards(
    documents: Iterable[Document],
    tokenizer,
    out_dir: str | Path,
    *,
    vocab_size: int,
    eos_token_id: int | None = None,
    specials: DocumentSpecials | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    dtype: str | np.dtype | None = None,
    progress: bool = True,
    select: Callable[[int, Document], int] | None = None,
    domain_counts: dict | None = None,
    stratify: bool = False,
    workers: int = 1,
) -> dict[str, SplitInfo]:
    """Tokenize ``documents`` into ``out_dir/{train,val}_NNNNN.bin`` and ``train_token_counts.npy``.

    Each document's tokens are preceded by ``specials.document_start`` and followed by
    ``specials.document_end`` (without ``specials``: nothing before, ``eos_token_id`` after). Output bytes
    depend only on the inputs, not on ``workers``.

    Args:
        documents: the corpus, read once.
        tokenizer: a ``transformers`` fast tokenizer (``mileloss.data.tokenizer``).
        vocab_size: number of token ids; picks the dtype and sizes the token counts.
        eos_token_id: the id after each document when ``specials`` is not given.
        specials: the ids around each document (``mileloss.data.tokenizer.document_specials``).
        val_fraction: share of documents (or, for a single document, of tokens) that go to val.
        max_shard_tokens: the most tokens per shard file.
        dtype: force ``"uint16"`` or ``"uint32"`` (default: from ``vocab_size``).
        select: ``select(index, document)`` -> how many times to write the document (0: leave it out); the
            split is chosen from the corpus ``index`` first, so all copies land in the same split (see
            ``mileloss.data.mixture``). ``None``: every document once.
        domain_counts: a dict to fill with ``{split: {domain: {"documents": n, "tokens": t}}}``: documents
            (copies counted) and tokens (the specials around documents included) of each ``Document.domain``.
        stratify: split by domain strata (``stratified_split``) instead of ``document_split``.
        workers: encoding processes (1: this process, with the tokenizer's own threads).

    Returns:
        ``{"train": SplitInfo, "val": SplitInfo}`` with shard names, token counts and sha256.

    Raises:
        EmptyCorpusError: no document.
        TokenizerError: the tokenizer produced an id >= vocab_size, or one the dtype cannot hold.
        ConfigError: ``workers`` outside [1, ``MAX_WORKERS``].
    """
    out_dir = Path(out_dir)
    dtype = np.dtype(dtype).newbyteorder("<") if dtype is not None else dtype_for_vocab(vocab_size)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise TokenizerError(f"vocab_size {vocab_size} does not fit in {dtype.name} shards")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_shard_tokens < 1:
        raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    check_workers(workers)
    if specials is None:
        if eos_token_id is None:
            raise ValueError("write_shards needs specials or eos_token_id")
        start_ids, end_ids = np.empty(0, np.int64), np.array([eos_token_id], np.int64)
    else:
        start_ids = np.array(specials.document_start, np.int64)
        end_ids = np.array(specials.document_end, np.int64)
    for ids in (start_ids, end_ids):
        if len(ids) and (ids.max() >= vocab_size or ids.min() < 0):
            raise TokenizerError(f"special token ids {ids.tolist()} are outside vocab_size {vocab_size}")
    writers = {split: _ShardWriter(out_dir, split, dtype, max_shard_tokens) for split in SPLITS}
    pending: list[tuple[str, str, bool, bool, str | None]] = []  # (split, piece, starts doc, ends doc, domain)
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
    counts = {split: {} for split in SPLITS}

    def write_unit(unit, encoded) -> None:
        for (split, starts_document, ends_document, domain), ids in zip(unit, encoded, strict=True):
            if len(ids) and (ids.max() >= vocab_size or ids.min() < 0):
                raise TokenizerError(f"tokenizer produced id {int(ids.max())}, outside vocab_size {vocab_size}")
            entry = counts[split].setdefault(domain, {"documents": 0, "tokens": 0})
            if starts_document and len(start_ids):
                writers[split].write(start_ids)
                entry["tokens"] += len(start_ids)
            writers[split].write(ids)
            entry["tokens"] += len(ids)
            if ends_document:
                writers[split].write(end_ids)
                entry["tokens"] += len(end_ids)
                entry["documents"] += 1
                bar.update(1)

    encoding = _Encoding(TextEncoder(data_tokenizer_json(tokenizer)), workers)

    def submit() -> None:
        unit = [(split, starts, ends, domain) for split, _, starts, ends, domain in pending]
        for done, encoded in encoding.submit(unit, [piece for _, piece, _, _, _ in pending]):
            write_unit(done, encoded)
        pending.clear()

    ok = False
    num_documents = pending_chars = 0
    seen: dict[str | None, int] = {}  # written documents per domain, for the stratified split
    try:
        for (index, document, copies), is_last in _with_last_flag(_selected(documents, select)):
            if stratify:
                k = seen[document.domain] = seen.get(document.domain, -1) + 1
                split = stratified_split(seed, document.domain, k, val_fraction)
            else:
                split = document_split(seed, index, val_fraction)
            if is_last and num_documents == 0 and copies == 1:
                split = "train"  # a lone document is split by token position below
            elif is_last and val_fraction > 0:
                for needed in SPLITS:  # give both splits a document (counts include pending ones)
                    if writers[needed].num_documents == 0:
                        split = needed
            writers[split].num_documents += copies
            num_documents += copies
            for _ in range(copies):
                for number, (piece, ends_document) in enumerate(_with_last_flag_pieces(document)):
                    pending.append((split, piece, number == 0, ends_document, document.domain))
                    pending_chars += len(piece)
                    if pending_chars >= BATCH_CHARS:
                        submit()
                        pending_chars = 0
        if pending:
            submit()
        for done, encoded in encoding.drain():
            write_unit(done, encoded)
        ok = True
    finally:
        encoding.close(ok)
        bar.close()
        for writer in writers.values():
            writer.close()
    if num_documents == 0:
        raise EmptyCorpusError("the corpus holds no document" + (" the mix selects" if select else ""))
    if num_documents == 1 and val_fraction > 0:
        _split_single_document(writers["train"], writers["val"], val_fraction)
        (domain, entry), = counts["train"].items()
        moved = writers["val"].num_tokens
        entry["tokens"] -= moved
        counts["val"][domain] = {"documents": 0, "tokens": moved}
    if domain_counts is not None:
        domain_counts.update(counts)
    return _finalize(writers, out_dir, vocab_size, dtype)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers) -> None:
    """``workers`` must be an integer from 1 to the usable CPUs (2 on a 1-CPU machine; at most ``MAX_WORKERS``):
    every worker is a process that imports torch (hundreds of MB), so a typo like ``--workers 200`` is refused."""
    limit = min(MAX_WORKERS, max(2, usable_cpus()))
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
        raise ConfigError(f"--workers must be an integer from 1 to {limit} (the usable CPUs), got {workers!r}")


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
