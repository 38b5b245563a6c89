"""``prepare_corpus``: corpus -> tokenizer -> token shards -> manifest, in one call.

Everything is written into a staging folder beside ``out_dir`` and moved into place at the end, so
``out_dir`` holds either the previous complete data set or the new one, never half of one. An
existing ``out_dir`` is replaced only if it is empty or a data directory (it has a
``manifest.json``); anything else is refused rather than deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mileloss.data.corpora import Corpus
from mileloss.data.errors import DataError
from mileloss.data.shards import (
    MANIFEST_FILE,
    TOKEN_COUNTS_FILE,
    TOKENIZER_DIR,
    ShardManifest,
    dtype_for_vocab,
    load_manifest,
)
from mileloss.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_vocab_size, train_tokenizer
from mileloss.data.writer import DEFAULT_MAX_SHARD_TOKENS, write_shards

logger = logging.getLogger(__name__)


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
            raise DataError(f"{out_dir} exists and is not a mileloss data directory; choose another --out")
        if out_dir.is_file():
            raise DataError(f"{out_dir} is a file; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)


def prepare_corpus(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer: str | os.PathLike | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    cache_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> ShardManifest:
    """Build a data directory (see ``mileloss.data.shards``) from a corpus.

    Args:
        sources: named corpora (``shakespeare``, ``kjv``, ``austen``) and/or ``.txt``/``.jsonl``
            files and folders.
        out_dir: the data directory to write.
        vocab_size: vocabulary of the byte-level BPE trained on the corpus (ignored with ``tokenizer``).
        tokenizer: an existing Hugging Face tokenizer folder to use (and copy) instead of training one.
        text_field: the text field of ``.jsonl`` records.
        val_fraction: share of documents held out for validation.
        seed: seeds the train/val assignment (recorded in the manifest).
        max_shard_tokens: the most tokens in one shard file.
        cache_dir: download folder of named corpora.
        dtype: force the shard dtype (``"uint16"``/``"uint32"``); default from the vocabulary size.
        progress: show progress bars.

    Returns:
        The new data directory's ``ShardManifest``.

    Raises:
        CorpusNotFoundError, EmptyCorpusError, CorpusFormatError, CorpusFetchError, TokenizerError.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = Corpus(sources, text_field=text_field, cache_dir=cache_dir)
    corpus.check_not_empty()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if tokenizer is None:
            logger.info("training a byte-level BPE tokenizer (vocab_size %d)", vocab_size)
            hf_tokenizer = train_tokenizer(corpus.texts(), vocab_size)
        else:
            hf_tokenizer = load_tokenizer(tokenizer)
        logger.info("tokenizer ready after %.1f s", time.perf_counter() - started)
        save_tokenizer(hf_tokenizer, staging / TOKENIZER_DIR)
        actual_vocab = tokenizer_vocab_size(hf_tokenizer)
        shard_dtype = np.dtype(dtype).newbyteorder("<") if dtype is not None else dtype_for_vocab(actual_vocab)
        splits = write_shards(
            corpus.documents(),
            hf_tokenizer,
            staging,
            vocab_size=actual_vocab,
            eos_token_id=hf_tokenizer.eos_token_id,
            val_fraction=val_fraction,
            seed=seed,
            max_shard_tokens=max_shard_tokens,
            dtype=shard_dtype,
            progress=progress,
        )
        split_by = "token_position" if splits["val"].num_documents == 0 and splits["val"].num_tokens else "document"
        manifest = ShardManifest(
            path=staging,
            corpus=corpus.name,
            sources=corpus.sources,
            vocab_size=actual_vocab,
            dtype=shard_dtype,
            eos_token_id=int(hf_tokenizer.eos_token_id),
            seed=seed,
            splits=splits,
            tokenizer=TOKENIZER_DIR,
            token_counts_file=TOKEN_COUNTS_FILE,
            extra={"val_fraction": val_fraction, "split_by": split_by, "text_field": text_field},
        )
        manifest.save()
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared %s in %.1f s", out_dir, time.perf_counter() - started)
    return load_manifest(out_dir, verify=False)
