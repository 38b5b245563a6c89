"""Loss engine on a CUDA GPU: correctness against float64, then forward+backward time and peak memory as ratios.

    python benchmarks/bench_cuda.py                    # needs a CUDA device; ~2 min on one H100
    python benchmarks/bench_cuda.py --quick            # small shapes
    python benchmarks/bench_cuda.py --json out.json    # raw rows

The CPU protocol is bench_loss.py; this is its GPU counterpart for the fused path (hidden states and the LM
head in, a scalar loss out), where the (N, V) logits are the memory that matters.
* Gate first: every variant runs in float32 on the first 512 rows and its loss and gradients are compared
  with bench_loss.py's float64 oracle (``oracle_loss``); a variant that fails is reported, not timed.
* Time: CUDA events around one forward+backward, 3 warm-ups, then R repetitions with the variants
  interleaved (ABC ABC ...), median. Ratios are to variant ``d`` (linear + F.cross_entropy on fp32 logits,
  what a Hugging Face model computes) measured in the same run.
* Peak memory: torch.cuda.max_memory_allocated during one forward+backward minus the memory allocated
  before it (inputs and their gradients' storage excluded): every temporary the loss creates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mileloss
from bench_loss import oracle_loss  # the float64 oracle, written independently of mileloss

GATE_ROWS = 512


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[::17] = -100
    hidden = torch.randn(n, d, generator=generator)
    weight = torch.randn(v, d, generator=generator) / d**0.5 * 2.0
    return dict(hidden=hidden.to(device, dtype), weight=weight.to(device, dtype), targets=targets.to(device))


def _linear_ce(x):
    return F.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=-100)


# name -> (label, what the oracle computes, function of the leaves)
VARIANTS = {
    "d": ("linear + F.cross_entropy (fp32 logits)", "ce",
          lambda x: F.cross_entropy((x["hidden"] @ x["weight"].T).float(), x["targets"])),
    "p": ("F.linear_cross_entropy (PyTorch's fused op)", "ce", _linear_ce),
    "e0": ("mileloss.linear_cross_entropy_loss", "ce",
           lambda x: mileloss.linear_cross_entropy_loss(x["hidden"], x["weight"], x["targets"])),
    "e": ("mileloss.linear_mile_loss", "mile",
          lambda x: mileloss.linear_mile_loss(x["hidden"], x["weight"], x["targets"])),
}


def available(name: str) -> bool:
    return name != "p" or hasattr(F, "linear_cross_entropy")


def leaves(inputs: dict) -> dict:
    return {k: (t.detach().clone().requires_grad_() if t.is_floating_point() else t) for k, t in inputs.items()}


def forward_backward(fn, x: dict) -> torch.Tensor:
    for t in x.values():
        t.grad = None
    loss = fn(x)
    loss.backward()
    return loss


def gate(name: str, inputs: dict) -> tuple[bool, str]:
    """float32 on the first GATE_ROWS rows against the float64 oracle; loss and both gradients."""
    _, what, fn = VARIANTS[name]
    sub = {k: (t[:GATE_ROWS] if k != "weight" else t) for k, t in inputs.items()}
    x32 = leaves({k: (t.float() if t.is_floating_point() else t) for k, t in sub.items()})
    loss32 = forward_backward(fn, x32)
    x64 = leaves({k: (t.double() if t.is_floating_point() else t) for k, t in sub.items()})
    loss64 = oracle_loss(what, x64["hidden"] @ x64["weight"].T, x64["targets"])
    loss64.backward()
    worst = abs(loss32.item() - loss64.item()) / abs(loss64.item())
    for key in ("hidden", "weight"):
        error = (x32[key].grad.double() - x64[key].grad).abs().max() / x64[key].grad.abs().max()
        worst = max(worst, float(error))
    return worst < 1e-4, f"max relative error {worst:.1e}"


def timed_ms(fn, x: dict) -> float:
    if not x["hidden"].is_cuda:  # --device cpu: a smoke run of this script, not a measurement
        start = time.perf_counter()
        forward_backward(fn, x)
        return (time.perf_counter() - start) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward_backward(fn, x)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def peak_mib(fn, x: dict) -> float:
    if not x["hidden"].is_cuda:
        return float("nan")
    for t in x.values():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(fn, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_and_memory(names: list[str], inputs: dict, repeats: int) -> dict[str, dict]:
    xs = {name: leaves(inputs) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats + 3):
        for name in names if rep % 2 == 0 else names[::-1]:
            elapsed = timed_ms(VARIANTS[name][2], xs[name])
            if rep >= 3:
                times[name].append(elapsed)
    return {name: dict(ms=statistics.median(times[name]), peak_mib=peak_mib(VARIANTS[name][2], xs[name]))
            for name in names}


def compiled_model_check(device: str) -> str:
    """A small model around the fused MiLe loss under torch.compile (inductor): one step, finite, equal to eager."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(512, 64).to(device)
    head = torch.nn.Linear(64, 512, bias=False).to(device)

    def step(ids, labels):
        hidden = torch.tanh(embed(ids)).reshape(-1, 64)
        return mileloss.linear_mile_loss(hidden, head.weight, labels.reshape(-1))

    ids = torch.randint(0, 512, (4, 128), device=device)
    labels = torch.randint(0, 512, (4, 128), device=device)
    eager = step(ids, labels)
    compiled = torch.compile(step)(ids, labels)
    compiled.backward()
    assert torch.isfinite(head.weight.grad).all()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    return (f"torch.compile(model + linear_mile_loss) on {device}: "
            f"loss {compiled.item():.6f} == eager {eager.item():.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the raw rows here")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run of the script)")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (smoke run, not a measurement)"
    print(f"# {name}, torch {torch.__version__}, mileloss {mileloss.__version__}")
    print(compiled_model_check(device), flush=True)
    n, d = (256, 64) if device == "cpu" else (1024, 512) if args.quick else (8192, 4096)
    vocabs = (1000,) if device == "cpu" else (32000,) if args.quick else (32000, 128256)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for v in vocabs:
            inputs = make_inputs(n, v, d, dtype, device)
            names = [name for name in VARIANTS if available(name)]
            print(f"\n## N={n}, V={v}, D={d}, {str(dtype).removeprefix('torch.')}", flush=True)
            gated = []
            for name in names:
                ok, detail = gate(name, inputs)
                print(f"gate {name:3} {'pass' if ok else 'FAIL'} ({detail})", flush=True)
                if ok:
                    gated.append(name)
            rows = time_and_memory(gated, inputs, args.repeats)
            base = rows["d"]
            print("| variant | ms (median) | time / d | peak MiB | memory / d |\n|---|---|---|---|---|")
            for name, row in rows.items():
                print(f"| {name}: {VARIANTS[name][0]} | {row['ms']:.2f} | {row['ms'] / base['ms']:.2f}x | "
                      f"{row['peak_mib']:.0f} | {row['peak_mib'] / base['peak_mib']:.2f}x |")
                out.append(dict(n=n, v=v, d=d, dtype=str(dtype), variant=name, **row))
            del inputs
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
