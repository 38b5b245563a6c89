"""Metric logs of a run: ``metrics.jsonl`` (every line), ``metrics.csv`` (training lines), TensorBoard (optional).

Training lines: ``{"kind": "train", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second", "time"}``;
validation lines: ``{"kind": "val", "step", "tokens", "val_loss", "val_ppl"}``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from mileloss.run_folder import RunFolder, parse_metric_lines, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "TRAIN_FIELDS"]

TRAIN_FIELDS = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second", "time"]


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Metric lines of a ``metrics.jsonl`` (not a line cut short by a kill), optionally only one ``kind``."""
    lines, _ = parse_metric_lines(Path(path).read_text(encoding="utf-8", errors="replace"))
    return [line for line in lines if kind is None or line["kind"] == kind]


class MetricsLogger:
    """Appends metric lines to the run directory's logs.

    Args:
        run_dir: the run directory.
        resume_step: when resuming from the checkpoint of this step, lines with a larger step (written by the
            interrupted process after its last checkpoint) are dropped so the logs read like one run.
        tensorboard: also write TensorBoard scalars when ``torch.utils.tensorboard`` is importable.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        folder = RunFolder(run_dir)
        self.jsonl_path, self.csv_path = folder.metrics_jsonl, folder.metrics_csv
        if resume_step is None:
            write_atomic(self.jsonl_path, "")
            write_atomic(self.csv_path, ",".join(TRAIN_FIELDS) + "\n")
        else:
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(folder.tensorboard))
            except Exception:  # tensorboard is optional
                self.writer = None

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to ``step``; both files are replaced atomically (a kill here loses no line)."""
        text = self.jsonl_path.read_text(encoding="utf-8", errors="replace") if self.jsonl_path.exists() else ""
        lines, other = parse_metric_lines(text)
        for raw in other:
            logger.warning("dropping an unreadable line of %s: %r", self.jsonl_path, raw[:80])
        kept = [line for line in lines if line["step"] <= step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, TRAIN_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: line.get(k) for k in TRAIN_FIELDS} for line in kept if line["kind"] == "train")
        write_atomic(self.csv_path, buffer.getvalue())
        write_atomic(self.jsonl_path, "".join(json.dumps(line) + "\n" for line in kept))

    def log(self, kind: str, **values: Any) -> None:
        """Append one line of the given kind ("train" or "val")."""
        line = {"kind": kind, **values}
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        if kind == "train":
            with open(self.csv_path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, TRAIN_FIELDS, lineterminator="\n")
                writer.writerow({k: values.get(k) for k in TRAIN_FIELDS})
        if self.writer is not None:
            for key, value in values.items():
                if key not in ("step", "tokens", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
