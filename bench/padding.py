"""The RL update on the padded batch, the trimmed batch (cut to its longest real prompt and
completion in `rl.length_bucket` steps) and the packed batch (`rl.pack`: rollouts end to end in
rows of `rl.pack_width`), in the same run, interleaved.

    python bench/padding.py [--steps 6] [--repeats 3] [--sft runs/arith/sft/best]

Two workloads, each with its own model and batches:
- `main_job`: configs/arith.py's model shape, separate critic and R^3 curriculum (32 start states
  per step), prompts left-padded to the sampler's power-of-two bucket and completion regions
  `rl.max_new_tokens` wide. With `--sft` (the main job's exported SFT model) the batches are
  sampled by that model as the main job samples them, and the whole RL step (sampling, then the
  update) is timed per layout; without it, each completion is as long as its start state's gold
  continuation.
- `gsm8k`: configs/gsm8k.py's batches (64 of GSM8K's real start states per step, M = 5, prompts up
  to 512 tokens, a 700-token completion region), each completion as long as its gold rationale,
  tokenised by a SentencePiece model trained on the training questions and rationales, on a small
  model shape (the main job's, 4 layers, a value head).
On an accelerator, in their place: `gsm8k_1b`, the `gsm8k` batches at TinyLlama-1.1B's shape in
bfloat16, padded against packed, and packed under a fused attention kernel (`--fused`), with real
tokens per second and the MFU counted on real tokens.

Reports per workload and layout: the real fraction of the update's token positions, the distinct
shapes (one compilation each), the steady update seconds (first call of each shape apart), median
over the interleaved repeats, and their ratios. Results: bench/results/padding-<device>.json.
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
from ppo_step import forward_flops, update_passes
from sampler import ONE_B, matmul_rate
from r3jax import (config as config_lib, optim, ppo, rollout as rollout_lib, settings as settings_lib, sharding,
                   tasks, tokenizer as tokenizer_lib)
from r3jax.metrics import machine_info
from r3jax.models.transformer import init_params
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout, SamplingConfig, prompt_bucket, sample
from r3jax.tokenizer import left_pad
from r3jax.train import job, rl

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
LAYOUTS = ("padded", "trimmed", "packed")


def train_tokenizer(task, vocab_size: int) -> tokenizer_lib.Tokenizer:
    with tempfile.TemporaryDirectory() as folder:
        texts = (task.prompt(d.question) + d.response for d in task.demonstrations("train"))
        return tokenizer_lib.load(tokenizer_lib.train_sentencepiece(texts, os.path.join(folder, "tok"), vocab_size))


def gold_length_batches(config, task, tokenizer, steps: int) -> list[ppo.Experience]:
    """The first `steps` batches of config's R^3 curriculum as the sampler lays them out, each
    completion as long as its start state's gold continuation (plus the stop token)."""
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
    return batches


def sampled_batches(config, task, sft_path: str, steps: int, mesh):
    """(model config, policy params, batches, sampling seconds per step) of the first `steps` RL
    steps sampled by the SFT model in `sft_path`, as the main job samples them."""
    tokenizer = tokenizer_lib.load(sft_path)
    policy = job.load_policy(sft_path, config, tokenizer, mesh)
    c = config.rl
    curriculum = rl.build_curriculum(c, task, tokenizer, "mixed", config.seed)
    settings = rollout_lib.sampling_config(tokenizer, c.max_new_tokens, c.temperature, c.top_k, c.top_p)
    batches, seconds, position = [], [], 0
    for step in range(steps + 1):  # the first compiles the sampler
        start = time.perf_counter()
        collected, position = rl.collect(c, curriculum.batch, task, policy, settings, jax.random.key(step), position)
        seconds.append(time.perf_counter() - start)
        batches.append(jax.tree.map(np.asarray, collected.experience))
    return policy.model_cfg, policy.params, batches[1:], seconds[1:]


def layouts(config, batches) -> dict[str, list[ppo.Experience]]:
    packed = config.rl.copy_and_resolve_references()
    packed.pack = True
    return {"padded": batches, "trimmed": [rl.trim(b, config.rl.length_bucket) for b in batches],
            "packed": [rl.update_batch(packed, b, 1) for b in batches]}


def real_fraction(layout: list[ppo.Experience]) -> float:
    masks = [ppo.ForwardRows.of(b).attention_mask for b in layout]
    return sum(int((m > 0).sum()) for m in masks) / sum(m.size for m in masks)


def shapes(layout: list[ppo.Experience]) -> list:
    return sorted({(ppo.ForwardRows.of(b).tokens.shape, b.rollout.tokens.shape) for b in layout})


