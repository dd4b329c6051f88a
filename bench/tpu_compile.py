"""The packed RL update compiled for a TPU from this host, ahead of time: the dense attention kernel
against Pallas's splash kernel with segment ids (`model.attention_impl=splash`), which otherwise
runs here only interpreted.

    pip install "libtpu==0.0.42.*"   # jax[tpu]'s pin for jax 0.10.2; no TPU needed
    python bench/tpu_compile.py [--topology v5p:2x2x1 v6e:2x2 v5e:2x2] [--batch 16]

What it builds: configs/gsm8k.py's first batch of start states (GSM8K, gold rationale lengths, as
bench/padding.py lays them out), packed, at TinyLlama-1.1B's shape (layers scanned and
rematerialised, computing in bfloat16, a value head), one update of the recipe's PPO settings: the
full fine-tune (float32 weights) under each kernel, and LoRA r64 on an nf4 base under splash.
JAX's TPU compiler (libtpu) compiles it for one chip of each topology without the chip: whether
it compiles, in how long, whether the splash kernel is in the program as Mosaic code (a
`tpu_custom_call`) rather than interpreted, and XLA's memory analysis (temporaries, arguments).
The dense update is also compiled for this host's CPU, as `r3jax.plan` plans memory, and each
TPU's temporaries are given over the CPU's.
Nothing runs, so this says nothing of the numbers the kernel computes; on a CPU the interpreted
kernel's update equals the dense one's (tests/test_trim.py).
Results: bench/results/tpu-compile-<this host's device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from importlib import metadata

import flax.linen as nn
import jax
import ml_collections
import numpy as np

import padding
from common import write
from sampler import ONE_B
from r3jax import config as config_lib, optim, plan, ppo, settings as settings_lib, tasks
from r3jax.metrics import machine_info
from r3jax.models import lora
from r3jax.models.transformer import init_params
from r3jax.models.value import actor_critic_params

FULL = ONE_B.replace(param_dtype="float32", scan_layers=True, remat="full")


def variants(config) -> dict:
    """The models compiled, by name: the full fine-tune under the dense kernel and under splash, and
    LoRA r64 on a 4-bit NormalFloat base (QLoRA, the rest of the base in bfloat16, as a run holds it)
    under splash."""
    qlora = config.model.lora.copy_and_resolve_references()
    qlora.update(rank=64, base_dtype="nf4")
    splash = FULL.replace(attention_impl="splash")
    return {"full_xla": FULL.replace(attention_impl="xla"), "full_splash": splash,
            "qlora_r64_nf4_splash": lora.configure(splash.replace(param_dtype="bfloat16"), qlora)}


@contextlib.contextmanager
def compiling_for_tpu():
    """The model asks `jax.default_backend()` where it runs (the Pallas kernels run interpreted on a
    CPU): while lowering here for a TPU, the answer is the TPU."""
    real = jax.default_backend
    jax.default_backend = lambda: "tpu"
    try:
        yield
    finally:
        jax.default_backend = real


def packed_batch(batch_size: int) -> tuple[ml_collections.ConfigDict, ppo.Experience]:
    """(configs/gsm8k.py with `batch_size` start states a step and a value head, its first batch packed)."""
    config = config_lib.load_config_file(os.path.join(padding.CONFIGS, "gsm8k.py"))
    config.rl.batch_size, config.rl.separate_critic = batch_size, False
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    batches = padding.gold_length_batches(config, task, padding.train_tokenizer(task, 2000), 1)
    return config, padding.layouts(config, batches)["packed"][0]


def compile_update(config, batch: ppo.Experience, model_cfg, device) -> dict:
    """One update of `batch` for `model_cfg`, compiled for `device` (a TPU's, or this host's CPU, as
    `r3jax.plan` compiles) from shapes alone, with what a run holds: the reference a copy in the
    compute dtype, or under LoRA the frozen base (adapters off)."""
    weights = jax.eval_shape(lambda key: nn.unbox(init_params(model_cfg, key)), jax.random.key(0))
    policy, frozen = lora.trainable_and_frozen(model_cfg, weights)
    reference = plan.abstract_reference(model_cfg, policy, frozen)
    params = jax.eval_shape(lambda p: actor_critic_params(model_cfg, p, False, critic=True), policy)
    optimizer = optim.rl_optimizer(config.rl, params)
    state = jax.eval_shape(lambda p: ppo.init_state(p, optimizer), params)
    update = ppo.make_ppo_update(model_cfg, settings_lib.of(config).ppo, optimizer)
    on_device = jax.sharding.SingleDeviceSharding(device)
    state, reference, batch, key, frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=on_device),
        (state, reference, batch, jax.eval_shape(lambda: jax.random.key(1)), frozen))
    start = time.perf_counter()
    try:
        with compiling_for_tpu() if device.platform == "tpu" else contextlib.nullcontext():
            compiled = update.lower(state, reference, batch, key, 1.0, 1.0, frozen).compile()
    except jax.errors.JaxRuntimeError as error:  # e.g. out of HBM: what the compiler says is the result
        return {"compiled": False, "error": str(error).splitlines()[0]}
    memory = compiled.memory_analysis()
    return {"compiled": True, "compile_s": time.perf_counter() - start,
            "mosaic_kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
            "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
            "generated_code_bytes": memory.generated_code_size_in_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", nargs="+", default=["v5p:2x2x1", "v6e:2x2", "v5e:2x2"],
                        help="TPU topologies (libtpu's names); the update is compiled for one chip of each")
    parser.add_argument("--batch", type=int, default=16, help="start states (rollouts) in the update's batch")
    args = parser.parse_args()
    if importlib.util.find_spec("libtpu") is None:  # JAX finds the TPU compiler through it
        sys.exit('error: bench/tpu_compile.py needs libtpu: pip install "libtpu==0.0.42.*" (jax[tpu]\'s pin)')
    from jax.experimental import topologies

    config, batch = packed_batch(args.batch)
    models = variants(config)
    result = {"benchmark": "the packed RL update compiled ahead of time for a TPU (bench/tpu_compile.py)",
              "machine": machine_info(), "libtpu": metadata.version("libtpu"),
              "model": "TinyLlama-1.1B shape, float32 weights (QLoRA: an nf4 base), bfloat16 compute, "
                       "scan_layers, remat=full, value head",
              "batch": args.batch, "packed_rows": list(batch.packing.tokens.shape),
              "completion": list(batch.rollout.completion_mask.shape), "by_topology": {}}
    # the same dense update compiled for this CPU, as the planner does (which compiles without
    # r3jax's YNNPACK setting): how far a plan made on a CPU stands from a TPU's own count
    result["cpu_full_xla"] = compile_update(config, batch, models["full_xla"], jax.devices("cpu")[0])
    print(f"this host's CPU full_xla: {result['cpu_full_xla']}")
    for name in args.topology:
        device = topologies.get_topology_desc(platform="tpu", topology_name=name).devices[0]
        outcomes = {variant: compile_update(config, batch, model_cfg, device) for variant, model_cfg in models.items()}
        result["by_topology"][name] = {"device_kind": device.device_kind, **outcomes,
                                       "full_xla_temp_over_cpu": _ratio(outcomes["full_xla"], result["cpu_full_xla"])}
        for variant, outcome in outcomes.items():
            print(f"{name} ({device.device_kind}) {variant}: {outcome}")
    write("tpu-compile", result)


def _ratio(outcome: dict, cpu: dict) -> float | None:
    """A TPU compile's temporaries over the CPU compile's (None if either did not compile)."""
    return outcome["temp_bytes"] / cpu["temp_bytes"] if outcome["compiled"] and cpu["compiled"] else None


if __name__ == "__main__":
    main()
