"""The R^3 loop: curriculum -> sampler -> rewards on the host -> one-jit PPO update.

Everything random is keyed by (seed, step) and the curriculum's batches are a function of the
step, so a run restored from its checkpoint continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from r3jax import (config as config_lib, curriculum as curriculum_lib, optim, packing, ppo, rollout as rollout_lib,
                   sharding)
from r3jax.checkpoint import StopSignal
from r3jax.evaluate import accuracy_report, evaluate, greedy_problems, samples
from r3jax.models import lora
from r3jax.models.transformer import ModelConfig
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout, SamplingConfig, read_ahead
from r3jax.curriculum import StartState
from r3jax.tasks.answers import Score
from r3jax.rollout import Policy
from r3jax.settings import Settings
from r3jax.tokenizer import Tokenizer
from r3jax.tasks.base import Task
from r3jax.train import loop


class Collected(NamedTuple):
    """The rows of one update, gathered on the host over one or more sampling rounds."""
    states: list[StartState]         # [kept rows] the start state of each real row
    scores: list[Score]              # [kept rows]
    experience: ppo.Experience | None  # `[batch, ...]` numpy, padded with masked rows; None if nothing kept
    new_tokens: int                  # tokens sampled in all rounds, kept or not
    rounds: int
    dropped_groups: int              # groups left out because their rewards were all equal
    equal_groups: dict[int, float]   # per stage: fraction of sampled groups with all-equal rewards
    outcomes: list[tuple[StartState, bool]]  # every sampled row, kept or not: its start state, correct or not
    hinted_groups: int = 0           # hint_on_failure: groups sampled again from a hint


def build_curriculum(c, task: Task, tokenizer: Tokenizer, strategy: str, seed: int) -> curriculum_lib.Curriculum:
    """Start states of the training demonstrations; prompts longer than rl.max_prompt_length are left out."""
    states = rollout_lib.tokenize_states(tokenizer, task, [
        s for demo in task.demonstrations("train")
        for s in curriculum_lib.start_states(task, demo, c.num_start_states or None)])
    fitting = [s for s in states if len(s.prompt_tokens) <= c.max_prompt_length]
    if len(fitting) < len(states):
        print(f"RL: left out {len(states) - len(fitting)} of {len(states)} start states longer than "
              f"rl.max_prompt_length={c.max_prompt_length}")
    return curriculum_lib.Curriculum(fitting, strategy, c.batch_size // c.group_size, seed, c.stage_length,
                                     c.stage_unit, tuple(c.stage_weights) or None, curriculum_lib.AdaptiveSettings(
                                         c.full_task_fraction, tuple(c.adaptive_band)))


def _left_pad_to(array: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(array, ((0, 0), (width - array.shape[1], 0)), constant_values=value)


def concatenate_rows(parts: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """The rows of several sampler calls or rounds (dicts of Rollout fields and more) as one,
    prompts left-padded to the widest part's."""
    width = max(part["tokens"].shape[1] for part in parts)
    return {key: np.concatenate([_left_pad_to(p[key], width, pad_id if key == "tokens" else 0)
                                 if key in ("tokens", "attention_mask") else p[key] for p in parts])
            for key in parts[0]}


def assemble(parts: list[dict[str, np.ndarray]], rows: int, pad_id: int) -> ppo.Experience:
    """One update batch of exactly `rows` rows from the kept rows of several rounds (dicts of the
    Rollout fields, scores and row_mask): prompts left-padded to the widest round, then rows that
    copy the first and are masked out (no completion tokens, row_mask 0), so the update keeps one
    compiled batch shape."""
    batch = {key: value[:rows] for key, value in concatenate_rows(parts, pad_id).items()}
    missing = rows - len(batch["scores"])
    if missing:
        filler = {key: np.repeat(value[:1], missing, axis=0) for key, value in batch.items()}
        filler["completion_mask"][:] = 0
        filler["lengths"][:] = 0
        filler["row_mask"][:] = 0
        filler["scores"][:] = 0
        batch = {key: np.concatenate([batch[key], filler[key]]) for key in batch}
    return ppo.Experience(Rollout(*(batch[name] for name in Rollout._fields)), batch["scores"], batch["row_mask"])


