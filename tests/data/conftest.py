"""Small generated corpora and data directories for the data tests (no network, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mileloss.data.shards import (
    TOKEN_COUNTS_FILE,
    ShardInfo,
    ShardManifest,
    SplitInfo,
    describe_file,
    hash_and_count,
    shard_name,
)

SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vu", "shi", "do", "pe", "nor", "qua", "zel", "ith", "um", "é", "ü"]
PUNCTUATION = [".", ",", ";", "!", "?", " --"]


def make_text(rng: random.Random, num_words: int) -> str:
    """Word salad with punctuation, newlines, blank lines and a little non-ASCII."""
    words = []
    for index in range(num_words):
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.1:
            word = word.capitalize()
        words.append(word)
        if rng.random() < 0.1:
            words[-1] += rng.choice(PUNCTUATION)
        if index and rng.random() < 0.05:
            words.append("\n\n" if rng.random() < 0.3 else "\n")
    return " ".join(words).replace(" \n", "\n").replace("\n ", "\n")


@pytest.fixture
def texts() -> list[str]:
    rng = random.Random(1234)
    return [make_text(rng, rng.randint(150, 400)) for _ in range(20)]


@pytest.fixture
def corpus_dir(tmp_path: Path, texts: list[str]) -> Path:
    """20 text files doc_00.txt ... doc_19.txt (sorted order = document order)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(texts):
        (folder / f"doc_{index:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def _write_data_dir(folder: Path, splits: dict[str, list[np.ndarray]], vocab_size: int, dtype="uint16") -> Path:
    """A data directory with the given shards per split and their token counts (no tokenizer folder: load
    with verify=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    infos = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    for split, shards in splits.items():
        shard_infos = []
        for index, tokens in enumerate(shards):
            path = folder / shard_name(split, index)
            path.write_bytes(np.asarray(tokens, dtype=dtype).tobytes())
            digest, shard_counts = hash_and_count(path, dtype, vocab_size)
            counts += shard_counts if split == "train" else 0
            shard_infos.append(ShardInfo(path.name, len(tokens), digest))
        infos[split] = SplitInfo(sum(len(tokens) for tokens in shards), shard_infos, len(shards))
    np.save(folder / TOKEN_COUNTS_FILE, counts)
    manifest = ShardManifest(
        path=folder,
        corpus="synthetic",
        sources=[],
        vocab_size=vocab_size,
        dtype=dtype,
        eos_token_id=0,
        seed=0,
        splits=infos,
        files=[describe_file(folder, TOKEN_COUNTS_FILE)],
    )
    manifest.save()
    return folder


@pytest.fixture
def write_data_dir():
    """``write_data_dir(folder, {"train": [shard, ...], "val": [...]}, vocab_size, dtype="uint16")``."""
    return _write_data_dir
