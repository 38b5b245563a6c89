"""``mileloss <verb>``: dispatch, logging and one error policy for every verb.

Each verb's module exposes ``build_parser()`` and ``run(args) -> int`` (and may expose ``parse(parser, argv)``);
it raises, and this module turns what it raised into an exit status and one line on stderr.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import sys

EXIT_CODES = """exit status:
  0    success
  1    the run failed: an I/O error (disk full, permission denied, a file gone) or out of memory;
       what was written is complete, and running the same command again continues or retries
  2    something you must fix: a wrong option, config key, input file or folder (one line says which)
  130  interrupted (Ctrl-C); files already written are complete
  Errors are one line, `mileloss <verb>: error: <message>`; anything else prints a traceback (a bug: report it)."""


Verb = collections.namedtuple("Verb", "module help again smaller", defaults=(
    "run the same command again", "use a smaller model or batch"))
"""A verb's module, its help line, what to do after an interruption or I/O error, and after running out of memory."""

VERBS = {
    "data": Verb("mileloss.data.cli", "prepare a corpus: tokenizer, token shards, manifest",
                 "--out is as it was; run the same command again"),
    "train": Verb("mileloss.train.cli", "pretrain a LLaMA-style model with CE, focal or MiLe loss",
                  "checkpoints written so far are complete: continue with --resume",
                  "reduce run.batch_size, run.seq_len or the model size"),
    "export": Verb("mileloss.train.export_cli", "a training checkpoint (any kind) as a save_pretrained folder",
                   "--out is absent or complete: run the same command again"),
    "eval": Verb("mileloss.eval.cli", "frequency-bucket perplexity and downstream benchmarks",
                 "files already written are complete, nothing is half-written", "reduce --batch-size or --seq-len"),
    "report": Verb("mileloss.report.cli", "Markdown/HTML report with plots comparing runs",
                   "run it again to write the whole report"),
    "reproduce": Verb("mileloss.reproduce", "data + CE/focal/MiLe training + eval + report, end to end",
                      "run the same command again to resume where it stopped",
                      "use a smaller --budget or --device cpu"),
}

VERB_FEATURES = {"data": "train", "train": "train", "export": "train", "eval": "train", "report": "report",
                 "reproduce": "train"}
"""The extra of ``mileloss[...]`` each verb needs (``mileloss.dependencies``); benchmarks are checked by eval and
reproduce once they know whether any task will run."""


def _usage() -> str:
    lines = ["usage: mileloss [--version] <verb> [args...]", "", "verbs:"]
    lines += [f"  {name:<10} {verb.help}" for name, verb in VERBS.items()]
    lines += ["", "Run `mileloss <verb> --help` for the verb's options.", "", EXIT_CODES]
    return "\n".join(lines)


def _env_int(name: str, default: int) -> int:
    """An integer environment variable set by torchrun; a value that is not one counts as unset (the trainer's own
    checks name the bad variable; this is only for log levels and message prefixes)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def setup_logging(quiet: bool = False, verbose: int = 0) -> None:
    """One format for every verb: INFO by default, WARNING with --quiet (and on DDP ranks > 0), DEBUG with -v."""
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or _env_int("RANK", 0) != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _failure(error: BaseException, verb: Verb) -> tuple[int, str] | None:
    """``(exit status, message)`` for an error of the policy in :data:`EXIT_CODES`; None for a bug."""
    from mileloss.errors import MileLossError, StageError

    cause = error.__cause__ if isinstance(error, StageError) else None
    if isinstance(error, OSError) or isinstance(cause, OSError):
        where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
        return 1, f"{getattr(error, 'strerror', None) or error}{where}; {verb.again}"
    if isinstance(error, MileLossError):
        return 2, str(error)
    if isinstance(error, ModuleNotFoundError):
        return 2, f"{error}; install the missing package"
    torch_oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", MemoryError)
    if isinstance(error, (MemoryError, torch_oom)) or (isinstance(error, RuntimeError) and "DefaultCPUAllocator" in
                                                        str(error)):
        return 1, f"out of memory ({' '.join(str(error).split())[:300]}): {verb.smaller}"
    return None


def run_verb(name: str, argv: list[str]) -> int:
    """Parse ``argv`` with the verb's parser, set up logging, run it, and apply the error policy."""
    verb = VERBS[name]
    from mileloss.dependencies import require
    from mileloss.errors import MileLossError

    try:
        require(VERB_FEATURES[name])  # every package the verb needs, before its module imports them
    except MileLossError as error:
        print(f"mileloss {name}: error: {error}", file=sys.stderr)
        return 2
    module = importlib.import_module(verb.module)
    parser = module.build_parser()
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log debug messages too")
    parser.epilog = f"{parser.epilog}\n\n{EXIT_CODES}" if parser.epilog else EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # argparse raises SystemExit itself: 0 after --help, 2 after a usage error (its message already printed)
    args = module.parse(parser, argv) if hasattr(module, "parse") else parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    rank = f"[rank {os.environ.get('RANK', '?')}] " if _env_int("WORLD_SIZE", 1) > 1 else ""
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"mileloss {name}: {rank}interrupted; {verb.again}", file=sys.stderr)
        return 130
    except Exception as error:
        failure = _failure(error, verb)
        if failure is None:
            raise  # a bug: keep the traceback
        print(f"mileloss {name}: error: {rank}{failure[1]}", file=sys.stderr)  # on every rank
        return failure[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mileloss import __version__

        print(f"mileloss {__version__}")
        return 0
    if argv[0] not in VERBS:
        print(f"mileloss: unknown verb {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_verb(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
