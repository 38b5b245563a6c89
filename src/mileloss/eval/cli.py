"""``mileloss eval RUN_DIR_OR_CHECKPOINT --data DATA_DIR``: bucket perplexity and downstream benchmarks.

    mileloss eval runs/mile --data data/shakespeare --tasks none                 # perplexity only
    mileloss eval runs/mile --data data/shakespeare --tasks piqa,arc_easy --limit 50 --num-fewshot 5
"""

from __future__ import annotations

import argparse
import os

__all__ = ["build_parser", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mileloss eval",
        description="Per-frequency-bucket perplexity (plus entropy, MiLe weight and calibration statistics) "
                    "and offline lm-evaluation-harness benchmarks of a run or Hugging Face checkpoint.",
    )
    parser.add_argument("path", help="run folder (uses RUN_DIR/final) or a Hugging Face checkpoint folder")
    parser.add_argument("--data", default=None,
                        help="data directory from `mileloss data` (default: the run's data_dir)")
    parser.add_argument("--buckets", default="80,95",
                        help="cumulative training-occurrence cut points in percent; k cuts give k+1 buckets "
                             "(default 80,95: high / medium / low)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate at most N validation tokens")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="perplexity window (default: the run's training seq_len or the model context)")
    parser.add_argument("--tasks", default="all",
                        help="comma-separated benchmarks (piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
                             "openbookqa, social_iqa, boolq, triviaqa), 'all' (default) or 'none'")
    parser.add_argument("--num-fewshot", type=int, default=0, help="in-context examples per benchmark prompt")
    parser.add_argument("--limit", type=int, default=None, help="documents per benchmark task (default: all)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: RUN_DIR/eval); a new or empty folder, or one holding an "
                             "earlier evaluation of the same checkpoint")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 (default), float64, bfloat16, float16")
    parser.add_argument("--cache-dir", default=None,
                        help="where benchmark files and exports are kept "
                             "(default $MILELOSS_CACHE/benchmarks or ~/.cache/mileloss/benchmarks)")
    return parser


def run(args: argparse.Namespace) -> int:
    # before transformers / datasets are imported: everything is local, never ask a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from mileloss.eval.pipeline import evaluate, format_lm_eval_table, format_perplexity_table

    result = evaluate(args.path, args.data, buckets=args.buckets, max_tokens=args.max_tokens, tasks=args.tasks,
                      num_fewshot=args.num_fewshot, limit=args.limit, out_dir=args.out, seq_len=args.seq_len,
                      batch_size=args.batch_size, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    print(format_perplexity_table(result["perplexity"]))
    if result["lm_eval"] is not None:
        print()
        print(format_lm_eval_table(result["lm_eval"]))
    print(f"\nwrote {result['out_dir']}")
    return 0
