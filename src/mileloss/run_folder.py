"""The run folder: every path ``mileloss train`` writes and ``eval``, ``report`` and ``reproduce`` read, known once.

    RUN_DIR/
      config.yaml                the TrainConfig (``mileloss.train.config.save_config``)
      metrics.jsonl, metrics.csv every metric line; the training lines as CSV (``mileloss.train.metrics``)
      checkpoints/               step_*.pt with their checksum records (``mileloss.train.checkpoint``), or
                                 step_N/ sharded DCP folders with a manifest (``mileloss.train.dcp``)
      tensorboard/               optional scalars
      final/                     the ``save_pretrained`` model and tokenizer, and ``mileloss_run.json``: the run's
                                 metadata, written once and last (its presence means the export is complete)
      eval/                      ``perplexity.json``, ``blocks.npz`` (per-window, per-bucket sums of cross-entropy and
                                 token counts, for paired intervals) and ``lm_eval.json`` (``mileloss eval``)
      .mileloss-train.lock       who is writing the folder (``mileloss.train.rundir``)

``mileloss_run.json`` holds ``{"loss", "data_dir", "data", "steps", "tokens", "seed", "model"}``; ``data`` is the
identity of the training data (:func:`data_identity`), so runs compare even after their data folder is deleted.
Small files are replaced atomically (:func:`write_atomic`). This module imports nothing else of mileloss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path

__all__ = ["RunFolder", "data_identity", "describe_differences", "is_temp_of", "parse_metric_lines", "read_json_object",
           "write_atomic"]

CONFIG, METRICS_JSONL, METRICS_CSV = "config.yaml", "metrics.jsonl", "metrics.csv"
CHECKPOINTS, TENSORBOARD, FINAL, EVAL = "checkpoints", "tensorboard", "final", "eval"
RUN_INFO, PERPLEXITY, LM_EVAL = "mileloss_run.json", "perplexity.json", "lm_eval.json"
BLOCKS = "blocks.npz"
LOCK = ".mileloss-train.lock"
TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to a new ``.<name>.<pid>-<random>.tmp`` beside ``path``, fsync it, rename it onto ``path``:
    a kill leaves the old content or the new, never half of it, and never replaces another file."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(tmp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_temp_of(entry: Path, names) -> bool:
    """True for the temporary file :func:`write_atomic` makes while writing one of ``names`` (left by a kill)."""
    return entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and any(
        entry.name.startswith(f".{name}.") for name in names)


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is not a readable JSON object (never raises)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def parse_metric_lines(text: str) -> tuple[list[dict], list[str]]:
    """The metric lines of ``metrics.jsonl`` text (JSON objects with a train/val ``kind`` and an integer ``step``),
    and its other non-blank lines (a kill may cut the last line short)."""
    lines, other = [], []
    for raw in filter(str.strip, text.splitlines()):
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if isinstance(line, dict) and line.get("kind") in ("train", "val") and isinstance(line.get("step"), int):
            lines.append(line)
        else:
            other.append(raw)
    return lines, other


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder, and the run's metadata (``final/mileloss_run.json``)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / CONFIG)
    metrics_jsonl = property(lambda self: self.path / METRICS_JSONL)
    metrics_csv = property(lambda self: self.path / METRICS_CSV)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    final = property(lambda self: self.path / FINAL)
    run_info_path = property(lambda self: self.path / FINAL / RUN_INFO)
    eval_dir = property(lambda self: self.path / EVAL)

    @property
    def finished(self) -> bool:
        """Training ended and ``final/`` is completely exported."""
        return self.run_info_path.is_file()

    def evaluated(self, benchmarks: bool) -> bool:
        """``eval/perplexity.json`` is there (and ``eval/lm_eval.json`` when ``benchmarks``)."""
        return (self.eval_dir / PERPLEXITY).is_file() and (not benchmarks or (self.eval_dir / LM_EVAL).is_file())

    def read_run_info(self) -> dict | None:
        return read_json_object(self.run_info_path)

    def write_run_info(self, info: dict) -> Path:
        return write_atomic(self.run_info_path, json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# what a data directory is, so that results on different data are never compared as if they were one

IDENTITY_FIELDS = (("corpus", "corpus"), ("tokenizer_sha256", "tokenizer"), ("vocab_size", "vocab size"),
                   ("manifest_sha256", "data manifest"))
"""(key, words) pairs compared by :func:`describe_differences`, in the order they are reported."""
MAX_TOKENIZER_FILE_BYTES = 256 << 20


def _tokenizer_sha256(folder: Path) -> str | None:
    """sha256 over the names and bytes of the regular files directly inside ``folder`` (None if it has none)."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size <= MAX_TOKENIZER_FILE_BYTES)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest() if files else None


def data_identity(data_dir: str | Path) -> dict:
    """``{"data_dir", "readable", "corpus", "vocab_size", "manifest_sha256", "tokenizer_sha256"}`` of a
    ``mileloss data`` directory, from ``manifest.json`` (never the shards); unreadable fields are None.

    ``manifest_sha256`` hashes the manifest's canonical JSON: it covers every shard's sha256 and token count, so two
    directories with the same tokens have the same hash wherever they lie. Never raises.
    """
    data_dir = Path(data_dir)
    identity = {"data_dir": str(data_dir), "readable": False, "corpus": None, "vocab_size": None,
                "manifest_sha256": None, "tokenizer_sha256": None}
    manifest = read_json_object(data_dir / "manifest.json")
    if manifest is None:
        return identity
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    vocab_size, tokenizer = manifest.get("vocab_size"), manifest.get("tokenizer", "tokenizer")
    tokenizer_hash = None
    if isinstance(tokenizer, str) and (data_dir / tokenizer).resolve().is_relative_to(data_dir.resolve()):
        with contextlib.suppress(OSError):  # only a folder inside the data directory is read
            tokenizer_hash = _tokenizer_sha256(data_dir / tokenizer)
    identity.update(
        readable=True,
        corpus=manifest.get("corpus") if isinstance(manifest.get("corpus"), str) else None,
        vocab_size=vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None,
        manifest_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        tokenizer_sha256=tokenizer_hash,
    )
    return identity


def describe_differences(a: dict, b: dict) -> list[str]:
    """``["corpus 'shakespeare' vs 'kjv'", "vocab size 1024 vs 4096", ...]`` over the fields both identities know."""

    def show(key: str, value) -> str:
        return str(value)[:12] if key.endswith("sha256") else repr(value) if isinstance(value, str) else str(value)

    return [f"{words} {show(key, a[key])} vs {show(key, b[key])}" for key, words in IDENTITY_FIELDS
            if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]]
