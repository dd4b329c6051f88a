"""LoRA: low-rank adapters beside the projections, the base weights frozen.

A LoRA model's params are one tree: the base's (the HF names, as without LoRA) plus, in each
module with an adapted projection `<name>`, a float32 adapter `<name>_lora = {"a": [*in, rank],
"b": [rank, *out]}` (models/transformer.py, LoraDelta). The trainers split that tree into what
trains (the adapters) and what stays frozen (the base), and differentiate and keep optimizer state
for the adapters alone. The base with the adapters off (`ModelConfig.base()`) is also the RL
reference, so no second copy of the weights exists.

Exports fold the adapters into the base (an ordinary HF checkpoint) and also write them alone in
PEFT's format (`adapter_config.json`, `adapter_model.safetensors`), which `peft` loads onto the base.
"""
from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from r3jax import files, sharding
from r3jax.config import LORA_MODULES, lora_targets
from r3jax.errors import ConfigError, InputError
from r3jax.models.transformer import NF4_LEVELS, ModelConfig, dequantize, init_params, nf4_block, pack_nf4

# The HF submodule that holds each projection an adapter can sit beside (config.LORA_MODULES)
HF_SUBMODULE = {name: "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn" for name in LORA_MODULES}
ADAPTER_SUFFIX = "_lora"


def configure(model_cfg: ModelConfig, section) -> ModelConfig:
    """`model_cfg` with config.model.lora's adapters and, with base_dtype int8 or nf4, quantized
    projection kernels (unchanged when lora.rank is 0)."""
    if not section.rank:
        return model_cfg
    # nf4 packs two codes per byte along each kernel's first input axis: embed, mlp, or heads
    odd = {name: size for name, size in (("hidden_size", model_cfg.hidden_size),
                                         ("intermediate_size", model_cfg.intermediate_size),
                                         ("num_heads", model_cfg.num_heads)) if size % 2}
    if section.base_dtype == "nf4" and odd:
        raise ConfigError(f"config.model.lora.base_dtype: nf4 packs two 4-bit codes per byte along each "
                          f"projection's input axis, and this model's {odd} is odd; use int8")
    return model_cfg.replace(lora_rank=section.rank, lora_alpha=float(section.alpha),
                             lora_targets=lora_targets(section.targets),
                             quantized_kernels=section.base_dtype if section.base_dtype in QUANTIZED else "")


def _input_axes(model_cfg: ModelConfig, projection: str) -> tuple[int, ...]:
    """The contracted axes of a projection's kernel (after a scanned model's layer axis)."""
    first = 1 if model_cfg.scan_layers else 0
    return tuple(range(first, first + (2 if projection == "o_proj" else 1)))


