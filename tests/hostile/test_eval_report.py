"""Hostile use of `mileloss eval`, `report` and `reproduce` (issue 7 items 8-9, issue 8 items 6 and 8): each test
reproduces a reported bug.

Runs on different data compared without a word; --out that is a file, unwritable, `.`, someone else's folder or
another report's; numeric options that were silently replaced by defaults; stage errors and Ctrl-C in reproduce;
eval statistics computed outside the loss engine with gamma = sigma = 1; from_pretrained(dtype=) that transformers
4.x ignores; pickled weights and remote code in a checkpoint folder; malformed run files.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mileloss.cli import main as cli
from mileloss.errors import OutputFolderError
from mileloss.eval import CheckpointError, evaluate
from mileloss.eval.buckets import frequency_buckets
from mileloss.report import ReportError, write_report
from mileloss.report.data_check import MixedDataError
from mileloss.run_folder import RunFolder, data_identity
from tests.eval.fixtures import make_checkpoint, make_data_dir, make_run_dir, make_tokenizer
from tests.report.fixtures import write_eval_results


def eval_main(argv):
    return cli(["eval", *map(str, argv)])


def report_main(argv):
    return cli(["report", *map(str, argv)])


def reproduce_main(argv):
    return cli(["reproduce", *map(str, argv)])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir):
    return make_data_dir(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), tokenizer_dir)


def _mile_run(tmp_path, checkpoint_dir, data_dir, name="run", **loss):
    loss = {"loss": "mile", "gamma": 0.5, "sigma": 2.0, **loss}
    return make_run_dir(tmp_path / name, final_from=checkpoint_dir, data_dir=data_dir, **loss)


def _one_line_error(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# issue 8 item 6: eval numbers from the engine, with the run's own loss, equal a naive float64 computation


def _naive_float64(checkpoint_dir: Path, data_dir: Path, seq_len: int, max_tokens: int, kind, gamma, sigma):
    """Per-position ce, entropy, weight, top-1 probability and correctness from full float64 logits."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir)).double().eval()
    tokens = np.fromfile(data_dir / "val_00000.bin", dtype="<u2").astype(np.int64)[: max_tokens + 1]
    rows = {key: [] for key in ("ce", "entropy", "weight", "confidence", "correct", "target")}
    for start in range(0, len(tokens) - 1, seq_len):
        window = torch.from_numpy(tokens[start : start + seq_len + 1])
        with torch.no_grad():
            logits = model(window[None, :-1]).logits[0].double()  # (T, V)
        log_p = torch.log_softmax(logits, -1)
        target = window[1:]
        ce = -log_p.gather(1, target[:, None]).squeeze(1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        weight = {"mile": (sigma + entropy) ** gamma, "focal": (1 - torch.exp(-ce)) ** gamma,
                  "ce": torch.ones_like(ce)}[kind]
        for key, value in (("ce", ce), ("entropy", entropy), ("weight", weight),
                           ("confidence", log_p.exp().max(-1).values), ("correct", logits.argmax(-1) == target),
                           ("target", target)):
            rows[key].append(value.numpy())
    return {key: np.concatenate(value) for key, value in rows.items()}


def _naive_ece(confidence: np.ndarray, correct: np.ndarray) -> float:
    total = 0.0
    for b in range(15):  # bins (b/15, (b+1)/15], a confidence of 0 in the first
        lower, upper = b / 15, (b + 1) / 15
        members = [(c, k) for c, k in zip(confidence, correct, strict=True)
                   if (lower < c <= upper) or (b == 0 and c == 0)]
        if members:
            total += abs(sum(k for _, k in members) - sum(c for c, _ in members))
    return total / len(confidence)


@pytest.mark.parametrize("kind, gamma, sigma", [("mile", 0.5, 2.0), ("focal", 2.0, 1.0)])
def test_eval_statistics_equal_a_naive_float64_computation_with_the_runs_gamma_and_sigma(
        tmp_path, checkpoint_dir, data_dir, kind, gamma, sigma):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir, loss=kind, gamma=gamma, sigma=sigma)
    result = evaluate(run, tasks="none", max_tokens=200, dtype="float64")["perplexity"]
    naive = _naive_float64(checkpoint_dir, data_dir, 32, 200, kind, gamma, sigma)
    assert result["loss_weight"]["kind"] == kind and result["loss_weight"]["gamma"] == gamma
    assert result["loss_weight"]["sigma"] == sigma  # was always gamma = sigma = 1
    overall = result["overall"]
    assert overall["num_tokens"] == len(naive["ce"]) == 200
    assert overall["loss"] == pytest.approx(naive["ce"].mean(), rel=1e-10)
    assert overall["ppl"] == pytest.approx(math.exp(naive["ce"].mean()), rel=1e-10)
    assert overall["entropy"]["mean"] == pytest.approx(naive["entropy"].mean(), rel=1e-10)
    assert overall["weight"]["mean"] == pytest.approx(naive["weight"].mean(), rel=1e-10)
    assert overall["accuracy"] == pytest.approx(naive["correct"].mean(), abs=1e-12)
    assert overall["ece"] == pytest.approx(_naive_ece(naive["confidence"], naive["correct"]), rel=1e-9)
    bucket = frequency_buckets(np.load(data_dir / "train_token_counts.npy")).bucket_of_token[naive["target"]]
    for index, row in enumerate(result["buckets"]):
        members = bucket == index
        assert row["num_tokens"] == members.sum()
        if members.any():
            assert row["loss"] == pytest.approx(naive["ce"][members].mean(), rel=1e-10)
            assert row["weight"]["mean"] == pytest.approx(naive["weight"][members].mean(), rel=1e-10)
    # the default float32 evaluation agrees to float32 rounding
    float32 = evaluate(run, tasks="none", max_tokens=200, out_dir=tmp_path / "f32")["perplexity"]["overall"]
    assert float32["loss"] == pytest.approx(overall["loss"], rel=1e-5)
    assert float32["weight"]["mean"] == pytest.approx(overall["weight"]["mean"], rel=1e-5)


