"""``mileloss train``: parse the config file and overrides, then call :func:`mileloss.train.train`.

    mileloss train tiny loss.kind=mile run.out=runs/mile
    mileloss train --config tiny run.max_steps=200 --resume
    mileloss train tiny run.out=runs/mile --overwrite      # replace a previous run's files
    torchrun --nproc_per_node 2 -m mileloss train tiny
    mileloss train 6.7B --dry-run model.vocab_size=32000 --world-size 128 --gpu-memory 80GB   # will it fit?
    mileloss train 468M --dry-run --json model.vocab_size=32000                              # the same as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from mileloss.errors import PlanError
from mileloss.train.config import SECTIONS, TrainConfig, load_config

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
        usage="mileloss train [PRESET | CONFIG.yaml | --config ...] [key.sub=value ...] [--resume | --overwrite]\n"
              "       mileloss train PRESET --dry-run [--json] [--world-size N] [--gpu-memory 80GB] "
              "[key.sub=value ...]",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="a preset shipped with mileloss (tiny, small, 468M, 1.2B, 6.7B) or a YAML "
                                         "config file; may also be given as the first positional argument")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out that holds a previous run, removing that run's files "
                             "(refused if run.out holds anything mileloss train did not write)")
    plan = parser.add_argument_group("will it fit? (--dry-run: no data, no weights, nothing written)")
    plan.add_argument("--dry-run", action="store_true",
                      help="build the model on the meta device and print its parameters, the per-rank memory of "
                           "parameters, gradients, AdamW state and activations under ddp and fsdp, tokens per step, "
                           "total tokens and training FLOPs (the vocabulary: model.vocab_size=N, else data.dir's "
                           "manifest)")
    plan.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    plan.add_argument("--world-size", type=int, default=None, metavar="N",
                      help="with --dry-run: the number of processes (GPUs) to plan for (default: $WORLD_SIZE or 1)")
    plan.add_argument("--gpu-memory", default=None, metavar="SIZE",
                      help="with --dry-run: each GPU's memory, e.g. 80GB (10^9 bytes), 80GiB or 81559MiB; says "
                           "whether the run fits (at most 90%% of it)")
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
    if not args.dry_run:
        given = [flag for flag, value in (("--json", args.json), ("--world-size", args.world_size),
                                          ("--gpu-memory", args.gpu_memory)) if value not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} only with --dry-run")
    elif args.resume or args.overwrite:
        parser.error("--dry-run plans a run and writes nothing: it takes no --resume or --overwrite")
    return args


def _env_world_size() -> int:
    """``$WORLD_SIZE`` (set by torchrun), else 1."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"WORLD_SIZE={text!r} in the environment is not a number; pass --world-size N") from None


def _vocab_size(config: TrainConfig) -> int:
    """``model.vocab_size``, else the manifest of ``data.dir`` (read, not verified), else a :class:`PlanError`."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    from pathlib import Path

    from mileloss.data.shards import read_manifest

    if (Path(config.data.dir) / "manifest.json").is_file():
        return read_manifest(config.data.dir).vocab_size
    raise PlanError(f"--dry-run needs the vocabulary size: set model.vocab_size=N (e.g. 32000 for the paper's LLaMA "
                    f"tokenizer), or point data.dir at a folder written by `mileloss data` (no manifest.json in "
                    f"{config.data.dir!r})")


def dry_run(config: TrainConfig, world_size: int, gpu_memory: str | None, as_json: bool) -> str:
    """The ``--dry-run`` report (text or JSON) of ``config`` on ``world_size`` processes."""
    import torch

    from mileloss.models import build_model, count_parameters
    from mileloss.train.plan import parse_memory, plan_training

    if world_size < 1:
        raise PlanError(f"--world-size must be >= 1, got {world_size}")
    memory = parse_memory(gpu_memory) if gpu_memory is not None else None
    vocab = _vocab_size(config)
    plan = plan_training(config, world_size, vocab, memory)
    overrides = {"num_hidden_layers": config.model.num_hidden_layers} if config.model.num_hidden_layers else {}
    with torch.device("meta"):  # the real model's parameters, no memory: the formula must agree with them
        exact = count_parameters(build_model(config.model.preset, vocab_size=vocab, **overrides))
    if exact != plan.parameters:
        raise RuntimeError(f"plan.py counts {plan.parameters:,} parameters, the model has {exact:,}: a bug")
    if as_json:
        return json.dumps(plan.to_dict(), indent=2)
    return format_plan(plan)


def _gib(count: int) -> str:
    return f"{count / 2**30:9.2f} GiB"


def format_plan(plan) -> str:
    """The plan as the text ``--dry-run`` prints."""
    from mileloss.train.plan import FIT_FRACTION

    shape = plan.shape
    lines = [
        f"model {plan.preset}: {plan.parameters:,} parameters (vocab {shape.vocab:,}, hidden {shape.hidden}, "
        f"{shape.layers} layers, {shape.heads} heads, FFN {shape.intermediate}; from the meta-device model)",
        f"world size {plan.world_size}, {plan.dtype}, micro-batch {plan.micro_batch} x {plan.seq_len} tokens, "
        f"gradient accumulation {plan.grad_accum_steps}, activation checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}",
        f"tokens per optimizer step: {plan.tokens_per_step:,}",
        f"optimizer steps: {plan.max_steps:,}; total tokens: {plan.total_tokens:,} ({plan.total_tokens / 1e9:.1f}B)",
        f"training FLOPs (6 x parameters x tokens): {plan.training_flops:.3e}",
        "",
        f"per-rank memory (estimate)    {'ddp':>13} {'fsdp':>13}",
    ]
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
    for label, key in (("parameters (fp32)", "parameters"), ("gradients (fp32)", "gradients"),
                       ("AdamW state (fp32)", "optimizer"), ("buffers", "buffers"), ("activations", "activations"),
                       ("total", "total")):
        lines.append(f"  {label:<27} {_gib(getattr(ddp, key))} {_gib(getattr(fsdp, key))}")
    if plan.gpu_memory is not None:
        fits = plan.fits
        verdict = {mode: "fits" if fits[mode] else "does NOT fit" for mode in fits}
        lines.append(f"  {'fits (<= ' + f'{FIT_FRACTION:.0%} of ' + _gib(plan.gpu_memory).strip() + ')':<27} "
                     f"{verdict['ddp']:>13} {verdict['fsdp']:>13}")
    if plan.world_size == 1:
        lines.append("one process trains without DDP or FSDP (run.parallel is ignored): read the ddp column, which "
                     "has no gradient buckets at world size 1")
    lines.append(f"run.parallel={plan.parallel} is configured; the formulas and their sources: "
                 f"mileloss.train.plan's docstring")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        world_size = args.world_size if args.world_size is not None else _env_world_size()
        print(dry_run(config, world_size, args.gpu_memory, args.json))
        return 0
    from mileloss.train.loop import train

    run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    logger.info("run finished: %s", run_dir)
    return 0
