#!/usr/bin/env bash
# Train one sovtune recipe on several Slurm nodes: one `accelerate launch` per node, one process per GPU.
# Only global rank 0 writes the run directory, so runs/ must be on a filesystem every node sees.
#
# Submit:   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_multinode.sh recipes/llama-3.1-8b-multi-gpu.yaml [ddp|fsdp]
# Check:    DRY_RUN=1 SLURM_NNODES=2 SLURM_NODEID=0 SLURM_JOB_NODELIST=node1 bash scripts/slurm_multinode.sh RECIPE
#           prints the per-node command instead of running it.
#SBATCH --job-name=sovtune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one accelerate launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm_multinode.sh RECIPE [ddp|fsdp] [extra sovtune train flags, e.g. --resume]}
STRATEGY=${2:-ddp}
shift $(( $# >= 2 ? 2 : 1 ))
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NODES=${SLURM_NNODES:?run under Slurm (sbatch), or set SLURM_NNODES/SLURM_NODEID/SLURM_JOB_NODELIST}
MAIN_HOST=${MAIN_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || echo "${SLURM_JOB_NODELIST%%,*}")}
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE=${ACCELERATE:-accelerate}

case "$STRATEGY" in
  ddp)  CONFIG=configs/accelerate/multinode-template.yaml ;;
  fsdp) CONFIG=configs/accelerate/fsdp.yaml ;;   # for 4-bit recipes use fsdp-qlora.yaml (storage_dtype bfloat16)
  *)    echo "strategy must be ddp or fsdp, got $STRATEGY" >&2; exit 2 ;;
esac

# A failing rank must end the job, not leave the other nodes waiting in a collective until the timeout:
# torchrun stops the processes of its node, and srun --kill-on-bad-exit stops the other nodes.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=1

# $SLURM_NODEID is expanded by each node's shell (single quotes), everything else here.
LAUNCH="$ACCELERATE launch --config_file $CONFIG \
  --num_machines $NODES --num_processes $(( NODES * GPUS_PER_NODE )) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port $MAIN_PORT \
  --rdzv_backend static --same_network --max_restarts 0 \
  -m sovtune train $RECIPE $*"

if [[ -n "${DRY_RUN:-}" ]]; then
  SLURM_NODEID=${SLURM_NODEID:-0} bash -c "echo $LAUNCH"
  exit 0
fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "$LAUNCH"
