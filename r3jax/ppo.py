"""PPO for R^3 as pure functions, and `make_ppo_update`: the whole update as one jitted call.

Conventions: a rollout batch holds `tokens` and `attention_mask` `[batch, prompt + new]`, the
sampler's `logprobs` and the `completion_mask` `[batch, new]`, and `scores` `[batch]` from the
host. Values and log-probs at completion position t are those of the state before token t.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from r3jax import optim
from r3jax.models.transformer import ModelConfig, forward, head_logits
from r3jax.models.value import hidden_and_values


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.05
    kl_mode: str = "reward"  # "reward": -beta*(logp - logp_ref) per token; "loss": k3 term in the loss
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 5.0
    entropy_coef: float = 0.0
    epochs: int = 2
    minibatches: int = 1
    temperature: float = 1.0
    whiten_advantages: bool = True
    score_clip: float = 0.0  # 0: off; the non-math recipe clips rewards to +-5
    max_log_ratio: float = 20.0
    logits_chunk: int = 0  # completion positions per LM-head call in completion_logprobs; 0: all


class PPOState(NamedTuple):
    params: Any          # actor-critic params (see models/value.py)
    opt_state: Any
    step: jnp.ndarray    # optimizer updates done


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def masked_whiten(x: jnp.ndarray, mask: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def token_logprobs(logits: jnp.ndarray, targets: jnp.ndarray, temperature: float):
    """Log-probs of `targets [batch, n]` under softmax(logits `[batch, n, vocab]` / temperature), the
    distribution the sampler reports; and the entropy of that distribution per position."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def completion_logprobs(model_cfg: ModelConfig, policy_params: Any, hidden: jnp.ndarray, tokens: jnp.ndarray,
                        num_new: int, temperature: float, chunk: int = 0):
    """`token_logprobs` of the completion tokens (the last `num_new` of `tokens [batch, seq]`) from
    the final hidden states `[batch, seq, embed]`: `[batch, new]` log-probs and entropies.

    The LM head runs only at completion positions, `chunk` of them at a time (0: all at once),
    each chunk rematerialised in the backward pass, so at most `[batch, chunk, vocab]` logits live
    at once instead of `[batch, seq, vocab]`.
    """
    prompt_len = tokens.shape[1] - num_new
    states, targets = hidden[:, prompt_len - 1:-1], tokens[:, prompt_len:]
    if not chunk or chunk >= num_new:
        return token_logprobs(head_logits(model_cfg, policy_params, states), targets, temperature)
    pad = -num_new % chunk
    states = jnp.pad(states, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    batch, num_chunks = states.shape[0], states.shape[1] // chunk

    @jax.checkpoint
    def one_chunk(_, chunk_inputs):
        chunk_states, chunk_targets = chunk_inputs
        return None, token_logprobs(head_logits(model_cfg, policy_params, chunk_states), chunk_targets, temperature)

    by_chunk = lambda x: x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
    _, (logp, entropy) = jax.lax.scan(one_chunk, None, (by_chunk(states), by_chunk(targets)))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, -1)[:, :num_new]
    return unchunk(logp), unchunk(entropy)


def gae(rewards: jnp.ndarray, values: jnp.ndarray, mask: jnp.ndarray, gamma: float, lam: float):
    """Generalised advantage estimation over `[batch, time]` by a reverse `lax.scan`.

    Rewards and values past the mask count as 0 (the episode has ended). Returns
    (advantages, returns), both masked.
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(next_advantage, delta):
        advantage = delta + gamma * lam * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def per_token_rewards(scores, logprobs, ref_logprobs, mask, cfg: PPOConfig) -> jnp.ndarray:
    """`-beta * (logp - logp_ref)` on every completion token (kl_mode "reward"), plus the score on
    the last one. `[batch, new]`."""
    mask = mask.astype(jnp.float32)
    if cfg.score_clip:
        scores = jnp.clip(scores, -cfg.score_clip, cfg.score_clip)
    last = jax.nn.one_hot(mask.sum(1).astype(jnp.int32) - 1, mask.shape[1])
    rewards = scores[:, None] * last
    if cfg.kl_mode == "reward":
        rewards = rewards - cfg.kl_coef * (logprobs - ref_logprobs)
    return rewards * mask


def policy_loss(logp, old_logp, advantages, mask, clip_ratio, max_log_ratio):
    """Clipped surrogate; returns (loss, clip fraction)."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -max_log_ratio, max_log_ratio))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).astype(jnp.float32), mask)