def timed_updates(config, runs, policy, repeats: int) -> dict[str, list[float]]:
    """Steady seconds per update for each run (`runs[name] = (model config, batches)`: the same
    model shape, each its own layout and attention kernel), over `repeats` interleaved passes;
    every shape is compiled before anything is timed. One optimizer state passes through every
    update (only the time is read), so that a large model's weights and moments are held once."""
    c = config.rl
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    any_cfg, _ = next(iter(runs.values()))
    params = actor_critic_params(any_cfg, policy, c.separate_critic, critic=True)
    optimizer = optim.rl_optimizer(c, params)
    ppo_settings = settings_lib.of(config).ppo
    updates = {name: ppo.make_ppo_update(model_cfg, ppo_settings, optimizer) for name, (model_cfg, _) in runs.items()}
    seconds = {name: [] for name in runs}
    state = [ppo.init_state(jax.tree.map(jnp.array, params), optimizer)]

    def run(name, batch):
        start = time.perf_counter()
        state[0], metrics, _ = updates[name](state[0], policy, sharding.shard_batch(batch, mesh), jax.random.key(1))
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    # a fresh state is called under another signature than an update's output state, which every
    # later call gets: one update first, so that the compiling calls compile what is timed
    first, (_, first_layout) = next(iter(runs.items()))
    run(first, first_layout[0])
    for name, (_, layout) in runs.items():
        for batch in {str(shapes([b])): b for b in layout}.values():
            run(name, batch)
    for _ in range(repeats):
        for name, (_, layout) in runs.items():
            seconds[name] += [run(name, batch) for batch in layout]
    return seconds


def report(config, model_cfg, policy, batches, repeats: int, sample_seconds: list[float] | None = None) -> dict:
    by_layout = layouts(config, batches)
    seconds = timed_updates(config, {name: (model_cfg, layout) for name, layout in by_layout.items()}, policy,
                            repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"model": {k: getattr(model_cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "vocab_size")},
              "steps": len(batches), "repeats": repeats, "length_bucket": config.rl.length_bucket,
              "real_position_fraction": {name: real_fraction(layout) for name, layout in by_layout.items()},
              "shapes": {name: shapes(layout) for name, layout in by_layout.items()},
              "median_update_seconds": medians,
              "update_over_padded": {name: medians[name] / medians["padded"] for name in LAYOUTS},
              "update_seconds": seconds}
    if sample_seconds:
        sample = statistics.median(sample_seconds)
        result["median_sample_seconds"] = sample
        result["step_seconds"] = {name: sample + medians[name] for name in LAYOUTS}
        result["step_over_padded"] = {name: (sample + medians[name]) / (sample + medians["padded"])
                                      for name in LAYOUTS}
    return result


def main_job(args) -> dict:
    config = config_lib.load_config_file(os.path.join(CONFIGS, "arith.py"))
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    if args.sft:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        model_cfg, policy, batches, sample_seconds = sampled_batches(config, task, args.sft, args.steps, mesh)
    else:
        tokenizer = train_tokenizer(task, config.tokenizer.vocab_size)
        batches, sample_seconds = gold_length_batches(config, task, tokenizer, args.steps), None
        model_cfg = job.scratch_model_config(config, tokenizer.vocab_size)
        policy = jax.tree.map(np.asarray, nn.unbox(init_params(model_cfg, jax.random.key(0))))
    return report(config, model_cfg, policy, batches, args.repeats, sample_seconds) | {
        "batches": "sampled by the SFT model" if args.sft else "gold continuation lengths"}


def gsm8k(args) -> dict:
    config = config_lib.load_config_file(os.path.join(CONFIGS, "gsm8k.py"))
    arith = config_lib.load_config_file(os.path.join(CONFIGS, "arith.py"))
    config.model.update(arith.model.to_dict())
    config.model.update(num_layers=4, path="")
    config.rl.separate_critic = False
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    tokenizer = train_tokenizer(task, 2000)
    model_cfg = job.scratch_model_config(config, tokenizer.vocab_size)
    policy = jax.tree.map(np.asarray, nn.unbox(init_params(model_cfg, jax.random.key(0))))
    batches = gold_length_batches(config, task, tokenizer, args.gsm8k_steps)
    return report(config, model_cfg, policy, batches, args.gsm8k_repeats) | {"batches": "gold rationale lengths"}


def real_token_flops(config, model_cfg, batches) -> float:
    """Model FLOPs of the updates of `batches` counted on real tokens alone: each rollout's forward
    (`forward_flops` at its real length, the LM head at its completion), times the update's passes
    (`update_passes`: the policy's with its value head standing for the critic's)."""
    per_pass = 0.0
    for batch in batches:
        real = batch.rollout.attention_mask.sum(1)
        completion = batch.rollout.completion_mask.sum(1)
        per_pass += sum(forward_flops(model_cfg, 1, int(n), int(m)) for n, m in zip(real, completion))
    return update_passes(settings_lib.of(config).ppo) * per_pass


