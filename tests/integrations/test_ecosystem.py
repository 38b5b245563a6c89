"""What leaves mileloss loads in the ecosystem as it is: a model trained with apply_mileloss saves exactly what the
unpatched model saves; a run's ``final/`` folder loads with the Auto classes of every supported transformers and
scores with ``lm_eval --model hf --model_args pretrained=RUN/final`` (the CLI, offline, a local task)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from mileloss.integrations import apply_mileloss

VOCAB = 53


def test_a_patched_model_saves_what_the_unpatched_model_saves_and_loads_back_unpatched(tmp_path):
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "plain")
    apply_mileloss(model, loss="mile", gamma=1.5, sigma=0.5).save_pretrained(tmp_path / "patched")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    patched = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert patched == plain  # nothing of the patch (loss type, options) leaks into the config
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "patched" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "patched").train()
    assert "forward" not in vars(loaded)  # HF's own forward: labels give HF's loss and the logits
    input_ids = torch.randint(0, VOCAB, (2, 9))
    outputs = loaded(input_ids, labels=input_ids)
    assert outputs.logits is not None and outputs.loss.ndim == 0


@pytest.fixture(scope="module")
def final_folder(data_dir, tmp_path_factory) -> Path:
    """``RUN/final`` of a real 4-step tiny ``mileloss train`` run (MiLe)."""
    from mileloss.train import load_config, train
    from tests.train._train_utils import tiny_overrides

    out = tmp_path_factory.mktemp("run") / "mile"
    run_dir = train(load_config(None, tiny_overrides(data_dir, out, **{"run.max_steps": 4, "run.eval_every": 4})))
    return run_dir / "final"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from tests.train.conftest import make_words_data

    return make_words_data(tmp_path_factory)


def test_the_final_folder_names_a_tokenizer_class_transformers_4_loads_too(final_folder):
    config = json.loads((final_folder / "tokenizer_config.json").read_text())
    # transformers 5.x's save_pretrained writes "TokenizersBackend", a class 4.x does not have
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = transformers.AutoTokenizer.from_pretrained(final_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(final_folder)
    assert model.config.vocab_size >= len(tokenizer)


@pytest.mark.slow
def test_lm_eval_cli_scores_the_final_folder_as_it_is(final_folder, tmp_path):
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    if lm_eval is None:
        pytest.skip("lm_eval is not installed (pip install 'mileloss[eval]')")
    documents = tmp_path / "docs.jsonl"
    rows = [{"context": "the", "choices": [" a", " b"], "label": 0},
            {"context": "a word", "choices": [" of", " the"], "label": 1},
            {"context": "one more", "choices": [" test", " text"], "label": 0}]
    documents.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {documents}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={final_folder}", "--tasks",
                           "tiny_choice", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                           "--batch_size", "2", "--output_path", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results*.json")]
    assert len(results) == 1
    accuracy = results[0]["results"]["tiny_choice"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and results[0]["n-samples"]["tiny_choice"]["effective"] == 3
