"""Will a config fit, and what will it move? Compiles the real graphs on simulated devices before
anything is allocated:

    python -m r3jax.plan --config=configs/gsm8k.py --model=llama-2-7b --devices=8 --device-memory=80GB

The SFT step, the sampler's prefill and one decode step (in the rollout layout and in the training
layout) and the PPO update are compiled from shapes alone (`jax.ShapeDtypeStruct`) on N CPU devices
that stand in for the accelerators. Per device it reports the parameter, optimizer-state and
temporary bytes XLA allocates, the peak of each phase, whether it fits the given memory (with 10%
headroom), and the bytes the collectives move, read from the compiled HLO with each loop body
counted as often as it runs. When a config does not fit it names the knobs that would help and
plans again with them.

    python -m r3jax.plan --config=configs/gsm8k.py --model=tinyllama-1.1b --tpu=v5p:2x2x1 --device-memory=95GB

plans for a TPU topology's chips instead, compiled by JAX's TPU compiler without them (the
`libtpu` wheel, not in the requirements). XLA:CPU computes bfloat16 dots in float32, so a CPU
plan of bfloat16 weights compiles without hoisting those converts out of the layer loop
(CPU_BFLOAT16_OPTIONS); under bfloat16 compute a CPU plan still over-counts a GPU's or TPU's
memory somewhat, and where checked against the TPU compiler it never under-counted it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import os
import re
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r3jax import files, optim, packing, ppo, programs, sampling, settings as settings_lib, sharding
from r3jax.config import (apply_override, data_parallel_size, flatten, load_config_file, validate_layout, value_at,
                          with_setting_line)
from r3jax.models import hf, lora, transformer
from r3jax.models.transformer import init_cache, init_params
from r3jax.models.value import actor_critic_params
from r3jax.train.job import execution_settings, scratch_model_config
from r3jax.train.rl import pack_width, update_rows
from r3jax.train.sft import SFTState, make_train_step

PRESETS = {  # shapes only (HF config.json fields); no weights
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rope_theta=10000.0),
    "codellama-7b": dict(model_type="llama", vocab_size=32016, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=16384, rope_theta=1000000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=10000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    # Qwen3: head_dim 128 apart from hidden / heads, per-head q/k norms, no qkv bias
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rope_theta=10000.0),
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
HEADROOM = 0.9
GB = 1e9


class PlanError(ValueError):
    """Bad input to the planner; main prints it in one line."""


def parse_memory(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|MB|MiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise PlanError(f"--device-memory={text}: expected a size such as 80GB or 16GiB")
    scale = {"gb": 1e9, "gib": 2 ** 30, "mb": 1e6, "mib": 2 ** 20}[(match.group(2) or "GB").lower()]
    return float(match.group(1)) * scale


def _shape_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO result shape such as `bf16[8,4096]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", shape_text):
        if dtype in DTYPE_BYTES:
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += size * DTYPE_BYTES[dtype]
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per call of the compiled program, per device: every
    collective's result size, times how often its computation runs (while bodies by their known
    trip count, nested loops multiplied)."""
    computations: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(2)
            computations[name] = []
            if header.group(1):
                entry = name
        elif name is not None and line.strip() and line.strip() != "}":
            computations[name].append(line)
    calls: dict[str, list[tuple[str, int]]] = {n: [] for n in computations}
    for caller, lines in computations.items():
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for key, callee in re.findall(r"\b(body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", line):
                count = int(trips.group(1)) if trips and key in ("body", "condition") else 1
                calls[caller].append((callee, count))
    runs: dict[str, int] = {}

    def visit(computation: str, times: int) -> None:
        runs[computation] = runs.get(computation, 0) + times
        for callee, count in calls.get(computation, []):
            if callee in computations:
                visit(callee, times * count)

    if entry is None:
        raise PlanError("no ENTRY computation in the HLO")
    visit(entry, 1)
    moved = {kind: 0 for kind in COLLECTIVES}
    for computation, times in runs.items():
        for line in computations[computation]:
            op = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if op:
                moved[op.group(2)] += _shape_bytes(op.group(1)) * times
    return moved


