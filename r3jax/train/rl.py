"""The R^3 loop: curriculum -> sampler -> rewards on the host -> one-jit PPO update.

Everything random is keyed by (seed, step) and the curriculum's batches are a function of the
step, so a run restored from its checkpoint continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from r3jax import config as config_lib, curriculum, optim, ppo, rollout as rollout_lib, sharding
from r3jax.checkpoint import Checkpointer, StopSignal
from r3jax.evaluate import accuracy_report, evaluate
from r3jax.metrics import MetricsWriter, plot_curves, read_jsonl
from r3jax.models.transformer import ModelConfig, compute_copy
from r3jax.models.value import actor_critic_params
from r3jax.sampling import SamplingConfig
from r3jax.tasks.base import Task
from r3jax.tokenizer import Tokenizer


def ppo_config(c) -> ppo.PPOConfig:
    return ppo.PPOConfig(kl_coef=c.kl_coef, kl_mode=c.kl_mode, gamma=c.gamma, lam=c.lam,
                         clip_ratio=c.clip_ratio, value_clip=c.value_clip, vf_coef=c.vf_coef,
                         entropy_coef=c.entropy_coef, epochs=c.epochs, minibatches=c.minibatches,
                         temperature=c.temperature, score_clip=c.score_clip, logits_chunk=c.logits_chunk)


def build_curriculum(c, task: Task, tokenizer: Tokenizer, strategy: str, seed: int) -> curriculum.Curriculum:
    """Start states of the training demonstrations; prompts longer than rl.max_prompt_length are left out."""
    states = rollout_lib.tokenize_states(tokenizer, task, [
        s for demo in task.demonstrations("train") for s in curriculum.start_states(task, demo, c.num_start_states or None)])
    fitting = [s for s in states if len(s.prompt_tokens) <= c.max_prompt_length]
    if len(fitting) < len(states):
        print(f"RL: left out {len(states) - len(fitting)} of {len(states)} start states longer than "
              f"rl.max_prompt_length={c.max_prompt_length}")
    return curriculum.Curriculum(fitting, strategy, c.batch_size, seed, c.stage_length, c.stage_unit,
                                 tuple(c.stage_weights) or None)


def _host_metrics(states, scores, row_metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Reward and accuracy, and the update's per-row metrics (`rows/<name>`, `[rows]`), overall
    and per start stage."""
    report = {k: v for k, v in accuracy_report(states, scores).items() if "/steps_" not in k}
    stages = np.asarray([s.stage for s in states])
    for name, values in row_metrics.items():
        values = values[:len(states)]  # rows past the states only fill the batch
        for stage in np.unique(stages):
            report[f"{name}/stage_{stage}"] = float(values[stages == stage].mean())
    return report


