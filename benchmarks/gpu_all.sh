#!/usr/bin/env bash
# Every GPU check of the project in one call, sized for a short loan of one H100 (about 8 minutes in all).
# Run from the repository root on a CUDA machine whose python3 holds torch, triton and transformers:
#   OUT=/tmp/gpu bash benchmarks/gpu_all.sh
# Optional peers are installed from wheels in .whl/ when present (no network needed), e.g.
#   pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# Each step has its own time limit and its own log under $OUT; a failing step does not stop the others.
set -u
OUT=${OUT:-/tmp/mileloss-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s ==="
}

step gpu_check 140 python3 benchmarks/gpu_check.py --budget-s 115 --out "$OUT/gpu_check.json"
step gpu_fsdp 140 python3 benchmarks/gpu_fsdp.py --budget 115 --out "$OUT/gpu_fsdp.json"
step bench_hf 100 python3 benchmarks/bench_hf.py --device cuda --budget-s 85 --json "$OUT/bench_hf.json"
step gpu_marked_tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/losses/test_cuda.py tests/train/test_fsdp_checkpoint.py
step loss_suite_on_cuda 120 env MILELOSS_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider --maxfail=10 \
    tests/losses/test_compiled.py tests/losses/test_numerics.py tests/losses/test_options.py tests/losses/test_paper_mode.py
