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
On an accelerator it also times the update and the bare step at TinyLlama-1.1B's shape (float32
master weights computing in bfloat16, as the paper recipes run) and reports their model FLOPs
utilisation against the matmul rate measured in the same run.
Results: bench/results/ppo_step-<device>.json.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import write
from sampler import ONE_B, matmul_rate
from r3jax import optim, ppo
from r3jax.metrics import machine_info
from r3jax.models.transformer import ModelConfig, init_params, reads_in_last_layer
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout
from r3jax.train.sft import SFTState, make_train_step

SMALL = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, max_position_embeddings=1024)
BATCH, PROMPT, NEW = 16, 64, 64
CHUNK = 16
LARGE_VOCAB = 32000


def seconds_per_call(fn, repeats=3):
    # two untimed calls: a caller's fresh state and an update's output state (what every later
    # call gets) are called under different signatures, so each compiles once
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_rollout(cfg, key, rows: int = BATCH, prompt: int = PROMPT, new: int = NEW) -> ppo.Experience:
    tokens = jax.random.randint(key, (rows, prompt + new), 3, cfg.vocab_size)
    rollout = Rollout(tokens, jnp.ones_like(tokens), jnp.zeros((rows, new)), jnp.ones((rows, new), jnp.int32),
                      jnp.full((rows,), new))
    return ppo.experience(rollout, jax.random.uniform(key, (rows,)))


CRITICS = {"gae_value_head": ("gae", False), "gae_separate_critic": ("gae", True), "grpo": ("grpo", False)}


def fresh_weights(cfg, key):
    """Randomly initialised weights in new buffers (each caller's state is donated)."""
    return jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(key)


def ppo_caller(cfg, ppo_cfg, optimizer, key, separate_critic=False, shape=(BATCH, PROMPT, NEW)):
    """A no-argument call of one compiled PPO update (the state carried along, as in training) on
    rollouts of `shape` = (rows, prompt, new tokens), the reference in the compute dtype."""
    rollout = make_rollout(cfg, key, *shape)
    reference = jax.tree.map(lambda p: p.astype(cfg.jnp_dtype), fresh_weights(cfg, key))
    update = ppo.make_ppo_update(cfg, ppo_cfg, optimizer)
    params = actor_critic_params(cfg, fresh_weights(cfg, key), separate_critic, critic=ppo_cfg.estimator == "gae")
    state = [ppo.init_state(params, optimizer)]

    def call():
        state[0], metrics, _ = update(state[0], reference, rollout, key)
        jax.block_until_ready(metrics)

    return call


def sft_caller(cfg, optimizer, key, tokens, logits_chunk: int = 0):
    """A no-argument call of one bare SFT step (forward + backward + AdamW) on `tokens` [rows, length]."""
    step = make_train_step(cfg, optimizer, logits_chunk)
    params = fresh_weights(cfg, key)
    state = [SFTState(params, optimizer.init(params), jnp.zeros((), jnp.int32))]
    batch = {"tokens": tokens[:, None], "attention_mask": jnp.ones_like(tokens)[:, None],
             "loss_mask": jnp.ones_like(tokens)[:, None]}

    def call():
        state[0], metrics = step(state[0], batch, 1.0)
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


LARGE = ONE_B.replace(param_dtype="float32")
LARGE_BATCH, LARGE_PROMPT, LARGE_NEW = 16, 128, 256


def forward_flops(cfg, rows: int, length: int, head_positions: int, read_positions: int | None = None) -> float:
    """Matmul FLOPs of one forward pass over `rows` sequences of `length` tokens, the LM head at
    `head_positions` of each (PaLM's count: 2 per weight per token, plus 4 * width * length per
    token and layer for attention, causal masking not halved). `read_positions`: how many
    positions of each row a row-by-row `Read` names; where the model computes its last layer
    there alone (`reads_in_last_layer`), that layer's keys and values alone run over every position."""
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_params() - head * (1 if cfg.tie_word_embeddings else 2)  # the embedding lookup is no matmul
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length
    flops = length * (2 * body + attention) + 2 * head * head_positions
    if read_positions is not None and reads_in_last_layer(cfg):
        layer = body / cfg.num_layers
        keys_values = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.hidden_size
        flops -= (length - read_positions) * (2 * (layer - keys_values) + attention / cfg.num_layers)
    return rows * flops


def update_passes(ppo_cfg: ppo.PPOConfig) -> int:
    """One PPO update in forward passes over the batch (a backward counts as two): the reference's
    forward under a KL penalty, the policy's own preparing forward unless the first gradient pass
    makes its numbers (`ppo.first_pass_prepares`), and each epoch's forward + backward."""
    return (1 if ppo_cfg.kl_coef else 0) + (0 if ppo.first_pass_prepares(ppo_cfg) else 1) + 3 * ppo_cfg.epochs


def accelerator_utilisation(optimizer, key) -> dict:
    """The PPO update (`update_passes` forwards' worth) and a bare SFT step at
    TinyLlama-1.1B's shape: seconds, and model FLOPs over seconds over the measured bf16 matmul rate."""
    cfg, rows, length = LARGE, LARGE_BATCH, LARGE_PROMPT + LARGE_NEW
    ppo_cfg = ppo.PPOConfig(epochs=2, minibatches=1, logits_chunk=128)
    ppo_s = seconds_per_call(ppo_caller(cfg, ppo_cfg, optimizer, key, shape=(rows, LARGE_PROMPT, LARGE_NEW)))
    tokens = make_rollout(cfg, key, rows, LARGE_PROMPT, LARGE_NEW).rollout.tokens
    sft_s = seconds_per_call(sft_caller(cfg, optimizer, key, tokens, 128))
    rate = matmul_rate(8192, jnp.bfloat16)
    completion_pass = forward_flops(cfg, rows, length, LARGE_NEW, LARGE_NEW)
    ppo_flops = update_passes(ppo_cfg) * completion_pass
    sft_flops = 3 * forward_flops(cfg, rows, length, length)
    return {"model": "TinyLlama-1.1B shape, float32 weights, bfloat16 compute", "params": cfg.num_params(),
            "batch": rows, "prompt": LARGE_PROMPT, "new_tokens": LARGE_NEW, "ppo_epochs": ppo_cfg.epochs,
            "logits_chunk": 128, "matmul_tflop_per_s": rate / 1e12,
            "ppo_update_s": ppo_s, "ppo_model_tflop": ppo_flops / 1e12, "ppo_mfu": ppo_flops / ppo_s / rate,
            "train_step_s": sft_s, "train_step_model_tflop": sft_flops / 1e12, "train_step_mfu": sft_flops / sft_s / rate,
            "ppo_over_train_step": ppo_s / sft_s}


def main():
    cfg = SMALL
    key = jax.random.key(0)
    tokens = make_rollout(cfg, key).rollout.tokens
    ppo_cfg = ppo.PPOConfig(epochs=2, minibatches=1)
    chunked_cfg = ppo.PPOConfig(epochs=2, minibatches=1, logits_chunk=CHUNK)
    optimizer = optim.adamw(1e-6)
    ppo_call = ppo_caller(cfg, ppo_cfg, optimizer, key)
    chunked_call = ppo_caller(cfg, chunked_cfg, optimizer, key)

    sft_call = sft_caller(cfg, optimizer, key, tokens)
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
    if jax.default_backend() != "cpu":
        result["accelerator"] = accelerator_utilisation(optimizer, key)
    print({k: v for k, v in result.items() if k not in ("model", "machine")})
    write("ppo_step", result)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
