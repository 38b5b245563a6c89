"""``mileloss reproduce``: the paper's comparison at the scale of this machine, end to end.

    mileloss reproduce                                   # ~15-20 min on 2 CPU cores: Shakespeare, CE vs focal vs MiLe
    mileloss reproduce --budget tiny                     # a few minutes: the run the test suite makes
    mileloss reproduce --budget long --seeds 111,112,113 --corpus kjv

Stages: prepare the corpus (tokenizer + shards), train one run per (loss, seed) with the same seed, data
order and token budget, evaluate each (frequency-bucket perplexity + offline benchmarks), write the report.
Every stage is skipped when its output is already there, so an interrupted reproduce continues where it
stopped (a half-trained run resumes from its last checkpoint).

``--out`` must be a new or empty folder, or one an earlier reproduce wrote (``reproduce.json``, written when it
starts, says so); anything else is refused before any work. A stage that fails with a named mileloss error stops
the command with one line naming the stage; Ctrl-C stops it with exit status 130, ready to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mileloss.dependencies import require
from mileloss.errors import ConfigError, DataError, StageError
from mileloss.run_folder import RunFolder, is_temp_of, read_json_object, write_atomic

log = logging.getLogger(__name__)

LOSSES = ("ce", "focal", "mile")
COMMAND = "mileloss reproduce"
SUMMARY = "reproduce.json"
FOLDERS = ("data", "runs", "report")
"""What reproduce writes under ``--out``, besides :data:`SUMMARY`."""


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    """Re-raise a stage's named error (a ValueError), missing package (ImportError) or I/O error as a StageError."""
    try:
        yield
    except (ValueError, ImportError, OSError) as error:
        raise StageError(name, error) from error


