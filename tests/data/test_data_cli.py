"""`mileloss data` command line: summary on success, a one-line error and exit code 2 on bad input."""

from __future__ import annotations

from mileloss.cli import main as cli
from mileloss.data import load_manifest


def main(argv):
    return cli(["data", *map(str, argv)])


def test_cli_prepares_a_data_directory_and_prints_a_summary(tmp_path, corpus_dir, capsys):
    out = tmp_path / "data"
    code = main(
        [
            "--corpus",
            str(corpus_dir),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--val-fraction",
            "0.2",
            "--seed",
            "1",
            "--max-shard-tokens",
            "1000",
            "--no-progress",
        ]
    )
    assert code == 0
    manifest = load_manifest(out)
    printed = capsys.readouterr().out
    assert f"{manifest.splits['train'].num_tokens:,} train" in printed
    assert "vocabulary  300" in printed and "documents   " in printed and "time " in printed
    assert manifest.seed == 1 and manifest.extra["val_fraction"] == 0.2
    assert all(shard.num_tokens <= 1000 for shard in manifest.splits["train"].shards)


def test_cli_reports_a_missing_corpus_path_without_a_traceback(tmp_path, capsys):
    code = main(["--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "data")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("mileloss data: error: corpus source") and "missing.txt" in error
    assert not (tmp_path / "data").exists()
