"""`mileloss data` at scale: tokenisation throughput against datasets.map, and peak memory vs corpus size (not a test).

    python benchmarks/bench_data.py throughput --mb 20            # MB/s: mileloss --workers 1 and 2, datasets.map
    python benchmarks/bench_data.py memory --mb 100               # peak RSS preparing a generated 100 MB corpus
    nohup nice -n 10 python benchmarks/bench_data.py memory --mb 1000 > bench_data_1g.log 2>&1 &

The corpus is generated here, seeded (``--seed``): JSONL documents of Zipf-distributed pseudo-words (a 20000-word
vocabulary of syllables), sentences with punctuation and line breaks, four Pile-style domains; 1 MB = 10**6 bytes
of file. Every run uses one fixed tokenizer: a byte-level BPE (``--vocab``, default 8192) trained by
``mileloss.data.tokenizer.train_tokenizer`` on the first 4 MB of the same corpus, saved once in the work folder,
so no run trains a tokenizer on the whole corpus and every contender encodes with the same tokenizer.

Each measurement runs in a fresh subprocess (``--child``) and reports its wall time and peak resident memory
(``ru_maxrss`` of the process; for ``datasets.map`` with ``num_proc=2`` and for ``--workers 2`` the worker
processes' peaks are reported separately, as RUSAGE_CHILDREN's largest child):

* ``mileloss``: ``prepare_corpus([corpus], out, tokenizer=..., workers=N)``: read, tokenise, write the shards,
  hash and count them, write the manifest. MB/s = corpus file bytes / wall seconds of that call (``transformers``
  imported before the clock starts; with N > 1 the call includes starting the N spawned workers, each of which
  imports ``mileloss`` and so ``torch``: seconds of fixed cost, more on a loaded machine).
* ``datasets``: ``load_dataset("json", data_files=corpus)`` (Arrow conversion, timed apart) then
  ``Dataset.map(batched=True, num_proc=N)`` calling the same tokenizer (``add_special_tokens=False``) on the
  ``text`` column; MB/s for the map alone and for load + map. ``datasets`` is an optional benchmark dependency
  (``pip install datasets``); without it those rows say "missing".

Memory mode runs ``mileloss`` only (``--workers 1`` by default); the check that matters is the ratio of the peaks
of two sizes (e.g. 1000 MB vs 100 MB), which ``--compare FILE`` prints from an earlier run's JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOMAINS = ("Pile-CC", "Github", "ArXiv", "Wikipedia (en)")
SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vu", "shi", "do", "pe", "nor", "qua", "zel", "ith", "um", "bra", "eo",
             "st", "ing", "ex", "al", "tor", "ve", "na", "gri")
TOKENIZER_SAMPLE_BYTES = 4 * 10**6


def generate_corpus(path: Path, megabytes: float, seed: int) -> int:
    """Write ``megabytes`` * 10**6 bytes (to within one document) of seeded JSONL to ``path``; returns the size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = []
    while len(words) < 20000:
        word = "".join(rng.choice(SYLLABLES, size=rng.integers(1, 4)))
        words.append(word)
    vocabulary = np.array(words, dtype=object)
    ranks = np.arange(1, len(vocabulary) + 1, dtype=np.float64)
    probabilities = ranks**-1.1 / (ranks**-1.1).sum()
    target = int(megabytes * 10**6)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            length = int(rng.choice([40, 200, 800, 3000], p=[0.3, 0.4, 0.2, 0.1]))
            picked = vocabulary[rng.choice(len(vocabulary), size=length, p=probabilities)]
            marks = rng.random(length)  # after each word: ".\n" (1 %), ". " (5 %), ", " (4 %), else " "
            separators = np.where(marks < 0.01, ".\n", np.where(marks < 0.06, ". ", np.where(marks < 0.1, ", ", " ")))
            text = "".join((picked + separators.astype(object)).tolist()).strip()
            record = {"text": text, "meta": {"pile_set_name": DOMAINS[int(rng.integers(4))]}}
            line = json.dumps(record) + "\n"
            handle.write(line)
            written += len(line.encode())
    return path.stat().st_size


def tokenizer_for(corpus: Path, folder: Path, vocab: int) -> Path:
    """Train (once) the benchmark's fixed tokenizer on the first 4 MB of the corpus."""
    if (folder / "tokenizer.json").exists():
        return folder
    from mileloss.data.tokenizer import save_tokenizer, train_tokenizer

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                seen += len(line)
                yield json.loads(line)["text"]
                if seen >= TOKENIZER_SAMPLE_BYTES:
                    return

    save_tokenizer(train_tokenizer(texts(), vocab), folder)
    return folder


def peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def child_mileloss(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    import transformers  # noqa: F401  imported before the clock starts, as the datasets child does

    from mileloss.data import prepare_corpus

    before = peak_mb(resource.RUSAGE_SELF)
    started = time.perf_counter()
    manifest = prepare_corpus([corpus], out, tokenizer=tokenizer, workers=workers, val_fraction=0.01, progress=False)
    seconds = time.perf_counter() - started
    tokens = sum(manifest.num_tokens(split) for split in manifest.splits)
    return {"seconds": seconds, "tokens": tokens, "peak_mb": peak_mb(resource.RUSAGE_SELF),
            "peak_mb_before_call": before, "worker_peak_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def child_datasets(corpus: Path, tokenizer: Path, cache: Path, workers: int) -> dict:
    try:
        import datasets
    except ImportError:
        return {"missing": "datasets is not installed (pip install datasets)"}
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    loaded = time.perf_counter()

    def encode(batch):
        return {"input_ids": hf_tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    mapped = dataset.map(encode, batched=True, num_proc=workers if workers > 1 else None,
                         remove_columns=dataset.column_names)
    finished = time.perf_counter()
    tokens = sum(len(ids) for batch in mapped.iter(batch_size=10000) for ids in batch["input_ids"])
    return {"load_seconds": loaded - started, "map_seconds": finished - loaded, "tokens": tokens,
            "peak_mb": peak_mb(resource.RUSAGE_SELF), "worker_peak_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def run_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare_inputs(work: Path, megabytes: float, seed: int, vocab: int) -> tuple[Path, Path, int]:
    corpus = work / f"corpus_{megabytes:g}MB_seed{seed}.jsonl"
    if not corpus.exists():
        started = time.perf_counter()
        generate_corpus(corpus.with_suffix(".partial"), megabytes, seed)
        os.replace(corpus.with_suffix(".partial"), corpus)
        print(f"generated {corpus} in {time.perf_counter() - started:.1f} s", flush=True)
    return corpus, tokenizer_for(corpus, work / f"tokenizer_v{vocab}_seed{seed}_{megabytes:g}MB", vocab), \
        corpus.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["throughput", "memory"])
    parser.add_argument("--mb", type=float, default=20.0, help="generated corpus size in MB (10**6 bytes)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="(throughput: 1 2; memory: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--work", help="folder for the corpus, tokenizer and outputs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--compare", help="memory mode: a JSON line of an earlier memory run, to print the ratio")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus, tokenizer, size = prepare_inputs(work, args.mb, args.seed, args.vocab)
        workers = args.workers or ([1, 2] if args.mode == "throughput" else [1])
        print(f"corpus {size / 1e6:.1f} MB ({corpus.name}), tokenizer vocab {args.vocab}, cpus {os.cpu_count()}",
              flush=True)
        rows = []
        for count in workers:
            out = work / f"out_w{count}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_child("mileloss", str(corpus), str(tokenizer), str(out), str(count))
            shutil.rmtree(out, ignore_errors=True)
            row = {"mode": args.mode, "tool": "mileloss", "workers": count, "mb": size / 1e6, **result,
                   "mb_per_s": size / 1e6 / result["seconds"]}
            rows.append(row)
            print(f"mileloss data  workers {count}: {row['mb_per_s']:.2f} MB/s ({result['seconds']:.1f} s, "
                  f"{result['tokens']:,} tokens), peak RSS {result['peak_mb']:.0f} MB "
                  f"(before the call {result['peak_mb_before_call']:.0f} MB; workers' largest "
                  f"{result['worker_peak_mb']:.0f} MB)", flush=True)
            if args.mode == "throughput":
                cache = work / f"hf_cache_w{count}"
                shutil.rmtree(cache, ignore_errors=True)
                result = run_child("datasets", str(corpus), str(tokenizer), str(cache), str(count))
                shutil.rmtree(cache, ignore_errors=True)
                if "missing" in result:
                    print(f"datasets.map   num_proc {count}: {result['missing']}", flush=True)
                    rows.append({"tool": "datasets", "workers": count, **result})
                    continue
                row = {"mode": args.mode, "tool": "datasets", "workers": count, "mb": size / 1e6, **result,
                       "map_mb_per_s": size / 1e6 / result["map_seconds"],
                       "load_map_mb_per_s": size / 1e6 / (result["load_seconds"] + result["map_seconds"])}
                rows.append(row)
                print(f"datasets.map   num_proc {count}: {row['map_mb_per_s']:.2f} MB/s map only "
                      f"({result['map_seconds']:.1f} s), {row['load_map_mb_per_s']:.2f} MB/s with load_dataset "
                      f"({result['load_seconds']:.1f} s), {result['tokens']:,} tokens, peak RSS "
                      f"{result['peak_mb']:.0f} MB (workers' largest {result['worker_peak_mb']:.0f} MB)", flush=True)
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.compare:
            lines = Path(args.compare).read_text().splitlines()
            earlier = json.loads(next(line for line in reversed(lines) if line.startswith('{"mode": "memory"')))
            now = next(row for row in rows if row["tool"] == "mileloss")
            growth = [row["peak_mb"] - row["peak_mb_before_call"] for row in (now, earlier)]
            print(f"peak RSS {now['mb']:.0f} MB corpus / {earlier['mb']:.0f} MB corpus: "
                  f"{now['peak_mb']:.0f} / {earlier['peak_mb']:.0f} MB = {now['peak_mb'] / earlier['peak_mb']:.3f}x; "
                  f"growth during the call {growth[0]:.0f} / {growth[1]:.0f} MB")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, corpus, tokenizer, out, workers = sys.argv[2:7]
        function = child_mileloss if kind == "mileloss" else child_datasets
        print(json.dumps(function(Path(corpus), Path(tokenizer), Path(out), int(workers))))
    else:
        main()
