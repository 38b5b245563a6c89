"""Read what a run folder holds (config, metric curves, eval results) and group runs that differ only by seed.

Every file is parsed as data (``json``, ``yaml.safe_load``) and checked against the shape the report reads, so a
malformed or crafted file is a :class:`ReportError` naming the file and the field, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import yaml

from mileloss.errors import EmptyRunError, ReportError
from mileloss.run_folder import CONFIG, LM_EVAL, METRICS_JSONL, PERPLEXITY, RunFolder

logger = logging.getLogger(__name__)

__all__ = ["EmptyRunError", "ReportError", "RunGroup", "RunRecord", "group_runs", "load_run"]

# config keys that do not change what a run learns: runs differing only here (and in seed) are one group
NON_SEMANTIC_KEYS = {"run.seed", "run.out", "run.device", "run.progress", "run.num_threads", "run.log_every",
                     "run.checkpoint_every", "run.keep_checkpoints", "data.verify_checksums"}


# ---------------------------------------------------------------------------------------------------------------
# the shapes of the files the report reads: {key: spec} (a trailing "?" marks an optional key), [spec] a list of
# spec, MapOf(spec) a mapping of any keys to spec, OrNone(spec) spec or null, or a tuple of types (bool never
# counts as a number)


@dataclasses.dataclass(frozen=True)
class MapOf:
    spec: object


@dataclasses.dataclass(frozen=True)
class OrNone:
    spec: object


NUMBER = (int, float)
NUMBER_OR_NONE = (int, float, type(None))
TEXT_OR_NONE = (str, type(None))
INT_OR_NONE = (int, type(None))
HISTOGRAM = {"edges": [NUMBER], "overall": [NUMBER]}
DATA_IDENTITY = {"data_dir?": TEXT_OR_NONE, "corpus?": TEXT_OR_NONE, "vocab_size?": INT_OR_NONE,
                 "manifest_sha256?": TEXT_OR_NONE, "tokenizer_sha256?": TEXT_OR_NONE}
PERPLEXITY_SCHEMA = {
    "bucket_cut_points": [NUMBER],
    "buckets": [{"name": (str,), "label?": (str,), "num_types": NUMBER, "share_of_occurrences": NUMBER,
                 "num_tokens": NUMBER, "ppl?": NUMBER_OR_NONE}],
    "overall": {"ppl?": NUMBER_OR_NONE, "accuracy?": NUMBER_OR_NONE, "ece?": NUMBER_OR_NONE,
                "entropy?": OrNone({"mean?": NUMBER_OR_NONE})},
    "histograms?": {"entropy?": HISTOGRAM, "weight?": HISTOGRAM},
    "loss_weight?": {"kind?": (str,), "gamma": NUMBER, "sigma": NUMBER},
    "mile_weight?": {"gamma": NUMBER, "sigma": NUMBER},
    "data?": DATA_IDENTITY,
    "data_dir?": TEXT_OR_NONE,
    "blocks?": {"sha256?": TEXT_OR_NONE},
}
LM_EVAL_SCHEMA = {"tasks": MapOf({"value?": NUMBER_OR_NONE}), "num_fewshot?": INT_OR_NONE}
LOSS = {"kind?": (str,), "gamma?": NUMBER_OR_NONE, "sigma?": NUMBER_OR_NONE}
RUN_INFO_SCHEMA = {"loss?": LOSS, "data_dir?": TEXT_OR_NONE, "data?": DATA_IDENTITY, "steps?": INT_OR_NONE,
                   "tokens?": INT_OR_NONE,
                   "seed?": (int, str, type(None)), "model?": OrNone({"vocab_size?": INT_OR_NONE})}
CONFIG_SCHEMA = {"loss?": LOSS, "run?": (dict,), "data?": {"dir?": TEXT_OR_NONE},
                 "model?": {"vocab_size?": INT_OR_NONE}}
LINE_SCHEMAS = {"train": {"step": NUMBER, "loss": NUMBER, "tokens?": NUMBER},
                "val": {"step": NUMBER, "val_loss": NUMBER, "tokens?": NUMBER}}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_shape(value, spec, where: str) -> None:
    """Raise :class:`ReportError` (``"<where>: expected ..., got ..."``) unless ``value`` has the shape ``spec``."""
    if isinstance(spec, OrNone):
        if value is not None:
            check_shape(value, spec.spec, where)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ReportError(f"{where}: expected a mapping, got {_show(value)}")
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name in value:
                check_shape(value[name], sub, f"{where}.{name}")
            elif not key.endswith("?"):
                raise ReportError(f"{where}: missing {name!r}")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise ReportError(f"{where}: expected a mapping, got {_show(value)}")
        for key, item in value.items():
            check_shape(item, spec.spec, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ReportError(f"{where}: expected a list, got {_show(value)}")
        for index, item in enumerate(value):
            check_shape(item, spec[0], f"{where}[{index}]")
    elif isinstance(value, bool) or not isinstance(value, spec):
        names = ["number" if t in (int, float) else "null" if t is type(None) else
                 "mapping" if t is dict else t.__name__ for t in spec]
        raise ReportError(f"{where}: expected {' or '.join(dict.fromkeys(names))}, got {_show(value)}")


@dataclasses.dataclass
class RunRecord:
    """One run folder (:mod:`mileloss.run_folder`), read: ``config.yaml`` ({} if absent), the train and val lines of
    ``metrics.jsonl``, ``eval/perplexity.json`` and ``eval/lm_eval.json`` (None if absent), ``final/mileloss_run.json``
    ({} if absent)."""

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

    @property
    def data_dir(self) -> str | None:
        """The data directory the run trained on (``final/mileloss_run.json``, else ``config.yaml`` data.dir)."""
        return self.run_info.get("data_dir") or (self.config.get("data") or {}).get("dir")

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size as the run recorded it (None if it did not)."""
        for section in (self.run_info.get("model"), self.config.get("model")):
            if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
                return section["vocab_size"]
        return None

    def group_key(self) -> tuple:
        # default=str: YAML values that JSON has no type for (dates) still compare
        flat = _flatten(self.config) if self.config else {"loss": json.dumps(self.loss, sort_keys=True, default=str)}
        identity = self.run_info.get("data")
        if isinstance(identity, dict) and identity.get("manifest_sha256") and "data.dir" in flat:
            # the same data prepared in two folders (two reproduce runs) is the same data: compare what it holds
            flat["data.dir"] = {k: identity.get(k) for k in ("manifest_sha256", "tokenizer_sha256", "vocab_size")}
        return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in flat.items()
                            if k not in NON_SEMANTIC_KEYS))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: cannot be read ({error})") from error


