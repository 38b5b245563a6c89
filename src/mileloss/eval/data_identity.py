"""What a data directory *is*, so that results on different data are never compared as if they were one.

``data_identity(DATA_DIR)`` reads ``manifest.json`` (never the shards) and returns

    {"data_dir", "corpus", "vocab_size", "manifest_sha256", "tokenizer_sha256"}

``manifest_sha256`` hashes the manifest's content (canonical JSON: key order and whitespace do not matter); it
covers every shard's sha256 and token count, so two directories with the same tokens have the same hash wherever
they lie. ``tokenizer_sha256`` hashes the files of the manifest's tokenizer folder. ``mileloss eval`` stores the
identity of the data it evaluated on in ``perplexity.json``; ``mileloss report`` compares runs on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

__all__ = ["IDENTITY_FIELDS", "data_identity", "describe_differences"]

IDENTITY_FIELDS = (("corpus", "corpus"), ("tokenizer_sha256", "tokenizer"), ("vocab_size", "vocab size"),
                   ("manifest_sha256", "data manifest"))
"""(key, words) pairs compared by :func:`describe_differences`, in the order they are reported."""

MAX_TOKENIZER_FILE_BYTES = 256 << 20


def _tokenizer_sha256(folder: Path) -> str | None:
    """sha256 over the names and bytes of the regular files directly inside ``folder`` (None if it has none)."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size <= MAX_TOKENIZER_FILE_BYTES)
    if not files:
        return None
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def data_identity(data_dir: str | Path) -> dict:
    """Identity of a ``mileloss data`` directory; fields that cannot be read are None.

    Never raises for a missing or malformed manifest: ``{"data_dir": ..., "readable": False, ...None}`` then.
    """
    data_dir = Path(data_dir)
    identity = {"data_dir": str(data_dir), "readable": False, "corpus": None, "vocab_size": None,
                "manifest_sha256": None, "tokenizer_sha256": None}
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return identity
    if not isinstance(manifest, dict):
        return identity
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    vocab_size = manifest.get("vocab_size")
    tokenizer = manifest.get("tokenizer", "tokenizer")
    tokenizer_hash = None
    if isinstance(tokenizer, str) and (data_dir / tokenizer).resolve().is_relative_to(data_dir.resolve()):
        with contextlib.suppress(OSError):  # only a folder inside the data directory is read
            tokenizer_hash = _tokenizer_sha256(data_dir / tokenizer)
    identity.update(
        readable=True,
        corpus=manifest.get("corpus") if isinstance(manifest.get("corpus"), str) else None,
        vocab_size=vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None,
        manifest_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        tokenizer_sha256=tokenizer_hash,
    )
    return identity


def _show(key: str, value) -> str:
    if key.endswith("sha256"):
        return str(value)[:12]
    return repr(value) if isinstance(value, str) else str(value)


def describe_differences(a: dict, b: dict) -> list[str]:
    """``["corpus 'shakespeare' vs 'kjv'", "vocab size 1024 vs 4096", ...]`` over the fields both identities know."""
    return [f"{words} {_show(key, a[key])} vs {_show(key, b[key])}" for key, words in IDENTITY_FIELDS
            if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]]
