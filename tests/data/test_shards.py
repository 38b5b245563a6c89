"""prepare_corpus end to end on generated text: shard contents, dtype, checksums, determinism, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from mileloss.data import (
    FileChecksumError,
    ManifestError,
    OutputFolderError,
    ShardChecksumError,
    TokenizerMismatchError,
    load_manifest,
    prepare_corpus,
    read_split,
)
from mileloss.data.shards import ConcatenatedTokens, dtype_for_vocab
from mileloss.data.writer import document_split

VOCAB = 400


def expected_split_tokens(data_dir: Path, texts: list[str], seed: int, val_fraction: float) -> dict[str, list[int]]:
    """Each document's tokens followed by eos, concatenated per split in document order."""
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    expected = {"train": [], "val": []}
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected[document_split(seed, index, val_fraction)] += ids + [tokenizer.eos_token_id]
    return expected


def test_shards_hold_each_documents_tokens_followed_by_eos(tmp_path, corpus_dir, texts):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, val_fraction=0.2, progress=False)
    expected = expected_split_tokens(manifest.path, texts, seed=0, val_fraction=0.2)
    assert expected["val"] and expected["train"], "pick a seed whose hash split leaves both splits non-empty"
    for split in ("train", "val"):
        tokens = read_split(manifest, split)
        assert tokens.tolist() == expected[split]
        assert manifest.num_tokens(split) == len(expected[split])
    eos = manifest.eos_token_id
    train = read_split(manifest, "train")
    assert int((train == eos).sum()) == manifest.splits["train"].num_documents
    assert train[-1] == eos


def test_default_dtype_is_uint16_and_forced_uint32_stores_the_same_ids(tmp_path, corpus_dir):
    small = prepare_corpus([corpus_dir], tmp_path / "u16", vocab_size=VOCAB, progress=False)
    wide = prepare_corpus([corpus_dir], tmp_path / "u32", vocab_size=VOCAB, dtype="uint32", progress=False)
    assert small.dtype == np.dtype("<u2") and wide.dtype == np.dtype("<u4")
    for split in ("train", "val"):
        assert read_split(wide, split).tolist() == read_split(small, split).tolist()
        for path, shard in zip(wide.shard_paths(split), wide.splits[split].shards, strict=True):
            assert path.stat().st_size == 4 * shard.num_tokens
    assert json.loads((tmp_path / "u32" / "manifest.json").read_text())["dtype"] == "uint32"


def test_dtype_is_uint32_only_when_ids_exceed_uint16():
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")


def test_rerun_gives_byte_identical_data_directory(tmp_path, corpus_dir):
    first = prepare_corpus([corpus_dir], tmp_path / "a", vocab_size=VOCAB, max_shard_tokens=700, progress=False)
    second = prepare_corpus([corpus_dir], tmp_path / "b", vocab_size=VOCAB, max_shard_tokens=700, progress=False)
    files = sorted(p.relative_to(first.path) for p in first.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.path) for p in second.path.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".bin"]) > 2
    for file in files:
        assert (first.path / file).read_bytes() == (second.path / file).read_bytes(), file


def test_small_max_shard_tokens_splits_into_shards_read_back_as_one_array(tmp_path, corpus_dir):
    whole = prepare_corpus([corpus_dir], tmp_path / "one", vocab_size=VOCAB, progress=False)
    sharded = prepare_corpus([corpus_dir], tmp_path / "many", vocab_size=VOCAB, max_shard_tokens=500, progress=False)
    train = read_split(sharded, "train")
    assert isinstance(train, ConcatenatedTokens) and len(sharded.splits["train"].shards) > 3
    assert all(shard.num_tokens <= 500 for shard in sharded.splits["train"].shards)
    reference = np.asarray(read_split(whole, "train"))
    assert np.array_equal(np.asarray(train), reference)
    assert np.array_equal(train[490:1234], reference[490:1234])  # a slice across shard boundaries
    assert train[-1] == reference[-1] and train[777] == reference[777]


def test_train_token_counts_are_the_training_split_histogram(tmp_path, corpus_dir):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, progress=False)
    counts = manifest.token_counts()
    assert counts.dtype == np.int64 and counts.shape == (manifest.vocab_size,)
    assert np.array_equal(counts, np.bincount(read_split(manifest, "train"), minlength=manifest.vocab_size))


def test_corrupted_byte_raises_shard_checksum_error_naming_the_shard(tmp_path, corpus_dir):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, progress=False)
    load_manifest(manifest.path)  # clean data verifies
    shard = manifest.shard_paths("train")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match="train_00000.bin"):
        load_manifest(manifest.path)
    load_manifest(manifest.path, verify=False)  # sizes still match: only verify=True hashes