def test_eval_never_builds_the_logits_of_a_whole_batch(tmp_path, checkpoint_dir, data_dir, monkeypatch):
    import mileloss.eval.pipeline as pipeline

    shapes, load = [], pipeline.load_model

    def load_with_hook(*args, **kwargs):
        model = load(*args, **kwargs)
        model.lm_head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
        return model

    monkeypatch.setattr(pipeline, "load_model", load_with_hook)
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    result = evaluate(run, tasks="none", batch_size=4)["perplexity"]
    assert result["overall"]["num_tokens"] == 299
    # only the one probe that checks logits == lm_head(hidden) on <= 8 positions; the windows go to the engine
    assert shapes == [(1, 8, shapes[0][-1])]


def test_a_model_whose_logits_are_not_its_head_on_the_hidden_states_is_refused(tmp_path, checkpoint_dir, data_dir,
                                                                              monkeypatch):
    import mileloss.eval.pipeline as pipeline

    load = pipeline.load_model

    def scaled(*args, **kwargs):  # logits scaled after the head, as some architectures do
        model = load(*args, **kwargs)
        model.lm_head.register_forward_hook(lambda module, inputs, output: output * 1.3)
        return model

    monkeypatch.setattr(pipeline, "load_model", scaled)
    with pytest.raises(CheckpointError, match="its logits are not lm_head\\(final hidden state\\)"):
        evaluate(_mile_run(tmp_path, checkpoint_dir, data_dir), tasks="none")


def test_malformed_config_json_is_named_before_anything_loads_it(tmp_path, checkpoint_dir, data_dir, capsys):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    config = json.loads((run / "final" / "config.json").read_text())
    (run / "final" / "config.json").write_text(json.dumps({**config, "vocab_size": "abc"}))
    assert eval_main([str(run), "--tasks", "none"]) == 2  # was: a huggingface_hub traceback
    assert "config.json: vocab_size must be a positive integer, got 'abc'" in _one_line_error(capsys.readouterr())


