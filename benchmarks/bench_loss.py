"""Loss-engine benchmark: forward+backward time and peak memory as ratios to a baseline from the same run.

    python benchmarks/bench_loss.py                      # full protocol (~40 min on 2 quiet CPU cores)
    python benchmarks/bench_loss.py --quick              # small shapes, a smoke run (~1 min)
    python benchmarks/bench_loss.py --markdown docs/benchmarks_table.md --csv docs/bench_loss.csv
    python benchmarks/bench_loss.py --case logits:4096:32000 --case linear:4096:32000:512   # issue 12's run

Protocol (docs/benchmarks.md): fp32, identical seeded inputs, ~6% of targets ignored, 2 threads.
* Correctness gate first: each variant runs on the first 512 rows of the same inputs and its loss and
  gradients are compared with a float64 oracle written in this file (``oracle_loss``), independently of both
  mileloss and the timed naive variant (b); a variant that fails is not timed or reported.
* Time: 1 warm-up (which also compiles what a variant compiles), then R forward+backward repetitions, variants
  interleaved (ABC CBA ...), median and min.
* Peak memory: each variant in a fresh subprocess with a fixed glibc mmap threshold; one warm-up
  forward+backward, then the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) after a
  second one, minus the resident size at the reset: every temporary and gradient the loss creates (inputs and
  compiled code excluded).
* Rows besides the losses: "floor", the three bare GEMMs of a fused head (h W^T, g W, g^T h with a fixed g),
  the time no fused loss can beat; "cce_tc", Cut Cross-Entropy's ``impl="torch_compile"`` (optional:
  ``pip install cut-cross-entropy``; reported as failing the gate with the import error if absent).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import mileloss

THREADS = 2
GATE_ROWS = 512
LINEAR_CHUNK = 512

# ---------------------------------------------------------------------------------------------------
# naive formulas: the timed variant (b), and the gate's float64 oracle, written separately on purpose


def official_formula(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0, sigma: float = 1.0):
    """Variant (b): MiLe as the official code computes it (utils/trainer.py of suu990901/LLaMA-MiLe-Loss):
    per-position CE (0 where ignored), entropy of the softmax clamped to [1e-8, 1] (several (N, V) temporaries),
    w = (sigma + H)^gamma detached, alpha = 1 / mean(w) and the mean of alpha * w * CE over all positions."""
    ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1).clamp(1e-8, 1.0)
        weight = (sigma + (-probs * probs.log()).sum(-1)) ** gamma
        alpha = 1.0 / weight.mean()
    return (alpha * weight * ce).mean()


def oracle_loss(what: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 truth for the gate, gamma = sigma = 1: "ce" the token mean of CE; "mile" sum w CE / sum w over
    valid tokens, w = 1 + H detached; "official" sum w CE / sum of w over *all* positions with the clamped
    entropy (alpha * mean(w CE) with alpha = 1 / mean(w) is that ratio). CE = logsumexp - z_y; H = logsumexp -
    sum p z; the clamp replaces each p < 1e-8 by 1e-8 in -sum q log q."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != -100
    picked = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    ce = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if what == "ce":
        return ce.sum() / valid.sum()
    p = torch.exp(z - lse[:, None]).detach()
    if what == "official":
        q = torch.where(p < 1e-8, torch.full_like(p, 1e-8), p)
        weight = 1.0 - (q * q.log()).sum(-1)
        return (weight * ce).sum() / weight.sum()
    weight = torch.where(valid, 1.0 + lse.detach() - (p * z.detach()).sum(-1), torch.zeros_like(lse))
    return (weight * ce).sum() / weight.sum()


# ---------------------------------------------------------------------------------------------------
# inputs and variants


def make_inputs(kind: str, n: int, v: int, d: int, seed: int = 0, floor: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[::17] = -100
    if kind == "logits":
        return dict(logits=torch.randn(n, v, generator=generator) * 2.0, targets=targets)
    hidden = torch.randn(n, d, generator=generator)
    weight = torch.randn(v, d, generator=generator) / d**0.5 * 2.0
    inputs = dict(hidden=hidden, weight=weight, targets=targets)
    if floor:  # the floor's output gradient: an input of that variant alone (its memory excludes it)
        inputs["floor_grad"] = torch.randn(n, v, generator=generator) * 1e-4
    return inputs


def _linear_options(chunk):
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    return LinearCrossEntropyOptions() if chunk is None else LinearCrossEntropyOptions(batch_chunk_size=chunk)


def _torch_linear_cross_entropy(chunk):
    """The variant entry of PyTorch's ``F.linear_cross_entropy`` with ``batch_chunk_size=chunk`` (None: its
    automatic options)."""
    setting = "auto options" if chunk is None else f"batch_chunk_size={chunk}"
    return (f"F.linear_cross_entropy ({setting})", "ce",
            lambda x: F.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=-100,
                                             options=_linear_options(chunk)))


def gemm_floor(x):
    """The three GEMMs of a fused head and nothing else: logits = h @ W^T, then dh = g @ W and dW = g^T @ h
    with a fixed (N, V) g (autograd's backward of ``h @ W.T`` with a given output gradient)."""
    logits = x["hidden"] @ x["weight"].T
    return logits, x["floor_grad"]


def _cce_torch_compile(x):
    """Cut Cross-Entropy's ``impl="torch_compile"`` (an optional benchmark dependency, not a requirement of
    mileloss: ``pip install cut-cross-entropy``; on Linux it imports triton, although this impl does not use it)."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=-100, impl="torch_compile")


def cce_available() -> str | None:
    """None if Cut Cross-Entropy imports, else why not."""
    try:
        import cut_cross_entropy  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError, or triton failing to import
        return f"{type(error).__name__}: {error}"
    return None


# name -> (label, what it computes: "ce" | "mile" | "official" | "floor", function of leaves)
LOGITS_VARIANTS = {
    "a": ("F.cross_entropy", "ce", lambda x: F.cross_entropy(x["logits"], x["targets"])),
    "b": ("naive MiLe (official code's formula)", "official",
          lambda x: official_formula(x["logits"], x["targets"])),
    "c": ("mileloss.mile_loss (chunked, eager)", "mile",
          lambda x: mileloss.mile_loss(x["logits"], x["targets"], compile=False)),
    "c0": ("mileloss.cross_entropy_loss (chunked, eager)", "ce",
           lambda x: mileloss.cross_entropy_loss(x["logits"], x["targets"], compile=False)),
    "cc": ("mileloss.mile_loss (chunked, compiled)", "mile",
           lambda x: mileloss.mile_loss(x["logits"], x["targets"], compile=True)),
    "c0c": ("mileloss.cross_entropy_loss (chunked, compiled)", "ce",
            lambda x: mileloss.cross_entropy_loss(x["logits"], x["targets"], compile=True)),
    "cci": ("mileloss.mile_loss (chunked, compiled, inplace_backward=True)", "mile",
            lambda x: mileloss.mile_loss(x["logits"], x["targets"], compile=True, inplace_backward=True)),
}
# variants whose backward overwrites the logits: before every call (untimed, outside the memory window) the
# logits are restored in place from the seeded inputs, so every variant computes on the same numbers
OVERWRITES_LOGITS = {"cci"}
LINEAR_VARIANTS = {
    "d": ("linear + F.cross_entropy", "ce", lambda x: F.cross_entropy(x["hidden"] @ x["weight"].T, x["targets"])),
    "p_auto": _torch_linear_cross_entropy(None),
    "p_tuned": _torch_linear_cross_entropy(LINEAR_CHUNK),
    "p_1024": _torch_linear_cross_entropy(1024),
    "e": ("mileloss.linear_mile_loss (fused, eager)", "mile",
          lambda x: mileloss.linear_mile_loss(x["hidden"], x["weight"], x["targets"], chunk_size=LINEAR_CHUNK,
                                              compile=False)),
    "e0": ("mileloss.linear_cross_entropy_loss (fused, eager)", "ce",
           lambda x: mileloss.linear_cross_entropy_loss(x["hidden"], x["weight"], x["targets"],
                                                        chunk_size=LINEAR_CHUNK, compile=False)),
    "ec": ("mileloss.linear_mile_loss (fused, compiled)", "mile",
           lambda x: mileloss.linear_mile_loss(x["hidden"], x["weight"], x["targets"], chunk_size=LINEAR_CHUNK,
                                               compile=True)),
    "e0c": ("mileloss.linear_cross_entropy_loss (fused, compiled)", "ce",
            lambda x: mileloss.linear_cross_entropy_loss(x["hidden"], x["weight"], x["targets"],
                                                         chunk_size=LINEAR_CHUNK, compile=True)),
    "cce_tc": ("Cut Cross-Entropy linear_cross_entropy(impl='torch_compile')", "ce", _cce_torch_compile),
    "floor": ("the three bare GEMMs (h W^T, g W, g^T h): the floor", "floor", gemm_floor),
}
BASELINE = {"logits": "a", "linear": "d"}


def variants(kind: str) -> dict:
    return LOGITS_VARIANTS if kind == "logits" else LINEAR_VARIANTS


def leaves(inputs: dict) -> dict:
    return {k: (t.requires_grad_() if t.is_floating_point() and k != "floor_grad" else t) for k, t in inputs.items()}


def forward_backward(fn, x: dict) -> None:
    for t in x.values():
        t.grad = None
    out = fn(x)
    if isinstance(out, tuple):  # the GEMM floor: (output, its gradient)
        out[0].backward(out[1])
    else:
        out.backward()


# ---------------------------------------------------------------------------------------------------
# correctness gate


def reference_loss(what: str, x: dict) -> torch.Tensor:
    logits = x["logits"] if "logits" in x else x["hidden"] @ x["weight"].T
    return oracle_loss(what, logits, x["targets"])


def passes_gate(kind: str, name: str, inputs: dict) -> tuple[bool, str]:
    """Run variant ``name`` on the first GATE_ROWS rows; compare loss and grads with the float64 oracle."""
    _, what, fn = variants(kind)[name]
    if what == "floor":
        return True, "not a loss: no gate"
    if name == "cce_tc" and cce_available() is not None:
        return False, f"Cut Cross-Entropy not importable: {cce_available()}"
    sub = {k: (t[:GATE_ROWS] if k != "weight" else t) for k, t in inputs.items() if k != "floor_grad"}
    x32 = leaves({k: t.clone() for k, t in sub.items()})
    loss32 = fn(x32)
    loss32.backward()
    x64 = leaves({k: (t.double() if t.is_floating_point() else t.clone()) for k, t in sub.items()})
    loss64 = reference_loss(what, x64)
    loss64.backward()
    worst = abs(loss32.item() - loss64.item()) / abs(loss64.item())
    for key, t in x32.items():
        if t.is_floating_point():
            error = (t.grad.double() - x64[key].grad).abs().max() / x64[key].grad.abs().max()
            worst = max(worst, float(error))
    return worst < 1e-4, f"max relative error {worst:.1e}"


# ---------------------------------------------------------------------------------------------------
# timing (interleaved, in this process) and memory (fresh subprocess per variant)


def time_variants(kind: str, names: list[str], inputs: dict, repeats: int) -> dict[str, list[float]]:
    xs = {name: leaves({k: (t if k == "floor_grad" else t.clone()) for k, t in inputs.items()
                        if k != "floor_grad" or name == "floor"}) for name in names}
    times = {name: [] for name in names}
    for rep in range(repeats + 1):
        order = names if rep % 2 == 0 else names[::-1]  # alternate the order to cancel drift
        for name in order:
            _restore(name, xs[name], inputs)
            start = time.perf_counter()
            forward_backward(variants(kind)[name][2], xs[name])
            if rep > 0:  # rep 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    return times


def _restore(name: str, x: dict, inputs: dict) -> None:
    if name in OVERWRITES_LOGITS:
        with torch.no_grad():
            x["logits"].copy_(inputs["logits"])


def peak_memory_mib(kind: str, name: str, n: int, v: int, d: int) -> float:
    command = [sys.executable, __file__, "--memory-worker", json.dumps([kind, name, n, v, d])]
    # a fixed mmap threshold: every large block is mmapped and returned to the kernel when freed, so that the
    # warm-up call's freed buffers cannot hide the measured call's peak inside glibc's heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def memory_worker(spec: str) -> None:
    kind, name, n, v, d = json.loads(spec)
    torch.set_num_threads(THREADS)
    inputs = make_inputs(kind, n, v, d, floor=name == "floor")
    x = leaves({k: t.clone() for k, t in inputs.items()})
    fn = variants(kind)[name][2]
    # one warm-up call first (compiles what the variant compiles; identical for every variant), then reset the
    # kernel's high-water mark (VmHWM) to the current resident size, so that import- and compile-time peaks do
    # not hide the op's own peak; the delta is every byte the second forward+backward added at its worst
    forward_backward(fn, x)
    for t in x.values():
        t.grad = None
    _restore(name, x, inputs)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    forward_backward(fn, x)
    print(max(_status_kib("VmHWM") - before, 0) / 1024.0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------------


def run_case(kind: str, n: int, v: int, d: int, repeats: int, names: list[str]) -> list[dict]:
    inputs = make_inputs(kind, n, v, d, floor="floor" in names)
    label = f"N={n}, V={v}" + (f", D={d}" if kind == "linear" else "")
    print(f"\n## {kind}: {label}", flush=True)
    gated = []
    for name in names:
        ok, detail = passes_gate(kind, name, inputs)
        print(f"  gate {name:8s} {'ok ' if ok else 'FAIL'} ({detail})", flush=True)
        if ok:
            gated.append(name)
    baseline = BASELINE[kind]
    if baseline not in gated:
        print("  baseline failed the gate: case not reported")
        return []
    times = time_variants(kind, gated, inputs, repeats)
    memory = {name: peak_memory_mib(kind, name, n, v, d) for name in gated}
    rows = []
    for name in gated:
        median, best = statistics.median(times[name]), min(times[name])
        rows.append(dict(kind=kind, case=label, variant=name, label=variants(kind)[name][0], median_s=median,
                         min_s=best, peak_mib=memory[name],
                         time_ratio=median / statistics.median(times[baseline]),
                         memory_ratio=memory[name] / memory[baseline] if memory[baseline] > 0 else float("nan"),
                         p20=statistics.quantiles(times[name], n=5)[0] if len(times[name]) > 1 else median,
                         p80=statistics.quantiles(times[name], n=5)[-1] if len(times[name]) > 1 else median))
        row = rows[-1]
        print(f"  {name:8s} {row['median_s']:7.3f} s (min {best:.3f})  {row['time_ratio']:5.2f}x time   "
              f"{row['peak_mib']:8.0f} MiB  {row['memory_ratio']:5.2f}x memory   {row['label']}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | variant | median s (min) | time vs baseline | peak MiB | memory vs baseline |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} {r['case']} | ({r['variant']}) {r['label']} | {r['median_s']:.3f} "
                     f"({r['min_s']:.3f}) | {r['time_ratio']:.2f}x | {r['peak_mib']:.0f} | {r['memory_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run, not the protocol")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["logits", "linear"], help="run one half of the protocol")
    parser.add_argument("--case", action="append", metavar="KIND:N:V[:D]",
                        help="run this case instead of the protocol's (repeatable), e.g. linear:4096:32000:512")
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all of the kind)")
    parser.add_argument("--csv", help="write raw rows (Liger-style schema) here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return 0
    torch.set_num_threads(THREADS)
    if args.quick:
        cases = [("logits", 1024, 8000, 0), ("linear", 1024, 8000, 256)]
    else:
        cases = [("logits", 4096, 32000, 0), ("logits", 8192, 32000, 0), ("logits", 2048, 128256, 0),
                 ("linear", 4096, 32000, 512), ("linear", 4096, 128256, 512)]
    if args.case:
        cases = []
        for text in args.case:
            parts = text.split(":")
            if len(parts) not in (3, 4) or parts[0] not in ("logits", "linear"):
                parser.error(f"--case {text!r}: expected logits:N:V or linear:N:V:D")
            cases.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else 0))
    cases = [c for c in cases if args.only in (None, c[0])]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {THREADS} threads, "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    for kind, n, v, d in cases:
        names = list(variants(kind))
        if args.variants:
            wanted = args.variants.split(",")
            names = [name for name in names if name in wanted or name == BASELINE[kind]]
        rows += run_case(kind, n, v, d, args.repeats, names)
    table = markdown(rows)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.csv:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kernel", "provider", "mode", "metric", "unit", "x_name", "x", "p50", "p20", "p80",
                             "config", "device", "timestamp", "version"])
            for r in rows:
                config = f"{r['kind']} {r['case']}"
                writer.writerow(["mile_loss", r["variant"], "full", "time", "s", "case", config, r["median_s"],
                                 r["p20"], r["p80"], r["label"], "cpu", stamp, torch.__version__])
                writer.writerow(["mile_loss", r["variant"], "full", "memory", "MiB", "case", config, r["peak_mib"],
                                 r["peak_mib"], r["peak_mib"], r["label"], "cpu", stamp, torch.__version__])
    return 0


if __name__ == "__main__":
    sys.exit(main())
