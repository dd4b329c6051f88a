"""Llama-family decoder (Llama 2/3, Code Llama, Mistral, Qwen2) in flax.linen.

The model is a pure function of its parameters:

    logits, hidden, cache = Transformer(cfg).apply({'params': params}, tokens, positions, kv_mask,
                                                   cache, cache_start)

Batches are left-padded. `positions` count real tokens (cumulative sum of the attention mask
minus one); `kv_mask` marks which key slots hold real tokens. A KV cache is a plain pytree
(`init_cache`) whose slot s holds the key/value of the token at padded index s.

Without a cache, rows may also be packed: several sequences share a row, `segment_ids` number them
(1, 2, ...; 0 is padding), a token attends only within its own segment, and positions restart
at 0 in each (`forward` with explicit `positions`).

A caller that reads the output at a few positions only (the states that predict a completion)
names them (`Read`): the last layer then computes its queries, attention and MLP there alone
(`reads_in_last_layer`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r3jax.config import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF "llama3" rope scaling as a tuple of (key, value) pairs, so the config stays hashable.
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    # Mixed precision: trainable weights (and so the optimizer moments) are stored in param_dtype,
    # float32 master weights for training; every matmul computes in dtype (bfloat16 on accelerators).
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Execution choices, not part of the checkpoint. decode_block: cache slots a one-token decode
    # step reads at a time (see decode_attention), 0 = the whole cache in one pass, None = by
    # backend (`cache_block`). attention_chunk: queries attended at a time in a many-token
    # forward (`attention`), 0 = all at once. scan_layers:
    # the decoder layers as one scan over stacked parameters (leading "layers" axis; compile time
    # independent of depth). remat: what the backward pass recomputes (REMAT_POLICIES).
    decode_block: int | None = None
    attention_chunk: int = 0
    # attention_impl: the kernel of a forward without a cache (training, the update's passes):
    # xla, cudnn, pallas, splash or auto (`attention_kernel`, `fused_attention`).
    attention_impl: str = "auto"
    scan_layers: bool = False
    remat: str = "none"
    # LoRA (models/lora.py): adapters of this rank beside the projections named in lora_targets,
    # their output scaled by lora_alpha / lora_rank; 0 = none. Adapters are float32 whatever
    # param_dtype (the frozen base's dtype) is.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    # The frozen base's projection kernels stored as codes with float32 scales (`kernel_scale`),
    # dequantized one layer at a time: "int8" (a scale per output feature) or "nf4" (QLoRA's
    # NormalFloat4, a scale per block of NF4_BLOCK input weights of each output feature); "" =
    # plain kernels. models/lora.py: quantize.
    quantized_kernels: str = ""

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def base(self) -> "ModelConfig":
        """This model without its LoRA adapters: the frozen base, which is also the RL reference."""
        return self.replace(lora_rank=0, lora_targets=())

    def has_adapter(self, module: str) -> bool:
        return self.lora_rank > 0 and module in self.lora_targets

    @property
    def qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm of queries and keys, before RoPE."""
        return self.model_type == "qwen3"

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attn + mlp + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * layer + self.hidden_size + head


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies `[head_dim // 2]`, with HF's "llama3" scaling when configured."""
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    if not cfg.rope_scaling:
        return inv_freq
    scaling = dict(cfg.rope_scaling)
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x [batch, seq, heads, head_dim]` by `positions [batch, seq]`.

    HF's split-half layout: the first half of head_dim pairs with the second half.
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# model.remat -> the jax.checkpoint policy of each decoder layer (None: save nothing, recompute all)
REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[dict[str, jnp.ndarray]] | dict[str, jnp.ndarray]:
    """Empty KV cache: per layer `k`, `v` of shape `[batch, kv_heads, length, head_dim]`; with
    scan_layers one `k`, `v` pair stacked as `[layers, batch, kv_heads, length, head_dim]`."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    if cfg.scan_layers:
        stacked = (cfg.num_layers, *shape)
        return {"k": jnp.zeros(stacked, cfg.jnp_dtype), "v": jnp.zeros(stacked, cfg.jnp_dtype)}
    return [{"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}
            for _ in range(cfg.num_layers)]


def write_cache(cache: dict, k, v, cache_start, layer_index=None) -> dict:
    """Keys and values `[batch, kv_heads, seq, head_dim]` written at slots `cache_start + [0, seq)`
    of one layer's cache, or with `layer_index` of that layer in the stacked cache
    `[layers, batch, kv_heads, length, head_dim]`."""
    def write(stored, new):
        new = new.astype(stored.dtype)
        if layer_index is None:
            return jax.lax.dynamic_update_slice_in_dim(stored, new, cache_start, axis=2)
        return jax.lax.dynamic_update_slice(stored, new[None], (layer_index, 0, 0, cache_start, 0))
    return {"k": write(cache["k"], k), "v": write(cache["v"], v)}


def layer_keys_values(cache: dict, layer_index=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's keys and values `[batch, kv_heads, length, head_dim]` from `write_cache`'s cache."""
    if layer_index is None:
        return cache["k"], cache["v"]
    return (jax.lax.dynamic_index_in_dim(cache["k"], layer_index, keepdims=False),
            jax.lax.dynamic_index_in_dim(cache["v"], layer_index, keepdims=False))


class Read(NamedTuple):
    """The positions a forward's caller reads: columns `slots [n, count]` of the input's rows, the
    i-th read sequence lying in row `rows[i]` (`rows` None: in row i). A forward given one returns
    its hidden states (and logits) there alone, `[n, count, ...]`."""
    slots: jnp.ndarray
    rows: jnp.ndarray | None = None

    def take(self, x: jnp.ndarray) -> jnp.ndarray:
        """`x [rows, width, ...]` at the read positions: `[n, count, ...]`."""
        if self.rows is None:
            return jnp.take_along_axis(x, self.slots.reshape(self.slots.shape + (1,) * (x.ndim - 2)), axis=1)
        return x.reshape(-1, *x.shape[2:])[self.rows[:, None] * x.shape[1] + self.slots]


def attention(q, k, v, kv_mask, cache_start, segment_ids=None, chunk: int = 0) -> jnp.ndarray:
    """Causal attention of queries at slots `cache_start + [0, seq)` over every key slot.

    q `[batch, seq, kv_heads, groups, head_dim]`, k/v `[batch, kv_heads, keys, head_dim]`,
    kv_mask `[batch, keys]`; returns `[batch, seq, kv_heads, groups, head_dim]`. `segment_ids
    [batch, seq]` (no cache: keys are the queries) also keeps each query within its own segment.
    `chunk` > 0 attends `chunk` queries at a time (see `_chunked_attention`).
    """
    seq = q.shape[1]
    query_slots = cache_start + jnp.arange(seq)
    if not chunk or seq <= chunk:
        return _attend(q, k, v, kv_mask, query_slots, segment_ids, segment_ids)
    return _chunked_attention(q, k, v, kv_mask, query_slots, segment_ids, chunk)


CAUSAL_BLOCKS, CAUSAL_BLOCK_MIN = 8, 64


def causal_block_attention(q, k, v, kv_mask, segment_ids=None) -> jnp.ndarray:
    """`attention` of a forward without a cache (keys are the queries, slots from 0), in at most
    CAUSAL_BLOCKS blocks of queries (at least CAUSAL_BLOCK_MIN each), each over the keys up to its
    own last slot: the blocks above the causal diagonal, whose scores the mask zeroes, are never
    computed (nearly half the scores at 8 blocks). Shapes as in `attention`."""
    seq = q.shape[1]
    block = max(CAUSAL_BLOCK_MIN, -(-seq // CAUSAL_BLOCKS))
    outputs = []
    for start in range(0, seq, block):
        end = min(seq, start + block)
        outputs.append(_attend(q[:, start:end], k[:, :, :end], v[:, :, :end], kv_mask[:, :end], jnp.arange(start, end),
                               None if segment_ids is None else segment_ids[:, start:end],
                               None if segment_ids is None else segment_ids[:, :end]))
    return jnp.concatenate(outputs, axis=1)


def _attend(q, k, v, kv_mask, query_slots, query_segments, key_segments) -> jnp.ndarray:
    """`attention` for queries at `query_slots` (`[seq]`, or `[batch, seq]` per row), with their
    segment ids `[batch, seq]` and the keys' `[batch, keys]` (or both None)."""
    scores = jnp.einsum("bqkgd,bksd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    key_slots = jnp.arange(k.shape[2])
    allowed = (key_slots <= query_slots[..., None]) & kv_mask[:, None, :].astype(bool)
    if query_segments is not None:
        allowed = allowed & (query_segments[:, :, None] == key_segments[:, None, :])
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgqs,bksd->bqkgd", probs, v)


def _chunked_attention(q, k, v, kv_mask, query_slots, segment_ids, chunk: int) -> jnp.ndarray:
    """`attention` in blocks of `chunk` queries, each over every key: the same softmax per query,
    but only one block's scores `[batch, kv_heads, groups, chunk, keys]` exist at a time, and the
    backward pass recomputes each block's (jax.checkpoint) instead of keeping all of them. The
    queries are padded to whole blocks (slot -1 and segment -1 attend nowhere; their rows are
    cut off)."""
    batch, seq = q.shape[:2]
    blocks = -(-seq // chunk)
    pad = blocks * chunk - seq
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    query_slots = jnp.pad(query_slots, (0, pad), constant_values=-1)
    query_segments = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)

    @jax.checkpoint
    def block(i):
        start = i * chunk
        segments = None if query_segments is None else jax.lax.dynamic_slice_in_dim(query_segments, start, chunk, 1)
        return _attend(jax.lax.dynamic_slice_in_dim(q, start, chunk, 1), k, v, kv_mask,
                       jax.lax.dynamic_slice_in_dim(query_slots, start, chunk), segments, segment_ids)

    out = jax.lax.map(block, jnp.arange(blocks))  # [blocks, batch, chunk, kv_heads, groups, head_dim]
    return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * chunk, *out.shape[3:])[:, :seq]


# measured on an H200 (bench/results/attention-nvidia-h200.json): packed-row attention forward +
# backward at TinyLlama's heads in bf16, cuDNN 0.27x the dense kernel's time, Pallas 0.30x
FUSED_ATTENTION_ON_GPU = "cudnn"
PALLAS_BLOCK = 64
SPLASH_BLOCK = 128


_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


def platform() -> str:
    """The platform the model's programs are built for: JAX's default backend, or within
    `compiling_for` the one it names."""
    return _target_platform.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str):
    """Builds the model's programs for platform `name` ("cpu", "gpu" or "tpu") within the block, as
    for an ahead-of-time compile for chips not attached: the kernels `auto` picks, the decode's
    cache blocks, and whether Pallas kernels are interpreted follow `name`, not this process."""
    token = _target_platform.set(name)
    try:
        yield
    finally:
        _target_platform.reset(token)


def attention_kernel(cfg: ModelConfig) -> str:
    """The kernel `cfg.attention_impl` names, with "auto" resolved for the backend: the masked dense
    one ("xla") except under bfloat16 compute on a GPU."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    return FUSED_ATTENTION_ON_GPU if platform() == "gpu" and cfg.dtype == "bfloat16" else "xla"


def fused_attention(q, k, v, segment_ids, kernel: str) -> jnp.ndarray:
    """Causal attention within segments, by a fused kernel that never holds the scores.

    q `[batch, seq, kv_heads, groups, head_dim]`, k/v `[batch, kv_heads, seq, head_dim]` (keys are
    the queries: no cache), segment_ids `[batch, seq]` (0 = padding; a left-padded row is one
    segment after its padding). Returns q's shape. Padding queries attend to padding keys, so no
    row of scores is empty; their outputs are never read.
    kernel "cudnn": cuDNN's flash attention (16-bit inputs on a GPU), the segments as a mask.
    kernel "pallas": JAX's Pallas (Triton) flash attention with segment ids (GPU).
    kernel "splash": JAX's Pallas splash attention with segment ids (TPU).
    The Pallas kernels run interpreted on a CPU. They have no sharding rule, so on a mesh they run
    per device (`per_device`); cuDNN's has JAX's own.
    """
    by_kernel = {"cudnn": _cudnn_attention, "pallas": per_device(_pallas_attention),
                 "splash": per_device(_splash_attention)}
    return by_kernel[kernel](q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids.astype(jnp.int32))


def devices_in_context():
    """The mesh in context (`jax.set_mesh`) where it has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def rows_split(mesh, rows: int) -> bool:
    """Whether `rows` split evenly over `mesh`'s batch axes."""
    return rows % math.prod(mesh.shape[axis] for axis in BATCH_AXES) == 0


def per_device(kernel):
    """`kernel(q, keys, values, segment_ids)` (shapes as in `_cudnn_attention`) run on each device's
    shard of the mesh in context (`jax.set_mesh`): rows split over the batch axes, key/value heads
    over `tensor`, each where its size divides. Without a mesh of more than one device, the kernel
    as it is. Rows and heads are independent in attention, so the shards need no communication;
    left to XLA, a kernel with no sharding rule would be run whole on every device."""
    def run(q, keys, values, segment_ids):
        mesh = devices_in_context()
        if mesh is None:
            return kernel(q, keys, values, segment_ids)
        rows = BATCH_AXES if rows_split(mesh, q.shape[0]) else None
        heads = "tensor" if q.shape[2] % mesh.shape["tensor"] == 0 else None
        spec = P(rows, None, heads)
        return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(rows)), out_specs=spec,
                             check_vma=False)(q, keys, values, segment_ids)
    return run


def split_rows(x: jnp.ndarray) -> jnp.ndarray:
    """`x` `[batch, ...]` constrained to rows split over the batch axes of the mesh in context
    (where their size divides the batch; unchanged without a mesh of more than one device). Left
    to propagation, a training forward's residual stream took the weights' FSDP layout (the hidden
    axis over `fsdp`): Llama-2-7B's SFT step on 8 devices moved 904 GB through collectives where
    it now moves 88 GB (the planner's count), and on a mesh with data and fsdp axes both XLA
    replicated whole activations ("involuntary full rematerialization")."""
    mesh = devices_in_context()
    if mesh is None or not rows_split(mesh, x.shape[0]):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def _cudnn_attention(q, keys, values, segment_ids) -> jnp.ndarray:
    """`fused_attention` by cuDNN; keys/values `[batch, seq, kv_heads, head_dim]`."""
    batch, seq, kv_heads, groups, head_dim = q.shape
    slots = jnp.arange(seq)
    allowed = (slots[None, :] <= slots[:, None])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    out = jax.nn.dot_product_attention(q.reshape(batch, seq, kv_heads * groups, head_dim), keys, values,
                                       mask=allowed[:, None], implementation="cudnn")
    return out.reshape(q.shape)


def _pallas_attention(q, keys, values, segment_ids) -> jnp.ndarray:
    """`fused_attention` by Pallas's Triton kernel; keys/values `[batch, seq, kv_heads, head_dim]`.
    It takes whole blocks of queries and as many key heads as query heads; the padded tail slots
    come after every real one, so causality keeps them out of real rows."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    batch, seq, kv_heads, groups, head_dim = q.shape
    pad = -seq % PALLAS_BLOCK
    widen = functools.partial(jnp.repeat, repeats=groups, axis=2)
    blocks = pallas_attention.BlockSizes(PALLAS_BLOCK, PALLAS_BLOCK, 32, 32, 32, 32)
    out = pallas_attention.mha(
        _pad_slots(q.reshape(batch, seq, kv_heads * groups, head_dim), pad), _pad_slots(widen(keys), pad),
        _pad_slots(widen(values), pad), _pad_slots(segment_ids, pad), sm_scale=1 / math.sqrt(head_dim),
        causal=True, block_sizes=blocks, interpret=platform() == "cpu")
    return out[:, :seq].reshape(q.shape)


def _splash_attention(q, keys, values, segment_ids) -> jnp.ndarray:
    """`fused_attention` by Pallas's splash kernel: per row and key/value head, the head's query
    groups over its one key head (the kernel's multi-query form); slots padded to whole blocks."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    batch, seq, kv_heads, groups, head_dim = q.shape
    pad = -seq % SPLASH_BLOCK
    width = seq + pad
    blocks = splash.BlockSizes(*(SPLASH_BLOCK,) * 8)
    kernel = splash.make_splash_mqa_single_device(
        splash_mask.MultiHeadMask([splash_mask.CausalMask((width, width))] * groups), block_sizes=blocks,
        interpret=platform() == "cpu")
    queries = _pad_slots(q / math.sqrt(head_dim), pad).transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, groups, width, dim]
    keys, values = (_pad_slots(x, pad).transpose(0, 2, 1, 3) for x in (keys, values))  # [batch, kv_heads, width, dim]

    def row(row_queries, row_keys, row_values, row_segments):
        segments = splash.SegmentIds(row_segments, row_segments)
        return jax.vmap(lambda qs, ks, vs: kernel(qs, ks, vs, segment_ids=segments))(row_queries, row_keys, row_values)

    out = jax.vmap(row)(queries, keys, values, _pad_slots(segment_ids, pad))  # [batch, kv_heads, groups, width, dim]
    return out.transpose(0, 3, 1, 2, 4)[:, :seq]


def _pad_slots(x: jnp.ndarray, pad: int) -> jnp.ndarray:
    """x `[batch, seq, ...]` with `pad` zero slots after its last."""
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


def cache_block(cfg: ModelConfig) -> int:
    """`cfg.decode_block`, or by default 64 slots on a CPU and the whole cache (0) on an
    accelerator: there the blocked loop's many small kernels cost more than the empty slots one
    pass reads (a 1.1B bf16 decode step at batch 64 on an H100: 5.1 ms in blocks of 64, 1.8 ms in
    one pass; bench/results/sampler-nvidia-h100-80gb-hbm3.json)."""
    if cfg.decode_block is not None:
        return cfg.decode_block
    return 64 if platform() == "cpu" else 0


def decode_attention(q, k, v, kv_mask, cache_start, block: int) -> jnp.ndarray:
    """One query per row at slot `cache_start`, reading only the cache blocks of `block` slots up to it.

    A fixed-size cache holds `max_new_tokens` slots that are still empty for most of the decode;
    attending over the filled blocks alone (online softmax, as in flash decoding) keeps each step's
    cache reads proportional to the tokens so far. Shapes as in `attention` with seq = 1.
    """
    batch, _, kv_heads, groups, head_dim = q.shape
    keys = k.shape[2]
    block = block if keys % block == 0 else keys
    query = q[:, 0].astype(jnp.float32) / math.sqrt(head_dim)  # [batch, kv_heads, groups, head_dim]

    def read_block(i, carry):
        running_max, denominator, numerator = carry
        start = i * block
        k_block = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2).astype(jnp.float32)
        v_block = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2).astype(jnp.float32)
        slots = start + jnp.arange(block)
        allowed = jax.lax.dynamic_slice_in_dim(kv_mask, start, block, axis=1).astype(bool) & (slots <= cache_start)
        scores = jnp.einsum("bkgd,bksd->bkgs", query, k_block)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        weights = jnp.where(allowed[:, None, None], jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        return (new_max, denominator * rescale + weights.sum(axis=-1),
                numerator * rescale[..., None] + jnp.einsum("bkgs,bksd->bkgd", weights, v_block))

    init = (jnp.full((batch, kv_heads, groups), jnp.finfo(jnp.float32).min),
            jnp.zeros((batch, kv_heads, groups)), jnp.zeros((batch, kv_heads, groups, head_dim)))
    filled_blocks = cache_start // block + 1
    _, denominator, numerator = jax.lax.fori_loop(0, filled_blocks, read_block, init)
    return (numerator / denominator[..., None]).astype(q.dtype)[:, None]


def _param(init, *names):
    return nn.with_logical_partitioning(init, names)


# QLoRA's NormalFloat4 levels (Dettmers et al., 2023): quantiles of a standard normal scaled to
# [-1, 1], with an exact 0; a code is the index of the level nearest to weight / its block's absmax
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64  # input weights per scale (QLoRA's block size), or fewer where a layer is narrower


def nf4_block(in_size: int) -> int:
    """Input weights per NF4 scale for a kernel of `in_size` contracted weights per output feature."""
    return math.gcd(NF4_BLOCK, in_size)


def pack_nf4(codes: jnp.ndarray, lead: int) -> jnp.ndarray:
    """4-bit codes `[*lead, in0, ...]` (values 0-15) as uint8, two per byte along the first input
    axis: `[*lead, in0 / 2, ...]`, code 2i in the low half of byte i, code 2i + 1 in the high half.
    Plain bytes rather than jnp.uint4: XLA:CPU held uint4 arrays unpacked, a byte per code, as
    whole stacked copies of the base (6.5 GB of temporaries in a 7B SFT step's plan)."""
    if codes.shape[lead] % 2:
        raise ValueError(f"an nf4 base packs two codes per byte along each kernel's first input axis, "
                         f"which has odd size {codes.shape[lead]} here; use model.lora.base_dtype=int8")
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:lead], codes.shape[lead] // 2, 2, *codes.shape[lead + 1:])
    return jnp.take(pairs, 0, axis=lead + 1) | (jnp.take(pairs, 1, axis=lead + 1) << 4)


def unpack_nf4(packed: jnp.ndarray, lead: int) -> jnp.ndarray:
    """`pack_nf4`'s codes back, `[*lead, in0, ...]` uint8."""
    pairs = jnp.stack([packed & 15, packed >> 4], axis=lead + 1)
    return pairs.reshape(*packed.shape[:lead], 2 * packed.shape[lead], *packed.shape[lead + 1:])


def dequantize(kind: str, codes: jnp.ndarray, scale: jnp.ndarray, lead: int, n_in: int) -> jnp.ndarray:
    """A float32 kernel `[*lead, *in, *out]` from its codes and scales: int8 codes (same shape) times
    `scale [*lead, *out]`; nf4 codes (`pack_nf4`'s bytes) as NF4 levels times `scale [*lead, blocks,
    *out]`, one per NF4 block of the flattened input axes."""
    if kind == "int8":
        return codes.astype(jnp.float32) * jnp.expand_dims(scale, tuple(range(lead, lead + n_in)))
    codes = unpack_nf4(codes, lead)
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)[codes.astype(jnp.int32)]
    blocks = scale.shape[lead]
    by_block = levels.reshape(*codes.shape[:lead], blocks, -1, *codes.shape[lead + n_in:])
    return (by_block * jnp.expand_dims(scale, lead + 1)).reshape(codes.shape)


class Projection(nn.Module):
    """x's last `len(in_axes)` axes onto `out_shape` through `kernel [*in, *out]` (and `bias [*out]`),
    as flax's DenseGeneral computes it; with `cfg.quantized_kernels` the kernel is codes times
    float32 `kernel_scale`s (`dequantize`)."""
    cfg: ModelConfig
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]   # logical names of the contracted input axes
    out_axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, n_in = self.cfg, len(self.in_axes)
        shape = (*x.shape[-n_in:], *self.out_shape)
        axes = (*self.in_axes, *self.out_axes)
        if cfg.quantized_kernels:
            int8, in_size = cfg.quantized_kernels == "int8", math.prod(shape[:n_in])
            stored = shape if int8 else (shape[0] // 2, *shape[1:])  # nf4: pack_nf4's bytes
            codes = self.param("kernel", _param(nn.initializers.zeros, *axes), stored, jnp.int8 if int8 else jnp.uint8)
            blocks = () if int8 else (in_size // nf4_block(in_size),)
            scale = self.param("kernel_scale", _param(nn.initializers.ones, *((None,) * len(blocks)), *self.out_axes),
                               (*blocks, *self.out_shape), jnp.float32)
            kernel = dequantize(cfg.quantized_kernels, codes, scale, 0, n_in)
        else:
            kernel = self.param("kernel", _param(nn.initializers.normal(0.02), *axes), shape, cfg.jnp_param_dtype)
        y = jnp.tensordot(x.astype(cfg.jnp_dtype), kernel.astype(cfg.jnp_dtype), axes=n_in)
        if self.use_bias:
            bias = self.param("bias", _param(nn.initializers.zeros, *self.out_axes), self.out_shape,
                              cfg.jnp_param_dtype)
            y = y + bias.astype(cfg.jnp_dtype)
        return y


class LoraDelta(nn.Module):
    """A LoRA adapter's output `scale * (x A) B` for a projection of x's last `len(in_axes)` axes
    onto `out_shape`. A is initialised as PEFT's (uniform, +-1/sqrt(fan-in)) and B to zero, so a
    fresh adapter changes nothing."""
    cfg: ModelConfig
    in_axes: tuple[str, ...]   # logical names of the contracted input axes
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x):
        cfg, n_in = self.cfg, len(self.in_axes)
        fan_in = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
        a = self.param("a", _param(fan_in, *self.in_axes, "lora"), (*x.shape[-n_in:], cfg.lora_rank), jnp.float32)
        b = self.param("b", _param(nn.initializers.zeros, "lora", *self.out_axes), (cfg.lora_rank, *self.out_shape),
                       jnp.float32)
        down = jnp.tensordot(x.astype(cfg.jnp_dtype), a.astype(cfg.jnp_dtype), axes=n_in)
        return jnp.tensordot(down, b.astype(cfg.jnp_dtype), axes=1) * (cfg.lora_alpha / cfg.lora_rank)


def with_adapter(cfg: ModelConfig, name: str, x, y, in_axes, out_axes):
    """`y`, the projection `name` of `x`, plus its LoRA adapter's output where the config gives it one
    (params `<name>_lora/{a, b}` beside the projection's own, in the calling module)."""
    if not cfg.has_adapter(name):
        return y
    return y + LoraDelta(cfg, in_axes, y.shape[x.ndim - len(in_axes):], out_axes, name=f"{name}_lora")(x)


class RMSNorm(nn.Module):
    """Over the last axis, of `size` (default: hidden_size)."""
    cfg: ModelConfig
    size: int | None = None

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _param(nn.initializers.ones, "norm"),
                           (self.size or self.cfg.hidden_size,), self.cfg.jnp_param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (normed.astype(self.cfg.jnp_dtype) * scale.astype(self.cfg.jnp_dtype))


class Attention(nn.Module):
    cfg: ModelConfig

    def _proj(self, name, heads, x):
        cfg = self.cfg
        y = Projection(cfg, (heads, cfg.head_dim), ("embed",), ("heads", "head_dim"), cfg.attention_bias, name=name)(x)
        return with_adapter(cfg, name, x, y, ("embed",), ("heads", "head_dim"))

    @nn.compact
    def __call__(self, x, positions, kv_mask, layer_cache, cache_start, segment_ids, layer_index=None,
                 read: Read | None = None):
        """x `[batch, seq, embed]`; kv_mask `[batch, keys]`; segment_ids `[batch, seq]` or None;
        `layer_cache` is this layer's cache, or with `layer_index` the whole stacked one (see
        `write_cache`); returns (`[batch, seq, embed]`, the cache as it was given, updated). With
        `read` (no cache or a prefill; the dense kernel): queries at the read positions alone,
        `[n, count, embed]` returned."""
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg)
        queries_in, query_positions = (x, positions) if read is None else (read.take(x), read.take(positions))
        q, k = self._proj("q_proj", cfg.num_heads, queries_in), self._proj("k_proj", cfg.num_kv_heads, x)
        if cfg.qk_norm:
            q, k = RMSNorm(cfg, cfg.head_dim, name="q_norm")(q), RMSNorm(cfg, cfg.head_dim, name="k_norm")(k)
        q = apply_rope(q, query_positions, inv_freq)
        # keys and values as [batch, kv_heads, keys, head_dim], the cache's layout: each decode
        # step then reads the cache as it lies, with no transposed copy of it
        k = apply_rope(k, positions, inv_freq).transpose(0, 2, 1, 3)
        v = self._proj("v_proj", cfg.num_kv_heads, x).transpose(0, 2, 1, 3)
        # a prefill (the cache empty, filled from slot 0) attends over its own keys alone, as a
        # forward without a cache does: the cache's later slots are empty, so reading them is waste
        prefill = layer_cache is not None and isinstance(cache_start, int) and cache_start == 0
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, cache_start, layer_index)
            if not prefill:
                k, v = layer_keys_values(layer_cache, layer_index)
        own_keys = layer_cache is None or prefill
        kv_mask = kv_mask[:, :x.shape[1]] if prefill else kv_mask
        groups = cfg.num_heads // cfg.num_kv_heads
        batch, seq = queries_in.shape[:2]
        q = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
        block = cache_block(cfg)
        kernel = attention_kernel(cfg)
        if read is not None:
            out = _attend(q, k, v, kv_mask, read.slots, None if segment_ids is None else read.take(segment_ids),
                          segment_ids)
        elif layer_cache is not None and seq == 1 and block:
            out = decode_attention(q, k, v, kv_mask, cache_start, block)
        elif own_keys and kernel != "xla":
            segments = kv_mask.astype(jnp.int32) if segment_ids is None else segment_ids
            out = fused_attention(q, k, v, segments, kernel)
        elif own_keys and not cfg.attention_chunk:
            out = causal_block_attention(q, k, v, kv_mask, segment_ids)
        else:
            out = attention(q, k, v, kv_mask, cache_start, segment_ids, cfg.attention_chunk)
        out = out.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        projected = Projection(cfg, (cfg.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj")(out)
        return with_adapter(cfg, "o_proj", out, projected, ("heads", "head_dim"), ("embed",)), layer_cache


class MLP(nn.Module):
    cfg: ModelConfig

    def _dense(self, name, features, axes, x):
        cfg = self.cfg
        y = Projection(cfg, (features,), axes[:1], axes[1:], name=name)(x)
        return with_adapter(cfg, name, x, y, axes[:1], axes[1:])

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = self._dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"), x)
        up = self._dense("up_proj", cfg.intermediate_size, ("embed", "mlp"), x)
        return self._dense("down_proj", cfg.hidden_size, ("mlp", "embed"), nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, layer_cache, cache_start, segment_ids, layer_index=None,
                 read: Read | None = None):
        """As `Attention`: with `read`, the layer's output at the read positions alone."""
        attn_out, layer_cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, kv_mask, layer_cache, cache_start, segment_ids,
            layer_index, read)
        x = (x if read is None else read.take(x)) + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x))
        whole_sequences = layer_cache is None  # as in `Transformer`
        return (split_rows(x) if whole_sequences else x), layer_cache


class Embed(nn.Embed):
    """`nn.Embed`; with `whole_table`, its lookup reads the table whole on every device of the mesh
    in context, as FSDP reads each layer's weights, and its gradient is reduce-scattered back onto
    the table's shards. Left to the partitioner, the backward's scatter-add of row-split updates
    into a table split over `fsdp` replicated the updates whole on a mesh with data and fsdp axes."""
    whole_table: bool = False

    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        if not self.whole_table or devices_in_context() is None:
            return super().__call__(inputs)
        return jnp.take(jax.lax.with_sharding_constraint(self.embedding, P()).astype(self.dtype), inputs, axis=0)


def _embed_layer(cfg: ModelConfig, name: str | None = None, whole_table: bool = False) -> nn.Embed:
    return Embed(cfg.vocab_size, cfg.hidden_size, name=name, dtype=cfg.jnp_dtype,
                    param_dtype=cfg.jnp_param_dtype,
                    embedding_init=_param(nn.initializers.normal(0.02), "vocab", "embed"), whole_table=whole_table)


def _lm_head_layer(cfg: ModelConfig, name: str | None = None) -> nn.Dense:
    return nn.Dense(cfg.vocab_size, use_bias=False, name=name, dtype=cfg.jnp_dtype,
                    param_dtype=cfg.jnp_param_dtype,
                    kernel_init=_param(nn.initializers.normal(0.02), "embed", "vocab"))


def _scanned_layer(layer: nn.Module, carry, positions, kv_mask, cache_start, segment_ids):
    """One step of the layer scan. The stacked cache rides in the carry, not in the scanned inputs
    and outputs: a scan's outputs are a new stacked buffer, so every decode step copied the whole
    cache (about 3x a layer's cache in temporaries per layer); carried, it is updated in place."""
    x, cache, index = carry
    x, cache = layer(x, positions, kv_mask, cache, cache_start, segment_ids, None if cache is None else index)
    return (x, cache, index + 1), None


def reads_in_last_layer(cfg: ModelConfig) -> bool:
    """Whether a forward given a `Read` row by row (`rows` None) computes its last layer at the read
    positions alone: with unrolled layers and the dense kernel. The fused kernels take as many
    queries as keys, a chunked attention's memory bound would not hold, and a scan runs every layer
    alike. A read across packed rows never does: each sequence would need its row's keys and
    values, which on a GRPO update (64 rollouts in about 21 rows) cost more than the queries saved
    (0.22 s a call against 0.19 s). Those forwards compute every position and read after."""
    return not cfg.scan_layers and not cfg.attention_chunk and attention_kernel(cfg) == "xla"


class Transformer(nn.Module):
    """Returns (logits `[batch, seq, vocab]` float32, final hidden `[batch, seq, embed]`, cache);
    logits are None with `with_head=False` (see `head_logits`). With a `Read` (no cache, or a
    prefill): logits and hidden at the read positions alone, `[n, count, ...]`."""
    cfg: ModelConfig
    with_head: bool = True

    @nn.compact
    def __call__(self, tokens, positions, kv_mask, cache=None, cache_start=0, segment_ids=None,
                 read: Read | None = None):
        cfg = self.cfg
        # a forward without a cache (training, scoring) keeps its rows split over the batch axes and
        # gathers the weights, as FSDP does; a decode step's activations are too small for that to pay
        whole_sequences = cache is None
        embed = _embed_layer(cfg, name="embed", whole_table=whole_sequences)
        x = embed(tokens)
        x = split_rows(x) if whole_sequences else x
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        last_layer_reads = read is not None and read.rows is None and reads_in_last_layer(cfg)
        if cfg.scan_layers:
            layers = nn.scan(_scanned_layer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=nn.broadcast, length=cfg.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            (x, new_cache, _), _ = layers(layer(cfg, name="layers"), (x, cache, 0), positions, kv_mask,
                                          cache_start, segment_ids)
        else:
            new_cache = []
            for i in range(cfg.num_layers):
                x, layer_cache = layer(cfg, name=f"layers_{i}")(
                    x, positions, kv_mask, None if cache is None else cache[i], cache_start, segment_ids, None,
                    read if last_layer_reads and i == cfg.num_layers - 1 else None)
                new_cache.append(layer_cache)
        if read is not None and not last_layer_reads:
            x = read.take(x)
            x = split_rows(x) if whole_sequences else x
        hidden = RMSNorm(cfg, name="final_norm")(x)
        new_cache = None if cache is None else new_cache
        if not self.with_head:
            return None, hidden, new_cache
        logits = embed.attend(hidden) if cfg.tie_word_embeddings else _lm_head_layer(cfg, name="lm_head")(hidden)
        return logits.astype(jnp.float32), hidden, new_cache


def head_logits(cfg: ModelConfig, params: Any, hidden: jnp.ndarray) -> jnp.ndarray:
    """The model's own output layer alone: logits `[..., vocab]` (float32) of final hidden states
    `[..., embed]`, for callers that want logits at a few positions at a time."""
    if cfg.tie_word_embeddings:
        logits = _embed_layer(cfg).apply({"params": params["embed"]}, hidden, method="attend")
    else:
        logits = _lm_head_layer(cfg).apply({"params": params["lm_head"]}, hidden)
    return logits.astype(jnp.float32)


def positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Positions `[batch, seq]` that count real tokens; padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def forward(cfg: ModelConfig, params: Any, tokens: jnp.ndarray, attention_mask: jnp.ndarray,
            with_head: bool = True, positions: jnp.ndarray | None = None, read: Read | None = None):
    """Full no-cache forward: (logits `[b, s, vocab]`, hidden `[b, s, embed]`); logits None with
    `with_head=False`. Either a left-padded batch (`attention_mask` 0/1, positions counted from
    it), or packed rows: `attention_mask` holds segment ids and `positions` restart in each.
    `read`: both at the read positions alone, `[n, count, ...]`."""
    if positions is None:
        positions = positions_from_mask(attention_mask)
        segment_ids = None
    else:
        segment_ids = attention_mask
    logits, hidden, _ = Transformer(cfg, with_head).apply(
        {"params": params}, tokens, positions, attention_mask > 0, segment_ids=segment_ids, read=read)
    return logits, hidden


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
    """Boxed (logically partitioned) params; see sharding.init_sharded for placed, plain params.
    Traced with the dense attention kernel, whatever `cfg` names: the params do not depend on it,
    and a Pallas kernel in a program over several TPU chips would have to be under shard_map."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return Transformer(cfg.replace(attention_impl="xla")).init(key, tokens, jnp.zeros_like(tokens),
                                                                jnp.ones_like(tokens))["params"]
