"""Per-seed (paired) perplexity change of focal and MiLe against CE, per frequency bucket.

    python scripts/paired_deltas.py reports/results-shakespeare 111,112

Reads RUN_DIR/eval/perplexity.json of the runs ``<corpus>-<loss>-s<seed>`` under ``OUT/runs`` (the layout of
``mileloss reproduce``). Runs with the same seed share initialisation and data order, so the paired change is
less noisy than the difference of seed means.
"""

import json
import sys
from pathlib import Path


def bucket_perplexities(run_dir: Path) -> dict[str, float]:
    result = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    return {b["label"].split()[0]: b["ppl"] for b in result["buckets"]} | {"overall": result["overall"]["ppl"]}


def main(out: str, seeds: str) -> None:
    root = Path(out)
    for seed in seeds.split(","):
        ppl = {loss: bucket_perplexities(next(root.glob(f"runs/*-{loss}-s{seed}"))) for loss in ("ce", "focal", "mile")}
        for loss in ("focal", "mile"):
            changes = "  ".join(f"{k} {100 * (ppl[loss][k] / ppl['ce'][k] - 1):+.2f}%" for k in ppl["ce"])
            print(f"seed {seed} {loss:5s} vs ce: {changes}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