def _read_jsonl(path: Path) -> list[dict]:
    lines = []
    for number, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            # a run still writing may leave a partial last line; anything else is a broken file
            logger.warning("%s:%d: skipping a line that is not JSON", path, number)
            continue
        if not isinstance(line, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, got {_show(line)}")
        kind = line.get("kind")
        if kind in LINE_SCHEMAS and any(key in line for key in LINE_SCHEMAS[kind] if not key.endswith("?")):
            check_shape(line, LINE_SCHEMAS[kind], f"{path}:{number}")
        lines.append(line)
    return lines


def _read_json(path: Path, schema: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error.msg})") from error
    check_shape(value, schema, str(path))
    return value


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as error:
        raise ReportError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    config = config or {}
    check_shape(config, CONFIG_SCHEMA, str(path))
    return config


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder written by ``mileloss train`` (and ``mileloss eval``).

    Raises:
        EmptyRunError: if the folder is missing or has neither ``metrics.jsonl`` nor ``config.yaml``.
        ReportError: a file that is not valid JSON / YAML or lacks the fields the report reads (file and field
            named).
    """
    path, run = Path(path), RunFolder(path)
    if not path.is_dir() or not (run.metrics_jsonl.is_file() or run.config.is_file()):
        what = "no such folder" if not path.is_dir() else f"no {METRICS_JSONL} or {CONFIG}"
        raise EmptyRunError(f"{path}: not a training run ({what}); pass folders written by `mileloss train`")
    lines = _read_jsonl(run.metrics_jsonl) if run.metrics_jsonl.is_file() else []
    return RunRecord(
        path=path,
        config=_read_config(run.config),
        train=[line for line in lines if line.get("kind") == "train" and "loss" in line],
        val=[line for line in lines if line.get("kind") == "val" and "val_loss" in line],
        perplexity=_read_json(run.eval_dir / PERPLEXITY, PERPLEXITY_SCHEMA),
        lm_eval=_read_json(run.eval_dir / LM_EVAL, LM_EVAL_SCHEMA),
        run_info=_read_json(run.run_info_path, RUN_INFO_SCHEMA) or {},
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
