"""Train the paper's 468M preset for a few steps with FSDP2 in bf16 on one GPU: tokens/s and MFU (not a test).

    python benchmarks/gpu_fsdp.py --device cuda --out results.json      # 468M, vocab 32000, ~1-2 minutes on an H100
    python benchmarks/gpu_fsdp.py --device cuda --compile               # the same with torch.compile on the body
    python benchmarks/gpu_fsdp.py --device cpu --small                  # tiny preset on CPU: checks the script

The training code path is ``mileloss train``'s with ``run.parallel=fsdp``: the model is built on the meta device,
sharded with ``mileloss.train.distributed.shard_model`` (one FSDP2 unit per decoder layer + the root, bf16
``param_dtype`` with fp32 gradient reduction on CUDA), materialised with ``mileloss.models.materialize_model``,
then each step is ``mileloss.train.loop.train_step`` (fused MiLe loss from the hidden states) +
``clip_gradients`` + AdamW (fused on CUDA) + the warmup/cosine schedule. ``mileloss train`` itself runs a single
process without FSDP, so this script starts a 1-rank process group in-process (a ``HashStore``: no port, no
torchrun). The tokens are random (Zipf-distributed over the vocabulary, fixed seed): no data download.

It reports the median step time over the timed steps, tokens/s, and the model FLOPs utilisation
``MFU = 6 N tokens/s / peak`` with N the parameter count and ``peak`` = 989e12 FLOP/s (H100 SXM, bf16 dense
Tensor Core, NVIDIA's datasheet; the H200 has the same; override with ``--peak-flops``), plus the CUDA peak
memory next to the ``--dry-run`` plan's FSDP estimate for the same micro-batch (``mileloss.train.plan``).
A wall-clock ``--budget`` (default 150 s, including model build and compilation) stops the timed loop early
and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

H100_BF16_DENSE_FLOPS = 989e12


class ZipfTokens:
    """A loader stand-in: Zipf-distributed token windows (labels = next token), on the training device."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, device, seed: int = 0):
        import torch

        ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
        self.probs = ((1.0 / ranks) / (1.0 / ranks).sum()).float().to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shape = (batch_size, seq_len + 1)

    def next_batch(self):
        import torch

        tokens = torch.multinomial(self.probs, self.shape[0] * self.shape[1], replacement=True,
                                   generator=self.generator).view(self.shape)
        return tokens[:, :-1], tokens[:, 1:]


