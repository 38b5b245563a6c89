"""``mileloss export``: a checkpoint (``step_N.pt`` or a sharded ``step_N/``) as a ``save_pretrained`` folder.

    mileloss export runs/mile --out models/mile                # the newest complete checkpoint
    mileloss export runs/mile --step 4000 --out models/mile-4k
    lm_eval --model hf --model_args pretrained=models/mile ... # loads it as it is

Runs in one process on the CPU whatever the number of processes that trained; see
:func:`mileloss.train.export.export_checkpoint`.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("mileloss.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mileloss export",
        description="Convert a training checkpoint (any kind, any world size) into a Hugging Face save_pretrained "
                    "folder (safetensors + tokenizer) that AutoModelForCausalLM and lm_eval --model hf load.",
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (run.out) of mileloss train")
    parser.add_argument("--out", required=True, help="folder to create (absent or empty); never replaced")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--data", default=None, help="the data folder, if it moved since training (for the tokenizer)")
    return parser


def run(args: argparse.Namespace) -> int:
    from mileloss.errors import ConfigValueError
    from mileloss.train.export import export_checkpoint

    if args.step is not None and args.step < 1:
        raise ConfigValueError(f"--step must be >= 1, got {args.step}")
    out = export_checkpoint(args.run_dir, args.out, step=args.step, data_dir=args.data)
    logger.info("export written: %s", out)
    return 0