def _int8_codes(kernel: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(int8 codes, a scale per output feature): the largest magnitude over the input `axes` / 127,
    so each weight is off by at most half a scale step."""
    scale = jnp.max(jnp.abs(kernel), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8), jnp.squeeze(scale, axes)


def _nf4_codes(kernel: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(codes packed two per byte (`pack_nf4`), a scale per block of `nf4_block` weights of the flattened input `axes` per output
    feature): the block's largest magnitude, each weight then the NF4 level nearest to weight / scale,
    so it is off by at most half the widest gap between levels times its scale."""
    lead, n_in = axes[0], len(axes)
    in_size = math.prod(kernel.shape[lead:lead + n_in])
    block = nf4_block(in_size)
    by_block = kernel.reshape(*kernel.shape[:lead], in_size // block, block, *kernel.shape[lead + n_in:])
    scale = jnp.max(jnp.abs(by_block), axis=lead + 1, keepdims=True)
    scale = jnp.where(scale > 0, scale, 1.0)
    distance = jnp.abs((by_block / scale)[..., None] - jnp.asarray(NF4_LEVELS, jnp.float32))
    codes = jnp.argmin(distance, axis=-1).reshape(kernel.shape)
    return pack_nf4(codes, lead), jnp.squeeze(scale, lead + 1)


QUANTIZED = {"int8": _int8_codes, "nf4": _nf4_codes}


def quantize(model_cfg: ModelConfig, params: dict) -> dict:
    """A base's projection kernels as `model_cfg.quantized_kernels` codes and their float32
    `kernel_scale`s (`_int8_codes`, `_nf4_codes`); everything else as it is."""
    quantized = {}
    for key, value in params.items():
        if key in LORA_MODULES and "kernel" in value:
            codes, scale = QUANTIZED[model_cfg.quantized_kernels](value["kernel"].astype(jnp.float32),
                                                                  _input_axes(model_cfg, key))
            value = {**value, "kernel": codes, "kernel_scale": scale}
        elif isinstance(value, dict):
            value = quantize(model_cfg, value)
        quantized[key] = value
    return quantized


def quantize_placed(model_cfg: ModelConfig, params: dict, mesh) -> dict:
    """`quantize` as one jitted call, each shard made on its device as the params' logical axes say."""
    shardings = sharding.logical_shardings(
        jax.eval_shape(lambda k: split(init_params(model_cfg, k))[1], jax.random.key(0)), mesh)
    return jax.jit(lambda p: quantize(model_cfg, p), out_shardings=shardings)(params)


def dequantized_kernel(model_cfg: ModelConfig, projection: str, value: dict) -> jnp.ndarray:
    """A projection's kernel in float32, dequantized where it is quantized."""
    if "kernel_scale" not in value:
        return value["kernel"].astype(jnp.float32)
    axes = _input_axes(model_cfg, projection)
    return dequantize(model_cfg.quantized_kernels, value["kernel"], value["kernel_scale"], axes[0], len(axes))


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base) of a LoRA model's params, each a tree of the same nesting."""
    adapters, base = {}, {}
    for key, value in params.items():
        if key.endswith(ADAPTER_SUFFIX):
            adapters[key] = value
        elif isinstance(value, dict):
            inner_adapters, base[key] = split(value)
            if inner_adapters:
                adapters[key] = inner_adapters
        else:
            base[key] = value
    return adapters, base


def merge(frozen: dict | None, trainable: Any) -> Any:
    """The model's params from its frozen part (None: nothing is frozen) and its trained part."""
    if frozen is None:
        return trainable
    merged = dict(frozen)
    for key, value in trainable.items():
        merged[key] = merge(frozen[key], value) if isinstance(value, dict) and key in frozen else value
    return merged


def trainable_and_frozen(model_cfg: ModelConfig, params: dict) -> tuple[dict, dict | None]:
    """(what trains, what stays frozen): with LoRA the adapters and the base, else every weight and None."""
    return split(params) if model_cfg.lora_rank else (params, None)


def init_adapters(model_cfg: ModelConfig, key: jax.Array, mesh) -> dict:
    """Fresh adapters (B = 0: the model's outputs are the base's), each shard made on its device;
    the base's initialisation is traced but never computed."""
    return sharding.init_sharded(lambda k: split(init_params(model_cfg, k))[0], key, mesh)


def fold(model_cfg: ModelConfig, params: dict) -> dict:
    """The base's params with each adapter's `scale * A B` added to its projection's kernel (in the
    kernel's dtype; a quantized kernel dequantized, in param_dtype): a LoRA model as a plain one, of
    config `model_cfg.base().replace(quantized_kernels="")`."""
    scale = model_cfg.lora_alpha / max(model_cfg.lora_rank, 1)

    def delta(a, b):  # [*in, rank] x [rank, *out] -> [*in, *out]
        return jnp.tensordot(a, b, axes=1)

    if model_cfg.scan_layers:
        delta = jax.vmap(delta)  # over the stacked layers
    folded = {}
    for key, value in params.items():
        if key.endswith(ADAPTER_SUFFIX):
            continue
        if isinstance(value, dict):
            value = fold(model_cfg, value)
        adapter = params.get(key + ADAPTER_SUFFIX)
        if isinstance(value, dict) and ("kernel_scale" in value or adapter is not None):
            kernel = dequantized_kernel(model_cfg, key, value)
            if adapter is not None:
                kernel = kernel + scale * delta(adapter["a"], adapter["b"])
            dtype = model_cfg.jnp_param_dtype if "kernel_scale" in value else value["kernel"].dtype
            value = {name: v for name, v in value.items() if name != "kernel_scale"} | {"kernel": kernel.astype(dtype)}
        folded[key] = value
    return folded


def _layer(model_cfg: ModelConfig, params: dict, index: int) -> dict:
    if model_cfg.scan_layers:
        return jax.tree.map(lambda x: x[index], params["layers"])
    return params[f"layers_{index}"]


def peft_tensors(model_cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """PEFT's adapter tensors (`...<proj>.lora_A.weight [rank, in]`, `lora_B.weight [out, rank]`)
    of a LoRA model's params. A collective across hosts: every process must call it."""
    tensors = {}
    rank = model_cfg.lora_rank
    for i in range(model_cfg.num_layers):
        layer = _layer(model_cfg, params, i)
        for name, submodule in HF_SUBMODULE.items():
            if not model_cfg.has_adapter(name):
                continue
            ours = layer["attn" if submodule == "self_attn" else "mlp"][name + ADAPTER_SUFFIX]
            a, b = sharding.to_host(ours["a"]), sharding.to_host(ours["b"])
            prefix = _peft_prefix(i, name + ADAPTER_SUFFIX)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    return tensors


def save_peft(path: str, model_cfg: ModelConfig, params: dict, base_model: str) -> None:
    """An adapter-only PEFT directory for `PeftModel.from_pretrained(<the HF model in base_model>,
    path)`. Multi-host: every process calls it; process 0 writes."""
    tensors = peft_tensors(model_cfg, params)
    if not sharding.is_primary():
        return
    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": model_cfg.lora_rank, "lora_alpha": model_cfg.lora_alpha, "lora_dropout": 0.0,
              "target_modules": list(model_cfg.lora_targets), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "inference_mode": True}
    files.write_json(os.path.join(path, "adapter_config.json"), config)
    files.write_with(os.path.join(path, "adapter_model.safetensors"),
                     lambda temp_path: save_file(tensors, temp_path, metadata={"format": "pt"}))


def load_peft(path: str, model_cfg: ModelConfig, mesh) -> dict:
    """The adapters of a PEFT directory (as `save_peft` writes them) for `model_cfg`, placed on
    `mesh`. InputError naming config.model.lora.init_from when the adapter's rank or targets differ
    from the config's, or a tensor's shape from the model's (the first that does)."""
    saved = files.read_json(os.path.join(path, "adapter_config.json"), "give config.model.lora.init_from a whole "
                                                                       "PEFT adapter directory")
    if saved.get("r") != model_cfg.lora_rank or set(saved.get("target_modules") or ()) != set(model_cfg.lora_targets):
        raise InputError(f"config.model.lora.init_from: {path} holds rank {saved.get('r')} adapters on "
                         f"{saved.get('target_modules')}; the config asks for rank {model_cfg.lora_rank} on "
                         f"{list(model_cfg.lora_targets)}")
    with files.open_safetensors(os.path.join(path, "adapter_model.safetensors"),
                                "give config.model.lora.init_from a whole PEFT adapter directory") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    unrolled = model_cfg.replace(scan_layers=False)
    shapes = jax.eval_shape(lambda k: split(nn.unbox(init_params(unrolled, k)))[0], jax.random.key(0))
    layers = [{module: {name: {"a": _from_peft(tensors, f"{_peft_prefix(i, name)}.lora_A.weight", adapter["a"].shape, path),
                               "b": _from_peft(tensors, f"{_peft_prefix(i, name)}.lora_B.weight", adapter["b"].shape, path)}
                        for name, adapter in projections.items()}
               for module, projections in shapes[f"layers_{i}"].items()}
              for i in range(model_cfg.num_layers)]
    adapters = ({"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)} if model_cfg.scan_layers
                else {f"layers_{i}": layer for i, layer in enumerate(layers)})
    return jax.device_put(adapters, sharding.logical_shardings(
        jax.eval_shape(lambda k: split(init_params(model_cfg, k))[0], jax.random.key(0)), mesh))


def _peft_prefix(layer: int, adapter_name: str) -> str:
    name = adapter_name[:-len(ADAPTER_SUFFIX)]
    return f"base_model.model.model.layers.{layer}.{HF_SUBMODULE[name]}.{name}"


def _from_peft(tensors: dict, name: str, shape: tuple[int, ...], path: str) -> np.ndarray:
    """PEFT's `lora_A.weight [rank, in]` or `lora_B.weight [out, rank]` as r3jax's `a [*in, rank]`
    or `b [rank, *out]` of `shape`."""
    if name not in tensors:
        raise InputError(f"config.model.lora.init_from: {path} has no tensor {name}")
    is_a = name.endswith("lora_A.weight")
    expected = (shape[-1], math.prod(shape[:-1])) if is_a else (math.prod(shape[1:]), shape[0])
    if tensors[name].shape != expected:
        raise InputError(f"config.model.lora.init_from: {path}: tensor {name} has shape {tensors[name].shape}, "
                         f"this model's adapter there has {expected} (another base model?)")
    return tensors[name].T.reshape(shape).astype(np.float32)


def describe(model_cfg: ModelConfig, params: dict) -> str:
    """"trainable N (B bytes), frozen M (C bytes)" of a model's params."""
    trainable, frozen = trainable_and_frozen(model_cfg, params)

    def size(tree):
        leaves = jax.tree.leaves(tree)
        return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)

    (count, nbytes), (frozen_count, frozen_bytes) = size(trainable), size(frozen)
    return (f"trainable {count:,} parameters ({nbytes / 2**20:,.1f} MiB), "
            f"frozen {frozen_count:,} ({frozen_bytes / 2**20:,.1f} MiB)")