def trim(experience: ppo.Experience, bucket: int) -> ppo.Experience:
    """The update batch (host arrays) cut to its longest real prompt and its longest completion,
    each rounded up to a multiple of `bucket` and never past the sampled width: the columns cut are
    padding in every row (prompts are left-padded, completions end in padding), so every
    per-sequence quantity is the padded batch's, with fewer positions to compute."""
    rollout = experience.rollout
    new = rollout.completion_mask.shape[1]
    prompt = rollout.tokens.shape[1] - new
    keep_prompt = min(prompt, packing.round_up(int(rollout.attention_mask[:, :prompt].sum(1).max()), bucket))
    keep_new = min(new, packing.round_up(int(rollout.completion_mask.sum(1).max()), bucket))
    columns = slice(prompt - keep_prompt, prompt + keep_new)
    return experience._replace(rollout=rollout._replace(
        tokens=rollout.tokens[:, columns], attention_mask=rollout.attention_mask[:, columns],
        logprobs=rollout.logprobs[:, :keep_new], completion_mask=rollout.completion_mask[:, :keep_new]))


def pack_width(c) -> int:
    """Tokens per packed row: rl.pack_width, or the longest rollout rounded up to rl.length_bucket.
    One width for the run: with the row count and the completion width it makes the update's
    shape, so a run compiles few (on the main job's batches, 4 against 15 with each batch's
    trimmed width, whose narrower rows attend across fewer segments: bench/padding.py)."""
    return c.pack_width or packing.round_up(c.max_prompt_length + c.max_new_tokens, c.length_bucket)


def update_batch(c, experience: ppo.Experience, batch_shards: int) -> ppo.Experience:
    """The batch the update reads (host arrays): trimmed, and with rl.pack its rollouts also packed
    into rows of `pack_width`, as many as a multiple of `packing.row_multiple(batch_shards)`
    (`batch_shards`: the mesh's data x fsdp); the rollout then keeps only its completion columns
    (the targets and their mask), the prompts being in the packed rows."""
    batch = trim(experience, c.length_bucket)
    if not c.pack:
        return batch
    rollout, new = batch.rollout, batch.rollout.completion_mask.shape[1]
    packed = packing.pack(rollout.tokens, rollout.attention_mask, new, pack_width(c),
                          packing.row_multiple(batch_shards))
    return batch._replace(rollout=rollout._replace(tokens=rollout.tokens[:, -new:],
                                                   attention_mask=rollout.completion_mask), packing=packed)