def train(config, model_cfg: ModelConfig, policy: Any, tokenizer: Tokenizer, task: Task, mesh,
          workdir: str, stop: StopSignal, strategy: str | None = None, seed: int | None = None,
          ) -> dict[str, Any] | None:
    """Runs (or resumes) RL from the SFT `policy` in `workdir`. Returns the final evaluation
    report (k = 0, greedy, on config.eval.split), or None when stopped early by a signal."""
    c = config.rl
    strategy = strategy or c.strategy
    seed = config.seed if seed is None else seed
    os.makedirs(workdir, exist_ok=True)
    schedule = build_curriculum(c, task, tokenizer, strategy, seed)
    reference = compute_copy(model_cfg, policy)  # own buffers: the training state is donated
    params = actor_critic_params(model_cfg, policy, c.separate_critic)
    steps = config_lib.training_steps(c, len(schedule.states), c.batch_size)
    if c.data_epochs:
        print(f"RL: {c.data_epochs:g} epochs over {len(schedule.states):,} start states = {steps:,} steps")
    policy_opt = optim.adamw(c.lr, c.weight_decay, c.grad_clip)
    critic_opt = optim.adamw(c.critic_lr or c.lr, c.weight_decay, c.grad_clip)
    optimizer = optim.actor_critic(policy_opt, critic_opt, params)
    update = ppo.make_ppo_update(model_cfg, ppo_config(c), optimizer)
    state = ppo.init_state(params, optimizer)
    settings = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                              top_p=c.top_p, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    step, tokens_sampled = 0, 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(checkpointer.latest_step(), state)
        step, tokens_sampled = meta["step"], meta["tokens_sampled"]
    writer = MetricsWriter(workdir, "rl", resume_step=step)
    eval_demos = task.demonstrations("validation")[:c.eval_examples]
    base_key = jax.random.key(seed)
    budget = c.token_budget
    bar = tqdm(total=budget or steps, initial=min(tokens_sampled if budget else step, budget or steps),
               desc=f"RL {strategy}", unit="tok" if budget else "step", disable=not sharding.is_primary())
    while step < steps and (not budget or tokens_sampled < budget) and not stop.requested:
        step_key = jax.random.fold_in(base_key, step)
        sample_key, update_key = jax.random.split(step_key)
        progress = tokens_sampled / budget if budget else step / steps
        batch_states = schedule.batch(step, progress)

        started = time.perf_counter()
        rollout, texts = rollout_lib.generate(compute_copy(model_cfg, state.params["policy"]), model_cfg,
                                              tokenizer, batch_states, settings, sample_key, mesh)
        sampled = time.perf_counter()
        scores = task.score_batch([s.given + t for s, t in zip(batch_states, texts)],
                                  [s.demo.answer for s in batch_states])
        scored = time.perf_counter()
        batch = {"tokens": rollout.tokens, "attention_mask": rollout.attention_mask,
                 "logprobs": rollout.logprobs, "completion_mask": rollout.completion_mask,
                 "scores": jnp.asarray([s.reward for s in scores], jnp.float32)}
        lr_scale = optim.lr_scale(c.schedule, c.warmup_steps, step, progress)
        state, update_metrics = update(state, reference, batch, update_key, lr_scale)
        update_metrics = {k: sharding.to_host(v) for k, v in update_metrics.items()}  # waits for the update
        rows = {k.removeprefix("rows/"): v for k, v in update_metrics.items() if k.startswith("rows/")}
        record = {k: float(v) for k, v in update_metrics.items() if not k.startswith("rows/")}
        updated = time.perf_counter()

        new_tokens = int(sharding.to_host(rollout.lengths).sum())
        tokens_sampled += new_tokens
        step += 1
        record.update(_host_metrics(batch_states, scores, rows))
        record.update({"tokens_sampled": tokens_sampled, "lr": c.lr * lr_scale, "time/sample_s": sampled - started,
                       "time/reward_s": scored - sampled, "time/update_s": updated - scored,
                       "sample_tokens_per_s": new_tokens / max(sampled - started, 1e-9)})
        if strategy == "staged":
            record["stage"] = schedule.stage_at(step - 1, progress)
        if c.eval_every and step % c.eval_every == 0:
            report, _ = evaluate(state.params["policy"], model_cfg, tokenizer, task, eval_demos, mesh,
                                 config.eval.batch_size, config.eval.max_new_tokens, desc="RL eval")
            record.update({f"eval/{k}": v for k, v in report.items() if "/steps_" not in k})
        writer.write(step, record)
        bar.update(new_tokens if budget else 1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.3f}",
                        kl=f"{record['kl']:.3f}",
                        **({"eval": f"{record['eval/accuracy']:.3f}"} if "eval/accuracy" in record else {}))
        if step % c.checkpoint_every == 0 or stop.requested:
            checkpointer.save(step, state, {"step": step, "tokens_sampled": tokens_sampled})
    bar.close()
    finished = not stop.requested
    if finished and checkpointer.latest_step() != step:
        checkpointer.save(step, state, {"step": step, "tokens_sampled": tokens_sampled})
    checkpointer.close()
    writer.close()
    if sharding.is_primary():
        plot_curves(read_jsonl(writer.path), os.path.join(workdir, "rl_curves.png"),
                    title=f"R^3 {strategy} on {task.name}")
    if not finished:
        return None
    test_demos = task.demonstrations(config.eval.split)
    if config.eval.num_examples:
        test_demos = test_demos[:config.eval.num_examples]
    report, records = evaluate(state.params["policy"], model_cfg, tokenizer, task, test_demos, mesh,
                               config.eval.batch_size, config.eval.max_new_tokens, desc="final eval")
    report.update({"steps": step, "tokens_sampled": tokens_sampled})
    return {"report": report, "records": records, "params": state.params["policy"]}