def test_loss_settings_that_disagree_or_have_wrong_types_are_named(tmp_path, checkpoint_dir, data_dir, capsys):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    info_path = run / "final" / "mileloss_run.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "loss": {**info["loss"], "gamma": 3.0}}))
    with pytest.raises(CheckpointError, match="loss.gamma=0.5 but .*mileloss_run.json says 3.0|says loss.gamma=3.0"):
        evaluate(run, tasks="none")
    info_path.write_text(json.dumps({**info, "loss": {**info["loss"], "gamma": "lots"}}))
    assert eval_main([str(run), "--tasks", "none"]) == 2
    assert "loss.gamma must be a finite number >= 0, got 'lots'" in _one_line_error(capsys.readouterr())
    info_path.write_text("[1, 2")
    assert eval_main([str(run), "--tasks", "none"]) == 2
    assert "mileloss_run.json: not a readable JSON file" in _one_line_error(capsys.readouterr())
    assert not (run / "eval").exists()


# ---------------------------------------------------------------------------------------------------------------
# issue 8 item 8 (eval) and loading without running code from disk


def test_model_loads_without_dtype_keywords_and_is_cast_after(tmp_path, checkpoint_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mileloss.eval.checkpoint import load_model, resolve_checkpoint

    calls, original = [], AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(recording))
    model = load_model(resolve_checkpoint(checkpoint_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # dtype= does not exist in transformers 4.46 (torch_dtype= is deprecated in 5.x): neither is passed
    assert "dtype" not in calls[0] and "torch_dtype" not in calls[0]
    assert calls[0]["trust_remote_code"] is False


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_pickled_weights_that_would_run_code_are_refused(tmp_path, checkpoint_dir, data_dir, capsys):
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint_dir, crafted)
    (crafted / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({"model.embed_tokens.weight": _RunsCodeWhenUnpickled(marker)}, crafted / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load pickled weights that are not plain tensors"):
        evaluate(crafted, data_dir, tasks="none", out_dir=tmp_path / "out")
    assert eval_main([str(crafted), "--data", str(data_dir), "--tasks", "none", "--out", str(tmp_path / "o")]) == 2
    assert "unsupported GLOBAL os.makedirs" in _one_line_error(capsys.readouterr())  # what it would have run
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_plain_pickled_weights_still_load_and_give_the_safetensors_numbers(tmp_path, checkpoint_dir, data_dir):
    from safetensors.torch import load_file

    plain = tmp_path / "plain"
    shutil.copytree(checkpoint_dir, plain)
    torch.save(load_file(plain / "model.safetensors"), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    from_bin = evaluate(plain, data_dir, tasks="none", max_tokens=64, out_dir=tmp_path / "a")["perplexity"]
    from_safe = evaluate(checkpoint_dir, data_dir, tasks="none", max_tokens=64, out_dir=tmp_path / "b")["perplexity"]
    assert from_bin["overall"]["loss"] == from_safe["overall"]["loss"]


def test_remote_code_named_by_the_checkpoint_is_never_imported(tmp_path, checkpoint_dir, data_dir):
    crafted = tmp_path / "remote"
    shutil.copytree(checkpoint_dir, crafted)
    marker = tmp_path / "imported"
    (crafted / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, auto_map in (("config.json", {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["evil.T", None]})):
        content = json.loads((crafted / name).read_text())
        (crafted / name).write_text(json.dumps({**content, "auto_map": auto_map}))
    try:
        evaluate(crafted, data_dir, tasks="none", max_tokens=16, out_dir=tmp_path / "out")
    except ValueError:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# issue 7 item 9: eval options and --out


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),  # was: silently the default window
    (["--seq-len", "1000"], "--seq-len 1000 exceeds the model's context of 64 positions"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--max-tokens", "-5"], "--max-tokens must be an integer >= 1, got -5"),
    (["--num-fewshot", "-1"], "--num-fewshot must be an integer >= 0, got -1"),
    (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["--tasks", "piqa,nope"], "unknown task(s) ['nope']; choose from ['arc_challenge', 'arc_easy'"),
    (["--dtype", "int8"], "--dtype 'int8': choose one of float32, float64, bfloat16, float16"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--buckets", "95,80"], "cut points must be strictly increasing"),
])
def test_bad_eval_options_are_one_line_errors_before_any_work(tmp_path, checkpoint_dir, data_dir, capsys, args,
                                                              message):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    before = _snapshot(run)
    assert eval_main([str(run), *([] if "--tasks" in args else ["--tasks", "none"]), *args]) == 2
    assert message in _one_line_error(capsys.readouterr())
    assert _snapshot(run) == before and not (run / "eval").exists()


def test_eval_out_that_is_a_file_foreign_or_unwritable_is_refused_untouched(tmp_path, checkpoint_dir, data_dir,
                                                                            capsys, monkeypatch):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "perplexity.json").write_text('{"my": "own numbers"}')
    (foreign / "README").write_text("mine too")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub", "cannot be created: " + str(a_file) + " is a file"),
             (foreign, "holds files that mileloss eval did not write (README, perplexity.json)"),
             (Path("/proc/mileloss-cannot-be-here"), "cannot be written")]
    for out, message in cases:
        assert eval_main([str(run), "--tasks", "none", "--out", str(out)]) == 2
        assert message in _one_line_error(capsys.readouterr())
    monkeypatch.chdir(foreign)
    assert eval_main([str(run), "--tasks", "none", "--out", "."]) == 2
    assert "--out . holds files that mileloss eval did not write" in _one_line_error(capsys.readouterr())
    assert a_file.read_text() == "mine" and _snapshot(foreign) == {"README": b"mine too",
                                                                   "perplexity.json": b'{"my": "own numbers"}'}


def test_eval_replaces_its_own_results_but_not_another_checkpoints(tmp_path, checkpoint_dir, data_dir, capsys):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    other = _mile_run(tmp_path, checkpoint_dir, data_dir, name="other")
    out = tmp_path / "shared"
    assert eval_main([str(run), "--tasks", "none", "--max-tokens", "20", "--out", str(out)]) == 0
    assert eval_main([str(run), "--tasks", "none", "--max-tokens", "30", "--out", str(out)]) == 0  # its own: again
    assert json.loads((out / "perplexity.json").read_text())["overall"]["num_tokens"] == 30
    capsys.readouterr()
    assert eval_main([str(other), "--tasks", "none", "--out", str(out)]) == 2
    assert f"holds the evaluation of {(run / 'final').resolve()}" in _one_line_error(capsys.readouterr())
    assert json.loads((out / "perplexity.json").read_text())["overall"]["num_tokens"] == 30


# ---------------------------------------------------------------------------------------------------------------
# issue 7 item 8: runs on different data


def _evaluated_run(root: Path, name: str, data: Path, loss: str = "ce", seed: int = 0) -> Path:
    run = make_run_dir(root / name, loss=loss, seed=seed, data_dir=data)
    write_eval_results(run, rare_shift=1.0, seed=seed)
    return run


def _relabel(data: Path, copy_to: Path, **changes) -> Path:
    shutil.copytree(data, copy_to)
    manifest = json.loads((copy_to / "manifest.json").read_text())
    (copy_to / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return copy_to


def test_report_refuses_runs_trained_on_different_corpora(tmp_path, data_dir, capsys):
    kjv = _relabel(data_dir, tmp_path / "kjv", corpus="kjv")
    a = _evaluated_run(tmp_path, "ce", data_dir)
    b = _evaluated_run(tmp_path, "mile", kjv, loss="mile")
    with pytest.raises(MixedDataError, match=f"{a} and {b} were trained on different data: corpus 'fixture' vs 'kjv'"):
        write_report([a, b], tmp_path / "report")
    assert report_main([str(a), str(b), "--out", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys.readouterr())
    assert "data manifest" in line and "--allow-mixed-data" in line
    assert not (tmp_path / "report").exists()


def test_report_refuses_runs_with_another_tokenizer_and_vocabulary(tmp_path, data_dir):
    other_tokenizer = make_tokenizer(tmp_path / "tok", corpus=["completely different words here"] * 3, vocab_size=290)
    other_data = make_data_dir(tmp_path / "other_data", other_tokenizer)
    a = _evaluated_run(tmp_path, "ce", data_dir)
    b = _evaluated_run(tmp_path, "mile", other_data, loss="mile")
    other_vocab = json.loads((other_data / "manifest.json").read_text())["vocab_size"]
    with pytest.raises(MixedDataError) as error:
        write_report([a, b], tmp_path / "report")
    assert "tokenizer " in str(error.value) and f"vocab size 320 vs {other_vocab}" in str(error.value)


def test_report_refuses_runs_evaluated_on_different_data(tmp_path, data_dir):
    a = _evaluated_run(tmp_path, "ce", data_dir)
    b = _evaluated_run(tmp_path, "mile", data_dir, loss="mile")
    for run, corpus in ((a, "fixture"), (b, "austen")):
        path = run / "eval" / "perplexity.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "data": {"corpus": corpus}}))
    with pytest.raises(MixedDataError, match="were evaluated on different data: corpus 'fixture' vs 'austen'"):
        write_report([a, b], tmp_path / "report")


def test_allow_mixed_data_reports_them_under_a_warning_at_the_top(tmp_path, data_dir, caplog):
    kjv = _relabel(data_dir, tmp_path / "kjv", corpus="kjv")
    a, b = _evaluated_run(tmp_path, "ce", data_dir), _evaluated_run(tmp_path, "mile", kjv, loss="mile")
    assert report_main([str(a), str(b), "--out", str(tmp_path / "report"), "--allow-mixed-data"]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert markdown[2].startswith("> **WARNING: these runs were not trained and evaluated on the same data")
    assert "corpus 'fixture' vs 'kjv'" in markdown[4]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.index('class="warning"') < html.index('class="verdict"')
    assert any("corpus 'fixture' vs 'kjv'" in r.message and r.levelname == "WARNING" for r in caplog.records)


def test_the_same_data_in_two_folders_compares_and_a_lost_data_folder_is_said(tmp_path, data_dir):
    copy = shutil.copytree(data_dir, tmp_path / "copy")
    gone = _relabel(data_dir, tmp_path / "gone", corpus="kjv")
    runs = [_evaluated_run(tmp_path, "ce", data_dir), _evaluated_run(tmp_path, "mile", copy, loss="mile"),
            _evaluated_run(tmp_path, "focal", gone, loss="focal")]
    shutil.rmtree(gone)  # its identity can no longer be read: compared on what the run recorded, and said so
    markdown = write_report(runs, tmp_path / "report").with_suffix(".md").read_text()
    assert "WARNING" not in markdown
    assert f"Training data not verified for {runs[2]} (data directory {gone} is not readable)" in markdown


def test_runs_compare_on_the_data_identity_recorded_at_training_time_after_the_data_folder_is_deleted(
        tmp_path, data_dir):
    gone = _relabel(data_dir, tmp_path / "gone", corpus="kjv")
    a, b = _evaluated_run(tmp_path, "ce", data_dir), _evaluated_run(tmp_path, "mile", gone, loss="mile")
    for run, data in ((a, data_dir), (b, gone)):  # what mileloss train now records in final/mileloss_run.json
        folder = RunFolder(run)
        folder.final.mkdir()
        folder.write_run_info({"data_dir": str(data), "data": data_identity(data)})
    shutil.rmtree(gone)
    with pytest.raises(MixedDataError, match=f"{a} and {b} were trained on different data: corpus 'fixture' vs 'kjv'"):
        write_report([a, b], tmp_path / "report")
    markdown = write_report([a, b], tmp_path / "report", allow_mixed_data=True).with_suffix(".md").read_text()
    assert "not verified" not in markdown


# ---------------------------------------------------------------------------------------------------------------
# issue 7 item 9: report --out, two reports into one folder, malformed run files


@pytest.fixture
def two_runs(tmp_path, data_dir):
    return [_evaluated_run(tmp_path, "ce", data_dir), _evaluated_run(tmp_path, "mile", data_dir, loss="mile")]


def test_report_out_that_is_a_file_foreign_or_unwritable_is_refused_untouched(tmp_path, two_runs, capsys,
                                                                              monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "site"
    foreign.mkdir()
    (foreign / "report.md").write_text("# my own report")
    (foreign / "curves.png").write_bytes(b"mine")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub", "is a file"),
             (foreign, "holds files that mileloss report did not write (curves.png, report.md)"),
             (Path("/proc/mileloss-cannot-be-here"), "cannot be written")]
    for out, message in cases:
        assert report_main([*map(str, two_runs), "--out", str(out)]) == 2
        assert message in _one_line_error(capsys.readouterr())
    monkeypatch.chdir(foreign)
    assert report_main([*map(str, two_runs), "--out", "."]) == 2
    assert "--out . holds files that mileloss report did not write" in _one_line_error(capsys.readouterr())
    assert a_file.read_text() == "mine"
    assert _snapshot(foreign) == {"curves.png": b"mine", "report.md": b"# my own report"}


def test_the_same_run_given_twice_is_refused(tmp_path, two_runs):
    with pytest.raises(ReportError, match="is given twice"):  # was: one run counted as two seeds
        write_report([two_runs[0], two_runs[1], two_runs[0].parent / ".." / two_runs[0].parent.name / "ce"],
                     tmp_path / "report")


def test_a_second_report_replaces_the_first_and_its_stale_figures(tmp_path, two_runs, data_dir):
    out = tmp_path / "report"
    write_report(two_runs, out)
    assert (out / "benchmarks.png").exists()
    bare = [make_run_dir(tmp_path / name, loss=loss, data_dir=data_dir) for name, loss in (("c", "ce"), ("m", "mile"))]
    write_report(bare, out)  # no eval results: no benchmark, bucket or histogram figure
    assert sorted(p.name for p in out.iterdir()) == [".report.lock", "curves.png", "report.html", "report.json",
                                                     "report.md"]
    assert json.loads((out / "report.json").read_text())["runs"] == [str(r) for r in bare]
    (out / "my_notes.txt").write_text("mine")  # a folder someone has since added to is no longer only ours
    with pytest.raises(OutputFolderError, match=r"did not write \(my_notes.txt\)"):
        write_report(two_runs, out)
    assert (out / "my_notes.txt").read_text() == "mine"


def test_two_reports_at_once_into_one_folder_do_not_interleave(tmp_path, two_runs):
    out = tmp_path / "report"
    write_report(two_runs, out)
    before = _snapshot(out)
    handle = os.open(out / ".report.lock", os.O_RDWR)
    fcntl.flock(handle, fcntl.LOCK_EX)  # as a report writing right now holds it
    try:
        with pytest.raises(OutputFolderError, match="another mileloss report is writing into"):
            write_report(two_runs, out)
    finally:
        os.close(handle)
    assert _snapshot(out) == before


@pytest.mark.parametrize("relative, content, message", [
    ("eval/perplexity.json", {"bucket_cut_points": [80, 95], "buckets": "abc", "overall": {}},
     "eval/perplexity.json.buckets: expected a list, got 'abc'"),
    ("eval/perplexity.json", {"bucket_cut_points": [80], "buckets": [], "overall": {"ppl": "7"}},
     "eval/perplexity.json.overall.ppl: expected number or null, got '7'"),
    ("eval/lm_eval.json", {"tasks": {"piqa": {"value": True}}}, "lm_eval.json.tasks.piqa.value: expected number"),
    ("final/mileloss_run.json", [1, 2], "mileloss_run.json: expected a mapping, got [1, 2]"),
    ("metrics.jsonl", '{"kind": "train", "step": 1, "loss": "low"}\n', "metrics.jsonl:1.loss: expected number"),
    ("metrics.jsonl", '[1, 2]\n', "metrics.jsonl:1: expected a JSON object, got [1, 2]"),
    ("config.yaml", "- a\n- list\n", "config.yaml: expected a mapping, got ['a', 'list']"),
    ("config.yaml", "loss: {kind: mile, gamma: lots}\n", "config.yaml.loss.gamma: expected number or null, got 'lots'"),
    ("config.yaml", "loss: {kind: [unclosed\n", "config.yaml: not valid YAML"),
    ("config.yaml", "loss: !!python/object/apply:os.makedirs ['{marker}']\n", "config.yaml: not valid YAML"),
])
def test_malformed_run_files_are_one_line_errors_naming_file_and_field(tmp_path, two_runs, capsys, relative,
                                                                       content, message):
    path = two_runs[1] / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "code_ran"
    text = content.replace("{marker}", str(marker)) if isinstance(content, str) else json.dumps(content)
    path.write_text(text)
    assert report_main([*map(str, two_runs), "--out", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys.readouterr())
    assert str(two_runs[1]) in line and message in line
    assert not marker.exists() and not (tmp_path / "report").exists()
    with pytest.raises(ReportError):
        write_report(two_runs, tmp_path / "report")


# ---------------------------------------------------------------------------------------------------------------
# issue 7 item 9: reproduce


def test_reproduce_out_that_is_a_file_or_foreign_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    import mileloss.data

    monkeypatch.setattr(mileloss.data, "prepare_corpus", lambda *a, **k: pytest.fail("a stage ran"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    project = tmp_path / "project"
    project.mkdir()
    (project / "setup.py").write_text("mine")
    for out, message in ((a_file, "is a file"), (project, "holds files that mileloss reproduce did not write")):
        assert reproduce_main(["--budget", "tiny", "--out", str(out)]) == 2
        assert message in _one_line_error(capsys.readouterr())
    monkeypatch.chdir(project)
    assert reproduce_main(["--budget", "tiny", "--out", "."]) == 2
    assert "--out . holds files that mileloss reproduce did not write (setup.py)" in _one_line_error(
        capsys.readouterr())
    assert sorted(p.name for p in project.iterdir()) == ["setup.py"] and a_file.read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqa,nope"], "unknown task(s) ['nope']"),  # was: found after every run had trained
    (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["--max-steps", "-1"], "--max-steps must be an integer >= 1, got -1"),
    (["--seeds", "1,1"], "--seeds: give distinct seeds"),
    (["--losses", "ce,dice"], "unknown loss 'dice'"),
])
def test_bad_reproduce_options_are_one_line_errors_before_any_stage(tmp_path, capsys, monkeypatch, args, message):
    import mileloss.data

    monkeypatch.setattr(mileloss.data, "prepare_corpus", lambda *a, **k: pytest.fail("a stage ran"))
    assert reproduce_main(["--budget", "tiny", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in _one_line_error(capsys.readouterr())
    assert not (tmp_path / "out").exists()


def test_reproduce_stage_error_is_one_line_naming_the_stage(tmp_path, capsys, monkeypatch):
    import mileloss.data
    from mileloss.errors import ManifestError

    def broken(*args, **kwargs):
        raise ManifestError("data/manifest.json: a named data error")

    monkeypatch.setattr(mileloss.data, "prepare_corpus", broken)
    assert reproduce_main(["--budget", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert _one_line_error(capsys.readouterr()) == (
        "mileloss reproduce: error: data shakespeare: data/manifest.json: a named data error")
    # the folder is marked as reproduce's, so the same command may continue there
    assert json.loads((tmp_path / "out" / "reproduce.json").read_text())["written_by"] == "mileloss reproduce"


def test_reproduce_interrupted_says_so_and_exits_130(tmp_path, capsys, monkeypatch):
    import mileloss.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mileloss.data, "prepare_corpus", interrupted)
    assert reproduce_main(["--budget", "tiny", "--out", str(tmp_path / "out")]) == 130
    assert "interrupted; run the same command again to resume" in _one_line_error(capsys.readouterr())


# ---------------------------------------------------------------------------------------------------------------
# issue 14 item 1: eval/blocks.npz, the per-block sums behind the report's paired intervals


def _record_blocks(run: Path, data: bytes) -> None:
    """Replace a run's blocks.npz and record its sha256 in perplexity.json, as a crafted folder would."""
    import hashlib

    (run / "eval" / "blocks.npz").write_bytes(data)
    path = run / "eval" / "perplexity.json"
    result = json.loads(path.read_text())
    result["blocks"]["sha256"] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(result))


def test_a_blocks_file_holding_pickled_objects_is_refused_without_unpickling(tmp_path, two_runs, capsys):
    import io

    marker = tmp_path / "code_ran"
    with np.load(two_runs[1] / "eval" / "blocks.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["bucket_names"] = np.array([_RunsCodeWhenUnpickled(str(marker))] * 3, dtype=object)
    image = io.BytesIO()
    np.savez(image, **arrays)
    _record_blocks(two_runs[1], image.getvalue())
    assert report_main([*map(str, two_runs), "--out", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys.readouterr())
    assert f"{two_runs[1] / 'eval' / 'blocks.npz'}: not a readable blocks file" in line
    assert not marker.exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("damage, message", [
    ("flip", "sha256 differs from the one recorded in perplexity.json"),
    ("delete", "missing, but"),
    ("unrecorded", "perplexity.json records no sha256 for it"),
])
def test_a_changed_or_missing_blocks_file_is_a_one_line_error_naming_it(tmp_path, two_runs, capsys, damage, message):
    path = two_runs[1] / "eval" / "blocks.npz"
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        result = json.loads((two_runs[1] / "eval" / "perplexity.json").read_text())
        del result["blocks"]
        (two_runs[1] / "eval" / "perplexity.json").write_text(json.dumps(result))
    assert report_main([*map(str, two_runs), "--out", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys.readouterr())
    assert str(path) in line and message in line
    assert report_main([*map(str, two_runs), "--out", str(tmp_path / "report"), "--bootstrap", "0"]) == 0


def test_runs_evaluated_on_other_blocks_are_refused_and_with_allow_mixed_data_reported_without_interval(
        tmp_path, checkpoint_dir, data_dir, capsys):
    ce = make_run_dir(tmp_path / "ce", loss="ce", final_from=checkpoint_dir, data_dir=data_dir)
    mile = _mile_run(tmp_path, checkpoint_dir, data_dir, name="mile")
    assert eval_main([str(ce), "--tasks", "none", "--max-tokens", "64"]) == 0
    assert eval_main([str(mile), "--tasks", "none", "--max-tokens", "40"]) == 0
    capsys.readouterr()
    assert report_main([str(ce), str(mile), "--out", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys.readouterr())
    assert f"{mile} and {ce}: block 1 differs in its length" in line and not (tmp_path / "report").exists()
    assert report_main([str(ce), str(mile), "--out", str(tmp_path / "report"), "--allow-mixed-data"]) == 0
    printed = capsys.readouterr().out
    assert "MiLe γ=0.5 σ=2 vs CE: interval unavailable" in printed and "block 1 differs in its length" in printed


def test_eval_replaces_its_own_blocks_file_but_a_foreign_one_is_refused(tmp_path, checkpoint_dir, data_dir, capsys):
    run = _mile_run(tmp_path, checkpoint_dir, data_dir)
    assert eval_main([str(run), "--tasks", "none", "--max-tokens", "20"]) == 0
    assert eval_main([str(run), "--tasks", "none", "--max-tokens", "40"]) == 0
    result = json.loads((run / "eval" / "perplexity.json").read_text())
    assert result["blocks"]["num_blocks"] == 2 and (run / "eval" / "blocks.npz").read_bytes()[:2] == b"PK"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "blocks.npz").write_text("my own numbers")
    capsys.readouterr()
    assert eval_main([str(run), "--tasks", "none", "--out", str(foreign)]) == 2
    assert "holds files that mileloss eval did not write (blocks.npz)" in _one_line_error(capsys.readouterr())
    assert (foreign / "blocks.npz").read_text() == "my own numbers"
