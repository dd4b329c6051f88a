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
Then, for all the chips of one slice (`--mesh-topology`, v5p 2x2x1's 4), sharded as a run shards
it: the update per mesh under each kernel, and under splash left whole to XLA (as before
`transformer.per_device`); and `r3jax.plan`'s whole plan (SFT step, updates, prefill, decode) for
the slice under each kernel, beside the dense plan for as many CPU devices.
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

# CPU devices for the planner's plan beside the TPU slice's (as many as the slice has chips, up to
# this many); set before JAX starts
CPU_DEVICES = 8
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CPU_DEVICES}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import padding  # noqa: E402
from common import write  # noqa: E402
from sampler import ONE_B  # noqa: E402
from r3jax import config as config_lib, plan, ppo, sharding, tasks  # noqa: E402
from r3jax.metrics import machine_info  # noqa: E402
from r3jax.models import lora, transformer  # noqa: E402
from r3jax.models.transformer import init_params  # noqa: E402

FULL = ONE_B.replace(param_dtype="float32", scan_layers=True, remat="full")
# (data, fsdp, tensor) over a topology's chips: weights split 4 ways, or 2 ways and heads 2 ways
MESHES = ((1, -1, 1), (1, -1, 2))


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
def kernels_left_whole():
    """While lowering, the model runs a Pallas kernel on the whole arrays, whatever the mesh."""
    real = transformer.per_device
    transformer.per_device = lambda kernel: kernel
    try:
        yield
    finally:
        transformer.per_device = real


def packed_batch(batch_size: int) -> tuple[ml_collections.ConfigDict, ppo.Experience]:
    """(configs/gsm8k.py with `batch_size` start states a step and a value head, its first batch packed)."""
    config = config_lib.load_config_file(os.path.join(padding.CONFIGS, "gsm8k.py"))
    config.rl.batch_size, config.rl.separate_critic = batch_size, False
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    batches = padding.gold_length_batches(config, task, padding.train_tokenizer(task, 2000), 1)
    return config, padding.layouts(config, batches)["packed"][0]


