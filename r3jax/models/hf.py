"""HF checkpoints (config.json + safetensors, one file or sharded with an index) <-> r3jax params.

`load` streams one tensor at a time from disk straight onto its device sharding, so a 7B
checkpoint never needs a second full copy in host memory.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file
from tqdm import tqdm

from r3jax import files
from r3jax import sharding as sharding_lib
from r3jax.config import HUB_ID
from r3jax.errors import InputError
from r3jax.models.transformer import ModelConfig, init_params

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class CheckpointError(InputError):
    """A HF checkpoint r3jax cannot read; the message names the file and tensor or field."""


REREAD = "export or download the model again"
PROGRESS_BYTES = 1 << 30  # a model of fewer bytes loads and saves in seconds: no progress bar


def _tensor_groups(cfg: ModelConfig, action: str, path: str, dtype: str = ""):
    """_grouped_tensors' items, with a progress bar (on the primary process) for a model of
    PROGRESS_BYTES or more in `dtype` ("" = its param_dtype)."""
    groups = _grouped_tensors(cfg).items()
    size = cfg.num_params() * jnp.dtype(dtype or cfg.param_dtype).itemsize
    return tqdm(groups, desc=f"{action} {path}", unit="tensor", leave=False,
                disable=size < PROGRESS_BYTES or not sharding_lib.is_primary())


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window is true; r3jax attends over the whole "
                              "sequence (set it to false if the model was trained that way)")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = tuple((k, float(rope[k])) for k in keys)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        model_type=model_type, **overrides)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    hf = {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.attention_bias
    return hf


def _tensor_map(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], Callable, Callable]]:
    """(HF name, r3jax param path, HF -> r3jax, r3jax -> HF) for every tensor."""
    def transpose(w):
        return w.T

    def into_heads(heads):
        return lambda w: w.T.reshape(cfg.hidden_size, heads, cfg.head_dim)

    def from_heads(w):
        return w.reshape(cfg.hidden_size, -1).T

    def bias_into_heads(heads):
        return lambda b: b.reshape(heads, cfg.head_dim)

    def flatten(b):
        return b.reshape(-1)

    def identity(w):
        return w

    yield "model.embed_tokens.weight", ("embed", "embedding"), identity, identity
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for name, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads),
                            ("v_proj", cfg.num_kv_heads)):
            yield (f"{hf}.self_attn.{name}.weight", (ours, "attn", name, "kernel"),
                   into_heads(heads), from_heads)
            if cfg.attention_bias:
                yield (f"{hf}.self_attn.{name}.bias", (ours, "attn", name, "bias"),
                       bias_into_heads(heads), flatten)
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                yield f"{hf}.self_attn.{name}.weight", (ours, "attn", name, "scale"), identity, identity
        yield (f"{hf}.self_attn.o_proj.weight", (ours, "attn", "o_proj", "kernel"),
               lambda w: w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),
               lambda w: w.reshape(-1, cfg.hidden_size).T)
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{hf}.mlp.{name}.weight", (ours, "mlp", name, "kernel"), transpose, transpose
        yield f"{hf}.input_layernorm.weight", (ours, "input_norm", "scale"), identity, identity
        yield (f"{hf}.post_attention_layernorm.weight", (ours, "post_attn_norm", "scale"),
               identity, identity)
    yield "model.norm.weight", ("final_norm", "scale"), identity, identity
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), transpose, transpose


def _stacked(cfg: ModelConfig, ours: tuple[str, ...]) -> bool:
    return cfg.scan_layers and ours[0] == "layers"


def _grouped_tensors(cfg: ModelConfig) -> dict[tuple[str, ...], list[tuple[str, Callable, Callable]]]:
    """r3jax param path -> its HF tensors (name, HF -> r3jax, r3jax -> HF): one, or with
    scan_layers one per layer of a stacked `layers` param, in layer order."""
    groups: dict[tuple[str, ...], list] = {}
    for hf_name, ours, to_ours, to_hf in _tensor_map(cfg):
        if cfg.scan_layers and ours[0].startswith("layers_"):
            ours = ("layers", *ours[1:])
        groups.setdefault(ours, []).append((hf_name, to_ours, to_hf))
    return groups


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = files.read_json(index, REREAD)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        if any(f.endswith(".bin") for f in os.listdir(path)):
            raise CheckpointError(
                f"{path}: a PyTorch .bin checkpoint; r3jax reads safetensors only (torch is not a dependency). "
                f"Convert once: python -c \"import transformers; transformers.AutoModelForCausalLM."
                f"from_pretrained('{path}').save_pretrained('{path}-safetensors')\"")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read)")
    with files.open_safetensors(single, REREAD) as f:
        return {name: single for name in f.keys()}


def cached_snapshot(name: str) -> str | None:
    """The folder of hub model `name` (org/name, or org/name@revision) in the local Hugging Face
    cache (HF_HUB_CACHE, HF_HOME), when `name` is not a local path and a snapshot of it is cached.
    Nothing is downloaded."""
    if os.path.exists(name) or not (hub_id := HUB_ID.fullmatch(name)):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(hub_id["repo"], revision=hub_id["revision"], local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def read_config(path: str, **overrides) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise CheckpointError(f"{config_file}: not found")
    return config_from_hf(files.read_json(config_file, REREAD), source=config_file, **overrides)


def load(path: str, mesh: jax.sharding.Mesh | None = None, **config_overrides) -> tuple[ModelConfig, Any]:
    """Reads a local HF directory into (config, params), each tensor placed on its sharding.

    `config_overrides` set r3jax-only fields such as `param_dtype` and `dtype`.
    """
    cfg = read_config(path, **config_overrides)
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    shardings = traverse_util.flatten_dict(sharding_lib.logical_shardings(abstract, mesh))
    shapes = traverse_util.flatten_dict(jax.tree.map(lambda x: x.shape, nn.unbox(abstract)))
    tensor_files = _tensor_files(path)
    flat = {}
    handles: dict[str, Any] = {}

    def read(hf_name: str, to_ours: Callable, shape: tuple[int, ...]) -> np.ndarray:
        if hf_name not in tensor_files:
            raise CheckpointError(f"{path}: tensor {hf_name} is missing from the checkpoint")
        file = tensor_files[hf_name]
        if file not in handles:
            handles[file] = files.open_safetensors(file, REREAD).__enter__()
        host = to_ours(handles[file].get_tensor(hf_name)).astype(cfg.jnp_param_dtype)
        if host.shape != shape:
            raise CheckpointError(f"{file}: tensor {hf_name} has shape {host.shape} after "
                                  f"conversion, config.json implies {shape}")
        return host

    try:
        for ours, entries in _tensor_groups(cfg, "loading", path):
            if _stacked(cfg, ours):
                # each device's shard reads just its layers from disk: no stacked copy on the host
                def layers(index, entries=entries, shape=shapes[ours][1:]):
                    chosen = range(len(entries))[index[0]]
                    return np.stack([read(entries[i][0], entries[i][1], shape)[index[1:]] for i in chosen])
                flat[ours] = jax.make_array_from_callback(shapes[ours], shardings[ours], layers)
            else:
                host = read(entries[0][0], entries[0][1], shapes[ours])
                flat[ours] = jax.make_array_from_callback(host.shape, shardings[ours],
                                                          lambda index, host=host: host[index])
                del host
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return cfg, traverse_util.unflatten_dict(flat)


def save(path: str, cfg: ModelConfig, params: Any, max_shard_bytes: int = 4 << 30, dtype: str = "",
         special_ids: dict[str, Any] | None = None) -> None:
    """Writes config.json and safetensors shards that `AutoModelForCausalLM.from_pretrained` reads,
    tensors in `dtype` ("" = cfg.param_dtype). `special_ids` (bos_token_id, eos_token_id: one id or
    the list of stop ids, pad_token_id) go into config.json and generation_config.json, so that
    `generate()` stops where r3jax's sampler does. Multi-host: every process must call it (each
    tensor is gathered); process 0 writes."""
    dtype = dtype or cfg.param_dtype
    writer = sharding_lib.is_primary()
    if writer:
        files.write_json(os.path.join(path, "config.json"), {**config_to_hf(cfg, dtype), **(special_ids or {})})
        if special_ids:
            files.write_json(os.path.join(path, "generation_config.json"), special_ids)
    flat = traverse_util.flatten_dict(params)
    # Shards are written as soon as they fill, so at most one shard sits in host memory.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}

    def flush():
        file = os.path.join(path, f"shard-{len(written):05d}.tmp")
        files.write_with(file, lambda temp_path: save_file(shard, temp_path, metadata={"format": "pt"}))
        written.append((file, list(shard)))
        shard.clear()

    for ours, entries in _tensor_groups(cfg, "saving", path, dtype):
        host = sharding_lib.to_host(flat[ours])  # a collective across hosts: every process gathers
        if not writer:
            continue
        for i, (hf_name, _, to_hf) in enumerate(entries):
            tensor = np.ascontiguousarray(to_hf(host[i] if _stacked(cfg, ours) else host).astype(jnp.dtype(dtype)))
            if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
                flush()
            shard[hf_name] = tensor
    if not writer:
        return
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(path, file))
        weight_map.update({name: file for name in names})
    files.write_json(os.path.join(path, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
