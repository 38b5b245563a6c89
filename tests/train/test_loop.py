"""The training loop in-process: exact gradient accumulation, outputs of a run, NaN stop, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mileloss.data import ShardChecksumError
from mileloss.models import build_model
from mileloss.run_folder import RunFolder, data_identity
from mileloss.train import NonFiniteLossError, PreflightError, TrainHooks, VocabMismatchError, load_config, train
from mileloss.train.checkpoint import latest_checkpoint, load_checkpoint
from mileloss.train.distributed import DistributedContext
from mileloss.train.loop import LanguageModelLoss, train_step
from mileloss.train.metrics import read_metrics
from mileloss.train.preflight import PreparedRun
from tests.reference import official_loss
from tests.train._train_utils import tiny_overrides


class _FixedBatches:
    """Loader stand-in handing out given (input_ids, labels) pairs in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def _step_grads(kind: str, batch_size: int, accum: int, input_ids, labels, normalize: str = "weighted"):
    config = load_config(None, [f"loss.kind={kind}", f"run.batch_size={batch_size}", "run.seq_len=16",
                                f"run.grad_accum_steps={accum}", f"loss.normalize={normalize}"])
    run = PreparedRun(config, None, None, torch.device("cpu"), 1, None)
    torch.manual_seed(0)
    model = build_model("tiny", 64, num_hidden_layers=1).double()
    batches = [(input_ids[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size])
               for i in range(accum)]
    loss = train_step(LanguageModelLoss(model, run.loss_kwargs), _FixedBatches(batches), run, DistributedContext())
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["ce", "focal", "mile"])
def test_two_micro_batches_give_exactly_the_gradient_of_one_big_batch(kind):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (4, 16), generator=generator)
    labels = torch.randint(0, 64, (4, 16), generator=generator)
    labels[0, :5] = -100  # uneven valid counts between the micro-batches
    big_loss, big = _step_grads(kind, 4, 1, input_ids, labels)
    small_loss, small = _step_grads(kind, 2, 2, input_ids, labels)
    torch.testing.assert_close(small_loss, big_loss, rtol=1e-12, atol=1e-12)
    for name, grad in big.items():
        torch.testing.assert_close(small[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_paper_normalization_step_equals_the_official_formula_on_the_logits():
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 64, (2, 16), generator=generator)
    labels = torch.randint(0, 64, (2, 16), generator=generator)
    labels[1, :6] = -100  # the official code's alpha also counts these positions
    loss, grads = _step_grads("mile", 2, 1, input_ids, labels, normalize="paper")
    torch.manual_seed(0)
    model = build_model("tiny", 64, num_hidden_layers=1).double()
    expected = official_loss(model(input_ids).logits.reshape(-1, 64), labels.reshape(-1), "mile")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["lm_head.weight"], model.lm_head.weight.grad, rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mile"
    run_dir = train(load_config(None, tiny_overrides(data_dir, out, **{"run.max_steps": 8})))
    return run_dir


def test_run_writes_config_metrics_checkpoints_and_final(finished_run):
    assert (finished_run / "config.yaml").is_file()
    train_lines = read_metrics(finished_run / "metrics.jsonl", "train")
    val_lines = read_metrics(finished_run / "metrics.jsonl", "val")
    assert [line["step"] for line in train_lines] == list(range(1, 9))
    assert set(train_lines[0]) == {"kind", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second", "time"}
    assert train_lines[-1]["tokens"] == 8 * 4 * 32
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert [line["step"] for line in val_lines] == [6, 8] and val_lines[-1]["val_ppl"] > 1
    csv_rows = (finished_run / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,tokens,loss") and len(csv_rows) == 9
    assert [p.name for p in sorted((finished_run / "checkpoints").glob("step_*.pt"))] == [
        "step_00000004.pt", "step_00000008.pt"]
    summary = json.loads((finished_run / "final" / "mileloss_run.json").read_text())
    assert summary["loss"]["kind"] == "mile" and summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 32
    assert summary == RunFolder(finished_run).read_run_info()


def test_the_run_records_the_identity_of_its_training_data(finished_run):
    summary = RunFolder(finished_run).read_run_info()
    assert summary["data"] == data_identity(summary["data_dir"]) and summary["data"]["readable"]
    assert len(summary["data"]["manifest_sha256"]) == 64


def test_exported_model_loads_with_auto_classes_and_gives_the_trained_logits(finished_run):
    exported = AutoModelForCausalLM.from_pretrained(finished_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "final")
    state = load_checkpoint(latest_checkpoint(finished_run / "checkpoints"))
    trained = build_model("tiny", state["config"]["model"]["vocab_size"], num_hidden_layers=2).eval()
    trained.load_state_dict(state["model"])
    input_ids = torch.tensor([tokenizer("the quick words of a test")["input_ids"][:16]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, trained(input_ids).logits, rtol=0, atol=0)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    def poison_step_6(step, model):  # the final norm's output (the hidden states) becomes NaN from step 6 on
        if step == 6:
            model.model.norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at step 6.*step_00000004.pt"):
        train(load_config(None, tiny_overrides(data_dir, out)), hooks=TrainHooks(step_start=poison_step_6))
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl", "train")] == [1, 2, 3, 4, 5]
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert state["step"] == 4
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not (out / "final").exists()


def _assert_nothing_trained(out):
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_missing_data_dir_is_reported_before_training(tmp_path):
    with pytest.raises(PreflightError, match="does not exist"):
        train(load_config(None, tiny_overrides(tmp_path / "nowhere", tmp_path / "run")))
    _assert_nothing_trained(tmp_path / "run")


def test_corpus_too_small_for_one_window_is_reported_before_training(tmp_path):
    from mileloss.data import prepare_corpus

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world.")
    prepare_corpus([str(tmp_path / "corpus")], tmp_path / "data", vocab_size=300, progress=False)
    with pytest.raises(PreflightError, match="fewer than run.seq_len"):
        train(load_config(None, tiny_overrides(tmp_path / "data", tmp_path / "run")))
    _assert_nothing_trained(tmp_path / "run")


def test_corrupted_shard_is_reported_before_training(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = copy / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardChecksumError, match="train_00000.bin"):
        train(load_config(None, tiny_overrides(copy, tmp_path / "run")))
    _assert_nothing_trained(tmp_path / "run")


def test_model_vocab_that_differs_from_the_manifest_is_reported_before_training(data_dir, tmp_path):
    with pytest.raises(VocabMismatchError, match="vocab_size=1000.*512"):
        train(load_config(None, tiny_overrides(data_dir, tmp_path / "run", **{"model.vocab_size": 1000})))
    _assert_nothing_trained(tmp_path / "run")
