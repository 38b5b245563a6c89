"""``mileloss.cli``: every verb goes through one error policy (one line on stderr, documented exit status)."""

from __future__ import annotations

import errno

import pytest

from mileloss import cli
from mileloss.errors import DataError, StageError

BAD_INPUTS = {
    "data": (["--corpus", "shakespeare", "--out", "{tmp}/d", "--val-fraction", "1"], "val-fraction must be in"),
    "train": (["run.out={tmp}/r", "run.batch_size=0"], "run.batch_size"),
    "eval": (["{tmp}/no-such-run", "--tasks", "none"], "no such run or checkpoint folder"),
    "report": (["{tmp}", "--out", "{tmp}/report"], "not a training run"),
    "reproduce": (["--budget", "tiny", "--losses", "hinge", "--out", "{tmp}/o"], "unknown loss 'hinge'"),
}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("verb", list(BAD_INPUTS))
def test_each_verb_reports_a_bad_input_in_one_line_with_status_2(verb, tmp_path, capsys):
    argv, message = BAD_INPUTS[verb]
    assert cli.main([verb, *(arg.format(tmp=tmp_path) for arg in argv)]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"mileloss {verb}: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written


def _raising(monkeypatch, verb: str, error: BaseException) -> None:
    import importlib

    module = importlib.import_module(cli.VERBS[verb].module)

    def run(args):
        raise error

    monkeypatch.setattr(module, "run", run)


@pytest.mark.parametrize("verb", list(BAD_INPUTS))
def test_a_disk_error_names_the_path_and_exits_1(verb, monkeypatch, capsys):
    _raising(monkeypatch, verb, OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"))
    assert cli.main([verb, *_minimal_args(verb)]) == 1
    err = _error_line(capsys)
    assert err.startswith(f"mileloss {verb}: error: No space left on device (/runs/x/metrics.jsonl); "), err


def _minimal_args(verb: str) -> list[str]:
    return {"data": ["--corpus", "x", "--out", "y"], "eval": ["run"], "report": ["run", "--out", "r"]}.get(verb, [])


def test_interrupt_exits_130_and_says_how_to_continue(monkeypatch, capsys):
    _raising(monkeypatch, "train", KeyboardInterrupt())
    assert cli.main(["train"]) == 130
    assert "interrupted; checkpoints written so far are complete: continue with --resume" in _error_line(capsys)


def test_a_stage_that_failed_on_the_disk_is_a_failed_run_and_one_on_input_is_the_users(monkeypatch, capsys):
    disk = OSError(errno.EACCES, "Permission denied", "/out/runs")
    stage = StageError("train /out/runs/a", disk)
    stage.__cause__ = disk
    _raising(monkeypatch, "reproduce", stage)
    assert cli.main(["reproduce"]) == 1
    assert "train /out/runs/a: [Errno 13] Permission denied" in _error_line(capsys)
    stage = StageError("data x", DataError("bad corpus"))
    stage.__cause__ = DataError("bad corpus")
    _raising(monkeypatch, "reproduce", stage)
    assert cli.main(["reproduce"]) == 2
    assert _error_line(capsys) == "mileloss reproduce: error: data x: bad corpus"


def test_a_bug_keeps_its_traceback(monkeypatch):
    _raising(monkeypatch, "report", ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["report", "run", "--out", "r"])


def test_under_ddp_every_rank_names_itself(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _raising(monkeypatch, "train", DataError("data.dir 'x' does not exist"))
    assert cli.main(["train", "--quiet"]) == 2
    assert _error_line(capsys) == "mileloss train: error: [rank 1] data.dir 'x' does not exist"


def test_a_torchrun_variable_that_is_not_a_number_is_a_one_line_error_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("RANK", "x")
    assert cli.main(["train", "tiny", "--dry-run", "model.vocab_size=1000"]) == 2
    assert "WORLD_SIZE='abc'" in _error_line(capsys)


def test_help_documents_the_exit_status(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "130" in out and "something you must fix" in out
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", "--help"])
    assert stop.value.code == 0 and "exit status:" in capsys.readouterr().out
    assert cli.main(["no-such-verb"]) == 2
