"""GPU readiness of the loss engine: correctness against float64, then time and memory against the fused peers.

    python benchmarks/gpu_check.py --out gpu_check.json                 # one CUDA GPU; < 2.5 min on an H100
    python benchmarks/gpu_check.py --device cpu --small --out x.json    # a CPU smoke run of this script

1. Gate (bf16, and fp32 on the first case). Our fused CE and MiLe (compiled per-chunk math, and MiLe eager) run
   on the first rows of the timed inputs (one chunk of ours, with the full head) and their loss and gradients
   (hidden, weight) are compared with the float64 oracle of ``bench_loss.py`` (``oracle_loss``, written without
   mileloss) on the same low-precision values; the peers and the baseline run the same check in bf16. A variant
   that fails is reported, not timed.
2. Timing at N = 16384, D = 4096, V in {32000, 128256}, bf16 (``--small``: N = 256, D = 64, V = 1000): one
   forward+backward per call, CUDA events, ``--warmup`` untimed calls, then ``--repeats`` calls with the
   variants interleaved (ABC CBA ...), median. Peak memory: torch.cuda.max_memory_allocated during one
   forward+backward minus what was allocated before it (inputs and their gradients' storage excluded).
   Both as ratios to variant ``base``, linear + F.cross_entropy on fp32 logits (what a Hugging Face model
   computes), measured in the same run.
3. Peers: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``, Cut Cross-Entropy's
   ``linear_cross_entropy(impl="cce")``, and ``torch.nn.functional.linear_cross_entropy`` where this torch has
   it. A peer that is not importable is reported as "not installed" (or "not in this torch"), never a crash;
   one that raises is reported with its error.
4. ``--budget-s`` (default 90): once this much wall time has passed, the remaining cases are reported as
   "skipped: time budget" instead of run, so that the script ends inside its GPU slot (a case, compilations
   included, should take well under a minute on an H100). If ``torch.compile`` fails, our "compiled" rows say
   so (``compile_failed``): the engine then ran its eager path.

Prints a Markdown table per case and writes every row (gate results included) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import mileloss
from bench_loss import oracle_loss  # the float64 oracle, written independently of mileloss
from mileloss.losses import compiled as compiled_module
from mileloss.losses.chunked import default_chunk_size

IGNORE = -100


# ---------------------------------------------------------------------------------------------------
# variants: name -> (label, what the oracle computes, builder); a builder returns fn(x) or a reason string


def _base(x):
    return F.cross_entropy((x["hidden"] @ x["weight"].T).float(), x["targets"], ignore_index=IGNORE)


def _ours(weighting, compile_mode):
    """Our fused loss with the chunk size it picks by default for the timed shape (``CHUNK``, set per case),
    also in the gate, so that the gate's rows (one chunk) compile the same kernels the timing uses."""
    def fn(x):
        return mileloss.linear_token_weighted_loss(x["hidden"], x["weight"], x["targets"], weighting=weighting,
                                                   compile=compile_mode, chunk_size=CHUNK[0])
    return fn


CHUNK = [None]


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return "not installed"
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda x: module(x["weight"], x["hidden"], x["targets"])


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return "not installed"
    return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE, impl="cce")


def _torch_fused():
    if not hasattr(F, "linear_cross_entropy"):
        return f"not in this torch ({torch.__version__})"
    return lambda x: F.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE)


VARIANTS = {
    "base": ("linear + F.cross_entropy (fp32 logits)", "ce", lambda: _base),
    "torch": ("F.linear_cross_entropy (PyTorch, auto options)", "ce", _torch_fused),
    "liger": ("Liger-Kernel LigerFusedLinearCrossEntropyLoss", "ce", _liger),
    "cce": ("Cut Cross-Entropy linear_cross_entropy(impl='cce')", "ce", _cce),
    "ce": ("mileloss fused CE (compiled)", "ce", lambda: _ours("ce", True)),
    "mile": ("mileloss fused MiLe (compiled)", "mile", lambda: _ours("mile", True)),
    "mile_eager": ("mileloss fused MiLe (eager)", "mile", lambda: _ours("mile", False)),
}
OURS = ("ce", "mile", "mile_eager")