def model_config_for(config, preset: str | None):
    """The ModelConfig of `--model` (a preset), of config.model.path's config.json, or of a
    from-scratch config's model section; with config.model.lora's adapters."""
    return lora.configure(_base_model_config(config, preset), config.model.lora)


def _base_model_config(config, preset: str | None):
    execution = execution_settings(config)
    if preset:
        if preset not in PRESETS:
            raise PlanError(f"--model={preset}: unknown preset (known: {', '.join(PRESETS)})")
        return hf.config_from_hf(PRESETS[preset], source=f"preset {preset}", **execution)
    if not config.model.path:
        if config.model.from_scratch:  # the config's own from-scratch shape
            return scratch_model_config(config, config.tokenizer.vocab_size)
        raise PlanError("give --model=<preset> or config.model.path (a directory with config.json)")
    path = hf.cached_snapshot(config.model.path) or config.model.path
    if not os.path.exists(os.path.join(path, "config.json")):
        raise PlanError(f"config.model.path: {path} has no config.json")
    return hf.read_config(path, **execution)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "peak_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                              + m.temp_size_in_bytes)}


def abstract(tree, shardings):
    """`tree`'s leaves as shapes and dtypes alone, each placed by its sharding in `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def like_params(fn, params, mesh):
    """The abstract output of `fn(params)` (params and optimizer states built from them), each leaf
    placed as `sharding.shardings_like_params` places it (Adam's moments like their weights)."""
    tree = jax.eval_shape(fn, params)
    return abstract(tree, sharding.shardings_like_params(tree, params, mesh))


def _tree_bytes_per_device(tree) -> int:
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8
                   for x in jax.tree.leaves(tree)))


# XLA:CPU computes bfloat16 dots in float32, and its loop-invariant code motion hoists those
# converts out of the layer scan: a CPU compile of bfloat16 weights then holds a float32 copy of
# every one, which a GPU or TPU, computing on them as stored, never makes. Without the hoisting each
# layer's copy is made inside the loop, one at a time (measured against the TPU compiler:
# docs/experiments.md, "Paper scale: planned memory").
CPU_BFLOAT16_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options(model_cfg, mesh) -> dict[str, str]:
    """The XLA options a plan compiles with: CPU_BFLOAT16_OPTIONS on CPU devices for weights stored
    and computed in bfloat16 (a LoRA base too), whose float32 copies are the CPU's alone; else
    XLA's own, the larger count."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    in_bfloat16 = {jnp.dtype(model_cfg.param_dtype), jnp.dtype(model_cfg.dtype)} == {jnp.dtype(jnp.bfloat16)}
    return CPU_BFLOAT16_OPTIONS if on_cpu and in_bfloat16 and not model_cfg.quantized_kernels else {}


class _Compiler:
    """Compiles a run's phases one by one, recording each one's memory, collectives and compile time."""

    def __init__(self, progress, options: dict[str, str]):
        self.progress, self.options, self.phases, self.seconds = progress, options, {}, {}

    def __call__(self, name: str, mesh, lowered_fn):
        """Compiles `lowered_fn()`, traced under `mesh` as programs.Cached traces a run's programs."""
        self.progress(f"compiling {name} ...")
        start = time.perf_counter()
        try:
            with programs.on_mesh(mesh):
                compiled = lowered_fn().compile(compiler_options=self.options)
        except jax.errors.JaxRuntimeError as error:
            over = over_device_bytes(str(error))
            if over is None:
                raise
            compiled, measured = None, {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": over,
                                        "peak_bytes": over, "collective_bytes": {}, "flops": 0.0,
                                        "compile_error": str(error).splitlines()[0]}
        else:
            measured = {**_memory(compiled), "collective_bytes": collective_bytes(compiled.as_text()),
                        "flops": float(compiled.cost_analysis().get("flops", 0.0))}
        self.seconds[name] = time.perf_counter() - start
        self.phases[name] = {**measured, "compile_seconds": self.seconds[name]}
        return compiled


