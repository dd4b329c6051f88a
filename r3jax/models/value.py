"""The critic: a scalar value head on the policy's backbone (the paper's choice) or on a
backbone of its own, or none at all (critic-free estimators). Actor-critic params are one
registered dataclass, `ActorCritic`, which the optimizer labels by field.

With LoRA, `policy` and `critic_backbone` hold adapters only; the functions here take the frozen
base they sit on as `frozen` (None: nothing is frozen).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from r3jax.models.lora import merge
from r3jax.models.transformer import ModelConfig, Read, forward


@flax.struct.dataclass
class ActorCritic:
    """The params PPO trains. `value_head` reads the policy's hidden states, or those of
    `critic_backbone` when the critic is a model of its own; both None without a critic."""
    policy: Any                     # transformer params
    value_head: Any = None          # {"kernel" [embed], "bias" []}, float32
    critic_backbone: Any = None     # transformer params of a separate critic

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None


def init_value_head(cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """Zero-initialised, so the first value estimates are 0."""
    return {"kernel": jnp.zeros((cfg.hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def actor_critic_params(cfg: ModelConfig, policy: Any, separate_critic: bool, critic: bool = True) -> ActorCritic:
    """Starts the critic from the policy (with `separate_critic`, a copy of it without the LM head,
    which values never read); no critic at all when `critic` is False."""
    if not critic:
        return ActorCritic(policy)
    backbone = None
    if separate_critic:
        backbone = {name: jax.tree.map(jnp.copy, part) for name, part in policy.items() if name != "lm_head"}
    return ActorCritic(policy, init_value_head(cfg), backbone)


def head_values(head: dict[str, jnp.ndarray], hidden: jnp.ndarray) -> jnp.ndarray:
    """Values `[batch, seq]` (float32) from hidden states `[batch, seq, embed]`."""
    return hidden.astype(jnp.float32) @ head["kernel"] + head["bias"]


def critic_values(cfg: ModelConfig, params: ActorCritic, tokens: jnp.ndarray, attention_mask: jnp.ndarray,
                  frozen: dict | None = None, positions: jnp.ndarray | None = None, read: Read | None = None,
                  ) -> jnp.ndarray | None:
    """Values `[b, s]` (float32) from the critic's own forward pass, or None without a critic.
    `positions`: packed rows; `read`: values at the read positions alone, `[n, count]`
    (`transformer.forward`)."""
    if not params.has_critic:
        return None
    backbone = params.policy if params.critic_backbone is None else params.critic_backbone
    _, hidden = forward(cfg, merge(frozen, backbone), tokens, attention_mask, with_head=False, positions=positions,
                        read=read)
    return head_values(params.value_head, hidden)


def hidden_and_values(cfg: ModelConfig, params: ActorCritic, tokens: jnp.ndarray, attention_mask: jnp.ndarray,
                      frozen: dict | None = None, positions: jnp.ndarray | None = None, read: Read | None = None,
                      ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(the policy's final hidden states `[b, s, embed]`, values `[b, s]` or None without a critic);
    the policy's logits are left to the caller (`ppo.chunked_logprobs`). `positions` and `read`
    as in `critic_values`."""
    _, hidden = forward(cfg, merge(frozen, params.policy), tokens, attention_mask, with_head=False, positions=positions,
                        read=read)
    if params.has_critic and params.critic_backbone is None:
        return hidden, head_values(params.value_head, hidden)
    return hidden, critic_values(cfg, params, tokens, attention_mask, frozen, positions, read)
