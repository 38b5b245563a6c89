"""Evaluation of trained models: frequency-bucket perplexity and offline downstream benchmarks.

Only light modules are imported here; lm-eval and transformers are imported when a function needs them.
"""

from mileloss.errors import (
    BenchmarkFileError,
    BucketSpecError,
    CheckpointError,
    EvalDataError,
    TokenizerMismatchError,
    UnknownTaskError,
)
from mileloss.eval.buckets import DEFAULT_CUT_POINTS, BucketDescription, FrequencyBuckets, frequency_buckets
from mileloss.eval.lm_eval_bridge import COMMONSENSE_TASKS, DEFAULT_TASKS, TASKS, run_lm_eval
from mileloss.eval.perplexity import evaluate_perplexity, expected_calibration_error, summarize_token_statistics
from mileloss.eval.pipeline import evaluate

__all__ = [
    "COMMONSENSE_TASKS", "DEFAULT_CUT_POINTS", "DEFAULT_TASKS", "TASKS", "BenchmarkFileError", "BucketDescription",
    "BucketSpecError", "CheckpointError", "EvalDataError", "FrequencyBuckets", "TokenizerMismatchError",
    "UnknownTaskError", "evaluate", "evaluate_perplexity", "expected_calibration_error", "frequency_buckets",
    "run_lm_eval", "summarize_token_statistics",
]
