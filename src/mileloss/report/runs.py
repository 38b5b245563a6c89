"""Read what a run folder holds (config, metric curves, eval results) and group runs that differ only by seed."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

__all__ = ["EmptyRunError", "ReportError", "RunGroup", "RunRecord", "group_runs", "load_run"]

# config keys that do not change what a run learns: runs differing only here (and in seed) are one group
NON_SEMANTIC_KEYS = {"run.seed", "run.out", "run.device", "run.progress", "run.num_threads", "run.log_every",
                     "run.checkpoint_every", "run.keep_checkpoints", "data.verify_checksums"}


class ReportError(ValueError):
    """A run folder cannot be reported."""


class EmptyRunError(ReportError):
    """The folder is not a training run: it has neither ``metrics.jsonl`` nor ``config.yaml``."""


@dataclasses.dataclass
class RunRecord:
    """One run folder, read.

    Attributes:
        path: the run folder.
        config: ``config.yaml`` (empty if absent).
        train: training lines of ``metrics.jsonl`` (``step``, ``tokens``, ``loss``...).
        val: validation lines (``step``, ``tokens``, ``val_loss``, ``val_ppl``).
        perplexity: ``eval/perplexity.json`` or None.
        lm_eval: ``eval/lm_eval.json`` or None.
        run_info: ``final/mileloss_run.json`` or {}.
    """

    path: Path
    config: dict
    train: list[dict]
    val: list[dict]
    perplexity: dict | None
    lm_eval: dict | None
    run_info: dict

    @property
    def loss(self) -> dict:
        return {**self.run_info.get("loss", {}), **self.config.get("loss", {})}

    @property
    def loss_kind(self) -> str:
        return str(self.loss.get("kind", "unknown"))

    @property
    def seed(self):
        return self.config.get("run", {}).get("seed", self.run_info.get("seed"))

    @property
    def steps(self) -> int | None:
        if self.run_info.get("steps") is not None:
            return int(self.run_info["steps"])
        return int(self.train[-1]["step"]) if self.train else None

    @property
    def tokens(self) -> int | None:
        if self.run_info.get("tokens") is not None:
            return int(self.run_info["tokens"])
        return int(self.train[-1]["tokens"]) if self.train and "tokens" in self.train[-1] else None

    @property
    def final_train_loss(self) -> float | None:
        return float(self.train[-1]["loss"]) if self.train else None

    @property
    def final_val_loss(self) -> float | None:
        return float(self.val[-1]["val_loss"]) if self.val else None

    def group_key(self) -> tuple:
        flat = _flatten(self.config) if self.config else {"loss": json.dumps(self.loss, sort_keys=True)}
        return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items() if k not in NON_SEMANTIC_KEYS))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_jsonl(path: Path) -> list[dict]:
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            # a run still writing may leave a partial last line; anything else is a broken file
            logger.warning("%s:%d: skipping a line that is not JSON", path, number)
    return lines


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error.msg})") from error


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder written by ``mileloss train`` (and ``mileloss eval``).

    Raises:
        EmptyRunError: if the folder is missing or has neither ``metrics.jsonl`` nor ``config.yaml``.
    """
    path = Path(path)
    metrics_path, config_path = path / "metrics.jsonl", path / "config.yaml"
    if not path.is_dir() or not (metrics_path.is_file() or config_path.is_file()):
        what = "no such folder" if not path.is_dir() else "no metrics.jsonl or config.yaml"
        raise EmptyRunError(f"{path}: not a training run ({what}); pass folders written by `mileloss train`")
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    lines = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    return RunRecord(
        path=path,
        config=config,
        train=[line for line in lines if line.get("kind") == "train" and "loss" in line],
        val=[line for line in lines if line.get("kind") == "val" and "val_loss" in line],
        perplexity=_read_json(path / "eval" / "perplexity.json"),
        lm_eval=_read_json(path / "eval" / "lm_eval.json"),
        run_info=_read_json(path / "final" / "mileloss_run.json") or {},
    )


@dataclasses.dataclass
class RunGroup:
    """Runs with the same configuration apart from the seed; ``label`` names the loss (``MiLe γ=1 σ=1``)."""

    label: str
    loss_kind: str
    runs: list[RunRecord]

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]


def loss_label(loss: dict) -> str:
    kind = str(loss.get("kind", "unknown"))
    if kind == "ce":
        return "CE"
    if kind == "focal":
        return f"Focal γ={_num(loss.get('gamma'))}"
    if kind == "mile":
        return f"MiLe γ={_num(loss.get('gamma'))} σ={_num(loss.get('sigma'))}"
    return kind


def _num(value) -> str:
    if value is None:
        return "?"
    value = float(value)
    return f"{value:g}" if math.isfinite(value) else str(value)


def group_runs(runs: list[RunRecord]) -> list[RunGroup]:
    """Group runs that differ only by seed (and output folder), keeping first-seen order.

    Groups whose loss labels collide (e.g. two MiLe runs with different model presets) get the first run's
    folder name appended.
    """
    groups: dict[tuple, RunGroup] = {}
    for run in runs:
        key = run.group_key()
        if key not in groups:
            groups[key] = RunGroup(label=loss_label(run.loss), loss_kind=run.loss_kind, runs=[])
        groups[key].runs.append(run)
    ordered = list(groups.values())
    labels = [g.label for g in ordered]
    for group in ordered:
        if labels.count(group.label) > 1:
            group.label = f"{group.label} [{group.runs[0].path.name}]"
    return ordered
