"""Input formats: JSONL (plain, gzip, zstd), parquet, globs, dotted fields; the same tokens whatever the format."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mileloss.data import Corpus, CorpusFormatError, CorpusNotFoundError, load_manifest, prepare_corpus
from mileloss.data.corpora import _ZstdReader
from tests.data.conftest import make_text


def make_records(count: int = 60, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    domains = ["Wiki", "Code", "Books"]
    return [
        {"text": make_text(rng, rng.randint(20, 80)), "meta": {"pile_set_name": domains[index % 3]}}
        for index in range(count)
    ]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def write_format(folder, records, kind: str, frames: int = 1):
    """``records`` as a file of ``kind`` (jsonl, jsonl.gz, jsonl.zst, parquet) in ``folder``; returns its path."""
    path = folder / f"data.{kind}"
    if kind == "jsonl":
        path.write_bytes(jsonl_bytes(records))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(jsonl_bytes(records)))
    elif kind == "jsonl.zst":
        size = -(-len(records) // frames)  # several frames, as zstd -c a b > c makes
        parts = [records[start : start + size] for start in range(0, len(records), size)]
        path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(jsonl_bytes(part)) for part in parts))
    elif kind == "parquet":
        table = pa.Table.from_pylist(records)
        pq.write_table(table, path, row_group_size=7)  # several row groups
    return path


KINDS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_the_same_documents_with_dotted_domain_field(tmp_path, kind):
    records = make_records()
    path = write_format(tmp_path, records, kind)
    documents = list(Corpus([path], domain_field="meta.pile_set_name").documents())
    assert [document.text for document in documents] == [record["text"] for record in records]
    assert [document.domain for document in documents] == [record["meta"]["pile_set_name"] for record in records]


def test_multi_frame_zstd_is_read_across_frames(tmp_path):
    records = make_records(50)
    path = write_format(tmp_path, records, "jsonl.zst", frames=4)
    assert [document.text for document in Corpus([path]).documents()] == [record["text"] for record in records]


def test_zstd_is_decompressed_in_bounded_reads(tmp_path, monkeypatch):
    monkeypatch.setattr("mileloss.data.corpora.ZSTD_READ_BYTES", 64)
    reads = []
    original = _ZstdReader._feed

    def feed(self, chunk):
        reads.append(len(chunk))
        return original(self, chunk)

    monkeypatch.setattr(_ZstdReader, "_feed", feed)
    records = make_records(40)
    path = write_format(tmp_path, records, "jsonl.zst")
    assert [document.text for document in Corpus([path]).documents()] == [record["text"] for record in records]
    assert len(reads) > 10 and max(reads) <= 64


def test_same_tokens_whatever_the_input_format(tmp_path):
    records = make_records()
    first = write_format(tmp_path, records, "jsonl")
    reference = prepare_corpus([first], tmp_path / "out_jsonl", vocab_size=300, progress=False)
    tokenizer = reference.tokenizer_dir
    for kind in KINDS[1:]:
        folder = tmp_path / kind
        folder.mkdir()
        path = write_format(folder, records, kind)
        manifest = prepare_corpus([path], tmp_path / f"out_{kind}", tokenizer=tokenizer, progress=False)
        for split in ("train", "val"):
            assert [shard.sha256 for shard in manifest.splits[split].shards] == [
                shard.sha256 for shard in reference.splits[split].shards
            ], (kind, split)


def test_globs_and_folders_pick_up_every_format_in_sorted_order(tmp_path):
    records = make_records(12)
    (tmp_path / "d").mkdir()
    write_format(tmp_path / "d", records[:4], "jsonl.gz").rename(tmp_path / "d" / "a.jsonl.gz")
    write_format(tmp_path / "d", records[4:8], "parquet").rename(tmp_path / "d" / "b.parquet")
    write_format(tmp_path / "d", records[8:], "jsonl.zst").rename(tmp_path / "d" / "c.jsonl.zst")
    expected = [record["text"] for record in records]
    assert [document.text for document in Corpus([tmp_path / "d"]).documents()] == expected
    assert [document.text for document in Corpus([str(tmp_path / "d" / "*")]).documents()] == expected
    assert [document.text for document in Corpus([str(tmp_path / "**" / "*.parquet")]).documents()] == expected[4:8]
    with pytest.raises(CorpusNotFoundError, match="matches no file"):
        Corpus([str(tmp_path / "*.nothing")])


def test_text_field_may_be_a_dotted_path_or_a_key_with_a_dot(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text(json.dumps({"body": {"content": "hello world"}, "a.b": "dotted key"}) + "\n")
    assert [d.text for d in Corpus([path], text_field="body.content").documents()] == ["hello world"]
    assert [d.text for d in Corpus([path], text_field="a.b").documents()] == ["dotted key"]


def test_parquet_nested_text_column_and_missing_column(tmp_path):
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.Table.from_pylist([{"doc": {"body": "some text here"}, "id": 1}]), path)
    assert [d.text for d in Corpus([path], text_field="doc.body").documents()] == ["some text here"]
    with pytest.raises(CorpusFormatError, match=r"nested\.parquet: no column 'content'"):
        list(Corpus([path], text_field="content").documents())


def test_domain_field_missing_in_a_record_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl.zst"
    lines = [{"text": "a b", "meta": {"pile_set_name": "X"}}, {"text": "c d", "meta": {}}]
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(lines)))
    with pytest.raises(CorpusFormatError, match=r"d\.jsonl\.zst:2: no domain field 'meta.pile_set_name'"):
        list(Corpus([path], domain_field="meta.pile_set_name").documents())


def test_domain_field_with_a_plain_text_file_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    with pytest.raises(CorpusFormatError, match="plain text file has no domain field"):
        list(Corpus([tmp_path / "a.txt"], domain_field="source").documents())


def test_manifest_counts_tokens_per_domain_and_split_exactly(tmp_path):
    records = make_records(45)
    path = write_format(tmp_path, records, "jsonl.zst")
    manifest = prepare_corpus(
        [path], tmp_path / "out", vocab_size=300, domain_field="meta.pile_set_name", val_fraction=0.2, progress=False
    )
    from mileloss.data.tokenizer import encode_batch, load_tokenizer
    from mileloss.data.writer import stratified_split

    tokenizer = load_tokenizer(manifest.tokenizer_dir)
    expected = {"train": {}, "val": {}}
    seen = {}
    for record in records:
        domain = record["meta"]["pile_set_name"]
        seen[domain] = seen.get(domain, -1) + 1
        split = stratified_split(manifest.seed, domain, seen[domain], 0.2)
        entry = expected[split].setdefault(domain, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += len(encode_batch(tokenizer, [record["text"]])[0]) + 1
    assert load_manifest(tmp_path / "out").extra["domains"] == {k: dict(sorted(v.items())) for k, v in expected.items()}
    for split in ("train", "val"):
        domains = manifest.extra["domains"][split]
        assert sum(entry["tokens"] for entry in domains.values()) == manifest.num_tokens(split)
        assert sum(entry["documents"] for entry in domains.values()) == manifest.splits[split].num_documents
    assert manifest.extra["domain_field"] == "meta.pile_set_name"
    assert manifest.extra["split_by"] == "document_stratified_by_domain"
    assert {domain: entry["documents"] for domain, entry in manifest.extra["domains"]["val"].items()} == {
        "Books": 3, "Code": 3, "Wiki": 3  # 15 documents each, val_fraction 0.2: exactly 3 of every domain
    }
    assert np.load(tmp_path / "out" / manifest.token_counts_file).sum() == manifest.num_tokens("train")


def test_a_datasets_source_streams_a_local_dataset_folder_with_domains(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    records = make_records(30)
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_format(folder, records, "parquet").rename(folder / "train-00000.parquet")
    source = f"hf:{folder}@train"
    documents = list(Corpus([source], domain_field="meta.pile_set_name").documents())
    assert [(d.text, d.domain) for d in documents] == [(r["text"], r["meta"]["pile_set_name"]) for r in records]
    assert documents[3].name == f"{source}:row 3"
    plain = tmp_path / "plain.jsonl"
    write_format(tmp_path, records, "jsonl").rename(plain)
    reference = prepare_corpus([plain], tmp_path / "out_jsonl", vocab_size=300, progress=False)
    manifest = prepare_corpus([source], tmp_path / "out_hf", tokenizer=reference.tokenizer_dir, progress=False)
    assert manifest.to_json()["splits"] == reference.to_json()["splits"]  # same tokens, same shards


def test_hf_source_syntax_and_unloadable_sources(tmp_path, monkeypatch):
    from mileloss.data.corpora import parse_hf_source

    assert parse_hf_source("hf:EleutherAI/pile") == ("EleutherAI/pile", None, "train")
    expected = ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@validation") == expected
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CorpusNotFoundError, match="datasets cannot load it"):
        Corpus([f"hf:{tmp_path / 'no-such-folder'}"])