def over_device_bytes(message: str) -> int | None:
    """The temporaries a TPU compile refused for its chip's memory ("... HLO temporaries (20.83G)
    exceeds available HBM (15.75G)"), in bytes; None for any other error."""
    match = re.search(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT])\)", message)
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


def _plan_sft(compile_phase: _Compiler, config, model_cfg, policy, frozen, mesh) -> None:
    """One jitted SFT step over batch_size x grad_accum sequences of sft.max_length, training
    `policy` (with LoRA its adapters, on the base `frozen`)."""
    c = config.sft
    optimizer = optim.sft_optimizer(c)
    state = SFTState(policy, like_params(optimizer.init, policy, mesh), jax.ShapeDtypeStruct((), jnp.int32))
    batch = {k: jax.ShapeDtypeStruct((c.batch_size, c.grad_accum, c.max_length), jnp.int32,
                                     sharding=sharding.batch_sharding(mesh, 3))
             for k in ("tokens", "attention_mask", "loss_mask")}
    step = make_train_step(model_cfg, optimizer, c.logits_chunk)
    compile_phase("sft_step", mesh, lambda: step.lower(state, batch, 1.0, frozen))


def packed_rows(c, rollout_tokens: int, batch_shards: int) -> tuple[int, int]:
    """(rows, width) of a packed update (`rl.update_batch`) whose rollouts hold `rollout_tokens`
    real tokens each on average."""
    width = pack_width(c)
    rows = -(-update_rows(c) * rollout_tokens // width)
    return packing.round_up(rows, packing.row_multiple(batch_shards)), width


def abstract_update(config, model_cfg, policy, mesh) -> tuple[Any, ppo.PPOState]:
    """(`config`'s PPO update, its abstract training state): the trained params built from the
    abstract `policy` (a critic or value head as `config.rl` says), laid out like it, with Adam's
    moments like them."""
    c = config.rl
    params = like_params(lambda p: actor_critic_params(model_cfg, p, c.separate_critic,
                                                        critic=c.estimator == "gae"), policy, mesh)
    optimizer = optim.rl_optimizer(c, params)
    state = ppo.PPOState(params, like_params(optimizer.init, params, mesh), jax.ShapeDtypeStruct((), jnp.int32))
    return ppo.make_ppo_update(model_cfg, settings_lib.of(config).ppo, optimizer), state


def _plan_update(compile_phase: _Compiler, config, model_cfg, policy, reference, frozen, mesh,
                 rollout_tokens: int) -> ppo.PPOState:
    """The PPO update on rollouts of rl.max_prompt_length + rl.max_new_tokens (the worst case, which
    the plan's memory is); with rl.pack also a packed update whose rollouts hold `rollout_tokens`
    each (its compute). Returns the (abstract) training state."""
    c = config.rl
    update, state = abstract_update(config, model_cfg, policy, mesh)
    rows, length = update_rows(c), c.max_prompt_length + c.max_new_tokens

    def rows_spec(*shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    rollout = ppo.Experience(
        sampling.Rollout(rows_spec(rows, length), rows_spec(rows, length),
                         rows_spec(rows, c.max_new_tokens, dtype=jnp.float32), rows_spec(rows, c.max_new_tokens),
                         rows_spec(rows)),
        rows_spec(rows, dtype=jnp.float32), rows_spec(rows, dtype=jnp.float32))
    key = jax.random.key(0)
    compile_phase("ppo_update", mesh, lambda: update.lower(state, reference, rollout, key, 1.0, 1.0, frozen))
    if c.pack:
        packed, width = packed_rows(c, rollout_tokens, data_parallel_size(mesh.devices.shape))
        completions = rows_spec(rows, c.max_new_tokens)
        rollout = rollout._replace(rollout=rollout.rollout._replace(tokens=completions, attention_mask=completions),
                                   packing=packing.Packing(rows_spec(packed, width), rows_spec(packed, width),
                                                           rows_spec(packed, width), completions))
        compile_phase("ppo_update_packed", mesh, lambda: update.lower(state, reference, rollout, key, 1.0, 1.0, frozen))
    return state


def _plan_sampler(compile_phase: _Compiler, config, model_cfg, params, boxed, layout: str, sample_mesh) -> int:
    """Prefill and one decode step with the weights in `sample_mesh`'s layout: a copy in the compute
    dtype, or with LoRA on the training mesh the weights as they lie (as rl.train samples). Returns
    the bytes per device of that copy (0 without one)."""
    c, compute_cfg = config.rl, model_cfg.replace(param_dtype=model_cfg.dtype)
    copied = not model_cfg.lora_rank or (layout == "rollout" and bool(config.rl.rollout_mesh))
    weights = params if not copied else abstract(
        jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(model_cfg.jnp_dtype), p), params),
        sharding.logical_shardings(boxed, sample_mesh))
    rows, prompt = c.rollout_rows or c.batch_size, c.max_prompt_length
    cache_len = sampling.cache_length(model_cfg, prompt, c.max_new_tokens)
    batch_axis = 1 if model_cfg.scan_layers else 0
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(
        sample_mesh, x.ndim, batch_axis)), jax.eval_shape(lambda: init_cache(model_cfg, rows, cache_len)))

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(sample_mesh, len(shape)))

    prefill = jax.jit(functools.partial(sampling.prefill, compute_cfg), donate_argnums=4)
    decode_step = jax.jit(functools.partial(sampling.decode_step, compute_cfg), donate_argnums=4)
    compile_phase(f"prefill_{layout}", sample_mesh, lambda: prefill.lower(
        weights, spec(rows, prompt), spec(rows, prompt), spec(rows, cache_len), cache))
    compile_phase(f"decode_step_{layout}", sample_mesh, lambda: decode_step.lower(
        weights, spec(rows), spec(rows), spec(rows, cache_len), cache, jax.ShapeDtypeStruct((), jnp.int32)))
    return _tree_bytes_per_device(weights) if copied else 0


