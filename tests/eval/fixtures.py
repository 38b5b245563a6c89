"""Tiny, self-made stand-ins for what `mileloss data` and `mileloss train` write (no hub, a few ms each).

- :func:`make_tokenizer`: a byte-level BPE trained with `tokenizers` on a few sentences, wrapped in
  ``PreTrainedTokenizerFast`` and saved with ``save_pretrained``.
- :func:`make_data_dir`: DATA_DIR with manifest.json, tokenizer/, raw uint16 shards and train_token_counts.npy.
- :func:`make_checkpoint`: a random 1-layer ``LlamaForCausalLM`` + tokenizer saved with ``save_pretrained``.
- :func:`make_run_dir`: RUN_DIR with config.yaml, metrics.jsonl and final/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SENTENCES = [
    "the cat sat on the mat and the dog sat on the log.",
    "Question: what is the capital of France?\nAnswer: Paris.",
    "a quick brown fox jumps over the lazy dog, again and again.",
    "rare words like zymurgy and quixotic appear only once.",
    "to be or not to be, that is the question.",
]


def make_tokenizer(out: Path, vocab_size: int = 320, corpus: list[str] | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((corpus or SENTENCES) * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return out


def _write_shard(path: Path, tokens: np.ndarray) -> dict:
    data = tokens.astype("<u2").tobytes()
    path.write_bytes(data)
    return {"file": path.name, "num_tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest()}


def make_data_dir(out: Path, tokenizer_dir: Path, *, num_val_tokens: int = 300, seed: int = 0) -> Path:
    """DATA_DIR following the layout contract; tokens are the tokenised sentences, repeated."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    docs = [tokenizer(s)["input_ids"] + [eos] for s in SENTENCES]
    # the last sentence never occurs in training, so its tokens land in the rarest bucket
    train = np.concatenate([docs[i] for i in rng.integers(0, len(docs) - 1, size=60)])
    val = np.concatenate([docs[i] for i in rng.integers(0, len(docs), size=40)])[:num_val_tokens]
    vocab_size = len(tokenizer)
    counts = np.bincount(train, minlength=vocab_size).astype(np.int64)
    np.save(out / "train_token_counts.npy", counts)
    manifest = {
        "format": "mileloss-shards", "version": 1, "corpus": "fixture", "sources": ["tests/eval/fixtures.py"],
        "tokenizer": "tokenizer", "vocab_size": vocab_size, "dtype": "uint16", "eos_token_id": eos, "seed": seed,
        "splits": {
            "train": {"num_tokens": int(len(train)), "shards": [_write_shard(out / "train_00000.bin", train)]},
            "val": {"num_tokens": int(len(val)), "shards": [_write_shard(out / "val_00000.bin", val)]},
        },
        "token_counts_file": "train_token_counts.npy",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def make_checkpoint(out: Path, tokenizer_dir: Path, *, seed: int = 0, max_position_embeddings: int = 64) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_position_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_run_dir(out: Path, *, loss: str = "ce", gamma: float = 1.0, sigma: float = 1.0, seed: int = 0,
                 steps: int = 40, final_from: Path | None = None, data_dir: Path | None = None,
                 val_offset: float = 0.0) -> Path:
    """RUN_DIR with config.yaml and metrics.jsonl (a decaying synthetic curve); final/ copied from a checkpoint."""
    import shutil

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = {"model": {"preset": "tiny"}, "loss": {"kind": loss, "gamma": gamma, "sigma": sigma},
              "data": {"dir": str(data_dir) if data_dir else "data"}, "run": {"seed": seed, "seq_len": 32}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in range(1, steps + 1):
        loss_value = 5.0 * np.exp(-step / 15) + 1.5 + 0.01 * seed
        lines.append({"kind": "train", "step": step, "tokens": step * 1024, "loss": loss_value, "lr": 1e-3,
                      "grad_norm": 1.0, "tokens_per_second": 5000.0, "time": step * 0.2})
        if step % 10 == 0:
            val = loss_value + 0.1 + val_offset
            lines.append({"kind": "val", "step": step, "tokens": step * 1024, "val_loss": val,
                          "val_ppl": float(np.exp(val))})
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if final_from is not None:
        shutil.copytree(final_from, out / "final")
        run_info = {"loss": {"kind": loss, "gamma": gamma, "sigma": sigma, "normalize": "weighted"},
                    "data_dir": str(data_dir) if data_dir else None, "steps": steps, "tokens": steps * 1024,
                    "seed": seed, "model": {"preset": "tiny", "seq_len": 32}}
        (out / "final" / "mileloss_run.json").write_text(json.dumps(run_info))
    return out