# ---------------------------------------------------------------------------------------------------


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[::17] = IGNORE
    hidden = torch.randn(n, d, generator=generator)
    weight = torch.randn(v, d, generator=generator) / d**0.5 * 2.0
    return dict(hidden=hidden.to(device, dtype), weight=weight.to(device, dtype), targets=targets.to(device))


def leaves(inputs: dict) -> dict:
    return {k: (t.detach().clone().requires_grad_() if t.is_floating_point() else t) for k, t in inputs.items()}


def forward_backward(fn, x: dict) -> torch.Tensor:
    for t in x.values():
        t.grad = None
    loss = fn(x)
    loss.backward()
    return loss


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gate(fn, what: str, inputs: dict, rows: int, dtype: torch.dtype) -> dict:
    """Loss and gradients of ``fn`` on the first ``rows`` rows in ``dtype`` against float64 on the same values:
    the worst relative error (max |error| / max |truth| per tensor), with a pass threshold per dtype."""
    sub = {k: (t[:rows] if k != "weight" else t) for k, t in inputs.items()}
    x = leaves({k: (t.to(dtype) if t.is_floating_point() else t) for k, t in sub.items()})
    loss = forward_backward(fn, x)
    x64 = leaves({k: (t.double() if t.is_floating_point() else t) for k, t in x.items()})
    truth = oracle_loss(what, x64["hidden"] @ x64["weight"].T, x64["targets"])
    truth.backward()
    errors = {"loss": abs(loss.item() - truth.item()) / abs(truth.item())}
    for key in ("hidden", "weight"):
        want = x64[key].grad
        errors[key] = float((x[key].grad.double() - want).abs().max() / want.abs().max())
    worst = max(errors.values())
    threshold = 1e-4 if dtype == torch.float32 else 2e-2
    del x, x64
    return dict(ok=worst < threshold, worst=worst, threshold=threshold, errors=errors)


