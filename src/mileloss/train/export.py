"""Export of a finished run: ``RUN_DIR/final`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

``final/mileloss_run.json`` (see :mod:`mileloss.run_folder`) records how the model was trained, the identity of
its training data included, and is written last: its presence means the export is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mileloss.run_folder import RunFolder, data_identity

logger = logging.getLogger(__name__)

__all__ = ["export_final"]


def export_final(model: torch.nn.Module, run, steps: int, tokens: int, state_dict: dict | None = None) -> Path:
    """Write ``save_pretrained`` model + tokenizer and ``mileloss_run.json`` into ``run.run_dir / "final"``.

    Args:
        model: the trained ``LlamaForCausalLM`` (not wrapped in DDP).
        run: the :class:`~mileloss.train.preflight.PreparedRun`.
        steps, tokens: optimizer steps and training tokens done.
        state_dict: the full weights to write instead of ``model``'s own (an FSDP-sharded model's gathered state).
    """
    folder = RunFolder(run.run_dir)
    folder.final.mkdir(parents=True, exist_ok=True)
    # mileloss_run.json marks a complete export: it goes first and comes back last, so a kill in between never
    # leaves the summary of an earlier export beside half-written weights
    folder.run_info_path.unlink(missing_ok=True)
    model.save_pretrained(folder.final, **({} if state_dict is None else {"state_dict": state_dict}))
    AutoTokenizer.from_pretrained(str(run.manifest.tokenizer_dir)).save_pretrained(folder.final)
    config, data_dir = run.config, Path(run.config.data.dir).resolve()
    folder.write_run_info({
        "loss": {"kind": config.loss.kind, "gamma": config.loss.gamma, "sigma": config.loss.sigma,
                 "normalize": config.loss.normalize},
        "data_dir": str(data_dir),
        "data": data_identity(data_dir),
        "steps": steps,
        "tokens": tokens,
        "seed": config.run.seed,
        "model": {"preset": config.model.preset, "vocab_size": config.model.vocab_size,
                  "seq_len": config.run.seq_len},
    })
    logger.info("exported %s", folder.final)
    return folder.final
