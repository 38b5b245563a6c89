"""``mileloss train``: parse the config file and overrides, then call :func:`mileloss.train.train`.

    mileloss train configs/tiny.yaml loss.kind=mile run.out=runs/mile
    mileloss train --config configs/tiny.yaml --run.max_steps 200 --resume
    mileloss train configs/tiny.yaml run.out=runs/mile --overwrite      # replace a previous run's files
    torchrun --nproc_per_node 2 -m mileloss train configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from mileloss.train.config import SECTIONS, ConfigError, load_config

logger = logging.getLogger("mileloss.train")


def _keys_help() -> str:
    lines = ["config keys (override with key.sub=value or --key.sub value):"]
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            lines.append(f"  {section}.{field.name} (default: {default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mileloss train",
        description="Pretrain a LLaMA-style model with CE, focal or MiLe loss.",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="mileloss train [CONFIG.yaml | --config CONFIG.yaml] [key.sub=value ...] [--resume | --overwrite]",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML config file (may also be given as the first positional argument)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out that holds a previous run, removing that run's files "
                             "(refused if run.out holds anything mileloss train did not write)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: choose one")
    config_file = args.config
    if overrides and "=" not in overrides[0] and not overrides[0].startswith("-"):
        if config_file is not None:
            parser.error(f"unexpected argument {overrides[0]!r} (the config file is already {config_file!r})")
        config_file = overrides.pop(0)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if args.quiet or rank != 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_file, overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"mileloss train: {error}", file=sys.stderr)
        return 2
    import torch

    from mileloss.train.loop import train

    try:
        run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    except ValueError as error:  # every input problem is a ValueError subclass with a precise message
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    except OSError as error:  # the disk or the file system (full, read-only, gone): checkpoints written stay valid
        logger.error("%s: %s (checkpoints written so far are complete; continue with --resume)",
                     type(error).__name__, error)
        return 1
    except MemoryError as error:
        logger.error("out of memory (%s): reduce run.batch_size, run.seq_len or the model size", error)
        return 1
    except RuntimeError as error:  # torch's allocators: CUDA out of memory, or CPU allocation failures
        if not isinstance(error, torch.OutOfMemoryError) and "DefaultCPUAllocator" not in str(error):
            raise
        message = " ".join(str(error).split())[:300]
        logger.error("out of memory (%s): reduce run.batch_size, run.seq_len or the model size", message)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; checkpoints written so far are complete: continue with --resume")
        return 130
    logger.info("run finished: %s", run_dir)
    return 0
