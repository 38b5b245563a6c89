"""Domain mixtures: presets and mix files, the sampling plan, token shares, determinism, manifest records."""

from __future__ import annotations

import json
import logging
import random

import pytest
import zstandard

from mileloss.data import load_manifest, prepare_corpus
from mileloss.data.mixture import Mixture, load_mix, plan_sampling
from mileloss.errors import DomainMismatchError, MixtureError
from tests.data.conftest import make_text
from tests.data.test_data_cli import main as cli


def pile_style_corpus(path, counts: dict[str, int], seed: int = 3):
    """A miniature Pile: ``.jsonl.zst`` with ``meta.pile_set_name``; domains differ in document length."""
    rng = random.Random(seed)
    lengths = {name: 10 + 15 * index for index, name in enumerate(counts)}
    order = [name for name, count in counts.items() for _ in range(count)]
    rng.shuffle(order)
    lines = [
        json.dumps({"text": make_text(rng, rng.randint(lengths[name], 2 * lengths[name])),
                    "meta": {"pile_set_name": name}})
        for name in order
    ]
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path


def test_pile_preset_has_the_22_domains_normalised_with_its_source():
    mix = load_mix("pile")
    assert len(mix.weights) == 22 and abs(sum(mix.weights.values()) - 1) < 1e-12
    assert mix.domain_field == "meta.pile_set_name" and "pile_sampling_rates.json" in mix.source
    assert abs(mix.weights["PubMed Central"] - 0.166076) < 1e-6 and abs(mix.weights["ArXiv"] - 0.1175) < 1e-5


def test_mix_files_in_yaml_and_json(tmp_path):
    (tmp_path / "m.yaml").write_text("A: 2\nB: 1\nC: 1\n")
    (tmp_path / "m.json").write_text('{"A": 0.5, "B": 0.25, "C": 0.25}')
    assert load_mix(tmp_path / "m.yaml").weights == load_mix(tmp_path / "m.json").weights == {
        "A": 0.5, "B": 0.25, "C": 0.25
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "mapping"),
        ('{"A": -1}', "finite and >= 0"),
        ('{"A": "x"}', "not a number"),
        ('{"A": 0}', "no domain has a positive weight"),
        ('{"A": NaN}', "finite"),
        ("{not json", "cannot read"),
    ],
)
def test_bad_mix_files_are_named_errors(tmp_path, content, message):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(MixtureError, match=message):
        load_mix(tmp_path / "m.json")


def test_unknown_preset_or_missing_file_is_a_mixture_error():
    with pytest.raises(MixtureError, match="neither a preset"):
        load_mix("no-such-mix")


def test_plan_downsamples_so_that_expected_shares_are_the_weights():
    plan = plan_sampling(Mixture({"A": 0.5, "B": 0.3, "C": 0.2}, "t"), {"A": 1000, "B": 3000, "C": 500}, seed=0)
    expected_tokens = {d: plan.rates[d] * n for d, n in {"A": 1000, "B": 3000, "C": 500}.items()}
    total = sum(expected_tokens.values())
    assert {d: round(t / total, 12) for d, t in expected_tokens.items()} == {"A": 0.5, "B": 0.3, "C": 0.2}
    assert max(plan.rates.values()) == pytest.approx(1.0) and plan.rates["A"] == pytest.approx(1.0)


def test_max_epochs_allows_repeating_a_domain():
    plan = plan_sampling(Mixture({"A": 0.9, "B": 0.1}, "t"), {"A": 100, "B": 100}, seed=0, max_epochs=3)
    assert plan.rates["A"] == pytest.approx(3.0) and plan.rates["B"] == pytest.approx(1 / 3)
    assert {plan.copies(index, "A") for index in range(50)} == {3}


def test_domain_in_data_but_not_in_mix_is_an_error_and_weight_zero_drops_it():
    with pytest.raises(DomainMismatchError, match=r"\['Z'\]"):
        plan_sampling(Mixture({"A": 1.0}, "t"), {"A": 10, "Z": 10}, seed=0)
    plan = plan_sampling(Mixture({"A": 1.0, "Z": 0.0}, "t"), {"A": 10, "Z": 10}, seed=0)
    assert plan.copies(0, "Z") == 0 and "Z" not in plan.rates


def test_domain_in_mix_but_not_in_data_warns_and_renormalises(caplog):
    with caplog.at_level(logging.WARNING, logger="mileloss.data.mixture"):
        plan = plan_sampling(Mixture({"A": 0.5, "B": 0.25, "Gone": 0.25}, "t"), {"A": 100, "B": 100}, seed=0)
    assert "Gone" in caplog.text and plan.missing_domains == ["Gone"]
    assert plan.weights == pytest.approx({"A": 2 / 3, "B": 1 / 3})


