"""Shared fixtures of the training tests: a small generated corpus and a tiny, fast run config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory (vocab 512, ~25k training tokens) from a generated Zipf-distributed word corpus."""
    return make_words_data(tmp_path_factory)


def make_words_data(tmp_path_factory) -> Path:
    """Write the data directory of :func:`data_dir` (also used by tests/hostile/test_train.py)."""
    from mileloss.data import prepare_corpus

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    corpus = tmp_path_factory.mktemp("corpus")
    for index in range(24):
        sentences = (" ".join(rng.choices(words, weights, k=12)) + "." for _ in range(50))
        (corpus / f"doc{index:02d}.txt").write_text(" ".join(sentences))
    out = tmp_path_factory.mktemp("data") / "words"
    prepare_corpus([str(corpus)], out, vocab_size=512, progress=False)
    return out
