"""Scale and pretrained tokenizers: --workers gives byte-identical shards, .jsonl.zst and parquet give the same
bytes, a LLaMA-like tokenizer.json gets <s> ... </s> around every document exactly once, and the manifest says so."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mileloss.data import TokenizerError, load_manifest, prepare_corpus, read_split
from mileloss.data.tokenizer import document_specials, load_tokenizer
from mileloss.errors import ConfigError
from tests.data.conftest import make_text
from tests.data.test_formats import write_format


def pile_records(count: int = 90, seed: int = 11) -> list[dict]:
    """A miniature Pile: several domains, documents of very different lengths, one with a literal '</s>'."""
    rng = random.Random(seed)
    domains = ["Pile-CC", "Github", "ArXiv", "Wikipedia (en)"]
    records = [
        {"text": make_text(rng, rng.choice([5, 40, 300])), "meta": {"pile_set_name": domains[rng.randrange(4)]}}
        for _ in range(count)
    ]
    records[7]["text"] += " the string </s> and <s> and <|endoftext|> are text here"
    return records


def shard_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.bin"))}


def llama_like_tokenizer_json(path, texts, vocab_size: int = 600):
    """A LLaMA-like tokenizer.json: BPE with <unk>, <s>, </s> (ids 0, 1, 2), a Metaspace pre-tokenizer and a
    TemplateProcessing post-processor that puts <s> before a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(path))
    return path


@pytest.fixture
def pile_zst(tmp_path):
    folder = tmp_path / "zst"
    folder.mkdir()
    return write_format(folder, pile_records(), "jsonl.zst", frames=3)


def test_workers_1_and_2_give_byte_identical_shards_and_manifests(tmp_path, pile_zst, monkeypatch):
    monkeypatch.setattr("mileloss.data.writer.BATCH_CHARS", 2000)  # many work units, several in flight
    runs = {}
    for workers in (1, 2):
        manifest = prepare_corpus([pile_zst], tmp_path / f"w{workers}", vocab_size=400, max_shard_tokens=3000,
                                  domain_field="meta.pile_set_name", workers=workers, progress=False)
        runs[workers] = manifest
    one, two = shard_bytes(runs[1].path), shard_bytes(runs[2].path)
    assert len(one) > 4 and one == two, "same shard files, byte for byte"
    strip = lambda m: {k: v for k, v in json.loads(m.manifest_path.read_text()).items() if k != "sources"}  # noqa: E731
    assert strip(runs[1]) == strip(runs[2])
    counts = [(runs[n].path / "train_token_counts.npy").read_bytes() for n in (1, 2)]
    assert counts[0] == counts[1]


def test_jsonl_zst_and_parquet_of_one_corpus_give_byte_identical_shards(tmp_path):
    records = pile_records()
    out = {}
    for kind in ("jsonl.zst", "parquet"):
        folder = tmp_path / kind.replace(".", "_")
        folder.mkdir()
        path = write_format(folder, records, kind, **({"frames": 4} if kind == "jsonl.zst" else {}))
        out[kind] = prepare_corpus([path], tmp_path / f"out_{folder.name}", vocab_size=400,
                                   domain_field="meta.pile_set_name", progress=False)
    assert shard_bytes(out["jsonl.zst"].path) == shard_bytes(out["parquet"].path)
    assert out["jsonl.zst"].extra["domains"] == out["parquet"].extra["domains"]


def test_manifest_records_vocabulary_domain_token_counts_and_the_specials(tmp_path, pile_zst):
    manifest = prepare_corpus([pile_zst], tmp_path / "out", vocab_size=400, domain_field="meta.pile_set_name",
                              progress=False)
    data = json.loads(manifest.manifest_path.read_text())
    assert data["vocab_size"] == 400 and data["tokenizer_source"] == "trained byte-level BPE"
    assert data["specials"]["document_start"] == [] and data["specials"]["document_end"] == [0]
    for split in ("train", "val"):
        domains = data["domains"][split]
        assert sum(entry["tokens"] for entry in domains.values()) == data["splits"][split]["num_tokens"]
        assert sum(entry["documents"] for entry in domains.values()) == data["splits"][split]["num_documents"]
    tokens = np.concatenate([np.asarray(read_split(manifest, "train")), np.asarray(read_split(manifest, "val"))])
    assert int((tokens == 0).sum()) == 90, "one eos per document: '<|endoftext|>' inside a text is not an eos"


def test_a_llama_like_tokenizer_json_puts_bos_and_eos_around_each_document_once(tmp_path, pile_zst):
    records = pile_records()
    path = llama_like_tokenizer_json(tmp_path / "tokenizer.json", [r["text"] for r in records])
    manifest = prepare_corpus([pile_zst], tmp_path / "out", tokenizer=path, val_fraction=0.0, progress=False)
    specials = manifest.extra["specials"]
    assert (specials["bos_token"], specials["bos_token_id"], specials["eos_token"], specials["eos_token_id"]) == (
        "<s>", 1, "</s>", 2)
    assert specials["document_start"] == [1] and specials["document_end"] == [2]
    assert manifest.eos_token_id == 2 and manifest.extra["tokenizer_source"] == str(path)
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(path))
    plain.encode_special_tokens = True
    expected = []
    for record in records:
        expected += [1, *plain.encode(record["text"], add_special_tokens=False).ids, 2]
    assert read_split(manifest, "train").tolist() == expected
    ids = np.asarray(read_split(manifest, "train"))
    assert int((ids == 1).sum()) == int((ids == 2).sum()) == len(records), "the literal '</s>' text is not an eos"
    # the copy in the data folder loads with transformers and has the same specials
    copy = load_tokenizer(manifest.tokenizer_dir)
    assert document_specials(copy).to_json() == specials
    load_manifest(manifest.path)  # the tokenizer folder's vocabulary matches the manifest