def test_mixture_token_shares_follow_the_weights_in_both_splits_and_are_deterministic(tmp_path):
    corpus = pile_style_corpus(tmp_path / "pile.jsonl.zst", {"A": 700, "B": 900, "C": 500})
    weights = {"A": 0.5, "B": 0.3, "C": 0.2}
    (tmp_path / "mix.yaml").write_text("".join(f"{d}: {w}\n" for d, w in weights.items()))
    tokenizer = prepare_corpus([corpus], tmp_path / "tok", vocab_size=300, progress=False).tokenizer_dir
    kwargs = dict(tokenizer=tokenizer, domain_field="meta.pile_set_name", mix=tmp_path / "mix.yaml",
                  val_fraction=0.25, seed=7, progress=False)
    first = prepare_corpus([corpus], tmp_path / "one", **kwargs)
    second = prepare_corpus([corpus], tmp_path / "two", **kwargs)
    assert first.to_json()["splits"] == second.to_json()["splits"]
    assert first.extra["domains"] == second.extra["domains"]
    for split in ("train", "val"):
        domains = first.extra["domains"][split]
        total = first.num_tokens(split)
        assert sum(entry["tokens"] for entry in domains.values()) == total
        assert sum(entry["documents"] for entry in domains.values()) == first.splits[split].num_documents
        tolerance = 0.03 if split == "train" else 0.06
        for domain, weight in weights.items():
            assert abs(domains[domain]["tokens"] / total - weight) < tolerance, (split, domain)
    mix = first.extra["mix"]
    assert mix["weights"] == pytest.approx(weights) and mix["missing_domains"] == []
    assert mix["source"].endswith("mix.yaml") and "Bernoulli" in mix["scheme"]
    assert sum(mix["source_tokens"].values()) > first.num_tokens("train") + first.num_tokens("val")
    other = prepare_corpus([corpus], tmp_path / "three", **{**kwargs, "seed": 8})
    assert other.to_json()["splits"] != first.to_json()["splits"]


def test_shares_converge_to_within_one_percent_on_a_larger_sample():
    rng = random.Random(0)
    sizes = {"A": [rng.randint(50, 150) for _ in range(20000)], "B": [rng.randint(200, 600) for _ in range(8000)]}
    documents = [(d, n) for d, lengths in sizes.items() for n in lengths]
    rng.shuffle(documents)
    plan = plan_sampling(Mixture({"A": 0.7, "B": 0.3}, "t"), {d: sum(v) for d, v in sizes.items()}, seed=1)
    kept = {"A": 0, "B": 0}
    for index, (domain, tokens) in enumerate(documents):
        kept[domain] += tokens * plan.copies(index, domain)
    assert abs(kept["A"] / sum(kept.values()) - 0.7) < 0.01


def test_cli_mix_pile_on_a_miniature_pile_warns_about_absent_domains_and_records_the_source(
    tmp_path, capsys, caplog
):
    corpus = pile_style_corpus(tmp_path / "pile.jsonl.zst", {"ArXiv": 200, "Github": 200, "Pile-CC": 200})
    out = tmp_path / "data"
    with caplog.at_level(logging.WARNING):
        code = cli(["--corpus", corpus, "--out", out, "--mix", "pile", "--vocab-size", "300", "--no-progress"])
    assert code == 0
    manifest = load_manifest(out)
    assert manifest.extra["domain_field"] == "meta.pile_set_name"
    assert len(manifest.extra["mix"]["missing_domains"]) == 19 and "preset pile" in manifest.extra["mix"]["source"]
    assert "domains     train: " in capsys.readouterr().out and "absent from the corpus" in caplog.text


def test_cli_domain_outside_the_mix_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    corpus = pile_style_corpus(tmp_path / "pile.jsonl.zst", {"A": 30, "Typo": 30})
    (tmp_path / "mix.json").write_text('{"A": 1}')
    out = tmp_path / "data"
    code = cli(["--corpus", corpus, "--out", out, "--domain-field", "meta.pile_set_name", "--mix",
                tmp_path / "mix.json", "--vocab-size", "300", "--no-progress"])
    assert code == 2 and "Typo" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_mix_without_a_domain_field_fails_before_reading(tmp_path, capsys):
    (tmp_path / "mix.json").write_text('{"A": 1}')
    code = cli(["--corpus", tmp_path / "missing.jsonl", "--out", tmp_path / "d", "--mix", tmp_path / "mix.json"])
    assert code == 2 and "--domain-field" in capsys.readouterr().err
