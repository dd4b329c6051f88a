"""The RL update on the padded batch against the same update on the trimmed batch (`rl.trim`, cut to
its longest real prompt and completion in `rl.length_bucket` steps), in the same run, interleaved.

    python bench/trim.py [--steps 6] [--repeats 3]

The batches are the main job's (configs/arith.py): its model shape, its separate critic, its 32
start states per step drawn by its R^3 curriculum, prompts left-padded to the sampler's
power-of-two bucket, and completion regions `rl.max_new_tokens` wide. Each completion is as long as
its start state's gold continuation (what the SFT model writes), so the real-token fraction is the
main job's. Reports the real fraction of the update's token positions in both, the distinct
trimmed shapes (one compilation each), and the steady update time of each (first call apart),
median over the interleaved repeats. Results: bench/results/trim-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import write
from r3jax import config as config_lib, optim, ppo, sharding, tasks, tokenizer as tokenizer_lib
from r3jax.metrics import machine_info
from r3jax.models.transformer import init_params
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout, prompt_bucket
from r3jax.tokenizer import left_pad
from r3jax.train import job, rl


def main_job_batches(steps: int):
    """(config, model config, padded batches) of the main job's first `steps` RL steps."""
    config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "arith.py"))
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    with tempfile.TemporaryDirectory() as folder:
        texts = (task.prompt(d.question) + d.response for d in task.demonstrations("train"))
        tokenizer = tokenizer_lib.load(tokenizer_lib.train_sentencepiece(texts, os.path.join(folder, "tok"),
                                                                         config.tokenizer.vocab_size))
    c = config.rl
    curriculum = rl.build_curriculum(c, task, tokenizer, "mixed", config.seed)
    rng = np.random.default_rng(0)
    batches = []
    for step in range(steps):
        states = curriculum.batch(step)
        tokens, mask = left_pad([list(s.prompt_tokens) for s in states], tokenizer.pad_id)
        width = prompt_bucket(tokens.shape[1])
        tokens, mask = (np.pad(x, ((0, 0), (width - x.shape[1], 0))) for x in (tokens, mask))
        lengths = np.array([min(c.max_new_tokens, len(tokenizer.encode_continuation(s.target)[0]) + 1)
                            for s in states])
        completion_mask = (np.arange(c.max_new_tokens)[None] < lengths[:, None]).astype(np.int32)
        completions = rng.integers(3, tokenizer.vocab_size, completion_mask.shape) * completion_mask
        rollout = Rollout(np.concatenate([tokens, completions], 1).astype(np.int32),
                          np.concatenate([mask, completion_mask], 1).astype(np.int32),
                          np.zeros(completion_mask.shape, np.float32), completion_mask, lengths.astype(np.int32))
        batches.append(ppo.Experience(rollout, rng.random(len(states)).astype(np.float32),
                                      np.ones(len(states), np.float32)))
    return config, job.scratch_model_config(config, tokenizer.vocab_size), batches


def real_fraction(batches) -> float:
    real = sum(int(b.rollout.attention_mask.sum()) for b in batches)
    return real / sum(b.rollout.attention_mask.size for b in batches)


def timed_updates(config, model_cfg, batches, repeats: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """(steady seconds per update, the batches), per layout (padded, trimmed), over `repeats`
    interleaved passes; every shape is compiled before anything is timed."""
    c = config.rl
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    policy = jax.tree.map(np.asarray, nn.unbox(init_params(model_cfg, jax.random.key(0))))
    params = actor_critic_params(model_cfg, policy, c.separate_critic, critic=True)
    optimizer = optim.rl_optimizer(c, params)
    update = ppo.make_ppo_update(model_cfg, rl.ppo_config(c), optimizer)
    layouts = {"padded": batches, "trimmed": [rl.trim(b, c.length_bucket) for b in batches]}
    seconds = {name: [] for name in layouts}
    states = {name: ppo.init_state(jax.tree.map(jnp.array, params), optimizer) for name in layouts}
    for name, layout in layouts.items():
        for batch in {b.rollout.tokens.shape: b for b in layout}.values():
            states[name], metrics, _ = update(states[name], policy, sharding.shard_batch(batch, mesh),
                                              jax.random.key(1))
            jax.block_until_ready(metrics)
    for _ in range(repeats):
        for name, layout in layouts.items():
            for batch in layout:
                start = time.perf_counter()
                states[name], metrics, _ = update(states[name], policy, sharding.shard_batch(batch, mesh),
                                                  jax.random.key(1))
                jax.block_until_ready(metrics)
                seconds[name].append(time.perf_counter() - start)
    return seconds, layouts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config, model_cfg, batches = main_job_batches(args.steps)
    seconds, layouts = timed_updates(config, model_cfg, batches, args.repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "benchmark": "the main job's RL update, padded batch vs trimmed batch (bench/trim.py)",
        "machine": machine_info(), "load_average": os.getloadavg(), "steps": args.steps, "repeats": args.repeats,
        "length_bucket": config.rl.length_bucket,
        "real_position_fraction": {name: real_fraction(layout) for name, layout in layouts.items()},
        "shapes": {name: sorted({b.rollout.tokens.shape for b in layout}) for name, layout in layouts.items()},
        "median_update_seconds": medians, "trimmed_over_padded": medians["trimmed"] / medians["padded"],
        "update_seconds": seconds}
    for key in ("real_position_fraction", "shapes", "median_update_seconds", "trimmed_over_padded"):
        print(f"{key}: {result[key]}")
    write("trim", result)


if __name__ == "__main__":
    main()
