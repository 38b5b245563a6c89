"""One training step of the same Hugging Face Llama with HF's own loss vs ``apply_mileloss`` (not a test).

    python benchmarks/bench_hf.py                       # CPU: hidden 256, 4 x 256 tokens, vocab 32000 and 128256
    python benchmarks/bench_hf.py --device cuda         # GPU: bf16, hidden 1024, 8 x 1024 tokens, + Liger, CCE

Variants, each in a fresh subprocess (``--worker``; Liger-Kernel patches transformers' classes process-wide):
``hf`` (``LlamaForCausalLM(..., labels=labels).loss``: the (tokens, vocab) logits, upcast to fp32, then
cross-entropy), ``mileloss-ce`` and ``mileloss-mile`` (the same model after ``apply_mileloss``), and on CUDA
``liger`` (``apply_liger_kernel_to_llama`` with only ``fused_linear_cross_entropy`` on, so that the body is the same
as the others; "not installed" when ``liger_kernel`` cannot be imported) and ``cce`` (Cut Cross-Entropy's
``cce_patch(model)``, likewise). A step is forward + backward of the
loss (no optimizer). Each worker builds the model with the same seed and the same batch, runs ``--warmup`` steps,
then times ``--steps`` steps; the table gives the median step time, the peak memory of a step, their ratios to
``hf`` of the same vocabulary, and the loss (the CE variants must agree with ``hf``: a sanity check).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus the allocation just before the first step (the
model, its gradients after the warm-up, the batch); on CPU, in one more step after the timed ones, the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` just before it) minus the resident set then (the
model, its gradients, the batch), with glibc's mmap threshold fixed and its free memory trimmed first so that the
resident set follows the live tensors (the timed steps run with glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("hf", "mileloss-ce", "mileloss-mile", "liger", "cce")


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current resident set."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _cpu_step_peak(step) -> int:
    """The resident-set peak of one more step over the resident set before it, in bytes. glibc first gets a fixed
    mmap threshold (so every large freed block goes back to the OS at once: the resident set then follows the live
    tensors; its default, growing threshold keeps freed logits) and trims what the timed steps left free. Done
    after the timing, which ran with glibc's defaults."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def worker(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.worker == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as error:
            return {"variant": args.worker, "vocab": args.vocab, "skipped": f"not installed ({error})"}
        # only the fused linear cross-entropy: the body (RoPE, RMSNorm, SwiGLU) stays HF's, as for the others
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=args.seq_len,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:  # initialised where it runs (a 128256 x 1024 head takes seconds to initialise on a CPU)
        model = transformers.LlamaForCausalLM(config).to(dtype=dtype).train()
    if args.worker == "cce":
        try:
            from cut_cross_entropy.transformers import cce_patch
        except ImportError as error:
            return {"variant": args.worker, "vocab": args.vocab, "skipped": f"not installed ({error})"}
        model = cce_patch(model)  # Cut Cross-Entropy's patch of this instance, its default kernel, mean
    if args.worker.startswith("mileloss-"):
        from mileloss.integrations import apply_mileloss

        apply_mileloss(model, loss=args.worker.split("-", 1)[1], gamma=1.0, sigma=1.0)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    labels = input_ids.clone()

    def step() -> float:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return float(loss)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times, loss = [], None
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_step_peak(step)
    return {"variant": args.worker, "vocab": args.vocab, "ms": 1000 * statistics.median(times),
            "peak_mib": peak / 2**20, "loss": loss, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else f"cpu, {args.threads} threads", "torch": torch.__version__,
            "transformers": transformers.__version__}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 8 on CUDA")
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 1024 on CUDA")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget in seconds (default 110 on CUDA, none on CPU): no worker starts "
                             "after it, a running one is stopped at it, and its row says so")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device.startswith("cuda")
    args.hidden = args.hidden or (1024 if cuda else 256)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.seq_len = args.seq_len or (1024 if cuda else 256)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.budget_s is None:
        args.budget_s = 110.0 if cuda else float("inf")
    return args


def table(rows: list[dict]) -> str:
    lines = ["| vocab | variant | step ms | time vs hf | peak MiB | memory vs hf | loss |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for vocab in dict.fromkeys(row["vocab"] for row in rows):
        base = next((r for r in rows if r["vocab"] == vocab and r["variant"] == "hf" and "ms" in r), None)
        for row in (r for r in rows if r["vocab"] == vocab):
            if "skipped" in row:
                lines.append(f"| {vocab} | {row['variant']} | {row['skipped']} | | | | |")
                continue
            time_ratio = f"{row['ms'] / base['ms']:.2f}" if base else "-"
            memory_ratio = f"{row['peak_mib'] / base['peak_mib']:.2f}" if base and base["peak_mib"] > 0 else "-"
            lines.append(f"| {vocab} | {row['variant']} | {row['ms']:.0f} | {time_ratio} | {row['peak_mib']:.0f} | "
                         f"{memory_ratio} | {row['loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _defaults(_parser().parse_args(argv))
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = VARIANTS if args.device.startswith("cuda") else VARIANTS[:3]
    rows, start = [], time.monotonic()
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for variant in variants:
            left = args.budget_s - (time.monotonic() - start)
            if left <= 0:
                rows.append({"variant": variant, "vocab": vocab, "skipped": f"not run (--budget-s {args.budget_s:g})"})
                continue
            command = [sys.executable, __file__, "--worker", variant, "--vocab", str(vocab), "--device", args.device,
                       "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch-size",
                       str(args.batch_size), "--seq-len", str(args.seq_len), "--dtype", args.dtype, "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            try:
                done = subprocess.run(command, capture_output=True, text=True,
                                      timeout=None if left == float("inf") else left)
            except subprocess.TimeoutExpired:
                rows.append({"variant": variant, "vocab": vocab, "skipped": f"stopped (--budget-s {args.budget_s:g})"})
                continue
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"variant": variant, "vocab": vocab, "skipped": f"failed (exit {done.returncode})"})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    first = next((r for r in rows if "device" in r), {})
    print(f"# {first.get('device')}, torch {first.get('torch')}, transformers {first.get('transformers')}; "
          f"Llama hidden {args.hidden}, {args.layers} layers, {args.batch_size} x {args.seq_len} tokens, "
          f"{args.dtype}, median of {args.steps} steps after {args.warmup} warm-up; "
          f"{time.monotonic() - start:.0f} s in all")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