def _totals(phases: dict, model_cfg, state: ppo.PPOState, reference, frozen, rollout_weight_bytes: int) -> dict:
    """The plan's per-device totals from its compiled phases and abstract state."""
    state_bytes, frozen_bytes = _tree_bytes_per_device(state.params), _tree_bytes_per_device(frozen)
    optimizer_bytes, reference_bytes = _tree_bytes_per_device(state.opt_state), _tree_bytes_per_device(reference)
    # sampling holds the training state, the reference and a frozen base while the rollout copy
    # decodes; a LoRA model sampled as it lies has its base among the sampler's own arguments
    sampling_peak = (max(phases["prefill_rollout"]["peak_bytes"], phases["decode_step_rollout"]["peak_bytes"])
                     + state_bytes + optimizer_bytes + reference_bytes + (frozen_bytes if rollout_weight_bytes else 0))
    return dict(
        weight_bytes=int(model_cfg.num_params() * np.dtype(model_cfg.jnp_dtype).itemsize),
        param_bytes_per_device=state_bytes, optimizer_state_bytes_per_device=optimizer_bytes,
        frozen_bytes_per_device=frozen_bytes,
        reference_bytes_per_device=reference_bytes, rollout_weight_bytes_per_device=rollout_weight_bytes,
        sampling_peak_bytes_per_device=sampling_peak,
        decode_collective_bytes={layout: sum(phases[f"decode_step_{layout}"]["collective_bytes"].values())
                                 for layout in ("rollout", "training")},
        update_collective_bytes=sum(phases["ppo_update"]["collective_bytes"].values()),
        peak_bytes_per_device=max(_phase_peaks(phases, sampling_peak).values()))


def _phase_peaks(phases: dict, sampling_peak: int) -> dict[str, int]:
    """Per device, each phase's peak as the run meets it: the SFT step, the PPO update, sampling."""
    return {"sft_step": phases["sft_step"]["peak_bytes"], "ppo_update": phases["ppo_update"]["peak_bytes"],
            "sampling": sampling_peak}


def abstract_reference(model_cfg, policy, frozen):
    """The KL penalty's reference as a run holds it, from the abstract `policy`: a copy in the compute
    dtype, laid out as the policy; None under LoRA, whose reference is the `frozen` base."""
    return None if frozen is not None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, model_cfg.jnp_dtype, sharding=x.sharding), policy)