def truncated(completions: np.ndarray, lengths: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    """`[rows]` True where a completion `[rows, new]` ran out of tokens before a stop token."""
    last = completions[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    return (lengths == 0) | ~np.isin(last, stop_ids)


def update_rows(c) -> int:
    """Rows of one update batch: rl.batch_size, twice that with hint_on_failure (room for a hinted
    resample of every group; rows left over are masked)."""
    return c.batch_size * (2 if c.strategy == "hint_on_failure" else 1)


def _sample_round(c, round_states: list[StartState], task: Task, sampler: Policy, settings: SamplingConfig,
                  key: jax.Array) -> tuple[dict[str, np.ndarray], list[Score], np.ndarray]:
    """Samples `round_states` (each repeated for its group), rl.rollout_rows rows per sampler call
    (0: all at once): the rollout's fields on the host `[rows, ...]`, prompts left-padded to the
    widest call's, the scores, and the rewards (with rl.missing_eos_penalty)."""
    size = c.rollout_rows or len(round_states)
    calls, texts = [], []
    for index, start in enumerate(range(0, len(round_states), size)):
        chunk = round_states[start:start + size]
        rollout, chunk_texts = rollout_lib.generate(sampler.model_cfg, sampler.params, sampler.tokenizer, chunk,
                                                    settings, jax.random.fold_in(key, index) if index else key,
                                                    sampler.mesh, rows=size)  # a short last call padded: one shape
        calls.append({name: value[:len(chunk)] for name, value in rollout._asdict().items()})
        texts += chunk_texts
    round_scores = sharding.computed_by_primary(lambda: task.score_batch(
        [s.given + t for s, t in zip(round_states, texts)], [s.demo.answer for s in round_states]))
    host = concatenate_rows(calls, settings.pad_id)
    rewards = np.array([s.reward for s in round_scores], np.float32)
    if c.missing_eos_penalty:
        completions = host["tokens"][:, host["tokens"].shape[1] - host["logprobs"].shape[1]:]
        rewards -= c.missing_eos_penalty * truncated(completions, host["lengths"], settings.stop_ids)
    return host, round_scores, rewards


def collect(c, batch_at: Callable[[int], list[StartState]], task: Task, sampler: Policy, settings: SamplingConfig,
            base_key: jax.Array, data_position: int, hint_for: Callable[[StartState], StartState] | None = None,
            ) -> tuple[Collected, int]:
    """Samples `rl.group_size` completions of each start state of the curriculum's batch at
    `data_position` (`batch_at(position)`) from `sampler` (the policy in its rollout layout) and
    scores them. With `rl.dynamic_sampling`, groups whose rewards are all equal are dropped and
    further batches are sampled, up to `rl.max_sampling_rounds`, until the batch is full. With
    `hint_for` (hint_on_failure), every group none of whose samples was correct is sampled again
    from `hint_for(its start state)`, and both are kept. Returns the rows and the next data position."""
    group, rows = c.group_size, update_rows(c)
    rounds_allowed = c.max_sampling_rounds if c.dynamic_sampling else 1
    states, scores, parts, outcomes = [], [], [], []
    new_tokens = rounds = dropped = hinted = 0
    equal_by_stage: dict[int, list[bool]] = collections.defaultdict(list)

    def keep(round_states, round_scores, rewards, host, kept_rows):
        part = {name: value[kept_rows] for name, value in host.items()}
        parts.append(part | {"scores": rewards[kept_rows], "row_mask": np.ones(len(kept_rows), np.float32)})
        states.extend(round_states[i] for i in kept_rows)
        scores.extend(dataclasses.replace(round_scores[i], reward=float(rewards[i])) for i in kept_rows)

    while rounds < rounds_allowed and len(states) < c.batch_size:
        round_states = [s for s in batch_at(data_position) for _ in range(group)]
        sample_key, hint_key = jax.random.split(jax.random.fold_in(base_key, data_position))
        host, round_scores, rewards = _sample_round(c, round_states, task, sampler, settings, sample_key)
        new_tokens += int(host["lengths"].sum())
        outcomes += [(state, score.correct) for state, score in zip(round_states, round_scores)]
        data_position += 1
        rounds += 1
        equal = (rewards.reshape(-1, group) == rewards.reshape(-1, group)[:, :1]).all(axis=1)
        for start, is_equal in zip(round_states[::group], equal):
            equal_by_stage[start.stage].append(bool(is_equal))
        dropped += int((equal & c.dynamic_sampling).sum())
        kept_rows = np.flatnonzero(np.repeat(~equal if c.dynamic_sampling else np.ones_like(equal), group))
        kept_rows = kept_rows[:c.batch_size - len(states)]
        if len(kept_rows):
            keep(round_states, round_scores, rewards, host, kept_rows)
        failed = [round_states[i] for i in range(0, len(round_states), group)
                  if not any(score.correct for score in round_scores[i:i + group])]
        if hint_for and failed and len(states) < rows:
            hint_states = [hint_for(s) for s in failed[:(rows - len(states)) // group] for _ in range(group)]
            host, round_scores, rewards = _sample_round(c, hint_states, task, sampler, settings, hint_key)
            new_tokens += int(host["lengths"].sum())
            outcomes += [(state, score.correct) for state, score in zip(hint_states, round_scores)]
            hinted += len(hint_states) // group
            keep(hint_states, round_scores, rewards, host, np.arange(len(hint_states)))
    experience = assemble(parts, rows, settings.pad_id) if parts else None
    return Collected(states, scores, experience, new_tokens, rounds, dropped,
                     {stage: float(np.mean(flags)) for stage, flags in equal_by_stage.items()}, outcomes,
                     hinted), data_position


def _host_metrics(states, scores, per_sequence: dict[str, np.ndarray]) -> dict[str, float]:
    """Reward and accuracy overall and per start stage, and the update's per-sequence metrics
    (`[batch]`) per start stage."""
    report = {k: v for k, v in accuracy_report(states, scores).items() if "/steps_" not in k}
    stages = np.asarray([s.stage for s in states])
    for name, values in per_sequence.items():
        values = values[:len(states)]  # sequences past the states only fill the batch
        for stage in np.unique(stages):
            report[f"{name}/stage_{stage}"] = float(values[stages == stage].mean())
    return report


def _sampling_record(c, collected: Collected, tokens_sampled: int, lr: float, sample_s: float,
                     update_s: float) -> dict[str, float]:
    """A step's record entries beside the update's: equal groups per stage, tokens, learning rate,
    timings, and dynamic sampling's rounds."""
    record = {f"equal_groups/stage_{stage}": fraction for stage, fraction in collected.equal_groups.items()}
    record.update({"tokens_sampled": tokens_sampled, "lr": lr, "time/sample_s": sample_s, "time/update_s": update_s,
                   "sample_tokens_per_s": collected.new_tokens / max(sample_s, 1e-9)})
    if c.dynamic_sampling:
        record.update({"sampling_rounds": collected.rounds, "dropped_groups": collected.dropped_groups,
                       "kept_rows": len(collected.states)})
    if c.strategy == "hint_on_failure":
        record["hinted_fraction"] = collected.hinted_groups / (c.batch_size // c.group_size)
    return record


def _learner(c, ppo_cfg: ppo.PPOConfig, model_cfg: ModelConfig, policy: Any, frozen: Any,
             mesh) -> tuple[ppo.PPOState, Callable]:
    """(the initial PPO state from the SFT `policy` (what trains: with LoRA its adapters, on the
    base `frozen`), learn): `learn(state, collected, key, lr_scale, step) -> (state, record)` trims
    the batch, runs the one jitted update (counting the distinct batch shapes it has compiled,
    `compiled/update_shapes`) and reads its metrics back; `update/real_fraction` is the share of
    the forward passes' token positions that hold real tokens."""
    # the frozen SFT reference: a copy in its own buffers (the training state is donated); none
    # when no KL penalty reads it, or with LoRA, where it is the frozen base (the adapters off)
    reference = sharding.compute_copy(model_cfg, mesh)(policy) if c.kl_coef and frozen is None else None
    params = actor_critic_params(model_cfg, policy, c.separate_critic, critic=c.estimator == "gae")
    optimizer = optim.rl_optimizer(c, params)
    update = ppo.make_ppo_update(model_cfg, ppo_cfg, optimizer, optim.rl_optimizer_knobs(c))
    shapes, batch_shards = set(), config_lib.data_parallel_size(mesh.devices.shape)

    def learn(state: ppo.PPOState, collected: Collected, key: jax.Array, lr_scale: float, step: int):
        batch = update_batch(c, collected.experience, batch_shards)
        rows = ppo.ForwardRows.of(batch)
        shapes.add((rows.tokens.shape, batch.rollout.tokens.shape))
        state, update_metrics, per_sequence = update(state, reference, sharding.shard_batch(batch, mesh), key,
                                                     lr_scale, 0.0 if step < c.critic_warmup_steps else 1.0, frozen)
        record = {k: float(sharding.to_host(v)) for k, v in update_metrics.items()}  # waits for the update
        record["compiled/update_shapes"] = len(shapes)  # in this process: a resumed run counts afresh
        record["update/real_fraction"] = packing.real_fraction(rows.attention_mask)
        record.update(_host_metrics(collected.states, collected.scores,
                                    {k: sharding.to_host(v) for k, v in per_sequence.items()}))
        return state, record

    state = ppo.init_state(params, optimizer)
    state = update.prepare(state)
    return state, learn


def _curriculum_record(curriculum: curriculum_lib.Curriculum, step: int, progress: float,
                       levels: list[int] | None) -> dict[str, float]:
    """A step's curriculum entries: the stage a staged run trains on; for adaptive, the share of
    demonstrations whose start point is each stage (as this step sampled them) and their mean."""
    if curriculum.strategy == "staged":
        return {"stage": curriculum.stage_at(step, progress)}
    if not levels:
        return {}
    stages = np.asarray([pool[level].stage for pool, level in zip(curriculum.pools, levels)])
    record = {f"start_point/stage_{stage}": float(np.mean(stages == stage)) for stage in np.unique(stages)}
    return record | {"start_point/mean_stage": float(stages.mean())}


def _sampling_weights(c, frozen: Any, policy: Any, to_rollout_layout: Callable[[Any], Any]) -> Any:
    """The policy to sample from: in the rollout layout, in new buffers (the training state is
    donated to the update); with LoRA on the training mesh, the base and adapters as they lie (the
    sampler is done with them before the update runs, and a copy would double the base's memory)."""
    weights = lora.merge(frozen, policy)
    return weights if frozen is not None and not c.rollout_mesh else to_rollout_layout(weights)


def _steps(c, curriculum: curriculum_lib.Curriculum) -> int:
    """rl.steps, or the steps of rl.data_epochs passes over the start states (said on the console)."""
    steps = config_lib.training_steps(c, len(curriculum.states), c.batch_size // c.group_size)
    if c.data_epochs:
        print(f"RL: {c.data_epochs:g} epochs over {len(curriculum.states):,} start states = {steps:,} steps")
    return steps


def _phase(config, strategy: str, workdir: str) -> loop.Phase:
    c = config.rl
    return loop.Phase(f"RL {strategy}", workdir, "rl", c.checkpoint_every, config.checkpoint.keep, c.eval_every,
                      finite_keys=("loss", "reward", "kl", "grad_norm"),
                      progress_bar=(("reward", "reward"), ("acc", "accuracy"), ("kl", "kl"), ("eval", "eval/accuracy")),
                      heatmap="start_point")


def train(settings: Settings, start: Policy, task: Task, workdir: str, stop: StopSignal) -> dict[str, Any] | None:
    """Runs (or resumes) RL from the SFT model `start` in `workdir`, with config.rl.strategy and
    config.seed: every weight, or with LoRA (adapters in `start`) the adapters alone. Returns the
    final policy's params with the steps taken and tokens sampled, or None when stopped early by a
    signal."""
    c, strategy, seed = settings.config.rl, settings.config.rl.strategy, settings.config.seed
    model_cfg, _, tokenizer, mesh = start
    policy, frozen = lora.trainable_and_frozen(model_cfg, start.params)
    os.makedirs(workdir, exist_ok=True)
    curriculum = build_curriculum(c, task, tokenizer, strategy, seed)
    sampling = rollout_lib.sampling_config(tokenizer, c.max_new_tokens, c.temperature, c.top_k, c.top_p)
    read_ahead(model_cfg, sampling)  # ahead of the update's programs, which the first step needs later
    initial_state, learn = _learner(c, settings.ppo, model_cfg, policy, frozen, mesh)
    steps = _steps(c, curriculum)
    rollout_mesh = sharding.make_mesh(c.rollout_mesh) if c.rollout_mesh else mesh
    to_rollout_layout = sharding.compute_copy(model_cfg, rollout_mesh)
    validation = greedy_problems(task, task.demonstrations("validation")[:c.eval_examples], settings.eval)
    base_key, budget = jax.random.key(seed), c.token_budget

    def rl_step(state: ppo.PPOState, meta: dict) -> tuple[ppo.PPOState, dict, dict]:
        step, tokens_sampled = meta["step"], meta["tokens_sampled"]
        _, update_key = jax.random.split(jax.random.fold_in(base_key, step))
        progress = tokens_sampled / budget if budget else step / steps
        started = time.perf_counter()
        sampler = Policy(model_cfg, _sampling_weights(c, frozen, state.params.policy, to_rollout_layout), tokenizer,
                         rollout_mesh)
        levels = meta.get("levels")  # adaptive's start points
        collected, data_position = collect(
            c, lambda position: curriculum.batch(position, progress, levels), task, sampler, sampling, base_key,
            meta["data_position"], (lambda s: curriculum.hint(s, levels)) if strategy == "hint_on_failure" else None)
        sampled = time.perf_counter()
        lr_scale = optim.lr_scale(c.schedule, c.warmup_steps, step, progress)
        record = {}
        if collected.experience is not None:  # else every sampled group had equal rewards: nothing to learn
            state, record = learn(state, collected, update_key, lr_scale, step)
        tokens_sampled += collected.new_tokens
        record.update(_sampling_record(c, collected, tokens_sampled, c.lr * lr_scale, sampled - started,
                                       time.perf_counter() - sampled))
        record.update(_curriculum_record(curriculum, step, progress, levels))
        meta = {**meta, "step": step + 1, "tokens_sampled": tokens_sampled, "data_position": data_position}
        return state, meta | ({"levels": curriculum.adapt(levels, collected.outcomes)} if levels else {}), record

    def validate(state: ppo.PPOState, meta: dict) -> tuple[dict, list[dict], dict]:
        report, records = evaluate(start.with_params(lora.merge(frozen, state.params.policy)), validation,
                                   desc="RL eval")
        return ({f"eval/{k}": v for k, v in report.items() if "/steps_" not in k},
                samples(task, validation.demos, records), meta)

    phase = _phase(settings.config, strategy, workdir)
    hooks = loop.Hooks(
        rl_step, lambda meta: meta["step"] >= steps or bool(budget and meta["tokens_sampled"] >= budget),
        lambda meta: (meta["tokens_sampled"], budget, "tok") if budget else (meta["step"], steps, "step"), validate)
    meta = {"step": 0, "tokens_sampled": 0, "data_position": 0}
    if strategy in curriculum_lib.PER_DEMONSTRATION:
        meta["levels"] = curriculum.initial_levels()
    state, meta, finished = loop.run(phase, settings, initial_state, meta, hooks, stop)
    if not finished:
        return None
    return {"params": lora.merge(frozen, state.params.policy), "steps": meta["step"],
            "tokens_sampled": meta["tokens_sampled"]}