def timed_ms(fn, x: dict, device: str) -> float:
    if not device.startswith("cuda"):
        start = time.perf_counter()
        forward_backward(fn, x)
        return (time.perf_counter() - start) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward_backward(fn, x)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def peak_mib(fn, x: dict, device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    for t in x.values():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(fn, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(n, v, d, device, fns, args, started, fp32_gate: bool) -> list[dict]:
    """Gate, then time and measure every variant that passed, on one (N, V, D) case in bf16. ``fp32_gate``: also
    gate our compiled variants in fp32 (two more compilations; done on the first case only)."""
    rows = []
    CHUNK[0] = default_chunk_size(n, v, d, torch.device(device))
    gate_rows = min(CHUNK[0], n)
    label = f"N={n}, V={v}, D={d}, bf16"
    print(f"\n## {label} (our chunk: {CHUNK[0]} rows; gate on the first {gate_rows} rows)", flush=True)
    inputs = make_inputs(n, v, d, torch.bfloat16, device)
    timed = []
    for name, fn in fns.items():
        row = dict(case=label, n=n, v=v, d=d, variant=name, label=VARIANTS[name][0])
        rows.append(row)
        if isinstance(fn, str):
            row["status"] = fn
            continue
        gate_started = time.monotonic()
        try:
            checks = {"bf16": gate(fn, VARIANTS[name][1], inputs, gate_rows, torch.bfloat16)}
            if (name in OURS or name == "base") and (fp32_gate or name == "mile_eager"):
                checks["fp32"] = gate(fn, VARIANTS[name][1], inputs, gate_rows, torch.float32)
        except Exception as error:  # noqa: BLE001 - a peer that raises is reported, not fatal
            row["status"] = f"error in gate: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc(limit=2)
            continue
        row["gate"] = checks
        row["gate_s"] = time.monotonic() - gate_started  # includes our compilations (the first call per key)
        verdicts = ", ".join(f"{k} {c['worst']:.1e} {'pass' if c['ok'] else 'FAIL'}" for k, c in checks.items())
        print(f"gate {name:10} {verdicts} ({row['gate_s']:.1f} s, compilation included)", flush=True)
        if name in ("ce", "mile") and compiled_module._FAILED:  # the engine fell back to eager with a warning
            row["compile_failed"] = compiled_module._FAILED[0]
            print(f"  {name}: torch.compile failed, this row is the eager path: {compiled_module._FAILED[0]}")
        if all(c["ok"] for c in checks.values()):
            timed.append(name)
        else:
            row["status"] = "failed the gate"
    if "base" not in timed:
        print("baseline failed the gate: nothing timed")
        return rows
    xs = {name: leaves(inputs) for name in timed}
    times = {name: [] for name in timed}
    try:
        for rep in range(args.warmup + args.repeats):
            for name in timed if rep % 2 == 0 else timed[::-1]:
                elapsed = timed_ms(fns[name], xs[name], device)
                if rep >= args.warmup:
                    times[name].append(elapsed)
        memory = {name: peak_mib(fns[name], xs[name], device) for name in timed}
    except torch.cuda.OutOfMemoryError as error:
        print(f"out of memory while timing: {error}")
        for row in rows:
            row.setdefault("status", "out of memory")
        return rows
    base_ms, base_mib = statistics.median(times["base"]), memory["base"]
    print("| variant | ms (median) | time / base | peak MiB | memory / base |\n|---|---|---|---|---|")
    for row in rows:
        name = row["variant"]
        if name not in times:
            print(f"| {name}: {row['label']} | {row.get('status', '?')} | | | |")
            continue
        ms = statistics.median(times[name])
        row.update(status="ok", ms=ms, ms_all=times[name], peak_mib=memory[name], time_ratio=ms / base_ms,
                   memory_ratio=memory[name] / base_mib if base_mib > 0 else float("nan"))
        print(f"| {name}: {row['label']} | {ms:.2f} | {row['time_ratio']:.2f}x | {memory[name]:.0f} | "
              f"{row['memory_ratio']:.2f}x |", flush=True)
    del xs, inputs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"(elapsed {time.monotonic() - started:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--small", action="store_true", help="N = 256, D = 64, V = 1000: a smoke run")
    parser.add_argument("--out", required=True, help="write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=90.0, help="start no new case after this long")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check.py: --device cuda needs a CUDA device (torch.cuda.is_available() is False); "
              "use --device cpu --small for a smoke run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU {platform.machine()} (smoke run)"
    header = dict(device=name, torch=torch.__version__, mileloss=mileloss.__version__, python=platform.python_version())
    print("# " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    if args.small:
        n, d, vocabs = 256, 64, (1000,)
    else:
        n, d, vocabs = 16384, 4096, (32000, 128256)
    fns = {}
    for key, (_, _, build) in VARIANTS.items():
        try:
            fns[key] = build()
        except Exception as error:  # noqa: BLE001 - an import that fails other than ImportError
            fns[key] = f"unusable: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if not device.startswith("cuda"):  # the Triton peers need a GPU
        for key in ("liger", "cce"):
            if not isinstance(fns[key], str):
                fns[key] = "needs CUDA (Triton kernels)"
    rows = []
    for v in vocabs:
        if time.monotonic() - started > args.budget_s:
            rows.append(dict(case=f"N={n}, V={v}, D={d}, bf16", status="skipped: time budget"))
            print(f"\n## N={n}, V={v}: skipped (time budget of {args.budget_s:.0f} s spent)", flush=True)
            continue
        rows += run_case(n, v, d, device, fns, args, started, fp32_gate=v == vocabs[0])
    with open(args.out, "w") as f:
        json.dump(dict(header=header, args=vars(args), wall_s=time.monotonic() - started, rows=rows), f, indent=1)
    print(f"\nwrote {args.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
