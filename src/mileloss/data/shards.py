"""Token shards on disk: the manifest, writing shards, verifying and memory-mapping them.

A data directory (written by ``mileloss data``) holds::

    manifest.json           format, vocab_size, dtype, eos id, splits with per-shard token counts and sha256,
                            and the size and sha256 of every other file below (version 2)
    tokenizer/              a Hugging Face tokenizer folder
    train_00000.bin ...     raw little-endian token ids (uint16 if vocab_size <= 65536, else uint32);
    val_00000.bin ...       every document is followed by the eos token
    train_token_counts.npy  int64 (vocab_size,): how often each token occurs in the training split

Shards are plain arrays, so ``np.memmap(path, dtype, mode="r")`` reads one (as in nanoGPT).
``load_manifest`` checks the format and version, the type of every field, that every file named stays
inside the folder, every file's size and (``verify=True``) sha256, and that the tokenizer folder has
``vocab_size`` ids. ``read_split`` checks that every token id is below ``vocab_size`` (one pass of
``max`` over the shards), so a shard that does not belong to its manifest is caught even unverified.

Version 1 manifests (no ``files`` entry) still load; their token counts and tokenizer files are not
checked (a warning says so), and ``mileloss data`` does not replace a folder that holds one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mileloss.data.tokenizer import tokenizer_vocab_size
from mileloss.errors import (
    FileChecksumError,
    IncompleteDataError,
    ManifestError,
    ShardChecksumError,
    TokenizerMismatchError,
    TokenRangeError,
)

logger = logging.getLogger(__name__)

FORMAT = "mileloss-shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_COUNTS_FILE = "train_token_counts.npy"
PARTIAL_MARKER = ".mileloss-partial"  # present while `mileloss data` is still writing the folder
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
READ_BLOCK_TOKENS = 8 * 2**20  # tokens per read when hashing, counting and range-checking
MAX_MANIFEST_BYTES = 64 * 2**20
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")  # no "", ".", "..", hidden names, separators
_SHA256 = re.compile(r"[0-9a-f]{64}")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32 (little-endian either way)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name (relative to the data directory), token count and sha256."""

    file: str
    num_tokens: int
    sha256: str