def _init_one_rank_group(backend: str) -> None:
    """A 1-rank process group in this process: an in-memory store, or a TCP store on a free local port if the
    backend refuses the in-memory one."""
    import socket

    import torch.distributed as dist

    try:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    except (RuntimeError, ValueError) as error:
        print(f"gpu_fsdp: {backend} with an in-memory store failed ({error}); using a local TCP store",
              file=sys.stderr)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from mileloss.models import build_model, count_parameters, materialize_model
    from mileloss.train.config import load_config
    from mileloss.train.distributed import DistributedContext, clip_gradients, resolve_device, shard_model
    from mileloss.train.loop import LanguageModelLoss, build_optimizer, train_step
    from mileloss.train.plan import ModelShape, memory_per_rank
    from mileloss.train.preflight import PreparedRun, resolve_schedule
    from mileloss.train.schedule import build_scheduler

    started = time.perf_counter()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = cuda and not args.fp32
    config = load_config(args.preset, [
        f"model.vocab_size={args.vocab}", f"run.batch_size={args.batch_size}", f"run.seq_len={args.seq_len}",
        "run.tokens_per_step=null", "run.grad_accum_steps=1", "run.parallel=fsdp", "run.checkpoint_every=0",
        f"run.dtype={'bf16' if bf16 else 'fp32'}", f"run.compile={'true' if args.compile else 'false'}",
        f"run.max_steps={args.warmup + args.steps}", "optim.warmup_steps=2", "loss.kind=mile"])
    config = resolve_schedule(config, 1)
    run_info = PreparedRun(config, None, None, device, 1, torch.bfloat16 if bf16 else None)

    _init_one_rank_group("nccl" if cuda else "gloo")
    try:
        context = DistributedContext(0, 1, 0)
        torch.manual_seed(config.run.seed)
        with torch.device("meta"):
            model = build_model(args.preset, vocab_size=args.vocab,
                                max_position_embeddings=max(args.seq_len, 2))
        loss_module = LanguageModelLoss(model, run_info.loss_kwargs, run_info.autocast_dtype)
        shard_model(loss_module, context, device, True, run_info.autocast_dtype)
        materialize_model(model, config.run.seed, device)
        parameters = count_parameters(model)
        from torch.distributed.tensor import DTensor

        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        if not sharded:
            raise RuntimeError("gpu_fsdp: the model's parameters are not FSDP2 DTensors after shard_model")
        optimizer = build_optimizer(model, config, device)
        scheduler = build_scheduler(optimizer, warmup_steps=config.optim.warmup_steps,
                                    total_steps=config.run.max_steps, min_lr_ratio=config.optim.min_lr_ratio)
        if args.compile:
            model.model.compile()
        loader = ZipfTokens(args.vocab, args.batch_size, args.seq_len, device)

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        def step() -> tuple[float, float]:
            sync()
            start = time.perf_counter()
            loss = train_step(loss_module, loader, run_info, context)
            clip_gradients(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss)  # synchronises
            sync()
            return time.perf_counter() - start, value

        build_seconds = time.perf_counter() - started
        losses, warmup_times = [], []
        for _ in range(args.warmup):
            seconds, value = step()
            warmup_times.append(seconds)
            losses.append(value)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, stopped_early = [], False
        for _ in range(args.steps):
            if times and time.perf_counter() - started + statistics.median(times) > args.budget:
                stopped_early = True
                break
            seconds, value = step()
            times.append(seconds)
            losses.append(value)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    finally:
        dist.destroy_process_group()

    tokens_per_step = args.batch_size * args.seq_len
    step_seconds = statistics.median(times)
    tokens_per_second = tokens_per_step / step_seconds
    shape = ModelShape.of_preset(args.preset, args.vocab)
    planned = memory_per_rank(shape, "fsdp", 1, micro_batch=args.batch_size, seq_len=args.seq_len, bf16=bf16,
                              checkpointing=config.model.gradient_checkpointing)
    return {
        "preset": args.preset, "parameters": parameters, "vocab": args.vocab, "device": device_name,
        "dtype": "bf16" if bf16 else "fp32", "compile": args.compile, "micro_batch": args.batch_size,
        "seq_len": args.seq_len, "tokens_per_step": tokens_per_step, "warmup_steps": args.warmup,
        "timed_steps": len(times), "stopped_early_by_budget": stopped_early, "build_seconds": build_seconds,
        "warmup_seconds": warmup_times, "step_seconds_median": step_seconds, "step_seconds": times,
        "tokens_per_second": tokens_per_second, "peak_flops": args.peak_flops,
        "mfu": 6 * parameters * tokens_per_second / args.peak_flops, "losses": losses,
        "cuda_max_memory_allocated": peak, "planned_fsdp_bytes": planned.total,
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--preset", default="468M")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (no accumulation)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (allocator, autotuning, compile)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer body")
    parser.add_argument("--fp32", action="store_true", help="no bf16 on CUDA")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE_FLOPS,
                        help="the device's peak FLOP/s for MFU (default 989e12: H100 SXM bf16 dense)")
    parser.add_argument("--budget", type=float, default=150.0, help="wall-clock seconds for the whole script")
    parser.add_argument("--small", action="store_true", help="tiny preset, vocab 512, batch 4 x 64, 2 + 3 steps")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file (a new file)")
    args = parser.parse_args(argv)
    if args.small:
        args.preset, args.vocab, args.batch_size, args.seq_len, args.warmup, args.steps = "tiny", 512, 4, 64, 2, 3
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; name a new file")
    for name in ("batch_size", "seq_len", "steps", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    result = run(args)
    gib = 2**30
    print(f"{result['preset']} ({result['parameters']:,} parameters, vocab {result['vocab']}) on {result['device']}, "
          f"FSDP2 1 rank, {result['dtype']}, compile {'on' if result['compile'] else 'off'}, micro-batch "
          f"{result['micro_batch']} x {result['seq_len']}")
    warmup = ", ".join(f"{t:.2f}" for t in result["warmup_seconds"])
    stopped = " (stopped by --budget)" if result["stopped_early_by_budget"] else ""
    print(f"build {result['build_seconds']:.1f} s; warm-up steps {warmup} s; {result['timed_steps']} timed steps"
          f"{stopped}")
    print(f"median step {result['step_seconds_median'] * 1000:.1f} ms; {result['tokens_per_second']:,.0f} tokens/s; "
          f"MFU {result['mfu']:.1%} (6 N tokens/s / {result['peak_flops']:.3g} FLOP/s)")
    if result["cuda_max_memory_allocated"] is not None:
        print(f"CUDA peak allocated {result['cuda_max_memory_allocated'] / gib:.2f} GiB; --dry-run plan (fsdp, 1 rank) "
              f"{result['planned_fsdp_bytes'] / gib:.2f} GiB")
    losses = result["losses"]
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; total {result['total_seconds']:.1f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
