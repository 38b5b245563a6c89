"""``mileloss.run_folder``: the layout of a run folder, its metadata, and the one atomic write."""

from __future__ import annotations

import os

import pytest

from mileloss.run_folder import RunFolder, is_temp_of, parse_metric_lines, write_atomic


def test_the_layout_is_named_once(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert (run.config.name, run.metrics_jsonl.name, run.metrics_csv.name) == ("config.yaml", "metrics.jsonl",
                                                                               "metrics.csv")
    assert run.run_info_path == tmp_path / "run" / "final" / "mileloss_run.json"
    assert (run.checkpoints, run.eval_dir) == (tmp_path / "run" / "checkpoints", tmp_path / "run" / "eval")
    assert not run.finished and run.read_run_info() is None and not run.evaluated(benchmarks=False)
    run.final.mkdir(parents=True)
    run.write_run_info({"steps": 3})
    assert run.finished and run.read_run_info() == {"steps": 3}
    run.eval_dir.mkdir()
    (run.eval_dir / "perplexity.json").write_text("{}")
    assert run.evaluated(benchmarks=False) and not run.evaluated(benchmarks=True)


def test_write_atomic_leaves_the_old_file_on_failure_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "a.json", "old")
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like open(): the umask, not 0600

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_temporary_files_are_recognised_by_the_name_they_are_for(tmp_path):
    assert is_temp_of(tmp_path / ".metrics.csv.123-0a1b2c3d.tmp", {"metrics.csv"})
    assert not is_temp_of(tmp_path / ".metrics.csv.123-0a1b2c3d.tmp", {"config.yaml"})
    assert not is_temp_of(tmp_path / "metrics.csv", {"metrics.csv"})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_metric_lines_are_parsed_once_for_train_resume_and_overwrite():
    text = '{"kind": "train", "step": 1, "loss": 2.0}\n\n{"kind": "val", "step": 1}\n{"kind": "other", "step": 1}\n{"ki'
    lines, other = parse_metric_lines(text)
    assert [line["kind"] for line in lines] == ["train", "val"]
    assert other == ['{"kind": "other", "step": 1}', '{"ki']
