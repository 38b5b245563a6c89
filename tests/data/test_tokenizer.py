"""Byte-level BPE tokenizer: round trip, saving/loading, determinism, reuse of an existing tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mileloss.data import TokenizerError, load_manifest, prepare_corpus, read_split
from mileloss.data.tokenizer import EOS_TOKEN, save_tokenizer, train_tokenizer

TRICKY = "  Leading spaces,\ttabs\t\tand  doubled  spaces.\n\n\nÜnïcödé — “quotes” 🎉 <|notspecial|> 12345\r\nend "


def test_decode_of_encode_is_the_identity(texts):
    tokenizer = train_tokenizer(texts, 400)
    for text in [TRICKY, *texts[:3], "", " ", "\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_saved_tokenizer_loads_with_auto_tokenizer_and_encodes_the_same(tmp_path, texts):
    tokenizer = train_tokenizer(texts, 400)
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == tokenizer.eos_token_id == 0
    assert len(loaded) == len(tokenizer) == 400
    assert loaded(TRICKY)["input_ids"] == tokenizer(TRICKY)["input_ids"]
    assert loaded.decode(loaded(TRICKY)["input_ids"]) == TRICKY


def test_training_twice_gives_identical_tokenizer_files(tmp_path, texts):
    save_tokenizer(train_tokenizer(texts, 400), tmp_path / "a")
    save_tokenizer(train_tokenizer(texts, 400), tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_vocab_size_below_bytes_plus_eos_is_rejected(texts):
    with pytest.raises(TokenizerError, match="vocab_size 256 is too small"):
        train_tokenizer(texts, 256)


def test_existing_tokenizer_folder_is_copied_and_used(tmp_path, corpus_dir):
    trained = prepare_corpus([corpus_dir], tmp_path / "trained", vocab_size=400, progress=False)
    reused = prepare_corpus([corpus_dir], tmp_path / "reused", tokenizer=trained.tokenizer_dir, progress=False)
    load_manifest(reused.path)
    assert reused.vocab_size == 400
    for split in ("train", "val"):
        assert read_split(reused, split).tolist() == read_split(trained, split).tolist()


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path, corpus_dir):
    with pytest.raises(TokenizerError, match="does not exist"):
        prepare_corpus([corpus_dir], tmp_path / "data", tokenizer=tmp_path / "nope", progress=False)
