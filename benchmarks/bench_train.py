"""Training throughput and peak memory of CE, focal and MiLe on the same model (not a test).

    python benchmarks/bench_train.py                       # tiny model, 2 CPU threads, 5 interleaved repeats
    python benchmarks/bench_train.py --preset small --device cuda --steps 30

Each measurement runs in a fresh subprocess (``--worker``) that builds the model, runs warm-up steps, then times
``--steps`` optimizer steps of ``mileloss.train.loop.train_step`` on random Zipf-distributed tokens. Repeats are
interleaved (ce, focal, mile, ce, focal, mile, ...) so machine drift hits every loss alike; the table gives the
median tokens/s and peak memory, with ratios to CE. Training memory is the growth of the process's peak
``ru_maxrss`` from just before the first step (model and optimizer built) to the end, on CPU;
``torch.cuda.max_memory_allocated`` minus the allocation before the first step on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

KINDS = ("ce", "focal", "mile")


class RandomTokens:
    """A loader stand-in: Zipf-distributed token windows (labels = next token), fixed seed."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, seed: int = 0):
        import torch

        ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
        self.probs = (1.0 / ranks) / (1.0 / ranks).sum()
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = (batch_size, seq_len + 1)

    def next_batch(self):
        import torch

        tokens = torch.multinomial(self.probs, self.shape[0] * self.shape[1], replacement=True,
                                   generator=self.generator).view(self.shape)
        return tokens[:, :-1], tokens[:, 1:]


def worker(args: argparse.Namespace) -> dict:
    import torch

    from mileloss.models import build_model
    from mileloss.train.config import TrainConfig, load_config
    from mileloss.train.distributed import DistributedContext, resolve_device
    from mileloss.train.loop import LanguageModelLoss, build_optimizer, train_step
    from mileloss.train.preflight import PreparedRun

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config: TrainConfig = load_config(None, [f"loss.kind={args.worker}", f"run.batch_size={args.batch_size}",
                                             f"run.seq_len={args.seq_len}", f"model.preset={args.preset}"])
    bf16 = device.type == "cuda"
    run = PreparedRun(config, None, None, device, 1, torch.bfloat16 if bf16 else None)
    torch.manual_seed(0)
    model = build_model(args.preset, args.vocab).to(device)
    wrapper = LanguageModelLoss(model, run.loss_kwargs, run.autocast_dtype)
    optimizer = build_optimizer(model, config, device)
    loader = RandomTokens(args.vocab, args.batch_size, args.seq_len)
    context = DistributedContext()

    def step():
        train_step(wrapper, loader, run, context)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # baseline: model, optimizer (state not yet allocated) and imports; the delta is what training adds
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mib = torch.cuda.memory_allocated() / 2**20
    else:
        base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": args.worker, "tokens_per_second": args.steps * args.batch_size * args.seq_len / elapsed,
            "peak_mib": peak_mib, "peak_delta_mib": peak_mib - base_mib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for repeat in range(args.repeats):
        for kind in KINDS:
            output = subprocess.run([sys.executable, __file__, *passthrough, "--worker", kind], check=True,
                                    capture_output=True, text=True).stdout
            results[kind].append(json.loads(output.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {kind}: {results[kind][-1]}", file=sys.stderr)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    ce_speed, ce_delta = median("ce", "tokens_per_second"), median("ce", "peak_delta_mib")
    memory = "CUDA max allocated" if args.device.startswith("cuda") else "max RSS"
    print(f"\n{args.preset} model, vocab {args.vocab}, batch {args.batch_size} x {args.seq_len}, device {args.device}, "
          f"{args.threads} threads, {args.steps} timed steps, median of {args.repeats} interleaved repeats\n")
    print(f"| loss | tokens/s | vs CE | training memory: {memory} delta (MiB) | vs CE | process peak (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        speed, delta = median(kind, "tokens_per_second"), median(kind, "peak_delta_mib")
        print(f"| {kind} | {speed:,.0f} | {speed / ce_speed:.3f}x | {delta:,.1f} | {delta / ce_delta:.3f}x | "
              f"{median(kind, 'peak_mib'):,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