def value_loss(values, old_values, returns, mask, value_clip):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within value_clip of the old value."""
    clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def k3_kl(logp, ref_logp):
    """Unbiased, non-negative per-token KL estimate exp(r) - r - 1 with r = logp_ref - logp."""
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1.0


def explained_variance(values, returns, mask):
    return 1.0 - masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask) / (
        masked_mean((returns - masked_mean(returns, mask)) ** 2, mask) + 1e-8)


def minibatch_loss(params, batch, model_cfg: ModelConfig, cfg: PPOConfig):
    """Total loss of one minibatch and its metrics."""
    num_new = batch["completion_mask"].shape[1]
    mask = batch["completion_mask"].astype(jnp.float32)
    hidden, values = hidden_and_values(model_cfg, params, batch["tokens"], batch["attention_mask"])
    logp, entropy = completion_logprobs(model_cfg, params["policy"], hidden, batch["tokens"], num_new,
                                        cfg.temperature, cfg.logits_chunk)
    values = values[:, -num_new - 1:-1]
    pg_loss, clip_frac = policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask,
                                     cfg.clip_ratio, cfg.max_log_ratio)
    vf_loss = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
    mean_entropy = masked_mean(entropy, mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
    kl_loss = masked_mean(k3_kl(logp, batch["ref_logprobs"]), mask)
    if cfg.kl_mode == "loss":
        loss = loss + cfg.kl_coef * kl_loss
    metrics = {"loss": loss, "pg_loss": pg_loss, "vf_loss": vf_loss, "clip_frac": clip_frac,
               "entropy": mean_entropy, "approx_kl": masked_mean(batch["old_logprobs"] - logp, mask)}
    return loss, metrics


def prepare(params, ref_params, rollout: dict, model_cfg: ModelConfig, cfg: PPOConfig) -> tuple[dict, dict]:
    """Old and reference log-probs, values, rewards, GAE and whitened advantages (no gradients)."""
    num_new = rollout["completion_mask"].shape[1]
    mask = rollout["completion_mask"].astype(jnp.float32)
    hidden, values = hidden_and_values(model_cfg, params, rollout["tokens"], rollout["attention_mask"])
    old_logp, _ = completion_logprobs(model_cfg, params["policy"], hidden, rollout["tokens"], num_new,
                                      cfg.temperature, cfg.logits_chunk)
    _, ref_hidden = forward(model_cfg, ref_params, rollout["tokens"], rollout["attention_mask"], with_head=False)
    ref_logp, _ = completion_logprobs(model_cfg, ref_params, ref_hidden, rollout["tokens"], num_new,
                                      cfg.temperature, cfg.logits_chunk)
    old_values = values[:, -num_new - 1:-1] * mask
    rewards = per_token_rewards(rollout["scores"], old_logp, ref_logp, mask, cfg)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    batch = {"tokens": rollout["tokens"], "attention_mask": rollout["attention_mask"],
             "completion_mask": rollout["completion_mask"], "old_logprobs": old_logp,
             "ref_logprobs": ref_logp, "old_values": old_values, "advantages": advantages,
             "returns": returns}
    kl = (old_logp - ref_logp) * mask
    metrics = {"score": rollout["scores"].mean(), "kl": kl.sum(1).mean(),
               "sampler_kl": masked_mean(rollout["logprobs"] - old_logp, mask),
               "value_explained_variance": explained_variance(old_values, returns, mask),
               "response_length": mask.sum(1).mean(), "return": masked_mean(returns, mask),
               "rows/kl": kl.sum(1), "rows/response_length": mask.sum(1)}  # [batch]: per stage on the host
    return jax.lax.stop_gradient(batch), metrics


def make_ppo_update(model_cfg: ModelConfig, cfg: PPOConfig, optimizer: optax.GradientTransformation,
                    ) -> Callable[..., tuple[PPOState, dict]]:
    """`update(state, ref_params, rollout, key, lr_scale=1.0) -> (state, metrics)`, one jitted call
    with the state donated: prepare, then `lax.scan` over epochs x minibatches of clipped PPO
    steps, each optimizer step scaled by `lr_scale` (the schedule's multiplier for this RL step)."""

    def update(state: PPOState, ref_params, rollout: dict, key: jax.Array, lr_scale=1.0):
        batch, metrics = prepare(state.params, ref_params, rollout, model_cfg, cfg)
        size = batch["tokens"].shape[0]
        if size % cfg.minibatches:
            raise ValueError(f"batch {size} does not split into {cfg.minibatches} minibatches")
        grad_fn = jax.grad(minibatch_loss, has_aux=True)

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            grads, step_metrics = grad_fn(params, minibatch, model_cfg, cfg)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = optim.scaled(updates, lr_scale)
            step_metrics["grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state), step_metrics

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, size)
            minibatches = jax.tree.map(
                lambda x: x[order].reshape(cfg.minibatches, size // cfg.minibatches, *x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, carry, minibatches)

        (params, opt_state), step_metrics = jax.lax.scan(
            epoch, (state.params, state.opt_state), jax.random.split(key, cfg.epochs))
        metrics.update(jax.tree.map(jnp.mean, step_metrics))
        return PPOState(params, opt_state, state.step + cfg.epochs * cfg.minibatches), metrics

    return jax.jit(update, donate_argnums=0)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> PPOState:
    """Optimizer state created under jit, so it inherits the params' shardings."""
    return PPOState(params, jax.jit(optimizer.init)(params), jnp.zeros((), jnp.int32))
