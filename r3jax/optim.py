"""Optimizers for SFT and PPO: AdamW at the peak learning rate with global-norm clipping, and the
learning-rate schedule as a multiplier the trainer passes into each jitted step.

The schedule is a function of the run's progress, not of the optimizer's update count, so a run
whose length is a token budget (an unknown number of steps) still decays to its end.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from r3jax import sharding
from r3jax.models.value import ActorCritic


def initial_state(optimizer: optax.GradientTransformation, params: Any) -> tuple[Any, jax.Array]:
    """(`optimizer`'s state for `params`, a step count of 0), laid out like the params: Adam's
    moments like their weights, counts replicated (`sharding.init_like_params`)."""
    return sharding.init_like_params(lambda p: (optimizer.init(p), jnp.zeros((), jnp.int32)), params)


def lr_scale(kind: str, warmup_steps: int, step: int, progress: float) -> float:
    """The learning rate's fraction of its peak for training step `step` (0-based) when a
    fraction `progress` of the run (steps, or tokens of a budget) is done: a linear warm-up over
    `warmup_steps`, times constant, linear or cosine decay to 0 at the end of the run."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    progress = min(max(progress, 0.0), 1.0)
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
    return warm * decay[kind]  # kind is one of config.SCHEDULES (validated)


def adamw(lr: float, weight_decay: float = 0.0, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(lr, weight_decay=weight_decay))
    return optax.chain(*parts)


def sft_optimizer_knobs(section) -> tuple[float, float, float]:
    """(lr, weight_decay, grad_clip): everything `sft_optimizer` reads of config.sft (and so what
    names a compiled SFT step's optimizer, `programs.Cached`)."""
    return section.lr, section.weight_decay, section.grad_clip


def sft_optimizer(section) -> optax.GradientTransformation:
    """config.sft's optimizer: what the SFT trainer steps and the planner compiles."""
    return adamw(*sft_optimizer_knobs(section))


def rl_optimizer_knobs(section) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """`adamw`'s arguments for the policy and for the critic: everything `rl_optimizer` reads of
    config.rl (and so what names a compiled update's optimizer, `programs.Cached`)."""
    return ((section.lr, section.weight_decay, section.grad_clip),
            (section.critic_lr or section.lr, section.weight_decay, section.grad_clip))


def rl_optimizer(section, params: ActorCritic) -> optax.GradientTransformation:
    """config.rl's optimizer over `params` (the policy at rl.lr, what only the critic owns at
    rl.critic_lr): what the RL trainer steps and the planner compiles."""
    policy, critic = rl_optimizer_knobs(section)
    return actor_critic(adamw(*policy), adamw(*critic), params)


def scaled(updates: Any, scale) -> Any:
    """Updates times the schedule's multiplier (AdamW's step, weight decay included, is linear in
    the learning rate)."""
    return optax.tree.scale(scale, updates)


def actor_critic(policy: optax.GradientTransformation, critic: optax.GradientTransformation,
                 params: ActorCritic) -> optax.GradientTransformation:
    """`policy` updates the policy (and, through the value loss, a shared backbone); `critic`
    updates what only the critic owns: the value head and a separate critic's backbone."""
    labels = ActorCritic("policy", *("critic" if part is not None else None
                                     for part in (params.value_head, params.critic_backbone)))
    return optax.multi_transform({"policy": policy, "critic": critic}, labels)
