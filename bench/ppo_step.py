"""Throughput of one `ppo_update` (the whole PPO step as one jit), next to its peer in the same run:
a bare SFT-style training step (forward + backward + AdamW) on the same tokens.

    python bench/ppo_step.py

The PPO step does 2 reference/old forwards plus epochs x (forward + backward) of the policy with
its value head, so its time over the bare step's shows the overhead of GAE, losses and the scans.
The same update with the LM head chunked over completion positions (`rl.logits_chunk`) is timed
beside it, and both are compiled at Llama-2's 32,000-token vocabulary to read XLA's temporary
memory, where the `[batch, positions, vocab]` logits dominate.
The update is also timed per advantage estimator on the same batch, in the same run: PPO with
a value head on the policy (the paper's), PPO with a separate critic, and critic-free GRPO
(groups of 4), so the cost of a critic shows as a ratio.
Results: bench/results/ppo_step-<device>.json.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import write
from r3jax import optim, ppo
from r3jax.metrics import machine_info
from r3jax.models.transformer import ModelConfig, init_params
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout
from r3jax.train.sft import SFTState, make_train_step

SMALL = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, max_position_embeddings=1024)
BATCH, PROMPT, NEW = 16, 64, 64
CHUNK = 16
LARGE_VOCAB = 32000


def seconds_per_call(fn, repeats=3):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_rollout(cfg, key) -> ppo.Experience:
    tokens = jax.random.randint(key, (BATCH, PROMPT + NEW), 3, cfg.vocab_size)
    rollout = Rollout(tokens, jnp.ones_like(tokens), jnp.zeros((BATCH, NEW)), jnp.ones((BATCH, NEW), jnp.int32),
                      jnp.full((BATCH,), NEW))
    return ppo.experience(rollout, jax.random.uniform(key, (BATCH,)))


CRITICS = {"gae_value_head": ("gae", False), "gae_separate_critic": ("gae", True), "grpo": ("grpo", False)}


def ppo_caller(cfg, ppo_cfg, optimizer, key, separate_critic=False):
    """A no-argument call of one compiled PPO update (the state carried along, as in training)."""
    rollout = make_rollout(cfg, key)
    reference = nn.unbox(init_params(cfg, key))
    update = ppo.make_ppo_update(cfg, ppo_cfg, optimizer)
    params = actor_critic_params(cfg, nn.unbox(init_params(cfg, key)), separate_critic,
                                 critic=ppo_cfg.estimator == "gae")
    state = [ppo.init_state(params, optimizer)]

    def call():
        state[0], metrics, _ = update(state[0], reference, rollout, key)
        jax.block_until_ready(metrics)

    return call


def temp_bytes(cfg, ppo_cfg, optimizer, key) -> int:
    """XLA's temporary memory for one PPO update, compiled from shapes alone."""
    params = jax.eval_shape(lambda k: actor_critic_params(cfg, nn.unbox(init_params(cfg, k)), False), key)
    state = jax.eval_shape(lambda p: ppo.init_state(p, optimizer), params)
    update = ppo.make_ppo_update(cfg, ppo_cfg, optimizer)
    rollout = jax.eval_shape(lambda k: make_rollout(cfg, k), key)
    compiled = update.lower(state, params.policy, rollout, key).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    cfg = SMALL
    key = jax.random.key(0)
    tokens = make_rollout(cfg, key).rollout.tokens
    ppo_cfg = ppo.PPOConfig(epochs=2, minibatches=1)
    chunked_cfg = ppo.PPOConfig(epochs=2, minibatches=1, logits_chunk=CHUNK)
    optimizer = optim.adamw(1e-6)
    ppo_call = ppo_caller(cfg, ppo_cfg, optimizer, key)
    chunked_call = ppo_caller(cfg, chunked_cfg, optimizer, key)

    sft_step = make_train_step(cfg, optimizer)
    sft_params = nn.unbox(init_params(cfg, key))
    sft_state = [SFTState(sft_params, optimizer.init(sft_params), jnp.zeros((), jnp.int32))]
    sft_batch = {"tokens": tokens[:, None], "attention_mask": jnp.ones_like(tokens)[:, None],
                 "loss_mask": jnp.ones_like(tokens)[:, None]}

    def sft_call():
        sft_state[0], metrics = sft_step(sft_state[0], sft_batch, 1.0)
        jax.block_until_ready(metrics)

    ppo_s, sft_s, chunked_s = seconds_per_call(ppo_call), seconds_per_call(sft_call), seconds_per_call(chunked_call)
    by_estimator = {}
    for name, (estimator, separate) in CRITICS.items():
        estimator_cfg = ppo.PPOConfig(epochs=2, minibatches=1, estimator=estimator,
                                      group_size=1 if estimator == "gae" else 4)
        by_estimator[name] = seconds_per_call(ppo_caller(cfg, estimator_cfg, optimizer, key, separate))
    large = cfg.replace(vocab_size=LARGE_VOCAB)
    plain_bytes, chunked_bytes = (temp_bytes(large, c, optimizer, key) for c in (ppo_cfg, chunked_cfg))
    tokens_per_step = BATCH * (PROMPT + NEW)
    result = {"benchmark": "one ppo_update vs one bare train step on the same batch", "model": cfg.__dict__,
              "params": cfg.num_params(), "batch": BATCH, "prompt": PROMPT, "new_tokens": NEW,
              "ppo_epochs": ppo_cfg.epochs, "machine": machine_info(),
              "ppo_update_s": ppo_s, "ppo_tokens_per_s": tokens_per_step / ppo_s,
              "train_step_s": sft_s, "train_step_tokens_per_s": tokens_per_step / sft_s,
              "ppo_over_train_step": ppo_s / sft_s,
              "update_s_by_estimator": by_estimator,
              "over_gae_value_head": {k: v / by_estimator["gae_value_head"] for k, v in by_estimator.items()},
              "logits_chunk": CHUNK, "ppo_update_chunked_s": chunked_s, "chunked_over_plain": chunked_s / ppo_s,
              "large_vocab": LARGE_VOCAB, "large_vocab_temp_bytes": plain_bytes,
              "large_vocab_chunked_temp_bytes": chunked_bytes,
              "large_vocab_temp_ratio": chunked_bytes / plain_bytes}
    print({k: v for k, v in result.items() if k not in ("model", "machine")})
    write("ppo_step", result)


if __name__ == "__main__":
    main()
