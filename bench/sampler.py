"""Decode throughput: r3jax's sampler vs HF `generate` (PyTorch) on the same weights vs a naive
JAX decode without a KV cache, measured in one run, next to the time of the decode's weight GEMMs
alone, prefill included (no attention, norms or sampling): a bound on what any fp32 decode of this
model reaches with XLA's GEMMs on this machine.

    python bench/sampler.py [--quick]

Greedy decoding of exactly `new_tokens` tokens (no stop ids), prompts of 32 tokens. JAX numbers
exclude compilation (one warm-up call per shape). Results: bench/results/sampler-<device>.json.
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
from r3jax.models.transformer import ModelConfig, head_logits, init_params
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


def r3jax_decode(params, cfg, tokens, mask, new_tokens):
    settings = SamplingConfig(max_new_tokens=new_tokens, greedy=True, pad_id=0, min_prompt_bucket=PROMPT)
    run = lambda: jax.block_until_ready(sample(params, cfg, tokens, mask, jax.random.key(0), settings).tokens)
    run()  # compile
    return timed(run, 2)


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


def hf_decode(model, tokens, new_tokens):
    import torch

    ids = torch.tensor(np.asarray(tokens))
    run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        run()  # warm-up
        return timed(run)


def main():
    import torch
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only")
    args = parser.parse_args()
    cfg = SMALL
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    with tempfile.TemporaryDirectory() as path:
        hf.save(path, cfg, params)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    rows = []
    for batch in ([1, 8] if args.quick else [1, 8, 32, 128]):
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
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    write("sampler", {"benchmark": "greedy decode tokens/s, prompt 32 tokens", "model": cfg.__dict__,
                      "params": cfg.num_params(), "machine": machine_info(),
                      "naive_note": f"naive (no KV cache) skipped where batch x new_tokens > {NAIVE_MAX_TOKENS}",
                      "gemms_only_note": "the prefill's and decode steps' weight GEMMs alone under XLA (no "
                                         "attention, norms, sampling): the speedup over HF that a decode costing "
                                         "nothing else would reach",
                      "rows": rows})


if __name__ == "__main__":
    main()