def _owns(entry: Path) -> bool:
    """True for what an earlier reproduce wrote: its summary (or the summary's temp file) and its three folders."""
    if entry.name == SUMMARY:
        content = read_json_object(entry)
        return content is not None and (content.get("written_by") == COMMAND or {"budget", "runs"} <= content.keys())
    if is_temp_of(entry, {SUMMARY}):
        return entry.is_file()
    return entry.name in FOLDERS and entry.is_dir() and not entry.is_symlink()


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much work one reproduce does; the presets below are measured on 2 CPU cores."""

    vocab_size: int
    preset: str
    max_steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    ppl_max_tokens: int | None
    tasks: tuple[str, ...]
    task_limit: int | None
    num_fewshot: int = 0


BUDGETS = {
    # CI: every stage runs for real, on little work
    "tiny": Budget(vocab_size=1024, preset="tiny", max_steps=30, batch_size=8, seq_len=64, lr=2e-3,
                   warmup_steps=5, eval_every=15, eval_batches=4, ppl_max_tokens=8192, tasks=("arc_easy",),
                   task_limit=4),
    # the README's main job: three 1M-token runs, roughly 15-20 minutes on 2 CPU cores
    "smoke": Budget(vocab_size=4096, preset="tiny", max_steps=500, batch_size=16, seq_len=128, lr=1e-3,
                    warmup_steps=50, eval_every=100, eval_batches=16, ppl_max_tokens=65536,
                    tasks=("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa",
                           "social_iqa", "triviaqa"), task_limit=50),
    # longer runs, the same pipeline (12M tokens per run: hours on 2 CPU cores)
    "long": Budget(vocab_size=8192, preset="tiny", max_steps=3000, batch_size=16, seq_len=256, lr=1e-3,
                   warmup_steps=200, eval_every=250, eval_batches=32, ppl_max_tokens=None,
                   tasks=("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa",
                          "social_iqa", "triviaqa"), task_limit=200),
}


def run_name(corpus: str, loss: str, seed: int) -> str:
    return f"{Path(corpus).name}-{loss}-s{seed}"


def train_config(budget: Budget, data_dir: Path, run_dir: Path, loss: str, seed: int, device: str | None):
    """The :class:`~mileloss.train.config.TrainConfig` of one run of ``budget``."""
    from mileloss.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(preset=budget.preset), data=DataConfig(dir=str(data_dir)), loss=LossConfig(kind=loss),
        optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
        run=RunConfig(out=str(run_dir), seed=seed, max_steps=budget.max_steps, batch_size=budget.batch_size,
                      seq_len=budget.seq_len, eval_every=budget.eval_every, eval_batches=budget.eval_batches,
                      checkpoint_every=budget.eval_every, device=device or "auto"))


def reproduce(
    out: str | Path = "reports/smoke",
    *,
    budget: str = "smoke",
    corpus: str = "shakespeare",
    seeds: tuple[int, ...] = (111,),
    losses: tuple[str, ...] = LOSSES,
    tasks: tuple[str, ...] | None = None,
    task_limit: int | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Prepare data, train every (loss, seed), evaluate, report. Returns the path of ``report.html``.

    Args:
        out: output folder: ``data/``, ``runs/<corpus>-<loss>-s<seed>/`` and ``report/`` go under it.
        budget: a key of :data:`BUDGETS`.
        corpus: a named corpus (shakespeare, kjv, austen) or a local path, as for ``mileloss data``.
        seeds, losses: one training run per pair, all with the same data order and token budget.
        tasks, task_limit, max_steps: override the budget's benchmarks, documents per task and steps.
    """
    from mileloss.data import load_manifest, prepare_corpus
    from mileloss.eval import evaluate
    from mileloss.eval.lm_eval_bridge import parse_task_list
    from mileloss.eval.outputs import check_output_folder, create_output_folder
    from mileloss.report import write_report
    from mileloss.train import train
    from mileloss.train.checkpoint import checkpoint_steps

    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise ConfigError(f"--losses: unknown loss {unknown[0]!r}; choose from {LOSSES}")
    if not losses or len(set(losses)) != len(losses):
        raise ConfigError(f"--losses: give each of {LOSSES} at most once, at least one, got {list(losses)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, at least one, got {list(seeds)}")
    for flag, value in (("--limit", task_limit), ("--max-steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
    if tasks is not None:
        tasks = tuple(parse_task_list(list(tasks)))  # UnknownTaskError now, not after hours of training
    corpus_name = Path(corpus).name or Path(corpus).resolve().name
    if not corpus_name:
        raise ConfigError(f"--corpus {corpus!r}: name a corpus (shakespeare, kjv, austen) or a file or folder")
    plan = BUDGETS[budget]
    plan = dataclasses.replace(plan, **{k: v for k, v in dict(
        tasks=tasks, task_limit=task_limit, max_steps=max_steps).items() if v is not None})
    require("reproduce" if plan.tasks else "report", cache_dir=cache_dir)  # packages and benchmark files, first
    out = Path(out)
    check_output_folder(out, COMMAND, _owns)
    create_output_folder(out)
    data_dir = out / "data" / corpus_name
    runs = [(loss, seed, out / "runs" / run_name(corpus_name, loss, seed)) for seed in seeds for loss in losses]
    summary = dict(written_by=COMMAND, complete=False, budget=dataclasses.asdict(plan), corpus=corpus,
                   seeds=list(seeds), losses=list(losses), runs=[str(r) for _, _, r in runs])
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")  # marks the folder as ours from the start
    started = time.time()
    # closed on any error too, so the error line is never glued to the bar; no bar when stderr is a file
    with tqdm(total=1 + 2 * len(runs) + 1, desc="reproduce", unit="stage", position=0,
              disable=not sys.stderr.isatty()) as stages:
        stages.set_postfix_str(f"data {corpus}")
        with _stage(f"data {corpus}"):
            if (data_dir / "manifest.json").exists():
                vocab_size = load_manifest(data_dir, verify=True).vocab_size
                if vocab_size != plan.vocab_size:
                    raise DataError(f"{data_dir} holds data with vocab {vocab_size}, but this budget uses "
                                    f"{plan.vocab_size}; choose another --out or delete {data_dir}")
                log.info("data: %s already prepared", data_dir)
            else:
                prepare_corpus([corpus], data_dir, vocab_size=plan.vocab_size, seed=0, cache_dir=cache_dir)
        stages.update()

        for loss, seed, run_dir in runs:
            stages.set_postfix_str(f"train {run_dir.name}")
            with _stage(f"train {run_dir}"):
                if RunFolder(run_dir).finished:
                    log.info("train: %s already finished", run_dir)
                else:
                    # resume from the last complete checkpoint; a run stopped before its first one starts afresh
                    # (train's overwrite removes only what train wrote, and refuses anything else)
                    resumable = bool(checkpoint_steps(RunFolder(run_dir).checkpoints))
                    train(train_config(plan, data_dir, run_dir, loss, seed, device), resume=resumable,
                          overwrite=run_dir.exists() and not resumable)
            stages.update()

        for _, _, run_dir in runs:
            stages.set_postfix_str(f"eval {run_dir.name}")
            with _stage(f"eval {run_dir}"):
                if RunFolder(run_dir).evaluated(benchmarks=bool(plan.tasks)):
                    log.info("eval: %s already evaluated", run_dir)
                else:
                    evaluate(run_dir, data_dir, max_tokens=plan.ppl_max_tokens, tasks=list(plan.tasks) or "none",
                             limit=plan.task_limit, num_fewshot=plan.num_fewshot, device=device, cache_dir=cache_dir)
            stages.update()

        stages.set_postfix_str("report")
        with _stage("report"):
            report = write_report([run_dir for _, _, run_dir in runs], out / "report")
        stages.update()
    summary.update(complete=True, report=str(report), seconds=round(time.time() - started, 1))
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mileloss reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="smoke", choices=sorted(BUDGETS),
                        help="how much work: tiny (minutes), smoke (default, ~15-20 min on 2 cores), long (hours)")
    parser.add_argument("--out", help="output folder (default reports/<budget>)")
    parser.add_argument("--corpus", default="shakespeare", help="named corpus or local path (default shakespeare)")
    parser.add_argument("--seeds", default="111", help="comma-separated training seeds (default 111, the paper's)")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of ce,focal,mile")
    parser.add_argument("--tasks", help="comma-separated benchmarks, or 'none' (default: the budget's)")
    parser.add_argument("--limit", type=int, help="documents per benchmark task (default: the budget's)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per run (default: the budget's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cache-dir", help="download cache for corpora and benchmarks")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    try:
        args.seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.tasks is not None:
        args.tasks = () if args.tasks == "none" else tuple(t for t in args.tasks.split(",") if t)
    return args


def run(args: argparse.Namespace) -> int:
    report = reproduce(args.out or f"reports/{args.budget}", budget=args.budget, corpus=args.corpus, seeds=args.seeds,
                       losses=tuple(args.losses.split(",")), tasks=args.tasks, task_limit=args.limit,
                       max_steps=args.max_steps, device=args.device, cache_dir=args.cache_dir)
    print(f"report: {report} (Markdown beside it: {report.with_suffix('.md')})")
    return 0
