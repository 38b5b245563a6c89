"""Token shards on disk: the manifest, writing shards, verifying and memory-mapping them.

A data directory (written by ``mileloss data``) holds::

    manifest.json           format, vocab_size, dtype, eos id, splits with per-shard token counts and sha256
    tokenizer/              a Hugging Face tokenizer folder
    train_00000.bin ...     raw little-endian token ids (uint16 if vocab_size <= 65536, else uint32);
    val_00000.bin ...       every document is followed by the eos token
    train_token_counts.npy  int64 (vocab_size,): how often each token occurs in the training split

Shards are plain arrays, so ``np.memmap(path, dtype, mode="r")`` reads one (as in nanoGPT).
``load_manifest`` checks the format and version, every shard's size and (``verify=True``) sha256, and
that the tokenizer folder has ``vocab_size`` ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mileloss.data.errors import ManifestError, ShardChecksumError, TokenizerMismatchError
from mileloss.data.tokenizer import tokenizer_vocab_size

logger = logging.getLogger(__name__)

FORMAT = "mileloss-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_COUNTS_FILE = "train_token_counts.npy"
SPLITS = ("train", "val")
READ_BLOCK_TOKENS = 8 * 2**20  # tokens per read when hashing and counting


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
class SplitInfo:
    """One split: its shards in order, their total token count, and how many documents went into it."""

    num_tokens: int
    shards: list[ShardInfo]
    num_documents: int | None = None


@dataclass
class ShardManifest:
    """The contents of ``manifest.json`` plus the folder it lives in.

    Attributes:
        path: the data directory.
        vocab_size: the number of token ids (``len(tokenizer)``).
        dtype: the shards' numpy dtype (``uint16`` or ``uint32``, little-endian).
        eos_token_id: the token written after every document.
        splits: ``{"train": SplitInfo, "val": SplitInfo}``.
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

    def token_counts(self) -> np.ndarray:
        """int64 array (vocab_size,): occurrences of each token id in the training split."""
        path = self.path / self.token_counts_file
        if not path.exists():
            raise ManifestError(f"{path}: token counts file is missing")
        counts = np.load(path)
        if counts.shape != (self.vocab_size,):
            raise ManifestError(f"{path}: shape {counts.shape}, expected ({self.vocab_size},)")
        return counts

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
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
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict, path: Path) -> ShardManifest:
        where = path / MANIFEST_FILE
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ManifestError(
                f"{where}: format {data.get('format')!r} version {data.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}"
            )
        known = {
            "format",
            "version",
            "corpus",
            "sources",
            "tokenizer",
            "vocab_size",
            "dtype",
            "eos_token_id",
            "seed",
            "splits",
            "token_counts_file",
        }
        try:
            dtype = np.dtype(data["dtype"]).newbyteorder("<")
            if dtype.kind != "u" or dtype.itemsize not in (2, 4):
                raise ManifestError(f"{where}: dtype {data['dtype']!r} is not uint16 or uint32")
            splits = {
                name: SplitInfo(
                    num_tokens=int(info["num_tokens"]),
                    shards=[ShardInfo(s["file"], int(s["num_tokens"]), s["sha256"]) for s in info["shards"]],
                    num_documents=info.get("num_documents"),
                )
                for name, info in data["splits"].items()
            }
            return cls(
                path=path,
                corpus=data.get("corpus", ""),
                sources=list(data.get("sources", [])),
                vocab_size=int(data["vocab_size"]),
                dtype=dtype,
                eos_token_id=int(data["eos_token_id"]),
                seed=int(data.get("seed", 0)),
                splits=splits,
                tokenizer=data.get("tokenizer", TOKENIZER_DIR),
                token_counts_file=data.get("token_counts_file", TOKEN_COUNTS_FILE),
                extra={key: value for key, value in data.items() if key not in known},
            )
        except (KeyError, TypeError) as error:
            raise ManifestError(f"{where}: missing or malformed entry {error}") from error

    def save(self) -> None:
        write_atomic(self.manifest_path, (json.dumps(self.to_json(), indent=2) + "\n").encode())


def _check_shard(path: Path, shard: ShardInfo, itemsize: int, verify: bool) -> None:
    if not path.exists():
        raise ShardChecksumError(f"{path}: shard is missing")
    expected_bytes = shard.num_tokens * itemsize
    if path.stat().st_size != expected_bytes:
        raise ShardChecksumError(f"{path}: {path.stat().st_size} bytes, manifest says {expected_bytes}")
    if verify:
        actual = file_sha256(path)
        if actual != shard.sha256:
            raise ShardChecksumError(f"{path}: sha256 {actual} differs from the manifest's {shard.sha256}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(data_dir: str | Path, verify: bool = True) -> ShardManifest:
    """Read ``DATA_DIR/manifest.json`` and check the files it describes.

    Every shard must exist with the recorded size (always checked: a stat per shard). With ``verify``,
    each shard's sha256 is recomputed and the tokenizer folder's number of ids is compared with
    ``vocab_size``.

    Raises:
        ManifestError: no manifest, unreadable JSON, unknown format or version.
        ShardChecksumError: a shard is missing or differs from the manifest (the message names it).
        TokenizerMismatchError: the tokenizer folder does not have ``vocab_size`` ids.
    """
    path = Path(data_dir)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise ManifestError(f"{manifest_path}: no manifest; prepare the data with `mileloss data --out {path}`")
    try:
        data = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{manifest_path}: not valid JSON ({error.msg})") from error
    manifest = ShardManifest.from_json(data, path)
    for name, split in manifest.splits.items():
        if sum(shard.num_tokens for shard in split.shards) != split.num_tokens:
            raise ManifestError(f"{manifest_path}: split {name!r} shard token counts do not add up to num_tokens")
        for shard in split.shards:
            _check_shard(path / shard.file, shard, manifest.dtype.itemsize, verify)
    if verify:
        actual = tokenizer_vocab_size(manifest.tokenizer_dir) if manifest.tokenizer_dir.exists() else None
        if actual != manifest.vocab_size:
            found = "no tokenizer folder" if actual is None else f"a tokenizer with {actual} ids"
            raise TokenizerMismatchError(
                f"{manifest.tokenizer_dir}: {found}, but {manifest_path} says vocab_size {manifest.vocab_size}"
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


def read_split(data_dir_or_manifest, split: str = "train"):
    """The tokens of a split as one 1-D array, memory-mapped (read-only).

    One shard gives an ``np.memmap``; several give a ``ConcatenatedTokens`` view over their memmaps;
    an empty split gives an empty array.
    """
    manifest = as_manifest(data_dir_or_manifest)
    parts = [
        np.memmap(path, dtype=manifest.dtype, mode="r", shape=(shard.num_tokens,))
        for path, shard in zip(manifest.shard_paths(split), manifest.split(split).shards, strict=True)
        if shard.num_tokens > 0
    ]
    if not parts:
        return np.empty(0, dtype=manifest.dtype)
    return parts[0] if len(parts) == 1 else ConcatenatedTokens(parts)


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