def test_a_tokenizer_json_without_an_eos_named_token_is_refused(tmp_path, corpus_dir):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="tokenizer.json: no special token named like an eos"):
        prepare_corpus([corpus_dir], tmp_path / "out", tokenizer=tmp_path / "tokenizer.json", progress=False)
    (tmp_path / "broken.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="broken.json: not a tokenizers JSON file"):
        prepare_corpus([corpus_dir], tmp_path / "out", tokenizer=tmp_path / "broken.json", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, -1, "cpus + 1", 1.5, True])
def test_bad_workers_is_a_config_error_before_anything_is_read(tmp_path, corpus_dir, workers):
    from mileloss.data.writer import usable_cpus

    limit = max(2, usable_cpus())
    workers = limit + 1 if workers == "cpus + 1" else workers
    with pytest.raises(ConfigError, match=rf"--workers must be an integer from 1 to {limit} \(the usable"):
        prepare_corpus([corpus_dir], tmp_path / "out", workers=workers, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Train time: the preflight refuses data whose specials disagree with its tokenizer, the model or the shards


@pytest.fixture
def llama_data(tmp_path, pile_zst):
    records = pile_records()
    path = llama_like_tokenizer_json(tmp_path / "tokenizer.json", [r["text"] for r in records])
    return prepare_corpus([pile_zst], tmp_path / "llama_data", tokenizer=path, progress=False)


def _edit_manifest(manifest, **changes):
    data = json.loads(manifest.manifest_path.read_text())
    data["specials"].update(changes)
    manifest.manifest_path.write_text(json.dumps(data))
    return load_manifest(manifest.path)


def test_preflight_accepts_consistent_specials_and_refuses_a_model_vocabulary_without_them(llama_data):
    from mileloss.errors import VocabMismatchError
    from mileloss.train.preflight import check_document_specials

    check_document_specials(load_manifest(llama_data.path), llama_data.vocab_size)
    with pytest.raises(VocabMismatchError, match="special token id 2 is not below model.vocab_size 2"):
        check_document_specials(load_manifest(llama_data.path), 2)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"document_start": []}, r"manifest says before each document \[\], .* but its tokenizer .* gives before "
                                 r"each document \[1\].*not written with this tokenizer"),
        ({"document_end": [2, 2]}, "not written with this tokenizer"),
        ({"eos_token_id": 1, "document_end": [1]}, "specials.eos_token_id 1 differs from eos_token_id 2"),
        ({"document_start": "<s>"}, "'specials' is malformed"),
        ({"document_end": [0]}, "'specials' is malformed"),
    ],
)
def test_preflight_refuses_specials_that_disagree_with_the_tokenizer(llama_data, changes, message):
    from mileloss.errors import TokenizerMismatchError
    from mileloss.train.preflight import check_document_specials

    manifest = _edit_manifest(llama_data, **changes)
    with pytest.raises(TokenizerMismatchError, match=message):
        check_document_specials(manifest, manifest.vocab_size)


def test_preflight_refuses_shards_that_do_not_start_with_the_recorded_bos(tmp_path, corpus_dir, monkeypatch):
    """Data written with nothing before documents, a manifest (and tokenizer) claiming a bos: the shards tell."""
    import mileloss.data.tokenizer as tokenizer_module
    from mileloss.errors import TokenizerMismatchError
    from mileloss.train.preflight import check_document_specials

    manifest = prepare_corpus([corpus_dir], tmp_path / "data", vocab_size=400, progress=False)
    claimed = _edit_manifest(manifest, document_start=[5])
    claim = tokenizer_module.DocumentSpecials.from_json(claimed.extra["specials"])
    monkeypatch.setattr(tokenizer_module, "document_specials", lambda tokenizer: claim)
    with pytest.raises(TokenizerMismatchError, match=r"train split starts with id \d+ and ends with 0, but the"):
        check_document_specials(claimed, claimed.vocab_size)


@pytest.mark.slow  # ~20 s on 2 busy cores: a training process imports torch
def test_mileloss_train_refuses_edited_specials_in_one_line_before_building_a_model(llama_data, tmp_path):
    import subprocess

    from tests.train._train_utils import subprocess_env, tiny_overrides, train_command

    _edit_manifest(llama_data, document_start=[])
    result = subprocess.run(train_command(tiny_overrides(llama_data.path, tmp_path / "run", **{"run.max_steps": 1})),
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not written with this tokenizer" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_hub_id_is_tried_only_for_a_missing_org_name_path_and_an_unreachable_hub_is_a_named_error(
    tmp_path, monkeypatch
):
    """No hub here: transformers' loader is replaced by one that fails as it does offline (and records its call)."""
    import transformers

    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError, match="'no-such-org/no-such-tok': no such local folder or file, and the hub id "
                                             "cannot be loaded .OSError: We couldn't connect"):
        load_tokenizer("no-such-org/no-such-tok")
    assert calls == [("no-such-org/no-such-tok", {"trust_remote_code": False})]
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("a/b/c")  # not org/name: a missing path, the hub is not asked
    (tmp_path / "org" / "tok").mkdir(parents=True)
    with pytest.raises(TokenizerError, match="cannot load a tokenizer from org/tok"):
        load_tokenizer("org/tok")  # an existing folder is read as a folder, never as a hub id
    assert len(calls) == 2 and calls[1] == ("org/tok", {"local_files_only": True, "trust_remote_code": False})
