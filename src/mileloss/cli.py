"""``mileloss`` command line: one verb, one library entry point.

Each verb lives in its own module and exposes ``main(argv: list[str]) -> int``; this file only
dispatches, importing the verb's module lazily so that ``mileloss --help`` stays fast and the loss
library never pulls in transformers.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module with a ``main(argv)``, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("mileloss.data.cli", "prepare a corpus: tokenizer, token shards, manifest"),
    "train": ("mileloss.train.cli", "pretrain a LLaMA-style model with CE, focal or MiLe loss"),
    "eval": ("mileloss.eval.cli", "frequency-bucket perplexity and downstream benchmarks"),
    "report": ("mileloss.report.cli", "Markdown/HTML report with plots comparing runs"),
    "reproduce": ("mileloss.reproduce", "data + CE/focal/MiLe training + eval + report, end to end"),
}


def _usage() -> str:
    lines = ["usage: mileloss [--version] <verb> [args...]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_text}" for verb, (_, help_text) in VERBS.items()]
    lines += ["", "Run `mileloss <verb> --help` for the verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mileloss import __version__

        print(f"mileloss {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"mileloss: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
