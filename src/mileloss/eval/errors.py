"""Errors raised by ``mileloss eval``; each is a ``ValueError`` whose message names the file or flag at fault."""

from __future__ import annotations

__all__ = [
    "BenchmarkFileError",
    "BucketSpecError",
    "CheckpointError",
    "EvalArgumentError",
    "EvalDataError",
    "OutputFolderError",
    "TokenizerMismatchError",
    "UnknownTaskError",
]


class BucketSpecError(ValueError):
    """Bad ``--buckets`` cut points or an unusable token-count array."""


class CheckpointError(ValueError):
    """The checkpoint folder is missing, has no model weights/config, or no tokenizer."""


class TokenizerMismatchError(ValueError):
    """The checkpoint's tokenizer is not the one the evaluation data was tokenised with."""


class EvalDataError(ValueError):
    """The data directory is missing files or its tokens do not fit the model."""


class UnknownTaskError(ValueError):
    """A ``--tasks`` name that the lm-eval bridge does not define."""


class BenchmarkFileError(ValueError):
    """A benchmark's validation files are not where the bridge expects them (names the task and path)."""


class EvalArgumentError(ValueError):
    """A numeric option out of range (``--seq-len 0``, ``--batch-size -1``), an unusable ``--dtype`` or
    ``--device``."""


class OutputFolderError(ValueError):
    """An ``--out`` that cannot be used: a file, unwritable, or a folder holding files the command did not write.

    Shared by ``mileloss eval``, ``report`` and ``reproduce``, none of which overwrites or deletes what it did not
    write itself.
    """
