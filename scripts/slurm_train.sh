#!/bin/bash
# Multi-node `mileloss train` under SLURM: one torchrun per node (srun), all joined by a c10d rendezvous on the
# job's first node. Edit the #SBATCH lines and the CONFIG line, then submit:
#
#   sbatch scripts/slurm_train.sh                                   # CONFIG below, as written
#   sbatch --nodes 4 scripts/slurm_train.sh 1.2B loss.kind=mile run.out=runs/1.2B-mile   # arguments replace CONFIG
#
# Options given to sbatch override the #SBATCH lines. The global batch does not depend on the node count when the
# config sets run.tokens_per_step (the paper presets do): gradient accumulation is derived from it and the world
# size (nodes x GPUs per node), and a world size that does not divide it stops the job before the first step.
# See docs/training.md, section "Multi-node".
#
#SBATCH --job-name=mileloss
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

# the one line to change: the config (a preset or a YAML file) and its overrides (or pass them as arguments)
CONFIG=(468M loss.kind=mile run.out=runs/468M-mile)

if [ "$#" -gt 0 ]; then
    CONFIG=("$@")
fi

PYTHON=${PYTHON:-python}          # the Python of the environment where mileloss is installed (on every node)
: "${SLURM_JOB_ID:?submit this script with sbatch (or run it inside salloc)}"
NODES=${SLURM_NNODES:?SLURM_NNODES is not set}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # --gpus-per-node=h100:8 gives "h100:8"
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # sed reads it all: no SIGPIPE under pipefail
RDZV_PORT=${RDZV_PORT:-29500}

# NCCL: fail fast on a hung collective instead of waiting forever; name the network interface if the nodes have
# several (ip addr shows them), and keep InfiniBand on when the cluster has it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=ib0      # or eth0: the interface the nodes reach each other on
# export NCCL_IB_DISABLE=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

WORLD_SIZE=$((NODES * GPUS_PER_NODE))
echo "mileloss on $NODES node(s) x $GPUS_PER_NODE GPU(s) = $WORLD_SIZE processes; rendezvous $HEAD_NODE:$RDZV_PORT"

# will it fit, and does the global batch divide? Printed into the job log; stops here if the schedule is refused.
PLAN=()
for arg in "${CONFIG[@]}"; do
    case "$arg" in --resume|--overwrite) ;; *) PLAN+=("$arg") ;; esac   # the plan takes neither
done
"$PYTHON" -m mileloss train "${PLAN[@]}" --dry-run --world-size "$WORLD_SIZE"

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes "$NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id "$SLURM_JOB_ID" \
    --max_restarts 0 \
    -m mileloss train "${CONFIG[@]}"
