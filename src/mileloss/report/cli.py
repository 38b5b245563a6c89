"""``mileloss report RUN_DIR... --out REPORT_DIR``: a Markdown + HTML comparison of training runs.

    mileloss report runs/ce runs/focal runs/mile --out reports/compare    # -> reports/compare/report.html
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mileloss report",
        description="Compare runs side by side (losses, per-bucket perplexity with deltas vs CE, benchmarks) "
                    "and write report.md, a self-contained report.html and PNG figures.",
    )
    parser.add_argument("runs", nargs="+", help="run folders written by `mileloss train` (and `mileloss eval`)")
    parser.add_argument("--out", required=True,
                        help="output folder for report.md, report.html and *.png: a new or empty folder, or an "
                             "earlier report's (replaced); a folder of other files is refused")
    parser.add_argument("--allow-mixed-data", action="store_true",
                        help="report runs trained or evaluated on different data (corpus, tokenizer, vocabulary, "
                             "token shards) anyway, under a warning at the top; by default that is an error")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples of the paired bootstrap behind the 95%% intervals vs CE (over seed pairs and "
                             "held-out blocks; needs eval/blocks.npz, written by mileloss eval); 0 = no intervals "
                             "(default: %(default)s)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                        help="random seed of the bootstrap: the same runs and seed give the same intervals "
                             "(default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
    from mileloss.report.render import write_report

    report = write_report(args.runs, args.out, allow_mixed_data=args.allow_mixed_data, bootstrap=args.bootstrap,
                          bootstrap_seed=args.bootstrap_seed)
    markdown = report.parent.joinpath("report.md").read_text().splitlines()
    print(next(line for line in markdown if line.startswith("**Verdict:**")))
    if "**Paired change vs CE (95 % CI):**" in markdown:
        start = markdown.index("**Paired change vs CE (95 % CI):**") + 2
        for line in markdown[start:]:
            if not line.startswith("- "):
                break
            print(line[2:])
    print(f"wrote {report} and {report.parent / 'report.md'}")
    return 0
