"""What the sampler's planned temporaries grow with: XLA:CPU's decode-step and prefill temporaries
for a LoRA model of 4 and of 8 layers on a bfloat16, int8 and nf4 base (GSM8K recipe, 16 rollout
rows, one device), next to each layer's KV cache. Shapes only; nothing is allocated.

    python bench/plan_sampler_growth.py [--out bench/results/plan-sampler-growth-cpu.json]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

from r3jax import files, plan, sampling  # noqa: E402
from r3jax.metrics import machine_info  # noqa: E402
from r3jax.models import hf, lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS, LAYERS, BASES = 16, (4, 8), ("bfloat16", "int8", "nf4")
SHAPE = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0)


def planned(layers: int, base: str) -> dict:
    config = plan.load_config(os.path.join(ROOT, "configs", "gsm8k.py"), [
        "model.lora.rank=64", f"model.lora.base_dtype={base}", "rl.rollout_mesh=()", "mesh=(1,1,1)",
        f"rl.batch_size={ROWS}", f"rl.rollout_rows={ROWS}"])
    model_cfg = lora.configure(hf.config_from_hf({**SHAPE, "num_hidden_layers": layers}, source="probe",
                                                 **plan.execution_settings(config)), config.model.lora)
    phases = plan.plan(config, model_cfg, progress=lambda *args: None)["phases"]
    cache_len = sampling.cache_length(model_cfg, config.rl.max_prompt_length, config.rl.max_new_tokens)
    layer_cache = (2 * ROWS * cache_len * model_cfg.num_kv_heads * model_cfg.head_dim  # K and V
                   * np.dtype(model_cfg.jnp_dtype).itemsize)
    return {"layers": layers, "base": base, "layer_kv_cache_bytes": layer_cache,
            "decode_temp_bytes": phases["decode_step_rollout"]["temp_bytes"],
            "prefill_temp_bytes": phases["prefill_rollout"]["temp_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/plan-sampler-growth-cpu.json")
    args = parser.parse_args()
    rows = [planned(layers, base) for layers in LAYERS for base in BASES]
    growth = {}
    for base in BASES:
        small, large = (next(r for r in rows if r["layers"] == n and r["base"] == base) for n in LAYERS)
        per_layer = (large["decode_temp_bytes"] - small["decode_temp_bytes"]) / (LAYERS[1] - LAYERS[0])
        growth[base] = {"decode_temp_bytes_per_layer": per_layer,
                        "per_layer_over_kv_cache": per_layer / small["layer_kv_cache_bytes"]}
        print(f"{base:9s} decode temporaries grow {per_layer / 1e9:.3f} GB per layer, "
              f"{growth[base]['per_layer_over_kv_cache']:.2f}x the layer's KV cache "
              f"({small['layer_kv_cache_bytes'] / 1e9:.3f} GB)")
    files.write_json(args.out, {"machine": machine_info(), "plans": rows, "growth": growth})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
