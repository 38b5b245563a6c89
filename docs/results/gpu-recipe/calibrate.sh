#!/bin/bash
# Calibration of docs/gpu-recipe.md: train the paper's 468M preset with MiLe loss for a few optimizer steps on ONE
# GPU, exactly as the recipe's training command does (micro-batch 32 x 1024 tokens, bf16, torch.compile), and
# print the measured tokens/s and peak GPU memory next to the --dry-run plan, with the wall times they imply.
#
#   bash docs/results/gpu-recipe/calibrate.sh --device cuda  [--out DIR]   # one H100: about 2 minutes
#   bash docs/results/gpu-recipe/calibrate.sh --device cpu --small         # the same stages on the tiny preset
#
# Data: the Shakespeare corpus shipped in the package with a byte-level BPE trained to (at most) 32000 tokens, the
# LLaMA tokenizer's size (no network needed). Everything it writes goes under --out (default $OUT/gpu-recipe when
# $OUT is set, else /tmp/gpu-recipe-calibrate), a folder that must not exist yet; the summary is summary.json and
# summary.txt there, beside the logs. Nothing else is written or deleted.
set -euo pipefail

DEVICE=cpu
SMALL=0
DEST=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?--device needs cpu or cuda}; shift 2 ;;
        --small) SMALL=1; shift ;;
        --out) DEST=${2:?--out needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "calibrate.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "calibrate.sh: --device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
if [ -z "$DEST" ]; then
    if [ -n "${OUT:-}" ]; then DEST=$OUT/gpu-recipe; else DEST=/tmp/gpu-recipe-calibrate; fi
fi
if [ -e "$DEST" ]; then
    echo "calibrate.sh: $DEST exists; give a new folder with --out (nothing is overwritten)" >&2
    exit 2
fi
mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-recipe-work.XXXXXX")   # data and the run: large, not copied back
MILELOSS=${MILELOSS:-mileloss}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if ! command -v "$MILELOSS" >/dev/null; then MILELOSS="$PYTHON -m mileloss"; fi

if [ "$SMALL" = 1 ]; then
    PRESET=tiny VOCAB=1024 STEPS=6 LOG_EVERY=2 TOKENS_PER_STEP=2048 TRAIN_ARGS=(run.batch_size=8 run.seq_len=128)
else
    # 468M's own batch_size 32 x seq_len 1024; 4 micro-batches per optimizer step on one GPU
    PRESET=468M VOCAB=32000 STEPS=12 LOG_EVERY=2 TOKENS_PER_STEP=131072 TRAIN_ARGS=()
fi

stamp() { date -u +%FT%TZ; }
echo "$(stamp) calibrate: device $DEVICE, preset $PRESET, work folder $WORK, results in $DEST" | tee "$DEST/summary.txt"

start=$(date +%s)
WORKERS=$(nproc 2>/dev/null || echo 1)
if [ "$WORKERS" -gt 4 ]; then WORKERS=4; fi   # mileloss data refuses more workers than usable CPUs
if ! $MILELOSS data --corpus shakespeare --vocab-size "$VOCAB" --out "$WORK/data" --workers "$WORKERS" \
        --no-progress > "$DEST/data.log" 2>&1; then
    echo "calibrate.sh: mileloss data failed:" >&2
    tail -5 "$DEST/data.log" >&2
    exit 1
fi
echo "$(stamp) data prepared in $(( $(date +%s) - start )) s" | tee -a "$DEST/summary.txt"

# the plan of the recipe's run on this data's vocabulary: 1, 8, 16, 32 GPUs of 80 GB
for world in 1 8 16 32; do
    $MILELOSS train "$PRESET" --dry-run data.dir="$WORK/data" --world-size "$world" --gpu-memory 80GB \
        "${TRAIN_ARGS[@]}" > "$DEST/dry-run-$world.txt" 2>&1 || echo "(dry-run for $world GPUs failed: see the file)"
done

MEMLOG="$DEST/nvidia-smi.csv"
SMI_PID=""
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits \
        -lms 500 > "$MEMLOG" &
    SMI_PID=$!
fi
start=$(date +%s)
set +e
$MILELOSS train "$PRESET" data.dir="$WORK/data" loss.kind=mile run.out="$WORK/run" run.device="$DEVICE" \
    run.max_steps="$STEPS" run.tokens_per_step="$TOKENS_PER_STEP" run.log_every="$LOG_EVERY" \
    run.eval_every=0 run.eval_batches=2 run.checkpoint_every=0 "${TRAIN_ARGS[@]}" > "$DEST/train.log" 2>&1
status=$?
set -e
train_seconds=$(( $(date +%s) - start ))
if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null || true; wait "$SMI_PID" 2>/dev/null || true; fi
echo "$(stamp) training ($STEPS steps) exited with $status after $train_seconds s" | tee -a "$DEST/summary.txt"
if [ "$status" != 0 ]; then
    tail -20 "$DEST/train.log" >&2
    exit "$status"
fi
cp "$WORK/run/metrics.jsonl" "$DEST/metrics.jsonl"

"$PYTHON" - "$DEST" "$DEVICE" "$PRESET" "$train_seconds" <<'EOF' | tee -a "$DEST/summary.txt"
import json, statistics, sys
from pathlib import Path

dest, device, preset, train_seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
train = [r for r in map(json.loads, (dest / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
# the first logged interval holds torch.compile and the allocator's warm-up: steady state is the rest
steady = [r["tokens_per_second"] for r in train[1:]] or [r["tokens_per_second"] for r in train]
speed = statistics.median(steady)
peak_mib = None
smi = dest / "nvidia-smi.csv"
if smi.exists():
    used = [float(line.split(",")[1]) for line in smi.read_text().splitlines() if line.count(",") >= 3]
    peak_mib = max(used) if used else None
plan = (dest / "dry-run-1.txt").read_text()
params = next((line for line in plan.splitlines() if "parameters" in line and line.startswith("model")),
              "(no --dry-run plan: see dry-run-1.txt)")
total_tokens = 104_857_600_000  # the 468M preset: 100,000 steps x 1,048,576 tokens
rows = []
if preset != "468M":
    print("(small mode: the projection below uses this device's speed for the 468M token budget; meaningless)")
for gpus in (1, 8, 16, 32):
    efficiency = 1.0 if gpus == 1 else 0.9  # assumption: 90 % data-parallel scaling, not measured here
    hours = total_tokens / (speed * gpus * efficiency) / 3600
    rows.append({"gpus": gpus, "scaling_efficiency_assumed": efficiency, "hours_per_run": round(hours, 1),
                 "hours_three_runs": round(3 * hours, 1)})
summary = {"device": device, "preset": preset, "model": params, "tokens_per_second_per_gpu": round(speed),
           "logged_intervals": [round(r["tokens_per_second"]) for r in train], "peak_gpu_memory_mib": peak_mib,
           "train_wall_seconds": train_seconds, "projection_104.9B_tokens": rows}
(dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(params)
print(f"steady tokens/s on one {device} device (median of logged intervals after the first): {speed:,.0f}")
print(f"peak GPU memory (nvidia-smi, whole device): {peak_mib if peak_mib is not None else 'n/a'} MiB")
for row in rows:
    print(f"  {row['gpus']:>2} GPU(s), {row['scaling_efficiency_assumed']:.0%} scaling assumed: "
          f"{row['hours_per_run']} h per run, {row['hours_three_runs']} h for CE + focal + MiLe")
EOF
echo "(the work folder $WORK holds the data and the run; remove it when done)" | tee -a "$DEST/summary.txt"
