#!/usr/bin/env bash
# The GPU benchmarks in one short session, most wanted first, each under its own time limit so
# that one hang costs only its own share:
#   bash bench/accelerator.sh OUT_DIR
# Copies each result JSON and the log into OUT_DIR as it is written. Expects jax with a GPU
# plugin, flax, optax, orbax-checkpoint, transformers and sentencepiece installed, r3jax's other
# needs on PYTHONPATH, and GSM8K under $R3JAX_DATA_DIR.
set -u
out=${1:?usage: bench/accelerator.sh OUT_DIR}
cd "$(dirname "$0")"
export PYTHONPATH="..:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
log="$out/log.txt"
started=$(mktemp)  # results written after it are this session's

section() {  # section SECONDS RESULT_NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "=== $(date +%T) $name ($*), limit ${limit}s" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v "it/s\]" | tee -a "$log" | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
  find results -name "$name-*.json" -newer "$started" -exec cp {} "$out"/ \;
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, flax, optax; print(jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"
section 60 fused_update python3 fused_update.py
section 100 attention python3 attention.py
fused=$(grep -o "fastest fused kernel: [a-z]*" "$log" | tail -n 1 | cut -d" " -f4)
section 260 padding python3 padding.py --gsm8k-steps 2 --gsm8k-repeats 2 --fused "${fused:-none}"
section 130 ppo_step python3 ppo_step.py
# the planner's count for weights stored in bfloat16 (plan.CPU_BFLOAT16_OPTIONS), not yet checked on a GPU
section 150 plan_memory python3 plan_memory.py --model qwen3-0.6b --set "mesh=(-1,1,1)" model.lora.rank=64 \
  model.lora.base_dtype=bfloat16
section 100 sampler python3 sampler.py --quick --floor