def plan(config, model_cfg, progress=print, rollout_tokens: int = 0, devices=None) -> dict:
    """Compiles the run's graphs for `config` on `devices` (default: the current ones; a TPU
    topology's, say, which need not be attached); returns the plan.
    `rollout_tokens`: the mean real tokens per rollout a packed update is planned at (0: half the
    longest rollout)."""
    rollout_tokens = rollout_tokens or (config.rl.max_prompt_length + config.rl.max_new_tokens) // 2
    mesh = sharding.make_mesh(config.mesh, devices)
    rollout_mesh = sharding.make_mesh(config.rl.rollout_mesh, devices) if config.rl.rollout_mesh else mesh
    boxed = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    params = abstract(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh))
    policy, frozen = lora.trainable_and_frozen(model_cfg, params)
    reference = abstract_reference(model_cfg, policy, frozen)
    compile_phase = _Compiler(progress, compiler_options(model_cfg, mesh))
    _plan_sft(compile_phase, config, model_cfg, policy, frozen, mesh)
    state = _plan_update(compile_phase, config, model_cfg, policy, reference, frozen, mesh, rollout_tokens)
    rollout_weight_bytes = _plan_sampler(compile_phase, config, model_cfg, params, boxed, "rollout", rollout_mesh)
    _plan_sampler(compile_phase, config, model_cfg, params, boxed, "training", mesh)
    result = {"model": dataclasses.asdict(model_cfg), "num_params": model_cfg.num_params(),
              "devices": mesh.size, "device_kind": mesh.devices.flat[0].device_kind,
              "mesh": dict(mesh.shape), "rollout_mesh": dict(rollout_mesh.shape),
              "phases": compile_phase.phases, "compiler_options": compile_phase.options}
    result.update(compile_seconds=compile_phase.seconds)
    if config.rl.pack:
        result.update(packed_update_rollout_tokens=rollout_tokens,
                      packed_update_flops_ratio=(compile_phase.phases["ppo_update_packed"]["flops"]
                                                 / max(compile_phase.phases["ppo_update"]["flops"], 1.0)))
    result.update(_totals(compile_phase.phases, model_cfg, state, reference, frozen, rollout_weight_bytes))
    return result


def concrete_phase(config, model_cfg, phase: str):
    """The real `phase` ("sft_step" or "ppo_update") at the plan's shapes, on random weights and
    all-ones tokens: `(fn, args)`, to call or to compile, for checking a plan against the program
    it stands for (tests/test_plan.py, bench/plan_memory.py)."""
    mesh = sharding.make_mesh(config.mesh)
    boxed = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    policy, frozen = lora.trainable_and_frozen(model_cfg, jax.jit(
        lambda k: nn.unbox(init_params(model_cfg, k)), out_shardings=sharding.logical_shardings(boxed, mesh))(
        jax.random.key(0)))
    if phase == "sft_step":
        c = config.sft
        optimizer = optim.sft_optimizer(c)
        state = SFTState(policy, *optim.initial_state(optimizer, policy))
        shape = (c.batch_size, c.grad_accum, c.max_length)
        batch = sharding.shard_batch({k: np.ones(shape, np.int32) for k in ("tokens", "attention_mask", "loss_mask")},
                                     mesh)
        return make_train_step(model_cfg, optimizer, c.logits_chunk), (state, batch, 1.0, frozen)
    c = config.rl
    params = actor_critic_params(model_cfg, policy, c.separate_critic, critic=c.estimator == "gae")
    optimizer = optim.rl_optimizer(c, params)
    rows, new = update_rows(c), c.max_new_tokens
    length = c.max_prompt_length + new
    experience = sharding.shard_batch(ppo.experience(sampling.Rollout(
        np.ones((rows, length), np.int32), np.ones((rows, length), np.int32), np.zeros((rows, new), np.float32),
        np.ones((rows, new), np.int32), np.full(rows, new, np.int32)), np.zeros(rows, np.float32)), mesh)
    reference = None if frozen is not None else sharding.compute_copy(model_cfg, mesh)(policy)
    update = ppo.make_ppo_update(model_cfg, settings_lib.of(config).ppo, optimizer)
    return update, (ppo.init_state(params, optimizer), reference, experience, jax.random.key(0), 1.0, 1.0, frozen)


