#!/usr/bin/env bash
# SLURM, one process per node, each driving all of its GPUs; the first node coordinates.
#   sbatch --nodes=2 --gpus-per-node=8 --requeue launch/slurm_gpu.sh --config=configs/gsm8k.py \
#       --config.model.path=/data/llama-2-7b-hf --workdir=/shared/runs/r3-gsm8k
# Arguments reach r3jax.main exactly as given ("$@"), spaces and parentheses included. A run
# stopped by SIGTERM saves a checkpoint and exits with status 75: requeue it to resume.
#SBATCH --job-name=r3jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):12355  # sed reads all: no SIGPIPE under pipefail
# single quotes: each task expands its own SLURM_NTASKS / SLURM_PROCID; "$@" passes the arguments intact
srun bash -c 'exec python -m r3jax.main --coordinator="$0" --num_processes="$SLURM_NTASKS" \
  --process_id="$SLURM_PROCID" "$@"' "$COORDINATOR" "$@"