def sampling_seconds(model_cfg, policy, batches, new_tokens: int) -> list[float]:
    """Seconds to sample `new_tokens` tokens for each batch's prompts, after one compiling call. No
    stop token ends a completion early, so this is the sampling of the longest possible rollouts."""
    settings = SamplingConfig(max_new_tokens=new_tokens)

    def run(batch):
        prompt = batch.rollout.tokens.shape[1] - new_tokens
        start = time.perf_counter()
        jax.block_until_ready(sample(model_cfg, policy, jnp.asarray(batch.rollout.tokens[:, :prompt]),
                                     jnp.asarray(batch.rollout.attention_mask[:, :prompt]), jax.random.key(0), settings))
        return time.perf_counter() - start

    run(batches[0])
    return [run(batch) for batch in batches]


def gsm8k_on_accelerator(args) -> dict:
    """configs/gsm8k.py's batches (gold rationale lengths) at TinyLlama-1.1B's shape, float32 weights
    computing in bfloat16, layers scanned and rematerialised: the padded batch under the dense
    attention kernel, the packed one under the dense and the fused kernel (`args.fused`, unless
    none). Seconds per update, and per second the real tokens and the model FLOPs on them (MFU
    against the bf16 matmul rate measured in the same run); a whole step adds the seconds to sample
    every new token of the batch's prompts (`sampling_seconds`)."""
    config = config_lib.load_config_file(os.path.join(CONFIGS, "gsm8k.py"))
    config.rl.separate_critic = False
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    tokenizer = train_tokenizer(task, 2000)
    batches = gold_length_batches(config, task, tokenizer, args.gsm8k_steps)
    dense = ONE_B.replace(param_dtype="float32", scan_layers=True, remat="full")
    by_layout = layouts(config, batches)
    runs = {"padded": (dense, by_layout["padded"]), "packed": (dense, by_layout["packed"])}
    if args.fused != "none":
        runs[f"packed_{args.fused}"] = (dense.replace(attention_impl=args.fused), by_layout["packed"])
    policy = jax.tree.map(np.asarray, nn.unbox(init_params(dense, jax.random.key(0))))
    seconds = timed_updates(config, runs, policy, args.gsm8k_repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    sample_s = statistics.median(sampling_seconds(dense, policy, batches, config.rl.max_new_tokens))
    rate = matmul_rate(8192, jnp.bfloat16)
    flops_per_update = real_token_flops(config, dense, batches) / len(batches)
    real_tokens = sum(int(b.rollout.attention_mask.sum()) for b in batches) / len(batches)
    return {"model": "TinyLlama-1.1B shape, float32 weights, bfloat16 compute, scan_layers, remat=full",
            "steps": len(batches), "repeats": args.gsm8k_repeats, "matmul_tflop_per_s": rate / 1e12,
            "real_position_fraction": {name: real_fraction(layout) for name, (_, layout) in runs.items()},
            "shapes": {name: shapes(layout) for name, (_, layout) in runs.items()},
            "median_update_seconds": medians,
            "update_over_padded": {name: medians[name] / medians["padded"] for name in runs},
            "real_tokens_per_update": real_tokens,
            "real_tokens_per_second": {name: real_tokens / medians[name] for name in runs},
            "mfu_on_real_tokens": {name: flops_per_update / medians[name] / rate for name in runs},
            "median_sample_seconds": sample_s, "sampling": f"all {config.rl.max_new_tokens} new tokens (no stop)",
            "step_seconds": {name: sample_s + medians[name] for name in runs},
            "step_over_padded": {name: (sample_s + medians[name]) / (sample_s + medians["padded"]) for name in runs},
            "update_seconds": seconds, "batches": "gold rationale lengths"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gsm8k-steps", type=int, default=3)
    parser.add_argument("--gsm8k-repeats", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sft", default="", help="the main job's exported SFT model (runs/arith/sft/best)")
    parser.add_argument("--fused", default="cudnn", choices=("cudnn", "pallas", "splash", "none"),
                        help="on an accelerator: the fused attention kernel of the 1.1B GSM8K workload")
    args = parser.parse_args()
    result = {"benchmark": "the RL update on padded, trimmed and packed batches (bench/padding.py)",
              "machine": machine_info(), "load_average_before": os.getloadavg()}
    if jax.default_backend() == "cpu":
        result |= {"main_job": main_job(args), "gsm8k": gsm8k(args)}
    else:
        result["gsm8k_1b"] = gsm8k_on_accelerator(args)
    result["load_average_after"] = os.getloadavg()
    for workload in ("main_job", "gsm8k", "gsm8k_1b"):
        if workload not in result:
            continue
        for key in ("real_position_fraction", "shapes", "median_update_seconds", "update_over_padded",
                    "step_over_padded", "real_tokens_per_second", "mfu_on_real_tokens", "median_sample_seconds"):
            if key in result[workload]:
                print(f"{workload} {key}: {result[workload][key]}")
    write("padding", result)


if __name__ == "__main__":
    main()
