"""Decode throughput: r3jax's sampler vs HF `generate` (PyTorch) on the same weights vs a naive
JAX decode without a KV cache, measured in one run, next to the time of the decode's weight GEMMs
alone, prefill included (no attention, norms or sampling): a bound on what any fp32 decode of this
model reaches with XLA's GEMMs on this machine.

    python bench/sampler.py [--quick] [--floor]

Greedy decoding of exactly `new_tokens` tokens (no stop ids), prompts of 32 tokens. JAX numbers
exclude compilation (one warm-up call per shape). Results: bench/results/sampler-<device>.json.

`--floor` also times one decode step at batch 64 against its floor, the fewest bytes a step must
move over the measured memory bandwidth (and the fewest FLOPs over the measured matmul rate):
a ~1B Llama in bf16 on an accelerator, the small fp32 model on a CPU.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import write
from r3jax import models
from r3jax.metrics import machine_info
from r3jax.models import hf
from r3jax.models.transformer import ModelConfig, cache_block, head_logits, init_params
from r3jax.sampling import SamplingConfig, sample

SMALL = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, max_position_embeddings=1024)
PROMPT = 32
NAIVE_MAX_TOKENS = 8 * 64  # batch x new tokens beyond which the naive decode is too slow to wait for


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def r3jax_decode(params, cfg, tokens, mask, new_tokens, repeats=2):
    settings = SamplingConfig(max_new_tokens=new_tokens, greedy=True, pad_id=0, min_prompt_bucket=PROMPT)
    run = lambda: jax.block_until_ready(sample(cfg, params, tokens, mask, jax.random.key(0), settings).tokens)
    run()  # compile
    return timed(run, repeats)


@functools.partial(jax.jit, static_argnames=("cfg", "new_tokens"))
def _naive(params, tokens, cfg, new_tokens):
    """Every step re-runs the full forward over a fixed-length buffer (no cache)."""
    batch = tokens.shape[0]
    buffer = jnp.concatenate([tokens, jnp.zeros((batch, new_tokens), tokens.dtype)], axis=1)

    def step(buffer, t):
        mask = (jnp.arange(buffer.shape[1]) < PROMPT + t).astype(jnp.int32)[None].repeat(batch, 0)
        logits = models.logits(cfg, params, buffer, mask)
        next_token = jnp.argmax(logits[:, PROMPT + t - 1], axis=-1).astype(buffer.dtype)
        return buffer.at[:, PROMPT + t].set(next_token), None

    return jax.lax.scan(step, buffer, jnp.arange(new_tokens))[0]


def naive_decode(params, cfg, tokens, new_tokens):
    run = lambda: jax.block_until_ready(_naive(params, tokens, cfg, new_tokens))
    run()
    return timed(run)


def layer_matrices(cfg, params):
    """Per layer the 2-D `[in, out]` weight matrices a token is multiplied by."""
    layers = []
    for i in range(cfg.num_layers):
        attn, mlp = params[f"layers_{i}"]["attn"], params[f"layers_{i}"]["mlp"]
        layer = {name: attn[name]["kernel"].reshape(cfg.hidden_size, -1) for name in ("q_proj", "k_proj", "v_proj")}
        layer["o_proj"] = attn["o_proj"]["kernel"].reshape(-1, cfg.hidden_size)
        layer.update({name: mlp[name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj")})
        layers.append(layer)
    return layers


def _gemm_pass(cfg, params, layers, x):
    """One forward's weight GEMMs in the model's data flow, x `[..., embed]`; k/v and the logits
    feed row reductions so that no GEMM is dead code."""
    for w in layers:
        kv = (x @ w["k_proj"]).sum(-1, keepdims=True) + (x @ w["v_proj"]).sum(-1, keepdims=True)
        x = x + (x @ w["q_proj"]) @ w["o_proj"] + kv
        x = x + (jax.nn.silu(x @ w["gate_proj"]) * (x @ w["up_proj"])) @ w["down_proj"]
    return x + head_logits(cfg, params, x).max(-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("cfg", "new_tokens"))
def _gemms_only(params, layers, prompt_hidden, cfg, new_tokens):
    """The weight GEMMs of a prefill over prompt_hidden `[batch, prompt, embed]` and of `new_tokens`
    decode steps, and nothing else."""
    last = _gemm_pass(cfg, params, layers, prompt_hidden)[:, -1]
    return jax.lax.fori_loop(0, new_tokens, lambda _, x: _gemm_pass(cfg, params, layers, x), last)


def gemms_only(params, cfg, batch, new_tokens):
    layers = layer_matrices(cfg, params)
    prompt_hidden = jnp.full((batch, PROMPT, cfg.hidden_size), 0.01, jnp.float32)
    run = lambda: jax.block_until_ready(_gemms_only(params, layers, prompt_hidden, cfg, new_tokens))
    run()
    return timed(run, 2)


def load_hf(path, dtype):
    """The exported model in PyTorch, on the GPU when JAX runs on one."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model.to("cuda") if jax.default_backend() == "gpu" and torch.cuda.is_available() else model


