"""Where documents come from: text files, JSONL files, folders of both, and named corpora.

A corpus is a list of *sources*, read in the order given:

* a named corpus (``shakespeare``, ``kjv``, ``austen``; see ``mileloss.data.named``), fetched once
  into a cache folder;
* a ``.jsonl`` file: one document per non-blank line, the text in a field (``text_field``);
* any other file: one document, read as UTF-8 (``.txt`` and friends);
* a folder: every ``.txt`` and ``.jsonl`` file below it, recursively, in sorted path order.

Documents that hold only whitespace are skipped. A text file larger than ``LARGE_FILE_BYTES`` is never
held in memory: it is read in blocks. Every document reaches the tokenizer in pieces of about
``BLOCK_CHARS`` characters, cut just before a whitespace character that follows a non-whitespace one.
Byte-level BPE pre-tokenization (the GPT-2 regex) always splits at such a place, so encoding the pieces
one after the other gives exactly the tokens of the whole text, and the tokenizer's working memory
(tens of bytes per character of the text it is given at once) stays bounded whatever the document's
size. A text with no such place for ``MAX_PIECE_CHARS`` characters is refused as not being text.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mileloss.errors import CorpusFormatError, CorpusNotFoundError, EmptyCorpusError

logger = logging.getLogger(__name__)

LARGE_FILE_BYTES = 8 * 2**20  # text files above this are streamed in blocks, never read whole
BLOCK_CHARS = 2**20  # characters per piece handed to the tokenizer (and per read when streaming)
MAX_PIECE_CHARS = 64 * 2**20  # a "word" longer than this (no whitespace at all) is refused
CORPUS_SUFFIXES = (".txt", ".jsonl")  # what a folder source contributes
_SPACE_AFTER_WORD = re.compile(r"\S(?=\s)")


@dataclass(frozen=True)
class Document:
    """One document: a name saying where it came from, and its text (or the file that holds it).

    Attributes:
        name: ``path/to/file.txt``, ``data.jsonl:12`` (file and line), or ``shakespeare/hamlet``.
        text: the whole text, or ``None`` when the document is a large file streamed from ``path``.
        path: the file to stream when ``text`` is ``None``.
    """

    name: str
    text: str | None = None
    path: Path | None = None

    def chunks(self, block_chars: int | None = None) -> Iterator[str]:
        """The text in pieces of about ``block_chars`` characters whose concatenation is the document.

        Pieces end just before whitespace that follows a non-whitespace character (see the module
        docstring); a streamed document is read from ``path`` one block at a time.

        Raises:
            CorpusFormatError: the file is not UTF-8, or has no whitespace for ``MAX_PIECE_CHARS`` characters.
        """
        block_chars = BLOCK_CHARS if block_chars is None else block_chars
        if self.text is not None:
            if len(self.text) <= block_chars:
                yield self.text
                return
            yield from _pieces(io.StringIO(self.text), block_chars, self.name)
            return
        try:
            with _open_text(self.path) as handle:
                yield from _pieces(handle, block_chars, self.name)
        except UnicodeDecodeError as error:
            raise CorpusFormatError(f"{self.path}: not valid UTF-8 text ({error.reason})") from error


def _safe_cut(text: str) -> int:
    """The last k > 0 with ``text[k]`` whitespace and ``text[k-1]`` not, preferring newlines; 0 if none."""
    k = text.rfind("\n")
    while k > 0:
        if not text[k - 1].isspace():
            return k
        k = text.rfind("\n", 0, k)
    ends = [match.end() for match in _SPACE_AFTER_WORD.finditer(text)]
    return ends[-1] if ends else 0


def _pieces(handle, block_chars: int, name: str) -> Iterator[str]:
    pending = ""
    while True:
        block = handle.read(block_chars)
        pending += block
        if not block:
            if pending:
                yield pending
            return
        cut = _safe_cut(pending)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
        elif len(pending) > MAX_PIECE_CHARS:  # no safe cut yet (one giant word): keep reading, up to a limit
            raise CorpusFormatError(
                f"{name}: {len(pending):,} characters without a space or line break; not natural-language text"
            )


def _open_text(path: Path):
    # utf-8-sig drops a byte-order mark; universal newlines turn \r\n into \n.
    return open(path, encoding="utf-8-sig", errors="strict")


def _read_text_file(path: Path) -> Iterator[Document]:
    if path.stat().st_size > LARGE_FILE_BYTES:
        yield Document(str(path), path=path)
        return
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise CorpusFormatError(f"{path}: not valid UTF-8 text ({error.reason} at byte {error.start})") from error
    yield Document(str(path), text=text)


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    try:
        with _open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusFormatError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise CorpusFormatError(
                        f"{path}:{line_number}: no field {text_field!r} (found {keys}); "
                        "choose the field with --text-field"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise CorpusFormatError(
                        f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string"
                    )
                yield Document(f"{path}:{line_number}", text=text)
    except UnicodeDecodeError as error:
        raise CorpusFormatError(f"{path}: not valid UTF-8 text ({error.reason} at byte {error.start})") from error


def _read_file(path: Path, text_field: str) -> Iterator[Document]:
    if not path.is_file():  # a device (/dev/zero never ends), a FIFO (blocks), a socket: not a corpus file
        raise CorpusFormatError(f"{path}: not a regular file")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    else:
        yield from _read_text_file(path)


def _folder_files(folder: Path) -> list[Path]:
    """``.txt``/``.jsonl`` files below ``folder``, sorted by relative path; hidden files and folders skipped."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # prune .git, .venv, ...
        files += [Path(root) / name for name in names if name.endswith(CORPUS_SUFFIXES) and not name.startswith(".")]
    return sorted(files, key=lambda file: file.relative_to(folder).as_posix())