MAX_REPLANS = 12


class Knob(NamedTuple):
    """A config change that shrinks the memory of `phases` (sft_step, ppo_update, sampling, or
    resident: the weights and Adam moments)."""
    name: str
    phases: tuple[str, ...]
    applies: Callable[[Any], bool]
    change: Callable[[Any], None]


KNOBS = (  # what to try for a phase over the memory, in this order, each in turn
    Knob("rl.logits_chunk", ("ppo_update",), lambda c: c.rl.logits_chunk == 0,
         lambda c: c.rl.update(logits_chunk=128)),
    Knob("sft.logits_chunk", ("sft_step",), lambda c: c.sft.logits_chunk == 0,
         lambda c: c.sft.update(logits_chunk=128)),
    Knob("model.remat", ("sft_step", "ppo_update"), lambda c: c.model.remat == "none",
         lambda c: c.model.update(remat="full")),
    Knob("model.attention_chunk", ("sft_step", "ppo_update", "sampling"), lambda c: c.model.attention_chunk == 0,
         lambda c: c.model.update(attention_chunk=256)),
    # splitting the update's rows by rollout unpacks it (packed rows mix rollouts)
    Knob("rl.minibatches", ("ppo_update",), lambda c: c.rl.batch_size % (2 * c.rl.minibatches) == 0,
         lambda c: c.rl.update(minibatches=2 * c.rl.minibatches, pack=False)),
    Knob("rl.prepare_chunks", ("ppo_update",), lambda c: c.rl.batch_size % (2 * c.rl.prepare_chunks) == 0,
         lambda c: c.rl.update(prepare_chunks=2 * c.rl.prepare_chunks, pack=False)),
    Knob("rl.rollout_rows", ("sampling",), lambda c: (c.rl.rollout_rows or c.rl.batch_size) >= 2,
         lambda c: c.rl.update(rollout_rows=(c.rl.rollout_rows or c.rl.batch_size) // 2)),
    Knob("sft.grad_accum", ("sft_step",), lambda c: c.sft.batch_size % 2 == 0,
         lambda c: c.sft.update(batch_size=c.sft.batch_size // 2, grad_accum=2 * c.sft.grad_accum)),
    # weights and Adam moments that no activation knob shrinks: adapters of rank 64 on a bfloat16 base
    Knob("model.lora.rank", ("resident",), lambda c: c.model.lora.rank == 0,
         lambda c: c.model.lora.update(rank=64, base_dtype="bfloat16")),
)


def phases_over(result: dict, memory: float) -> list[str]:
    """The phases whose peak exceeds the memory with headroom; only `resident` when the weights and
    Adam moments alone do (no activation knob can help then)."""
    if _resident_bytes(result) > HEADROOM * memory:
        return ["resident"]
    peaks = _phase_peaks(result["phases"], result["sampling_peak_bytes_per_device"])
    return [phase for phase, peak in peaks.items() if peak > HEADROOM * memory]


def turn_knobs(config, over: list[str], queues: dict[str, list[Knob]]) -> list[str]:
    """Changes `config` by the next knob that applies for each phase in `over` (a knob taken goes to
    the back of its phase's queue, so each phase's knobs take turns); returns what changed."""
    changed = []
    for phase in over:
        knob = next((knob for knob in queues[phase] if knob.applies(config)), None)
        if knob is None:
            continue
        queues[phase].remove(knob)
        queues[phase].append(knob)
        packed = config.rl.pack
        knob.change(config)
        unpacked = ", rl.pack=False" if packed > config.rl.pack else ""
        changed.append(f"{knob.name}={value_at(config, knob.name)}{unpacked}")
    return changed


def report_lines(result: dict, memory: float) -> list[str]:
    phases = result["phases"]
    lines = [f"{result['num_params']:,} parameters on {result['devices']} devices "
             f"({result['device_kind']}), mesh {result['mesh']}, "
             f"rollout mesh {result['rollout_mesh']}",
             f"per device: trained params {result['param_bytes_per_device'] / GB:.1f} GB, frozen "
             f"{result['frozen_bytes_per_device'] / GB:.1f} GB, optimizer state "
             f"{result['optimizer_state_bytes_per_device'] / GB:.1f} GB, reference "
             f"{result['reference_bytes_per_device'] / GB:.1f} GB, rollout weights "
             f"{result['rollout_weight_bytes_per_device'] / GB:.1f} GB"]
    for name, phase in phases.items():
        lines.append(f"  {name:22s} peak {phase['peak_bytes'] / GB:6.1f} GB (temp {phase['temp_bytes'] / GB:5.1f} GB), "
                     f"collectives {sum(phase['collective_bytes'].values()) / GB:8.3f} GB, "
                     f"compiled in {phase['compile_seconds']:.0f} s"
                     + (f"; refused for memory: {phase['compile_error']}" if "compile_error" in phase else ""))
    if result.get("compiler_options"):
        lines.append("counted without the float32 copies of the bfloat16 weights that XLA:CPU hoists out of the "
                     "layer loop (a GPU or TPU computes on them as stored)")
    if "packed_update_flops_ratio" in result:
        lines.append(f"a packed update (rl.pack) at {result['packed_update_rollout_tokens']} real tokens per rollout "
                     f"costs {result['packed_update_flops_ratio']:.2f}x the padded update's FLOPs (XLA's count)")
    decode = result["decode_collective_bytes"]
    lines.append(f"decode step moves {decode['rollout'] / GB:.3f} GB through collectives in the rollout layout, "
                 f"{decode['training'] / GB:.3f} GB in the training layout (weights: {result['weight_bytes'] / GB:.1f} GB)")
    lines.append(f"peak {result['peak_bytes_per_device'] / GB:.1f} GB per device of {memory / GB:.0f} GB: "
                 + ("fits" if result["fits"] else "does NOT fit") + f" (with {100 - 100 * HEADROOM:.0f}% headroom)")
    if result["knobs_applied"]:
        lines.append(f"planned after {len(result['knobs_applied'])} knob turns, each round's above (first plan's "
                     f"peak: {result['first_plan_peak_bytes'] / GB:.1f} GB)")
        lines.append("as overrides: " + " ".join(f"--config.{key}={value}"
                                                 for key, value in result["overrides"].items()))
    if not result["fits"] and _resident_bytes(result) > HEADROOM * memory:
        lines.append(f"the weights and Adam moments alone need {_resident_bytes(result) / GB:.1f} GB per device: "
                     "shard them over more devices (FSDP), train LoRA adapters or choose a smaller model; no "
                     "activation knob can help")
    return lines


def _resident_bytes(result: dict) -> int:
    """What a run holds per device whatever its activations: weights (trained and frozen) and Adam's moments."""
    return sum(result[key] for key in ("param_bytes_per_device", "frozen_bytes_per_device",
                                       "optimizer_state_bytes_per_device"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/<file>.py[:argument]")
    parser.add_argument("--model", help=f"a shape preset ({', '.join(PRESETS)}); default: config.model.path")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--device-memory", help="memory per device, e.g. 80GB (default) or 16GiB")
    parser.add_argument("--tpu", metavar="TOPOLOGY",
                        help="plan for a TPU topology's chips (libtpu's names, e.g. v5p:2x2x1, v6e:2x2), compiled by "
                             "the TPU compiler without them; needs libtpu and --device-memory, the chip's HBM")
    parser.add_argument("--out", help="write the plan as JSON here")
    parser.add_argument("--rollout-tokens", type=int, default=0,
                        help="with rl.pack: the mean real tokens per rollout (prompt and completion) the packed "
                             "update's compute is planned at; default half the longest rollout")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, the same as --config.KEY=VALUE (as python -m r3jax.main takes them), "
                             "e.g. --config.rl.logits_chunk=0 --config.mesh='(1,-1,1)'")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [arg[len("--config."):] for arg in argv if arg.startswith("--config.")]
    args = parser.parse_args([arg for arg in argv if not arg.startswith("--config.")])
    args.set += overrides
    try:
        if args.tpu and not args.device_memory:
            raise PlanError(f"--tpu={args.tpu}: give --device-memory, the chip's HBM (v5e 16GB, v6e 32GB, v5p 95GB)")
        memory = parse_memory(args.device_memory or "80GB")
        if args.devices < 1:
            raise PlanError(f"--devices={args.devices}: need at least one")
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
        devices = tpu_chips(args.tpu) if args.tpu else None
        config = load_config(args.config, args.set)
        validate_layout(config, len(devices) if devices else args.devices)
        model_cfg = model_config_for(config, args.model)
    except (PlanError, ValueError, FileNotFoundError) as error:
        print(f"error: {with_setting_line(str(error), args.config, args.set)}", file=sys.stderr)
        return 2
    with transformer.compiling_for("tpu") if devices else contextlib.nullcontext():
        result = plan_until_it_fits(config, model_cfg, memory, args.rollout_tokens, devices)
    for line in report_lines(result, memory):
        print(line)
    if args.out:
        files.write_json(args.out, result)
        print(f"plan written to {args.out}")
    return 0


def tpu_chips(topology: str) -> list:
    """The chips of a TPU topology by libtpu's name, for compiling without them."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f'--tpu={topology}: needs the TPU compiler: pip install "libtpu==0.0.42.*" (jax[tpu]\'s pin)')
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as error:  # libtpu's own words for a name it does not know
        raise PlanError(f"--tpu={topology}: {str(error).splitlines()[0]}") from error


def plan_until_it_fits(config, model_cfg, memory: float, rollout_tokens: int = 0, devices=None) -> dict:
    """The plan of `config`; while it does not fit, again after a round of knobs: for each phase over
    the memory, its next knob (`turn_knobs`), cumulatively, until it fits, no knob applies or
    MAX_REPLANS rounds have run. `knobs_applied` (in turn), `overrides` (each changed key's final
    value) and `first_plan_peak_bytes` say what changed. `devices` as in `plan`."""
    progress = lambda message: print(message, file=sys.stderr, flush=True)
    given = flatten(config)
    result = plan(config, model_cfg, progress, rollout_tokens, devices)
    applied, first_peak = [], result["peak_bytes_per_device"]
    queues = {phase: [knob for knob in KNOBS if phase in knob.phases]
              for phase in ("sft_step", "ppo_update", "sampling", "resident")}
    for _ in range(MAX_REPLANS):
        over = phases_over(result, memory)
        changed = turn_knobs(config, over, queues) if over else []
        if not changed:
            break
        applied += changed
        print(f"does not fit ({result['peak_bytes_per_device'] / GB:.1f} GB; over: {', '.join(over)}): planning "
              f"again with {', '.join(changed)}", file=sys.stderr)
        model_cfg = lora.configure(model_cfg.replace(**execution_settings(config)), config.model.lora)
        result = plan(config, model_cfg, progress, rollout_tokens, devices)
    overrides = {key: value for key, value in flatten(config).items() if given.get(key) != value}
    result.update(fits=not phases_over(result, memory), knobs_applied=applied, overrides=overrides,
                  first_plan_peak_bytes=first_peak, device_memory_bytes=memory)
    return result


def load_config(spec: str, overrides: list[str]):
    """A config file's get_config([argument]) with KEY=VALUE overrides, parsed as `main` parses
    --config.KEY=VALUE (config.apply_override)."""

    path, _, argument = spec.partition(":")
    if not os.path.exists(path):
        raise PlanError(f"--config: config file {path} not found")
    config = load_config_file(path, argument)
    for override in overrides:
        key, equals, text = override.partition("=")
        if not equals:
            raise PlanError(f"--set {override}: expected KEY=VALUE, e.g. rl.kl_coef=0.05")
        apply_override(config, key, text, path)
    return config


if __name__ == "__main__":
    raise SystemExit(main())