def hf_decode(model, tokens, new_tokens, repeats=1):
    import torch

    ids = torch.tensor(np.asarray(tokens), device=model.device)

    def run():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        run()  # warm-up
        return timed(run, repeats)


# TinyLlama-1.1B's shape
ONE_B = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                    num_kv_heads=4, head_dim=64, max_position_embeddings=2048, param_dtype="bfloat16",
                    dtype="bfloat16")
FLOOR_BATCH, FLOOR_PROMPT = 64, 128
FLOOR_LENGTHS = (64, 192)  # two decode lengths: their time difference over 128 steps is one step's time


def memory_bandwidth(nbytes: int) -> float:
    """Bytes/s through device memory: the faster of an in-place (donated) scaling of a random float32
    array, counting bytes read plus written, and a sum over it (a fresh output buffer would time
    the host's page faults on a CPU)."""
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)
    total = jax.jit(jnp.sum)
    state = [jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)]

    def scale_in_place():
        state[0] = jax.block_until_ready(scale(state[0]))

    read = lambda: jax.block_until_ready(total(state[0]))
    scale_in_place()  # compile both
    read()
    return max(2 * nbytes / timed(scale_in_place, 5), nbytes / timed(read, 5))


def matmul_rate(n: int, dtype) -> float:
    """FLOP/s of an n x n x n matmul on random inputs."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    run = lambda: jax.block_until_ready(matmul(a, b))
    run()
    return 2 * n ** 3 / timed(run, 5)


def step_minimum(cfg, params, batch, cached):
    """(bytes, FLOPs) one decode step needs at least when it reads `cached` KV entries: each weight
    read once (of an untied embedding only the batch's rows), the cache read, one entry written."""
    embedding = params["embed"]["embedding"]
    matrix_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    matrix_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    if not cfg.tie_word_embeddings:
        matrix_bytes -= embedding.nbytes - batch * cfg.hidden_size * embedding.dtype.itemsize
        matrix_params -= embedding.size
    kv_entry = cfg.num_layers * 2 * batch * cfg.num_kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize
    attention_flops = 4 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * cached
    return matrix_bytes + kv_entry * (cached + 1), 2 * batch * matrix_params + attention_flops


def decode_floor(on_accelerator: bool) -> dict:
    """One decode step's time at batch 64 (r3jax reading the KV cache in blocks of 64 and in one
    pass, its default being the one `cache_block` picks on this backend, and HF), against the time
    its minimum bytes take at the measured bandwidth and its minimum FLOPs at the measured matmul
    rate."""
    import torch

    cfg = ONE_B if on_accelerator else SMALL
    params = jax.jit(lambda key: nn.unbox(init_params(cfg, key)))(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (FLOOR_BATCH, FLOOR_PROMPT), 3, cfg.vocab_size)
    mask = jnp.ones_like(tokens)
    short, long = FLOOR_LENGTHS

    def per_step(decode) -> float:
        """Seconds per decode step of `decode(new_tokens) -> seconds`, prefill and overhead cancelled."""
        return (decode(long) - decode(short)) / (long - short)

    by_block = {block: per_step(lambda n, b=block: r3jax_decode(params, cfg.replace(decode_block=b), tokens, mask, n, 3))
                for block in (0, 64)}
    ours, ours_whole_cache, ours_blocks = by_block[cache_block(cfg)], by_block[0], by_block[64]
    with tempfile.TemporaryDirectory() as path:
        hf.save(path, cfg, params)
        hf_model = load_hf(path, getattr(torch, cfg.dtype))
    theirs = per_step(functools.partial(hf_decode, hf_model, tokens, repeats=3))
    del hf_model
    bandwidth = memory_bandwidth((2 << 30) if on_accelerator else (256 << 20))
    rate = matmul_rate(8192 if on_accelerator else 1024, cfg.jnp_dtype)
    # decode step i reads the prompt's and i + 1 completion tokens' KV entries; bytes and FLOPs are
    # linear in that count, so the mean timed step is the step at its mean over i in [short, long)
    step_bytes, step_flops = step_minimum(cfg, params, FLOOR_BATCH, FLOOR_PROMPT + (short + long + 1) / 2)
    memory_floor, compute_floor = step_bytes / bandwidth, step_flops / rate
    floor = max(memory_floor, compute_floor)
    return {"model": cfg.__dict__, "params": cfg.num_params(), "batch": FLOOR_BATCH, "prompt": FLOOR_PROMPT,
            "steps_timed": f"decode of {long} minus decode of {short} new tokens, over {long - short}",
            "memory_bandwidth_gb_per_s": bandwidth / 1e9, "matmul_tflop_per_s": rate / 1e12,
            "step_bytes": float(step_bytes), "step_flops": float(step_flops),
            "memory_floor_ms": float(memory_floor) * 1e3, "compute_floor_ms": float(compute_floor) * 1e3,
            "r3jax_step_ms": ours * 1e3, "r3jax_whole_cache_step_ms": ours_whole_cache * 1e3,
            "hf_step_ms": theirs * 1e3, "r3jax_over_floor": float(ours / floor),
            "r3jax_whole_cache_over_floor": float(ours_whole_cache / floor), "hf_over_floor": float(theirs / floor),
            "r3jax_default_decode_block": cache_block(cfg), "r3jax_blocks_of_64_step_ms": ours_blocks * 1e3}


def throughput_rows(batches) -> list[dict]:
    import torch

    cfg = SMALL
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    with tempfile.TemporaryDirectory() as path:
        hf.save(path, cfg, params)
        hf_model = load_hf(path, torch.float32)
    rows = []
    for batch in batches:
        tokens = jax.random.randint(jax.random.key(batch), (batch, PROMPT), 3, cfg.vocab_size)
        mask = jnp.ones_like(tokens)
        for new_tokens in (64, 256):
            produced = batch * new_tokens
            ours = r3jax_decode(params, cfg, tokens, mask, new_tokens)
            theirs = hf_decode(hf_model, tokens, new_tokens)
            naive = naive_decode(params, cfg, tokens, new_tokens) if produced <= NAIVE_MAX_TOKENS else None
            gemms = gemms_only(params, cfg, batch, new_tokens)
            row = {"batch": batch, "new_tokens": new_tokens, "r3jax_tokens_per_s": produced / ours,
                   "hf_tokens_per_s": produced / theirs,
                   "naive_tokens_per_s": None if naive is None else produced / naive,
                   "gemms_only_tokens_per_s": produced / gemms,
                   "speedup_vs_hf": theirs / ours,
                   "speedup_vs_naive": None if naive is None else naive / ours,
                   "gemms_only_speedup_vs_hf": theirs / gemms}
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                    if not isinstance(v, dict))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only")
    parser.add_argument("--floor", action="store_true", help="also time a decode step against its floor")
    args = parser.parse_args()
    rows = throughput_rows([1, 8] if args.quick else [1, 8, 32, 128])
    payload = {"benchmark": "greedy decode tokens/s, prompt 32 tokens", "model": SMALL.__dict__,
               "params": SMALL.num_params(), "machine": machine_info(),
               "naive_note": f"naive (no KV cache) skipped where batch x new_tokens > {NAIVE_MAX_TOKENS}",
               "gemms_only_note": "the prefill's and decode steps' weight GEMMs alone under XLA (no "
                                  "attention, norms, sampling): the speedup over HF that a decode costing "
                                  "nothing else would reach",
               "rows": rows}
    if args.floor:
        payload["decode_floor"] = decode_floor(jax.default_backend() != "cpu")
        print(_line(payload["decode_floor"]), flush=True)
    write("sampler", payload)


if __name__ == "__main__":
    main()
