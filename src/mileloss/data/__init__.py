"""Data for pretraining: corpora -> byte-level BPE tokenizer -> token shards -> training batches.

>>> from mileloss.data import prepare_corpus, TokenBatchLoader               # doctest: +SKIP
>>> prepare_corpus(["shakespeare"], "data/shakespeare", vocab_size=8192)     # doctest: +SKIP
>>> loader = TokenBatchLoader("data/shakespeare", batch_size=8, seq_len=256)  # doctest: +SKIP
>>> input_ids, labels = loader.next_batch()  # (8, 256) int64; labels[:, t] = input_ids[:, t + 1]  # doctest: +SKIP

Inputs: text, JSONL (plain, ``.gz``, ``.zst``), parquet, folders, globs (``mileloss.data.corpora``); domain
mixtures with ``domain_field`` and ``mix`` (``mileloss.data.mixture``, preset ``pile``).
``mileloss.data.shards`` describes the on-disk layout. ``transformers``/``tokenizers`` are imported
only when a tokenizer is trained or loaded.
"""

from mileloss.data.corpora import Corpus, Document
from mileloss.data.loader import TokenBatchLoader, iter_eval_batches
from mileloss.data.mixture import Mixture, load_mix
from mileloss.data.prepare import prepare_corpus
from mileloss.data.shards import ShardManifest, load_manifest, read_split
from mileloss.errors import (
    CorpusFetchError,
    CorpusFormatError,
    CorpusNotFoundError,
    DataError,
    DomainMismatchError,
    EmptyCorpusError,
    FileChecksumError,
    FolderBusyError,
    IncompleteDataError,
    LoaderStateError,
    ManifestError,
    MixtureError,
    OutputFolderError,
    ShardChecksumError,
    SplitTooShortError,
    TokenizerError,
    TokenizerMismatchError,
    TokenRangeError,
    UnsafeArchiveError,
)

__all__ = [
    "Corpus",
    "Document",
    "prepare_corpus",
    "Mixture",
    "load_mix",
    "load_manifest",
    "ShardManifest",
    "read_split",
    "TokenBatchLoader",
    "iter_eval_batches",
    "DataError",
    "CorpusNotFoundError",
    "CorpusFormatError",
    "CorpusFetchError",
    "EmptyCorpusError",
    "TokenizerError",
    "TokenizerMismatchError",
    "ManifestError",
    "ShardChecksumError",
    "FileChecksumError",
    "TokenRangeError",
    "IncompleteDataError",
    "OutputFolderError",
    "FolderBusyError",
    "UnsafeArchiveError",
    "SplitTooShortError",
    "LoaderStateError",
    "MixtureError",
    "DomainMismatchError",
]
