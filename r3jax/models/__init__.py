"""Llama-family models as pure functions of parameter pytrees."""
from __future__ import annotations

import jax.numpy as jnp

from r3jax.models.transformer import ModelConfig, Transformer, forward, init_cache, init_params


def logits(config: ModelConfig, params, tokens: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Logits `[batch, seq, vocab]` (float32) of left-padded `tokens [batch, seq]`."""
    return forward(config, params, tokens, attention_mask)[0]


__all__ = ["ModelConfig", "Transformer", "forward", "init_cache", "init_params", "logits"]
