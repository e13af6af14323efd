#!/bin/bash
# The torchrun equivalent of `accelerate launch` on several nodes: run this script once on
# every node (same arguments, its own NODE_RANK); each starts NPROC_PER_NODE processes.
# The training scripts need no launcher-specific code: Accelerate reads torchrun's RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
#
#   # on node 0 (its address is MASTER_ADDR) and node 1 of a 2 x 8 GPU job:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash recipes/torchrun_multinode.sh \
#       --mixed-precision bf16 --output-dir /shared/runs/ddpm
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash recipes/torchrun_multinode.sh \
#       --mixed-precision bf16 --output-dir /shared/runs/ddpm
#   # inside a SLURM allocation the defaults come from SLURM (one task per node):
#   srun --ntasks-per-node=1 bash recipes/torchrun_multinode.sh --mixed-precision bf16 ...
#
# Print the command instead of running it: DRY_RUN=1. To resume, run the same command again.
#
# Variables: TRAIN_SCRIPT (train_ddpm.py), NNODES (SLURM_NNODES or 1), NODE_RANK
# (SLURM_NODEID or 0), MASTER_ADDR (first node of SLURM_JOB_NODELIST or 127.0.0.1),
# MASTER_PORT (29500), NPROC_PER_NODE (8), TORCHRUN (torchrun), DRY_RUN (0).

set -euo pipefail

TRAIN_SCRIPT=${TRAIN_SCRIPT:-train_ddpm.py}
TORCHRUN=${TORCHRUN:-torchrun}          # EDIT: e.g. /path/to/repo/.venv/bin/torchrun
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}     # EDIT: GPUs per node
MASTER_PORT=${MASTER_PORT:-29500}       # EDIT: a free port on node 0, open between the nodes
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
        MASTER_ADDR=${nodes[0]:?scontrol show hostnames printed nothing}
    else
        MASTER_ADDR=127.0.0.1
    fi
fi
DRY_RUN=${DRY_RUN:-0}

cmd=(
    "$TORCHRUN"
    --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    --nproc_per_node "$NPROC_PER_NODE"
    "$TRAIN_SCRIPT" "$@"
)

if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
export PYTHONUNBUFFERED=1
exec "${cmd[@]}"
