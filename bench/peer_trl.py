"""TRL's side of bench/peers.py. Runs in the peer's own virtualenv (bench/.peers/trl), never in
r3jax's: `python bench/peer_trl.py SPEC.json`, with the repository root on PYTHONPATH for the
project's arith scorer (r3jax.tasks needs numpy only).

SPEC holds: kind (grpo or ppo), out (a directory), steps, seed, lr, temperature, batch_size,
max_new_tokens, grad_clip, epochs; for grpo model (an HF directory), prompts (JSONL of prompt,
prompt_ids, gold), task_options, stop_ids and group_size; for ppo model_config (LlamaConfig's
arguments), prompt_length and tokenizer (an HF tokenizer directory, for its pad id). Writes out/steps.jsonl (one record per step: reward, rollout_s, update_s,
step_s, loadavg_1m) and, for grpo, the final model in out/final.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import transformers
from datasets import Dataset

import trl
from r3jax import tasks


def _prompts(spec: dict, tokenizer) -> list[dict]:
    """The prompt records, after checking that TRL's tokenizer gives r3jax's ids for every one."""
    records = [json.loads(line) for line in open(spec["prompts"])]
    for record in records:
        ids = tokenizer(record["prompt"])["input_ids"]
        if ids != record["prompt_ids"]:
            sys.exit(f"error: the exported tokenizer encodes {record['prompt']!r} as {ids}, "
                     f"r3jax as {record['prompt_ids']}")
    return records


class StepLog(transformers.TrainerCallback):
    """One JSONL record per optimizer step, written once both its timing (at the step's end) and
    its reward (at the log) are in, whichever comes first; the rollout's share is timed by
    wrapping the trainer's generation."""

    def __init__(self, path: str):
        self.path, self.rollout_s, self.started, self.pending = path, 0.0, time.perf_counter(), {}
        open(path, "w").close()

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.rollout_s += time.perf_counter() - start
            return out
        return wrapper

    def _add(self, entries: dict) -> None:
        self.pending.update(entries)
        if "reward" in self.pending and "step_s" in self.pending:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.pending) + "\n")
            self.pending = {}

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        step_s, self.started = now - self.started, now
        rollout_s, self.rollout_s = self.rollout_s, 0.0
        self._add({"step": state.global_step, "step_s": step_s, "rollout_s": rollout_s,
                   "update_s": step_s - rollout_s, "loadavg_1m": os.getloadavg()[0]})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        reward = logs.get("reward", logs.get("objective/scores"))
        if reward is not None:
            self._add({"reward": reward})


def run_grpo(spec: dict) -> None:
    task = tasks.get("arith", **spec["task_options"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    records = _prompts(spec, tokenizer)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "gold": r["gold"]} for r in records])

    def arith_reward(completions, gold, **_):
        return [score.reward for score in task.score_batch(completions, gold)]

    config = trl.GRPOConfig(
        output_dir=spec["out"], seed=spec["seed"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=spec["grad_clip"], max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        num_generations=spec["group_size"], steps_per_generation=1, num_iterations=1,
        temperature=spec["temperature"], top_k=0, top_p=1.0, max_completion_length=spec["max_new_tokens"],
        beta=0.0, epsilon=0.2, scale_rewards="group", loss_type="dapo", use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_dropout=True, dataloader_num_workers=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.generation_config.eos_token_id = spec["stop_ids"]
    trainer = trl.GRPOTrainer(model=model, reward_funcs=arith_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    log = StepLog(os.path.join(spec["out"], "steps.jsonl"))
    trainer._generate_and_score_completions = log.timed(trainer._generate_and_score_completions)
    trainer.add_callback(log)
    log.started = time.perf_counter()
    trainer.train()
    trainer.save_model(os.path.join(spec["out"], "final"))
    tokenizer.save_pretrained(os.path.join(spec["out"], "final"))


def run_ppo(spec: dict) -> None:
    """TRL's experimental PPOTrainer at the shape of the earlier comparison: random prompts of
    spec["prompt_length"] tokens, spec["max_new_tokens"] sampled, a policy, a critic and a reward
    model of spec["model_config"] (random weights), spec["epochs"] epochs, one minibatch."""
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    model_config = transformers.LlamaConfig(**spec["model_config"])
    policy, reference = (transformers.LlamaForCausalLM(model_config) for _ in range(2))
    critic, reward = (transformers.LlamaForSequenceClassification(model_config.__class__(
        **spec["model_config"], num_labels=1)) for _ in range(2))
    generator = torch.Generator().manual_seed(spec["seed"])
    rows = spec["batch_size"] * spec["steps"]
    prompts = torch.randint(3, model_config.vocab_size, (rows, spec["prompt_length"]), generator=generator)
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
    tokenizer = _tokenizer(spec["tokenizer"])
    config = PPOConfig(
        output_dir=spec["out"], seed=spec["seed"], learning_rate=spec["lr"], num_ppo_epochs=spec["epochs"],
        num_mini_batches=1, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=spec["batch_size"], total_episodes=rows, response_length=spec["max_new_tokens"],
        temperature=spec["temperature"], kl_coef=0.05, missing_eos_penalty=None, stop_token=None,
        max_grad_norm=spec["grad_clip"], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        report_to=[], num_sample_generations=0, dataloader_num_workers=0)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=critic, train_dataset=dataset)
    log = StepLog(os.path.join(spec["out"], "steps.jsonl"))
    ppo_trainer.batch_generation = log.timed(ppo_trainer.batch_generation)
    trainer.add_callback(log)
    log.started = time.perf_counter()
    trainer.train()


def _tokenizer(path: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads", os.cpu_count()))
    {"grpo": run_grpo, "ppo": run_ppo}[spec["kind"]](spec)


if __name__ == "__main__":
    main()
