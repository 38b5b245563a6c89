"""Errors raised by ``mileloss.data``.

Every error is a ``ValueError`` subclass whose message names the thing at fault (a file, a line, a
field, a split), so a failed ``mileloss data`` run says what to fix without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Base class of every error raised by ``mileloss.data``."""


class CorpusNotFoundError(DataError):
    """A corpus source is neither a named corpus nor an existing file or folder."""


class EmptyCorpusError(DataError):
    """The corpus holds no document with non-whitespace text."""


class CorpusFormatError(DataError):
    """A corpus file cannot be read: bad JSON, a missing or non-string text field, bad UTF-8."""


class CorpusFetchError(DataError):
    """A named corpus could not be downloaded, or the download (or its cached copy) fails its pinned sha256."""


class TokenizerError(DataError):
    """A tokenizer cannot be trained, loaded or used (no eos token, vocabulary too small...)."""


class TokenizerMismatchError(TokenizerError):
    """The tokenizer folder of a data directory does not match the manifest's ``vocab_size``."""


class ManifestError(DataError):
    """``manifest.json`` is missing, unreadable, or of an unknown format or version."""


class ShardChecksumError(DataError):
    """A token shard is missing, or its size or sha256 differs from the manifest."""


class SplitTooShortError(DataError):
    """A split holds fewer than ``seq_len + 1`` tokens, so not one training window fits."""


class LoaderStateError(DataError):
    """A loader ``state_dict`` was saved for other data, another sequence length or another seed."""


class FileChecksumError(ShardChecksumError):
    """A non-shard file of a data directory (token counts, a tokenizer file) is missing or changed."""


class TokenRangeError(DataError):
    """A shard holds a token id outside ``[0, vocab_size)``: the shards and the manifest disagree."""


class IncompleteDataError(ManifestError):
    """The folder is the unfinished output of a ``mileloss data`` run that was killed or failed."""


class OutputDirError(DataError):
    """``--out`` cannot be written: it is a file, a folder not written by mileloss, unwritable, or in use."""


class OutputDirBusyError(OutputDirError):
    """Another ``mileloss data`` process is writing the same ``--out`` right now."""


class UnsafeArchiveError(CorpusFormatError):
    """A downloaded archive has a member with an absolute or ``..`` path, a link, or an absurd size."""
