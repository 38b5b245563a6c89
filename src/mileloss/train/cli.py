"""``mileloss train``: parse the config file and overrides, then call :func:`mileloss.train.train`.

    mileloss train tiny loss.kind=mile run.out=runs/mile
    mileloss train --config tiny run.max_steps=200 --resume
    mileloss train tiny run.out=runs/mile --overwrite      # replace a previous run's files
    torchrun --nproc_per_node 2 -m mileloss train tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from mileloss.train.config import SECTIONS, load_config

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
        usage="mileloss train [PRESET | CONFIG.yaml | --config ...] [key.sub=value ...] [--resume | --overwrite]",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="a preset shipped with mileloss (tiny, small, 468M, 1.2B, 6.7B) or a YAML "
                                         "config file; may also be given as the first positional argument")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out that holds a previous run, removing that run's files "
                             "(refused if run.out holds anything mileloss train did not write)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The options, plus ``args.overrides`` (``key.sub=value``) and the config file given either way."""
    args, args.overrides = parser.parse_known_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: choose one")
    if args.overrides and "=" not in args.overrides[0] and not args.overrides[0].startswith("-"):
        if args.config is not None:
            parser.error(f"unexpected argument {args.overrides[0]!r} (the config file is already {args.config!r})")
        args.config = args.overrides.pop(0)
    return args


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from mileloss.train.loop import train

    run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    logger.info("run finished: %s", run_dir)
    return 0
