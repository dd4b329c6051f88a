#!/usr/bin/env bash
# SLURM, one process per node, each driving all of its GPUs; the first node coordinates.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config=configs/gsm8k.py \
#       --config.model.path=/data/llama-2-7b-hf --workdir=/shared/runs/r3-gsm8k
#SBATCH --job-name=r3jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355
srun bash -c "python -m r3jax.main --coordinator=$COORDINATOR --num_processes=\$SLURM_NTASKS \
  --process_id=\$SLURM_PROCID $*"