def compile_update(config, batch: ppo.Experience, model_cfg, mesh, per_device: bool = True) -> dict:
    """One update of `batch` for `model_cfg`, compiled for `mesh`'s devices (a TPU's chips, or this
    host's CPU, as `r3jax.plan` compiles) from shapes alone, laid out as a run lays it out (the
    planner's `abstract_update`): the weights by their logical axes, Adam's moments like them, the
    batch's rows over data x fsdp, and the reference a copy in the compute dtype (under LoRA the
    frozen base, adapters off).
    `per_device=False` leaves a Pallas kernel whole to XLA, as r3jax did before
    `transformer.per_device`."""
    boxed = jax.eval_shape(lambda key: init_params(model_cfg, key), jax.random.key(0))
    weights = plan.abstract(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh))
    policy, frozen = lora.trainable_and_frozen(model_cfg, weights)
    reference = plan.abstract_reference(model_cfg, policy, frozen)
    update, state = plan.abstract_update(config, model_cfg, policy, mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding.batch_sharding(
        mesh, np.ndim(x))), batch)
    key = jax.ShapeDtypeStruct((), jax.random.key(1).dtype, sharding=sharding.replicated(mesh))
    tracing = [] if per_device else [kernels_left_whole()]
    if mesh.devices.flat[0].platform == "tpu":
        tracing.append(transformer.compiling_for("tpu"))
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            for context in tracing:
                stack.enter_context(context)
            compiled = update.lower(state, reference, batch, key, 1.0, 1.0, frozen).compile()
    # what the compiler says is the result: out of HBM, say, or a kernel XLA cannot partition
    except (jax.errors.JaxRuntimeError, NotImplementedError) as error:
        return {"compiled": False, "error": str(error).splitlines()[0]}
    memory, text = compiled.memory_analysis(), compiled.as_text()
    return {"compiled": True, "compile_s": time.perf_counter() - start,
            "mosaic_kernels": text.count('custom_call_target="tpu_custom_call"'),
            "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
            "generated_code_bytes": memory.generated_code_size_in_bytes,
            "collective_bytes": plan.collective_bytes(text)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", nargs="+", default=["v5p:2x2x1", "v6e:2x2", "v5e:2x2"],
                        help="TPU topologies (libtpu's names); the update is compiled for one chip of each")
    parser.add_argument("--batch", type=int, default=16, help="start states (rollouts) in the update's batch")
    parser.add_argument("--mesh-topology", default="v5p:2x2x1",
                        help="the topology whose chips the update is also compiled for all together, sharded")
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
    result["cpu_full_xla"] = compile_update(config, batch, models["full_xla"], one_device(jax.devices("cpu")[0]))
    print(f"this host's CPU full_xla: {result['cpu_full_xla']}")
    for name in args.topology:
        device = topologies.get_topology_desc(platform="tpu", topology_name=name).devices[0]
        outcomes = {variant: compile_update(config, batch, model_cfg, one_device(device))
                    for variant, model_cfg in models.items()}
        result["by_topology"][name] = {"device_kind": device.device_kind, **outcomes,
                                       "full_xla_temp_over_cpu": _ratio(outcomes["full_xla"], result["cpu_full_xla"])}
        for variant, outcome in outcomes.items():
            print(f"{name} ({device.device_kind}) {variant}: {outcome}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.mesh_topology).devices
    result["sharded"] = {"topology": args.mesh_topology, "chips": len(devices), "by_mesh": {}}
    for shape in MESHES:
        mesh = sharding.make_mesh(shape, devices)
        outcomes = {"full_xla": compile_update(config, batch, models["full_xla"], mesh),
                    "full_splash": compile_update(config, batch, models["full_splash"], mesh),
                    "full_splash_whole": compile_update(config, batch, models["full_splash"], mesh, per_device=False)}
        result["sharded"]["by_mesh"][str(dict(mesh.shape))] = outcomes
        for variant, outcome in outcomes.items():
            print(f"{args.mesh_topology} mesh {dict(mesh.shape)} {variant}: {outcome}")
    result["sharded"]["plans"] = slice_plans(config, models, list(devices))
    print(f"{args.mesh_topology} plans: {result['sharded']['plans']}")
    write("tpu-compile", result)


def slice_plans(config, models: dict, chips: list) -> dict:
    """`r3jax.plan`'s whole plan (every phase of a run, per chip) for `chips`, under the dense kernel
    and under splash, and the dense one for as many of this host's CPU devices, as the planner
    plans a TPU run today: each plan's peak, and each phase's temporaries and peak."""
    def summary(result: dict) -> dict:
        return {"peak_bytes_per_device": result["peak_bytes_per_device"],
                "phases": {name: {"temp_bytes": phase["temp_bytes"], "peak_bytes": phase["peak_bytes"]}
                           for name, phase in result["phases"].items()}}

    plans = {}
    with transformer.compiling_for("tpu"):
        for variant in ("full_xla", "full_splash"):
            plans[f"tpu_{variant}"] = summary(plan.plan(config, models[variant], devices=chips))
    if len(chips) <= CPU_DEVICES:
        plans["cpu_full_xla"] = summary(plan.plan(config, models["full_xla"], devices=jax.devices("cpu")[:len(chips)]))
        plans["tpu_full_xla_peak_over_cpu"] = (plans["tpu_full_xla"]["peak_bytes_per_device"]
                                               / plans["cpu_full_xla"]["peak_bytes_per_device"])
    return plans


def one_device(device) -> jax.sharding.Mesh:
    return sharding.make_mesh((1, 1, 1), [device])


def _ratio(outcome: dict, cpu: dict) -> float | None:
    """A TPU compile's temporaries over the CPU compile's (None if either did not compile)."""
    return outcome["temp_bytes"] / cpu["temp_bytes"] if outcome["compiled"] and cpu["compiled"] else None


if __name__ == "__main__":
    main()
