#!/usr/bin/env bash
# Runs r3jax on every host of a Cloud TPU pod slice. JAX discovers the pod topology itself, so no
# coordinator flags are needed; every host runs the same command and sees all devices.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a ./launch/tpu_pod.sh --config=configs/gsm8k.py \
#       --config.model.path=/mnt/llama-2-7b-hf --workdir=/mnt/shared/r3-gsm8k
# The workdir must be a filesystem every host sees (e.g. a gcsfuse or Filestore mount); gs:// URLs
# are refused. Put the compilation cache there too (--config.compile_cache=/mnt/shared/jax-cache):
# JAX writes it from process 0 alone. Arguments are quoted for the remote shell, so they arrive intact.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-'~/r3jax'}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps -e . &&
  python -m r3jax.main --distributed $ARGS"
