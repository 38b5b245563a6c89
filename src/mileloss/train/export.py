"""Export of a finished run: ``RUN_DIR/final`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

``final/mileloss_run.json`` records how the model was trained, and is written last: its presence means the export
is complete. It holds
``{"loss": {...}, "data_dir": ..., "steps": ..., "tokens": ..., "seed": ..., "model": {...}}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mileloss.train.files import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["export_final"]


def export_final(model: torch.nn.Module, run, steps: int, tokens: int) -> Path:
    """Write ``save_pretrained`` model + tokenizer and ``mileloss_run.json`` into ``run.run_dir / "final"``.

    Args:
        model: the trained ``LlamaForCausalLM`` (not wrapped in DDP).
        run: the :class:`~mileloss.train.preflight.PreparedRun`.
        steps, tokens: optimizer steps and training tokens done.
    """
    final = run.run_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    # mileloss_run.json marks a complete export: it goes first and comes back last, so a kill in between never
    # leaves the summary of an earlier export beside half-written weights
    (final / "mileloss_run.json").unlink(missing_ok=True)
    model.save_pretrained(final)
    AutoTokenizer.from_pretrained(str(run.manifest.tokenizer_dir)).save_pretrained(final)
    config = run.config
    summary = {
        "loss": {"kind": config.loss.kind, "gamma": config.loss.gamma, "sigma": config.loss.sigma,
                 "normalize": config.loss.normalize},
        "data_dir": str(Path(config.data.dir).resolve()),
        "steps": steps,
        "tokens": tokens,
        "seed": config.run.seed,
        "model": {"preset": config.model.preset, "vocab_size": config.model.vocab_size,
                  "seq_len": config.run.seq_len},
    }
    write_text_atomic(final / "mileloss_run.json", json.dumps(summary, indent=2) + "\n")
    logger.info("exported %s", final)
    return final
