"""Optimizers for SFT and PPO: AdamW, warmup then constant/linear/cosine decay, global-norm clip."""
from __future__ import annotations

from typing import Any

import optax


def schedule(lr: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(1, total_steps - warmup_steps))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps))
    else:
        raise ValueError(f"schedule {kind!r}: expected constant, linear or cosine")
    if not warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def adamw(lr: float, warmup_steps: int = 0, total_steps: int = 1, kind: str = "constant",
          weight_decay: float = 0.0, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(schedule(lr, warmup_steps, total_steps, kind), weight_decay=weight_decay))
    return optax.chain(*parts)


def actor_critic(policy: optax.GradientTransformation, critic: optax.GradientTransformation,
                 params: dict[str, Any]) -> optax.GradientTransformation:
    """`policy` updates the policy (and, through the value loss, a shared backbone); `critic`
    updates what only the critic owns: the separate critic, or the value head on the policy."""
    return optax.multi_transform({"policy": policy, "critic": critic},
                                 {key: ("policy" if key == "policy" else "critic") for key in params})
