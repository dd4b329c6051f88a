"""The critic: a scalar value head on the policy's backbone (the paper's choice) or on a
backbone of its own. Actor-critic params are one pytree:

    shared:   {"policy": transformer params, "value_head": {"kernel", "bias"}}
    separate: {"policy": ..., "critic": {"backbone": transformer params, "value_head": ...}}
    none:     {"policy": ...} (critic-free estimators)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from r3jax.models.transformer import ModelConfig, forward


def init_value_head(cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """Zero-initialised, so the first value estimates are 0."""
    return {"kernel": jnp.zeros((cfg.hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def actor_critic_params(cfg: ModelConfig, policy: Any, separate_critic: bool, critic: bool = True) -> dict[str, Any]:
    """Starts the critic from the policy (a copy of its backbone when `separate_critic`); no
    critic at all when `critic` is False."""
    if not critic:
        return {"policy": policy}
    head = init_value_head(cfg)
    if separate_critic:
        return {"policy": policy, "critic": {"backbone": jax.tree.map(jnp.copy, policy), "value_head": head}}
    return {"policy": policy, "value_head": head}


def head_values(head: dict[str, jnp.ndarray], hidden: jnp.ndarray) -> jnp.ndarray:
    """Values `[batch, seq]` (float32) from hidden states `[batch, seq, embed]`."""
    return hidden.astype(jnp.float32) @ head["kernel"] + head["bias"]


def hidden_and_values(cfg: ModelConfig, params: dict[str, Any], tokens: jnp.ndarray,
                      attention_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(the policy's final hidden states `[b, s, embed]`, values `[b, s]` or None without a critic)
    of actor-critic params; the policy's logits are left to the caller (`ppo.completion_logprobs`)."""
    _, hidden = forward(cfg, params["policy"], tokens, attention_mask, with_head=False)
    if "value_head" not in params and "critic" not in params:
        return hidden, None
    if "critic" in params:
        _, critic_hidden = forward(cfg, params["critic"]["backbone"], tokens, attention_mask, with_head=False)
        return hidden, head_values(params["critic"]["value_head"], critic_hidden)
    return hidden, head_values(params["value_head"], hidden)
