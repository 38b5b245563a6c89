"""Per-rank memory and step time of DDP against FSDP2 with 2 gloo ranks on CPU (not a test).

    python benchmarks/bench_scale.py                          # 'small' shape, vocab 32000: 58.1M parameters
    python benchmarks/bench_scale.py --repeats 3 --steps 4
    python benchmarks/bench_scale.py --small                  # tiny preset, seconds: checks the script runs

Each (mode, repeat) is a fresh ``torchrun --standalone --nproc_per_node 2`` launch of this file with ``--worker
MODE``; repeats alternate ddp, fsdp, ddp, fsdp, ... so machine drift hits both alike, and the table gives medians.
A worker builds the model the way ``mileloss train`` does (``run.parallel=ddp``: ``build_model`` + DDP;
``run.parallel=fsdp``: meta device, ``shard_model``, ``materialize_model``), then runs ``--warmup`` and ``--steps``
timed optimizer steps of ``mileloss.train.loop.train_step`` (MiLe loss, fp32) + clipping + AdamW on random
tokens, one torch thread per rank. It reports, per rank:

* model state: the bytes of this rank's parameters, gradients (measured after backward, before the optimizer
  step) and AdamW state (after the step), counting a sharded ``DTensor`` by its local shard;
* resident model state: the process's current RSS (``/proc/self/statm``) right after the optimizer step, before
  the gradients are freed (parameters, gradients, AdamW state and DDP's buckets are live, the activations are
  not), minus the RSS just after the process group started; the largest value over the timed steps. The
  workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless the environment sets it): glibc's adaptive threshold
  would otherwise keep the freed activations' memory resident, and RSS would count it as model state;
* peak RSS: the process's ``ru_maxrss`` at the end (activations included), and its growth from the same start;
* step time: the median wall time of the timed steps.

The issue's targets: model state under FSDP <= 0.6x DDP's, FSDP step time within 1.3x DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("ddp", "fsdp")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RandomTokens:
    """A loader stand-in: uniform random token windows, a different stream per rank."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, seed: int):
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.vocab, self.shape = vocab, (batch_size, seq_len + 1)

    def next_batch(self):
        import torch

        tokens = torch.randint(0, self.vocab, self.shape, generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]


def _tensor_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mileloss.models import build_model, count_parameters, materialize_model
    from mileloss.train.config import load_config
    from mileloss.train.distributed import DistributedContext, clip_gradients, shard_model
    from mileloss.train.loop import LanguageModelLoss, build_optimizer, train_step
    from mileloss.train.preflight import PreparedRun

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    context, device = DistributedContext(rank, world, rank), torch.device("cpu")
    base_rss, base_current = _rss_mib(), _current_rss_mib()
    config = load_config(None, [f"model.preset={args.preset}", f"run.batch_size={args.batch_size}",
                                f"run.seq_len={args.seq_len}", "run.grad_accum_steps=1", "loss.kind=mile",
                                f"run.parallel={args.worker}", "run.checkpoint_every=0"])
    run = PreparedRun(config, None, None, device, world, None)
    torch.manual_seed(0)
    if args.worker == "fsdp":
        with torch.device("meta"):
            model = build_model(args.preset, args.vocab)
        wrapper = LanguageModelLoss(model, run.loss_kwargs)
        shard_model(wrapper, context, device, True, None)
        materialize_model(model, 0, device)
        wrapped = wrapper
    else:
        model = build_model(args.preset, args.vocab)
        wrapper = LanguageModelLoss(model, run.loss_kwargs)
        wrapped = DistributedDataParallel(wrapper)
    parameter_count = count_parameters(model)
    optimizer = build_optimizer(model, config, device)
    loader = RandomTokens(args.vocab, args.batch_size, args.seq_len, seed=rank)
    sizes = {"parameters": 0, "gradients": 0, "optimizer": 0}
    resident = []

    def step() -> float:
        start = time.perf_counter()
        train_step(wrapped, loader, run, context)
        clip_gradients(model.parameters(), 1.0)
        sizes["gradients"] = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer.step()
        elapsed = time.perf_counter() - start
        resident.append(_current_rss_mib() - base_current)  # gradients still held: model state at its largest
        optimizer.zero_grad(set_to_none=True)
        sizes["parameters"] = sum(_tensor_bytes(p) for p in model.parameters())
        sizes["optimizer"] = sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                                 if isinstance(v, torch.Tensor))
        return elapsed

    for _ in range(args.warmup):
        step()
    dist.barrier()
    resident.clear()
    times = [step() for _ in range(args.steps)]
    times = [float(t) for t in times]
    peak = _rss_mib()
    dist.destroy_process_group()
    return {"mode": args.worker, "rank": rank, "world_size": world, "parameter_count": parameter_count, **sizes,
            "model_state": sum(sizes.values()), "step_seconds": statistics.median(times),
            "peak_rss_mib": peak, "rss_growth_mib": peak - base_rss, "resident_state_mib": max(resident)}