class Corpus:
    """An ordered list of sources that can be read as documents any number of times.

    Args:
        sources: named corpora and/or paths (files or folders), read in this order.
        text_field: the JSON field holding the text in ``.jsonl`` files.
        cache_dir: where named corpora are downloaded (default: ``$MILELOSS_CACHE`` or
            ``~/.cache/mileloss/corpora``).

    A source spelled exactly like a named corpus is that corpus; write ``./shakespeare`` for a local
    folder of that name. Named corpora are fetched (or found in the cache) when the ``Corpus`` is made.

    Raises:
        CorpusNotFoundError: a source is neither a named corpus nor an existing path.
        CorpusFetchError: a named corpus cannot be downloaded or fails its checksum.

    >>> corpus = Corpus(["notes.txt", "web.jsonl"])     # doctest: +SKIP
    >>> for document in corpus.documents(): ...          # doctest: +SKIP
    """

    def __init__(self, sources: Sequence[str | os.PathLike], *, text_field: str = "text", cache_dir=None):
        from mileloss.data import named  # imported here: named.py imports Document from this module

        if not sources:
            raise CorpusNotFoundError("no corpus given: name a corpus (shakespeare, kjv, austen) or a path")
        self.sources = [str(source) for source in sources]
        self.text_field = text_field
        self._readers = []
        for source in self.sources:
            if source in named.NAMED_CORPORA:
                self._readers.append(named.NAMED_CORPORA[source].reader(cache_dir))
                continue
            path = Path(source).expanduser()
            if not path.exists():
                raise CorpusNotFoundError(
                    f"corpus source {source!r}: no such file or folder, and not a named corpus "
                    f"({', '.join(sorted(named.NAMED_CORPORA))})"
                )
            self._readers.append(self._path_reader(path))

    def _path_reader(self, path: Path):
        if path.is_dir():
            files = _folder_files(path)
            if not files:
                raise EmptyCorpusError(f"folder {path} holds no {' or '.join(CORPUS_SUFFIXES)} file")
            return lambda: (doc for file in files for doc in _read_file(file, self.text_field))
        return lambda: _read_file(path, self.text_field)

    @property
    def name(self) -> str:
        """A short name for the manifest: the named corpus, or the file/folder names joined by ``+``."""
        return "+".join(Path(source).name or source for source in self.sources)

    def documents(self) -> Iterator[Document]:
        """Every document with some non-whitespace text, in source order."""
        for reader in self._readers:
            for document in reader():
                if document.text is not None and not document.text.strip():
                    logger.debug("skipping whitespace-only document %s", document.name)
                    continue
                yield document

    def texts(self) -> Iterator[str]:
        """The documents' text pieces (see ``Document.chunks``), e.g. to train a tokenizer."""
        for document in self.documents():
            yield from document.chunks()

    def check_not_empty(self) -> None:
        """Raise ``EmptyCorpusError`` unless at least one document has non-whitespace text."""
        for document in self.documents():
            if any(piece.strip() for piece in document.chunks()):
                return
        raise EmptyCorpusError(f"corpus {self.sources} holds no non-whitespace text")
