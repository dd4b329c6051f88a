"""Rollouts: one jitted prefill plus a `lax.while_loop` decode over a KV cache.

Log-probs. `Rollout.logprobs` are log-probs of the sampled tokens under
`softmax(logits / temperature)`, before any top-k/top-p truncation (temperature 1 for greedy).
The PPO side recomputes exactly this (`ppo.chunked_logprobs` divides by the same temperature), so
the importance ratio starts at 1. With top-k or top-p the sampling distribution is the truncated
one; the paper's recipe uses neither.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from r3jax import programs
from r3jax.models.transformer import (ModelConfig, Read, Transformer, cache_block, head_logits, init_cache,
                                     positions_from_mask)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    min_prompt_bucket: int = 16


class Rollout(NamedTuple):
    """tokens `[batch, prompt + new]` (prompt left-padded to its bucket), attention_mask likewise,
    logprobs `[batch, new]` float32, completion_mask `[batch, new]` (1 up to and including the
    stop token), lengths `[batch]`."""
    tokens: jnp.ndarray
    attention_mask: jnp.ndarray
    logprobs: jnp.ndarray
    completion_mask: jnp.ndarray
    lengths: jnp.ndarray

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.logprobs.shape[1]

    @property
    def completions(self) -> jnp.ndarray:
        return self.tokens[:, self.prompt_length:]


def prompt_bucket(length: int, minimum: int = 16) -> int:
    """Prompt lengths round up to a power of two so a run compiles a handful of shapes."""
    return max(minimum, 1 << math.ceil(math.log2(max(length, 1))))


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
    """Sets logits `[batch, vocab]` outside the top-k / nucleus top-p to -inf."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """`jnp.argmax(x, axis=-1)`, the first index of the maximum, for `x [..., n]` without NaN, as a
    max and a min over indices: XLA:CPU runs jnp.argmax's paired (value, index) reduction with the
    Gumbel noise fused into it 2.2-3.6x slower per draw (docs/experiments.md)."""
    best = x.max(axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1]), x.shape[-1] - 1), axis=-1)


def categorical(key: jax.Array, logits: jnp.ndarray) -> jnp.ndarray:
    """`jax.random.categorical(key, logits)` over the last axis, the same draws (its Gumbel-max
    noise, ties to the first index), with `first_argmax`."""
    return first_argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


def choose_tokens(logits: jnp.ndarray, key: jax.Array, settings: SamplingConfig):
    """Next tokens `[batch]` and their log-probs (see the module docstring for which distribution)."""
    if settings.greedy:
        tokens = first_argmax(logits)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / settings.temperature
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
        tokens = categorical(key, filter_logits(scaled, settings.top_k, settings.top_p))
    return tokens.astype(jnp.int32), jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def prefill(cfg: ModelConfig, params: Any, tokens, positions, kv_mask, cache):
    """The prompt `[batch, prompt]` through the model into the cache: (logits `[batch, vocab]` of the
    last prompt position only, the last layer's queries there alone; the filled cache)."""
    batch, width = tokens.shape
    last = Read(jnp.full((batch, 1), width - 1))
    _, hidden, cache = Transformer(cfg, with_head=False).apply({"params": params}, tokens, positions, kv_mask, cache, 0,
                                                              read=last)
    return head_logits(cfg, params, hidden[:, 0]), cache


def decode_step(cfg: ModelConfig, params: Any, token, position, kv_mask, cache, cache_start):
    """One token per row `[batch]` at slot `cache_start`: (logits `[batch, vocab]`, the cache)."""
    logits, _, cache = Transformer(cfg).apply({"params": params}, token[:, None], position[:, None], kv_mask,
                                              cache, cache_start)
    return logits[:, 0], cache


class DecodeState(NamedTuple):
    """The decode loop's carry."""
    step: jnp.ndarray            # [] new tokens written so far
    tokens: jnp.ndarray          # [batch, new] sampled tokens, pad after a row stops
    logprobs: jnp.ndarray        # [batch, new] float32, 0 after a row stops
    completion_mask: jnp.ndarray  # [batch, new] 1 up to and including the stop token
    done: jnp.ndarray            # [batch] bool: the row has sampled a stop token
    kv_mask: jnp.ndarray         # [batch, cache] which cache slots hold real tokens
    cache: Any                   # the KV cache (models.transformer.init_cache)
    next_logits: jnp.ndarray     # [batch, vocab] for the token at `step`
    next_position: jnp.ndarray   # [batch] that token's position
    key: jax.Array


def cache_length(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> int:
    """KV-cache slots for a prompt and its completion, rounded up to whole decode blocks (the
    tail stays masked)."""
    block = cache_block(cfg) or 1
    return -(-(prompt_len + new_tokens) // block) * block


def read_ahead(cfg: ModelConfig, settings: SamplingConfig) -> None:
    """Starts reading back the sampler's programs for `cfg` and `settings` that an earlier run kept
    on disk (`programs.Cached`), so that a rerun's first rollout does not wait to load its own."""
    _generator(cfg, settings)


@functools.cache
def _generator(cfg: ModelConfig, settings: SamplingConfig) -> programs.Cached:
    """The sampler's program for one model config and sampling settings, kept on disk."""
    return programs.Cached("sampler", functools.partial(_generate, cfg, settings=settings), (cfg, settings))


def _generate(cfg: ModelConfig, params: Any, prompt_tokens, prompt_mask, key, settings: SamplingConfig):
    batch, prompt_len = prompt_tokens.shape
    new = settings.max_new_tokens
    cache_len = cache_length(cfg, prompt_len, new)
    kv_mask = jnp.pad(prompt_mask, ((0, 0), (0, cache_len - prompt_len)))
    positions = positions_from_mask(prompt_mask)
    logits, cache = prefill(cfg, params, prompt_tokens, positions, kv_mask, init_cache(cfg, batch, cache_len))
    stop_ids = jnp.asarray(settings.stop_ids or (-1,), jnp.int32)

    def cond(state: DecodeState):
        return (state.step < new) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        step = state.step
        key, sub = jax.random.split(state.key)
        token, logprob = choose_tokens(state.next_logits, sub, settings)
        alive = ~state.done
        token = jnp.where(alive, token, settings.pad_id)
        kv_mask = state.kv_mask.at[:, prompt_len + step].set(alive.astype(state.kv_mask.dtype))
        logits, cache = decode_step(cfg, params, token, state.next_position, kv_mask, state.cache, prompt_len + step)
        return DecodeState(step + 1, state.tokens.at[:, step].set(token),
                           state.logprobs.at[:, step].set(jnp.where(alive, logprob, 0.0)),
                           state.completion_mask.at[:, step].set(alive.astype(jnp.int32)),
                           state.done | jnp.isin(token, stop_ids), kv_mask, cache, logits, state.next_position + 1,
                           key)

    start = DecodeState(jnp.int32(0), jnp.full((batch, new), settings.pad_id, jnp.int32),
                        jnp.zeros((batch, new), jnp.float32), jnp.zeros((batch, new), jnp.int32),
                        jnp.zeros((batch,), bool), kv_mask, cache, logits, positions[:, -1] + 1, key)
    final = jax.lax.while_loop(cond, body, start)
    return Rollout(
        tokens=jnp.concatenate([prompt_tokens, final.tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask.astype(jnp.int32), final.completion_mask], axis=1),
        logprobs=final.logprobs, completion_mask=final.completion_mask, lengths=final.completion_mask.sum(axis=1))


def sample(cfg: ModelConfig, params: Any, prompt_tokens: jnp.ndarray, prompt_mask: jnp.ndarray,
           key: jax.Array, settings: SamplingConfig) -> Rollout:
    """Samples completions of left-padded prompts `[batch, prompt]` (every row needs one real token).

    The prompt is left-padded further to its power-of-two bucket before the jitted call.
    """
    prompt_len = prompt_tokens.shape[1]
    extra = prompt_bucket(prompt_len, settings.min_prompt_bucket) - prompt_len
    if extra:
        prompt_tokens = jnp.pad(prompt_tokens, ((0, 0), (extra, 0)), constant_values=settings.pad_id)
        prompt_mask = jnp.pad(prompt_mask, ((0, 0), (extra, 0)))
    return _generator(cfg, settings)(params, prompt_tokens, prompt_mask, key)