def launch(mode: str, args: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    """One torchrun launch of 2 ranks; each rank writes its result to its own file (their stdout interleaves)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   *passthrough, "--worker", mode, "--result-dir", folder]
        # a fixed mmap threshold: tensors above 128 KiB get their own mappings, returned to the system when freed;
        # glibc's adaptive default would keep freed activation memory resident and RSS would count it as state
        env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "OMP_NUM_THREADS": str(args.threads)}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        if result.returncode != 0:
            raise SystemExit(f"bench_scale: the {mode} launch failed:\n{result.stderr[-3000:]}")
        rows = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank*.json"))]
    if sorted(row["rank"] for row in rows) != [0, 1]:
        raise SystemExit(f"bench_scale: expected one result per rank from the {mode} launch, got {rows}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per launch")
    parser.add_argument("--small", action="store_true", help="tiny preset, vocab 512, batch 2 x 32: a quick check")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.preset, args.vocab, args.batch_size, args.seq_len, args.repeats = "tiny", 512, 2, 32, 1
    if args.worker:
        result = worker(args)
        (args.result_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0

    passthrough = ["--preset", args.preset, "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            rows = launch(mode, args, passthrough)
            results[mode].extend(rows)
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: " + "; ".join(
                f"rank {r['rank']} state {r['model_state'] / 2**20:,.1f} MiB, peak RSS {r['peak_rss_mib']:,.0f} MiB, "
                f"step {r['step_seconds']:.2f} s" for r in sorted(rows, key=lambda r: r["rank"])), file=sys.stderr)

    def median(mode: str, key: str) -> float:
        return statistics.median(row[key] for row in results[mode])

    def worst(mode: str, key: str) -> float:
        return max(row[key] for row in results[mode])

    parameters = results["ddp"][0]["parameter_count"]
    print(f"\n{args.preset} shape, vocab {args.vocab}: {parameters:,} parameters; 2 gloo ranks on CPU, "
          f"{args.threads} thread(s) each, micro-batch {args.batch_size} x {args.seq_len}, MiLe loss, fp32 AdamW; "
          f"median over {args.repeats} launch(es) x 2 ranks, {args.steps} timed step(s) each after {args.warmup} "
          f"warm-up\n")
    print("| per rank | parameters (MiB) | gradients (MiB) | AdamW state (MiB) | model state: tensors (MiB) | "
          "model state: RSS (MiB) | peak RSS (MiB) | peak RSS growth (MiB) | step time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        print(f"| {mode} | {median(mode, 'parameters') / 2**20:,.1f} | {median(mode, 'gradients') / 2**20:,.1f} | "
              f"{median(mode, 'optimizer') / 2**20:,.1f} | {median(mode, 'model_state') / 2**20:,.1f} | "
              f"{median(mode, 'resident_state_mib'):,.0f} | {median(mode, 'peak_rss_mib'):,.0f} | "
              f"{median(mode, 'rss_growth_mib'):,.0f} | {median(mode, 'step_seconds'):.2f} |")
    from mileloss.train.plan import ModelShape, memory_per_rank

    shape = ModelShape.of_preset(args.preset, args.vocab)
    planned = {mode: memory_per_rank(shape, mode, 2, micro_batch=args.batch_size, seq_len=args.seq_len, bf16=False,
                                     checkpointing=False).model_state / 2**20 for mode in MODES}
    print(f"\nthe --dry-run plan (mileloss.train.plan) for the same shape and 2 ranks: model state per rank "
          f"ddp {planned['ddp']:,.1f} MiB, fsdp {planned['fsdp']:,.1f} MiB")
    state = worst("fsdp", "model_state") / median("ddp", "model_state")
    resident_ratio = worst("fsdp", "resident_state_mib") / median("ddp", "resident_state_mib")
    rss = median("fsdp", "rss_growth_mib") / median("ddp", "rss_growth_mib")
    speed = median("fsdp", "step_seconds") / median("ddp", "step_seconds")
    checks = [("model state per rank, fsdp (largest rank) / ddp", state, 0.6),
              ("resident model state (RSS) per rank, fsdp (largest rank) / ddp", resident_ratio, 0.6),
              ("step time, fsdp / ddp", speed, 1.3)]
    print(f"\npeak RSS growth fsdp / ddp: {rss:.2f}x (activations included, the same in both: reported, no target)")
    failed = False
    for label, value, limit in checks:
        verdict = "pass" if value <= limit else "FAIL"
        failed |= value > limit
        print(f"{label}: {value:.2f}x (target <= {limit}x): {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