@dataclass(frozen=True)
class FileInfo:
    """Any other file of a data directory (token counts, tokenizer files): relative path, size, sha256."""

    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split: its shards in order, their total token count, and how many documents went into it."""

    num_tokens: int
    shards: list[ShardInfo]
    num_documents: int | None = None


def describe_file(folder: Path, relative: str) -> FileInfo:
    """The ``FileInfo`` of ``folder/relative`` as it is on disk now."""
    path = folder / relative
    return FileInfo(relative, path.stat().st_size, file_sha256(path))


class _Reader:
    """Typed access to one JSON object of the manifest; every error names the manifest and the key."""

    def __init__(self, data, where: str, context: str = ""):
        self.where, self.context = where, context
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: {context or 'the manifest'} is {_kind(data)}, expected an object")
        self.data = data

    def key(self, key: str) -> str:
        return f"{self.context}.{key}" if self.context else key

    def get(self, key: str, kind: type, default=...):
        if key not in self.data:
            if default is ...:
                raise ManifestError(f"{self.where}: missing key {self.key(key)!r}")
            return default
        value = self.data[key]
        if value is None and default is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(
                f"{self.where}: {self.key(key)!r} is {_kind(value)}, expected {_KIND_NAMES.get(kind, kind.__name__)}"
            )
        return value

    def count(self, key: str, default=...) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value < 0:
            raise ManifestError(f"{self.where}: {self.key(key)!r} is {value}, expected a count >= 0")
        return value

    def sha256(self, key: str) -> str:
        value = self.get(key, str)
        if not _SHA256.fullmatch(value):
            raise ManifestError(f"{self.where}: {self.key(key)!r} is {value[:80]!r}, not a hex sha256")
        return value

    def path(self, key: str, *, nested: bool = False, default=...) -> str:
        value = self.get(key, str, default)
        check_relative_path(value, f"{self.where}: {self.key(key)!r}", nested=nested)
        return value


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _kind(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_relative_path(value: str, what: str, *, nested: bool = False) -> None:
    """Refuse a file name that could point outside the data folder (absolute, ``..``, hidden, odd characters).

    ``nested`` allows ``a/b`` (each part a plain name); otherwise only a plain file name is allowed.

    Raises:
        ManifestError: naming ``what`` and the value.
    """
    parts = value.split("/")
    if not value or len(value) > 255 * 4 or not all(_NAME_PART.fullmatch(part) for part in parts) or (
        len(parts) > 1 and not nested
    ):
        raise ManifestError(
            f"{what} is {value[:80]!r}: not a plain file name inside the data folder "
            "(absolute paths, '..', '/', '\\' and hidden names are refused)"
        )


@dataclass
class ShardManifest:
    """The contents of ``manifest.json`` plus the folder it lives in.

    Attributes:
        path: the data directory.
        vocab_size: the number of token ids (``len(tokenizer)``).
        dtype: the shards' numpy dtype (``uint16`` or ``uint32``, little-endian).
        eos_token_id: the token written after every document.
        splits: ``{"train": SplitInfo, "val": SplitInfo}``.
        files: every other file the folder holds (tokenizer files, token counts), with size and sha256;
            empty for a version 1 manifest.
        version: the manifest format version (``VERSION`` when written by this code).
    """

    path: Path
    corpus: str
    sources: list[str]
    vocab_size: int
    dtype: np.dtype
    eos_token_id: int
    seed: int
    splits: dict[str, SplitInfo]
    tokenizer: str = TOKENIZER_DIR
    token_counts_file: str = TOKEN_COUNTS_FILE
    extra: dict = field(default_factory=dict)
    files: list[FileInfo] = field(default_factory=list)
    version: int = VERSION

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.tokenizer

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    def num_tokens(self, split: str) -> int:
        return self.split(split).num_tokens

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ManifestError(f"{self.manifest_path}: no split {split!r} (have {sorted(self.splits)})")
        return self.splits[split]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.path / shard.file for shard in self.split(split).shards]

    def file_info(self, relative: str) -> FileInfo | None:
        """The ``files`` entry of ``relative``, or ``None`` (always ``None`` for a version 1 manifest)."""
        return next((info for info in self.files if info.file == relative), None)

    def token_counts(self) -> np.ndarray:
        """int64 array (vocab_size,): occurrences of each token id in the training split.

        The file's sha256 is checked against the manifest (version 2) before it is read; it is read
        with ``allow_pickle=False``.

        Raises:
            FileChecksumError: the file is missing or differs from the manifest.
            ManifestError: the file is not an ``.npy`` array of ``vocab_size`` non-negative integers.
        """
        path = self.path / self.token_counts_file
        info = self.file_info(self.token_counts_file)
        if info is not None:
            check_file(path, info.bytes, info.sha256, verify=True, error=FileChecksumError)
        elif not path.is_file():
            raise ManifestError(f"{path}: token counts file is missing")
        try:
            counts = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ManifestError(f"{path}: not a readable .npy array ({error})") from error
        if counts.shape != (self.vocab_size,):
            raise ManifestError(f"{path}: shape {counts.shape}, expected ({self.vocab_size},)")
        if counts.dtype.kind not in "iu" or (counts.dtype.kind == "i" and counts.size and counts.min() < 0):
            raise ManifestError(f"{path}: dtype {counts.dtype} or negative counts; expected non-negative integers")
        return counts.astype(np.int64, copy=False)

    def to_json(self) -> dict:
        data = {
            "format": FORMAT,
            "version": self.version,
            "corpus": self.corpus,
            "sources": list(self.sources),
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "eos_token_id": self.eos_token_id,
            "seed": self.seed,
            "splits": {
                name: {
                    "num_tokens": info.num_tokens,
                    "num_documents": info.num_documents,
                    "shards": [vars(shard) for shard in info.shards],
                }
                for name, info in self.splits.items()
            },
            "token_counts_file": self.token_counts_file,
        }
        if self.version >= 2:
            data["files"] = [vars(info) for info in self.files]
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data, path: Path) -> ShardManifest:
        """Parse and check a manifest: every key's type, counts >= 0, hex digests, names inside ``path``.

        Raises:
            ManifestError: naming the manifest and the first key at fault.
        """
        where = str(path / MANIFEST_FILE)
        top = _Reader(data, where)
        if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            raise ManifestError(
                f"{where}: format {data.get('format')!r} version {data.get('version')!r}, "
                f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
            )
        version = data["version"]
        dtype_name = top.get("dtype", str)
        if dtype_name not in DTYPES:
            raise ManifestError(f"{where}: dtype {dtype_name[:40]!r} is not uint16 or uint32")
        vocab_size = top.count("vocab_size")
        if not 1 <= vocab_size <= 2**32:
            raise ManifestError(f"{where}: vocab_size {vocab_size} is outside [1, 2**32]")
        eos_token_id = top.count("eos_token_id")
        if eos_token_id >= vocab_size:
            raise ManifestError(f"{where}: eos_token_id {eos_token_id} is not below vocab_size {vocab_size}")
        sources = top.get("sources", list, [])
        if not all(isinstance(source, str) for source in sources):
            raise ManifestError(f"{where}: 'sources' must be a list of strings")
        splits_data = top.get("splits", dict)
        if not splits_data:
            raise ManifestError(f"{where}: 'splits' is empty")
        splits = {str(name): _parse_split(info, where, f"splits.{name}") for name, info in splits_data.items()}
        token_counts_file = top.path("token_counts_file", default=TOKEN_COUNTS_FILE)
        files = []
        if version >= 2:
            files = [_parse_file(entry, where, f"files[{i}]") for i, entry in enumerate(top.get("files", list))]
            names = [info.file for info in files]
            shard_files = {shard.file for split in splits.values() for shard in split.shards}
            if len(set(names)) != len(names) or MANIFEST_FILE in names or shard_files & set(names):
                raise ManifestError(f"{where}: 'files' names a file twice, or names manifest.json or a shard")
            if token_counts_file not in names:
                raise ManifestError(f"{where}: 'files' has no entry for the token counts {token_counts_file!r}")
        known = {"format", "version", "corpus", "sources", "tokenizer", "vocab_size", "dtype", "eos_token_id"}
        known |= {"seed", "splits", "token_counts_file", "files"}
        return cls(
            path=path,
            corpus=top.get("corpus", str, ""),
            sources=list(sources),
            vocab_size=vocab_size,
            dtype=np.dtype(dtype_name).newbyteorder("<"),
            eos_token_id=eos_token_id,
            seed=top.get("seed", int, 0),
            splits=splits,
            tokenizer=top.path("tokenizer", default=TOKENIZER_DIR),
            token_counts_file=token_counts_file,
            extra={key: value for key, value in data.items() if key not in known},
            files=files,
            version=version,
        )

    def save(self) -> None:
        write_atomic(self.manifest_path, (json.dumps(self.to_json(), indent=2) + "\n").encode())


def _parse_split(data, where: str, context: str) -> SplitInfo:
    split = _Reader(data, where, context)
    shards = []
    for index, entry in enumerate(split.get("shards", list)):
        shard = _Reader(entry, where, f"{context}.shards[{index}]")
        shards.append(ShardInfo(shard.path("file"), shard.count("num_tokens"), shard.sha256("sha256")))
    num_tokens = split.count("num_tokens")
    if sum(shard.num_tokens for shard in shards) != num_tokens:
        raise ManifestError(f"{where}: {context} shard token counts do not add up to num_tokens {num_tokens}")
    return SplitInfo(num_tokens, shards, split.count("num_documents", None))


def _parse_file(data, where: str, context: str) -> FileInfo:
    entry = _Reader(data, where, context)
    return FileInfo(entry.path("file", nested=True), entry.count("bytes"), entry.sha256("sha256"))


def check_file(path: Path, expected_bytes: int, sha256: str, verify: bool, error=ShardChecksumError) -> None:
    """``path`` must be a regular file of ``expected_bytes`` (and, with ``verify``, of digest ``sha256``)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {'shard' if error is ShardChecksumError else 'file'} is missing") from None
    except OSError as cause:
        raise error(f"{path}: cannot be read ({cause.strerror})") from cause
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file")
    if info.st_size != expected_bytes:
        raise error(f"{path}: {info.st_size} bytes, manifest says {expected_bytes}")
    if verify:
        actual = file_sha256(path)
        if actual != sha256:
            raise error(f"{path}: sha256 {actual} differs from the manifest's {sha256}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(data_dir: str | Path) -> ShardManifest:
    """Parse ``DATA_DIR/manifest.json`` (types, names, versions) without looking at the files it names.

    Raises:
        IncompleteDataError: the folder is a ``mileloss data`` output still being written (or abandoned).
        ManifestError: no manifest, unreadable, not JSON, wrong types, unknown format or version.
    """
    path = Path(data_dir)
    manifest_path = path / MANIFEST_FILE
    if os.path.lexists(path / PARTIAL_MARKER):
        raise IncompleteDataError(
            f"{path} is the unfinished output of a `mileloss data` run (it holds {PARTIAL_MARKER}); "
            "run `mileloss data` again to rebuild it"
        )
    if not manifest_path.exists():
        raise ManifestError(f"{manifest_path}: no manifest; prepare the data with `mileloss data --out {path}`")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
        data = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ManifestError(f"{manifest_path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ManifestError(f"{manifest_path}: not UTF-8 text") from error
    except json.JSONDecodeError as error:
        raise ManifestError(f"{manifest_path}: not valid JSON ({error.msg})") from error
    except RecursionError as error:
        raise ManifestError(f"{manifest_path}: JSON nested too deeply") from error
    return ShardManifest.from_json(data, path)


def load_manifest(data_dir: str | Path, verify: bool = True) -> ShardManifest:
    """Read ``DATA_DIR/manifest.json`` and check the files it describes.

    Every shard and (version 2) every other listed file must exist with the recorded size (always
    checked: a stat per file). With ``verify``, each file's sha256 is recomputed and the tokenizer
    folder's number of ids is compared with ``vocab_size``.

    Raises:
        IncompleteDataError: the folder is an unfinished ``mileloss data`` output.
        ManifestError: no manifest, unreadable JSON, wrong types or missing keys, a file name that
            leaves the folder, unknown format or version.
        ShardChecksumError: a shard is missing or differs from the manifest (the message names it).
        FileChecksumError: the token counts or a tokenizer file is missing or differs from the manifest.
        TokenizerMismatchError: the tokenizer folder does not have ``vocab_size`` ids.
    """
    manifest = read_manifest(data_dir)
    for split in manifest.splits.values():
        for shard in split.shards:
            check_file(manifest.path / shard.file, shard.num_tokens * manifest.dtype.itemsize, shard.sha256, verify)
    for info in manifest.files:
        check_file(manifest.path / info.file, info.bytes, info.sha256, verify, error=FileChecksumError)
    if manifest.version < 2:
        logger.warning(
            "%s: version 1 manifest: the token counts and tokenizer files carry no checksum and are not checked",
            manifest.manifest_path,
        )
    if verify:
        try:
            actual = tokenizer_vocab_size(manifest.tokenizer_dir) if manifest.tokenizer_dir.is_dir() else None
        except Exception as error:  # tokenizers raises bare Exceptions on a malformed tokenizer.json
            where = manifest.tokenizer_dir
            raise TokenizerMismatchError(f"{where}: cannot be read as a tokenizer ({error})") from error
        if actual != manifest.vocab_size:
            found = "no tokenizer folder" if actual is None else f"a tokenizer with {actual} ids"
            raise TokenizerMismatchError(
                f"{manifest.tokenizer_dir}: {found}, but {manifest.manifest_path} says vocab_size {manifest.vocab_size}"
            )
    return manifest


def as_manifest(data_dir_or_manifest, verify: bool = False) -> ShardManifest:
    """A ``ShardManifest`` given one, or loaded from a data directory."""
    if isinstance(data_dir_or_manifest, ShardManifest):
        return data_dir_or_manifest
    return load_manifest(data_dir_or_manifest, verify=verify)


# ---------------------------------------------------------------------------------------------------
# Reading


class ConcatenatedTokens:
    """Several memory-mapped shards seen as one 1-D array, without copying them.

    Supports ``len``, integer indexing, slicing (the result is a numpy array; only the touched shards
    are read), ``np.asarray`` and ``tolist`` (these two read everything into memory).
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(part) for part in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[start:stop][::step] if stop > start else np.empty(0, self.dtype)
            return self._range(start, max(start, stop))
        if isinstance(index, int | np.integer):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} tokens")
            part = int(np.searchsorted(self.offsets, position, side="right")) - 1
            return self.parts[part][position - self.offsets[part]]
        return np.asarray(self)[index]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        part = first
        while start < stop:
            local_start = start - int(self.offsets[part])
            local_stop = min(stop, int(self.offsets[part + 1])) - int(self.offsets[part])
            pieces.append(self.parts[part][local_start:local_stop])
            start += local_stop - local_start
            part += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __array__(self, dtype=None, copy=None):
        array = np.concatenate(self.parts)
        return array.astype(dtype) if dtype is not None else array


def read_split(data_dir_or_manifest, split: str = "train", *, check_ids: bool = True):
    """The tokens of a split as one 1-D array, memory-mapped (read-only).

    One shard gives an ``np.memmap``; several give a ``ConcatenatedTokens`` view over their memmaps;
    an empty split gives an empty array. Each shard's size is checked against the manifest, and (with
    ``check_ids``, the default) each token id against ``vocab_size``: one ``max`` over the shard, in
    blocks, whether or not the checksums were verified.

    Raises:
        ShardChecksumError: a shard is missing or not the size the manifest says.
        TokenRangeError: a shard holds an id >= vocab_size (the message names the shard, the id and
            its position).
    """
    manifest = as_manifest(data_dir_or_manifest)
    parts = []
    for path, shard in zip(manifest.shard_paths(split), manifest.split(split).shards, strict=True):
        if shard.num_tokens == 0:
            continue
        check_file(path, shard.num_tokens * manifest.dtype.itemsize, shard.sha256, verify=False)
        tokens = np.memmap(path, dtype=manifest.dtype, mode="r", shape=(shard.num_tokens,))
        if check_ids:
            check_token_range(tokens, manifest.vocab_size, path)
        parts.append(tokens)
    if not parts:
        return np.empty(0, dtype=manifest.dtype)
    return parts[0] if len(parts) == 1 else ConcatenatedTokens(parts)


def check_token_range(tokens: np.ndarray, vocab_size: int, where, block_tokens: int = READ_BLOCK_TOKENS) -> None:
    """Raise ``TokenRangeError`` naming ``where``, the id and its position if any token is >= ``vocab_size``."""
    if vocab_size > np.iinfo(tokens.dtype).max:
        return  # every value of the dtype is a valid id
    for start in range(0, len(tokens), block_tokens):
        block = tokens[start : start + block_tokens]
        largest = int(block.max())
        if largest >= vocab_size:
            position = start + int(np.argmax(block >= vocab_size))
            raise TokenRangeError(
                f"{where}: token id {int(tokens[position])} at position {position} is not below vocab_size "
                f"{vocab_size} (largest id in the block: {largest}); the shard does not belong to this manifest"
            )


def iter_shard_blocks(path: Path, dtype: np.dtype, block_tokens: int = READ_BLOCK_TOKENS):
    """Yield a shard's raw bytes in blocks of whole tokens (for hashing and counting)."""
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(block_tokens * dtype.itemsize), b"")


def hash_and_count(path: Path, dtype: np.dtype, vocab_size: int | None) -> tuple[str, np.ndarray | None]:
    """A shard's sha256 and (if ``vocab_size`` is given) its int64 token histogram, in one read."""
    digest = hashlib.sha256()
    counts = np.zeros(vocab_size, dtype=np.int64) if vocab_size is not None else None
    for block in iter_shard_blocks(path, dtype):
        digest.update(block)
        if counts is not None:
            counts += np.bincount(np.frombuffer(block, dtype=dtype), minlength=vocab_size)[:vocab_size]
    return digest.hexdigest(), counts