def test_truncated_or_missing_shard_raises_even_without_verify(tmp_path, corpus_dir):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, progress=False)
    shard = manifest.shard_paths("val")[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardChecksumError, match="val_00000.bin.*bytes"):
        load_manifest(manifest.path, verify=False)
    shard.unlink()
    with pytest.raises(ShardChecksumError, match="val_00000.bin: shard is missing"):
        load_manifest(manifest.path, verify=False)


def test_swapped_tokenizer_is_caught_by_its_checksum_then_by_its_vocab_size(tmp_path, corpus_dir):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, progress=False)
    other = prepare_corpus([corpus_dir], tmp_path / "other", vocab_size=VOCAB - 50, progress=False)
    for file in manifest.tokenizer_dir.iterdir():
        file.write_bytes((other.tokenizer_dir / file.name).read_bytes())
    with pytest.raises(FileChecksumError, match="tokenizer/tokenizer.json"):
        load_manifest(manifest.path)
    # the same swap with the manifest's file entries rewritten to match: the vocabulary still disagrees
    data = json.loads(manifest.manifest_path.read_text())
    data["files"] = [entry for entry in data["files"] if not entry["file"].startswith("tokenizer/")]
    data["files"] += [vars(info) for info in other.files if info.file.startswith("tokenizer/")]
    manifest.manifest_path.write_text(json.dumps(data))
    with pytest.raises(TokenizerMismatchError, match=f"{VOCAB - 50} ids.*vocab_size {VOCAB}"):
        load_manifest(manifest.path)


def test_unknown_manifest_version_raises_manifest_error(tmp_path, corpus_dir):
    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=VOCAB, progress=False)
    data = json.loads(manifest.manifest_path.read_text())
    data["version"] = 3
    manifest.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="version 3"):
        load_manifest(manifest.path)
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("max_shard_tokens", [100_000, 300])
def test_single_document_corpus_is_split_by_token_position(tmp_path, texts, max_shard_tokens):
    source = tmp_path / "book.txt"
    source.write_text("\n\n".join(texts))
    manifest = prepare_corpus(
        [source],
        tmp_path / "data",
        vocab_size=VOCAB,
        val_fraction=0.1,
        max_shard_tokens=max_shard_tokens,
        progress=False,
    )
    load_manifest(manifest.path)
    tokenizer = AutoTokenizer.from_pretrained(manifest.tokenizer_dir)
    whole = tokenizer(source.read_text(), add_special_tokens=False)["input_ids"] + [manifest.eos_token_id]
    train, val = read_split(manifest, "train").tolist(), read_split(manifest, "val").tolist()
    assert train + val == whole
    assert len(val) == round(0.1 * len(whole))
    assert manifest.extra["split_by"] == "token_position"


@pytest.mark.parametrize("seed", range(6))
def test_two_documents_always_give_one_train_and_one_val_document(tmp_path, texts, seed):
    for index in range(2):
        (tmp_path / f"{index}.txt").write_text(texts[index])
    manifest = prepare_corpus(
        [tmp_path / "0.txt", tmp_path / "1.txt"], tmp_path / "data", vocab_size=300, seed=seed, progress=False
    )
    assert manifest.splits["train"].num_documents == 1 and manifest.splits["val"].num_documents == 1


def test_rerun_replaces_a_data_directory_only_with_overwrite_and_refuses_any_other_folder(tmp_path, corpus_dir):
    out = tmp_path / "data"
    prepare_corpus([corpus_dir], out, vocab_size=VOCAB, max_shard_tokens=500, progress=False)
    with pytest.raises(OutputFolderError, match="already holds mileloss data.*--overwrite"):
        prepare_corpus([corpus_dir], out, vocab_size=VOCAB, progress=False)
    assert len(list(out.glob("*.bin"))) > 2, "the refused run left the data as it was"
    manifest = prepare_corpus([corpus_dir], out, vocab_size=VOCAB, progress=False, overwrite=True)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    load_manifest(manifest.path)
    assert not list(tmp_path.glob(".data.*")), "staging folders are cleaned up"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(OutputFolderError, match="not a data folder written by `mileloss data`"):
        prepare_corpus([corpus_dir], precious, vocab_size=VOCAB, progress=False, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_streaming_a_large_file_in_blocks_writes_the_same_shards(tmp_path, texts, monkeypatch):
    import mileloss.data.corpora as corpora

    source = tmp_path / "book.txt"
    source.write_text("\n\n".join(texts))
    whole = prepare_corpus([source], tmp_path / "whole", vocab_size=VOCAB, max_shard_tokens=999, progress=False)
    monkeypatch.setattr(corpora, "LARGE_FILE_BYTES", 1000)
    monkeypatch.setattr(corpora, "BLOCK_CHARS", 500)
    streamed = prepare_corpus([source], tmp_path / "streamed", vocab_size=VOCAB, max_shard_tokens=999, progress=False)
    for name in [
        "tokenizer/tokenizer.json",
        *(shard.file for split in whole.splits.values() for shard in split.shards),
    ]:
        assert (whole.path / name).read_bytes() == (streamed.path / name).read_bytes(), name
