"""Tunix's side of bench/peers.py. Runs in the peer's own virtualenv (bench/.peers/tunix), never in
r3jax's: `python bench/peer_tunix.py SPEC.json`, with the repository root on PYTHONPATH for the
project's arith scorer.

SPEC's kind picks the run:
- grpo: its GRPO learner on the main job's SFT export. SPEC holds (as bench/peer_trl.py's grpo
  kind) model (an HF directory), prompts (JSONL of prompt, prompt_ids, gold), out, steps, seed, lr,
  temperature, batch_size, group_size, max_new_tokens, grad_clip, epochs, task_options and
  stop_ids. Checks first that Tunix's model exports back to the SFT weights and gives r3jax's
  logits. Writes the final model, as an HF directory, in out/final.
- ppo: its PPO learner at the earlier comparison's shape (`run_ppo`). SPEC holds model_config
  (LlamaConfig's arguments), out, steps, seed, lr, temperature, batch_size, prompt_length,
  max_new_tokens, grad_clip and epochs.
Both write out/steps.jsonl: per step, the reward and step_s, the time since the previous step's
reward.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tunix.models.llama3 import model as llama_model, params as llama_params
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout

from r3jax import tasks


def model_config(h: dict) -> llama_model.ModelConfig:
    """Tunix's Llama3 config for LlamaConfig's arguments `h` (an HF config.json's)."""
    h = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, **h}  # LlamaConfig's defaults
    return llama_model.ModelConfig(
        num_layers=h["num_hidden_layers"], vocab_size=h["vocab_size"], embed_dim=h["hidden_size"],
        hidden_dim=h["intermediate_size"], num_heads=h["num_attention_heads"],
        head_dim=h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"],
        num_kv_heads=h["num_key_value_heads"], rope_theta=h["rope_theta"], norm_eps=h["rms_norm_eps"],
        weight_tying=h.get("tie_word_embeddings", False))


def honour_rope_theta(theta: float) -> None:
    """Tunix 0.1.7's Llama3 attention calls apply_rope without the config's rope_theta, so every
    model rotates at the default 1,000,000 (Llama 3's is 500,000, this SFT model's 10,000); bind
    the config's value so that Tunix's logits are the model's (`check_logits`)."""
    rope = llama_model.apply_rope
    llama_model.apply_rope = lambda inputs, positions, head_dim, rope_theta=None: rope(inputs, positions, head_dim, theta)


def check_logits(model, hf_dir: str, prompt_ids: list[int]) -> float:
    """Tunix's logits on `prompt_ids` against r3jax's (which its tests hold to transformers'); exits
    unless they agree to 1e-4. Returns the largest difference."""
    from r3jax.models import hf, logits
    cfg, params = hf.load(hf_dir, mesh=None, param_dtype="float32", dtype="float32")
    tokens = jnp.asarray([prompt_ids])
    reference = np.asarray(logits(cfg, params, tokens, jnp.ones_like(tokens)))
    length = tokens.shape[1]
    tunix, _ = model(tokens, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool)))
    difference = float(np.abs(np.asarray(tunix) - reference).max())
    if difference > 1e-4:
        sys.exit(f"error: Tunix's logits differ from r3jax's by {difference:.3g} on the first prompt")
    return difference


def hf_tensors(model, cfg: llama_model.ModelConfig, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The model's weights under HF's names and `shapes`: Tunix's own loading map
    (`_get_key_and_transform_mapping`: HF name -> (nnx path, (transpose, reshape)), its transposes
    all (1, 0)) run backwards."""
    state = {".".join(map(str, path)): np.asarray(leaf.value if hasattr(leaf, "value") else leaf, np.float32)
             for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {}
    for hf_pattern, (nnx_pattern, transform) in llama_params._get_key_and_transform_mapping(cfg).items():
        nnx_regex = "([0-9]+)".join(re.escape(part) for part in nnx_pattern.split("\\1"))
        for path, value in state.items():
            match = re.fullmatch(nnx_regex, path)
            if not match:
                continue
            name = hf_pattern.replace("([0-9]+)", match.group(1) if match.groups() else "").replace("\\.", ".")
            if transform is not None:
                value = value.reshape(shapes[name][::-1]).T
            tensors[name] = np.ascontiguousarray(value)
    return tensors


def source_tensors(source: str) -> dict[str, np.ndarray]:
    tensors = {}
    for name in os.listdir(source):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(source, name)))
    return tensors


def export(model, cfg, source: str, out: str) -> None:
    """`model` as an HF directory `out`: the source's config and tokenizer files, its weights."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(source):
        if not name.endswith(".safetensors") and os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), out)
    shapes = {name: value.shape for name, value in source_tensors(source).items()}
    save_file(hf_tensors(model, cfg, shapes), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def check_round_trip(model, cfg, source: str) -> None:
    """The export of the freshly loaded model must give back the source's tensors exactly."""
    original = source_tensors(source)
    exported = hf_tensors(model, cfg, {name: value.shape for name, value in original.items()})
    differing = sorted(name for name in set(original) | set(exported) if name not in original or name not in exported
                       or not np.array_equal(exported[name], original[name].astype(np.float32)))
    if differing:
        sys.exit(f"error: Tunix's model does not export back to the SFT weights: {differing[:4]}")


def step_logger(path: str):
    """`log(rewards)`, appending one record per call to `path`: the mean reward, and step_s, the
    seconds since the previous call (or since this logger was made)."""
    open(path, "w").close()
    last = [time.perf_counter()]

    def log(rewards) -> None:
        now = time.perf_counter()
        with open(path, "a") as f:
            f.write(json.dumps({"reward": float(np.mean(rewards)), "step_s": now - last[0],
                                "loadavg_1m": os.getloadavg()[0]}) + "\n")
        last[0] = now

    return log


def cpu_mesh() -> jax.sharding.Mesh:
    # Tunix 0.1.7's model indexes its embedding in a way jax 0.10's explicit mesh axes refuse
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def one_mesh_cluster(mesh, tokenizer, rollout, batch: int, max_steps: int, spec: dict,
                     **models) -> rl_cluster_lib.RLCluster:
    """Tunix's RLCluster of `models` (actor and reference, and a critic where given), the vanilla
    rollout, every role on `mesh`. Each trained model steps AdamW at spec["lr"] (no weight decay)
    after clipping the global norm to spec["grad_clip"], as r3jax and TRL do; every batch of a step
    is `batch` rows."""
    optimizers = {f"{role}_optimizer": optax.chain(optax.clip_by_global_norm(spec["grad_clip"]),
                                                   optax.adamw(spec["lr"], weight_decay=0.0))
                  for role in ("actor", "critic") if role in models}
    training = rl_cluster_lib.RLTrainingConfig(
        **optimizers, eval_every_n_steps=10**9, max_steps=max_steps, mini_batch_size=batch,
        train_micro_batch_size=batch, rollout_micro_batch_size=batch, compute_logps_micro_batch_size=batch)
    roles = [getattr(rl_cluster_lib.Role, name.upper()) for name in models] + [rl_cluster_lib.Role.ROLLOUT]
    return rl_cluster_lib.RLCluster(**models, tokenizer=tokenizer, cluster_config=rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in roles}, rollout_engine="vanilla", offload_to_cpu=False,
        training_config=training, rollout_config=rollout))


def run_grpo(spec: dict) -> None:
    task = tasks.get("arith", **spec["task_options"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    records = [json.loads(line) for line in open(spec["prompts"])]
    for record in records:
        if tokenizer(record["prompt"])["input_ids"] != record["prompt_ids"]:
            sys.exit(f"error: the exported tokenizer encodes {record['prompt']!r} unlike r3jax")
    cfg = model_config(json.load(open(os.path.join(spec["model"], "config.json"))))
    honour_rope_theta(cfg.rope_theta)
    mesh = cpu_mesh()
    actor = llama_params.create_model_from_safe_tensors(spec["model"], cfg, mesh, dtype=jnp.float32)
    reference = llama_params.create_model_from_safe_tensors(spec["model"], cfg, mesh, dtype=jnp.float32)
    check_round_trip(actor, cfg, spec["model"])
    print(f"Tunix's logits match r3jax's to {check_logits(actor, spec['model'], records[0]['prompt_ids']):.2g}")

    log, steps_done = step_logger(os.path.join(spec["out"], "steps.jsonl")), [0]

    def arith_reward(prompts, completions, gold, **_):
        rewards = [score.reward for score in task.score_batch(list(completions), list(gold))]
        log(rewards)
        # Tunix's vanilla rollout seeds every step's sampling with the same key; a key per step
        # instead, as r3jax and TRL draw
        steps_done[0] += 1
        object.__setattr__(cluster.cluster_config, "rollout_config",
                           dataclasses.replace(rollout, seed=spec["seed"] * 1_000_003 + steps_done[0]))
        return rewards

    prompts_per_step = spec["batch_size"] // spec["group_size"]
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=None,
        max_prompt_length=max(len(r["prompt_ids"]) for r in records), kv_cache_size=512,
        eos_tokens=list(spec["stop_ids"]), seed=spec["seed"] * 1_000_003)
    cluster = one_mesh_cluster(mesh, tokenizer, rollout, prompts_per_step, spec["steps"], spec, actor=actor,
                               reference=reference)
    learner = grpo_learner.GrpoLearner(
        rl_cluster=cluster, reward_fns=arith_reward,
        algo_config=grpo_learner.GRPOConfig(num_generations=spec["group_size"], num_iterations=spec["epochs"],
                                            beta=0.0, epsilon=0.2, loss_agg_mode="token-mean"))
    dataset = grain.MapDataset.source([{"prompts": r["prompt"], "gold": r["gold"]} for r in records])
    learner.train(dataset.shuffle(seed=spec["seed"]).repeat().batch(prompts_per_step))
    export(cluster.actor_trainer.model, cfg, spec["model"], os.path.join(spec["out"], "final"))


class Critic(llama_model.Llama3):
    """Llama3 with a one-output head: the values `[B, T, 1]` Tunix's compute_score reads. Its call
    takes `segment_ids` and drops them: Tunix 0.1.7's compute_score passes them to the critic
    whether or not its model accepts them, and Tunix's own Llama3 does not (google/tunix#1539).
    This is the smallest workaround; the padding mask still reaches attention."""

    def __init__(self, config: llama_model.ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(dataclasses.replace(config, weight_tying=False), rngs=rngs)
        self.lm_head = llama_model.Einsum(einsum_str="BTD,DV->BTV", shape=(config.embed_dim, 1), rngs=rngs,
                                          sharding=config.shd_config.emb_dv)

    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
        return super().__call__(input_tokens, positions, cache, attention_mask)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` ids ("<pad>", "<eos>", then "w2" ...): a prompt of n
    random words is n ids, and every id the random model samples decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}},
                                       unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def run_ppo(spec: dict) -> None:
    """Tunix's PPOLearner at the earlier comparison's shape, as bench/peer_trl.py's ppo kind and
    r3jax's PPO step in bench/peers.py: a policy, a frozen reference and a separate critic of
    spec["model_config"] (random weights), random prompts of spec["prompt_length"] tokens,
    spec["max_new_tokens"] sampled, spec["epochs"] epochs of one minibatch, a KL penalty of 0.05.
    The reward is a function (random numbers), as r3jax's step scores nothing."""
    cfg = model_config(spec["model_config"])
    tokenizer = word_tokenizer(cfg.vocab_size)
    batch, rng = spec["batch_size"], np.random.default_rng(spec["seed"])
    mesh = cpu_mesh()
    with jax.set_mesh(mesh):
        actor, reference = (llama_model.Llama3(cfg, rngs=nnx.Rngs(spec["seed"])) for _ in range(2))
        critic = Critic(cfg, rngs=nnx.Rngs(spec["seed"] + 1))
    log = step_logger(os.path.join(spec["out"], "steps.jsonl"))

    def random_reward(prompts, completions, **_):
        rewards = rng.uniform(size=len(completions)).tolist()
        log(rewards)
        return rewards

    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=None,
        max_prompt_length=spec["prompt_length"], kv_cache_size=spec["prompt_length"] + spec["max_new_tokens"],
        eos_tokens=[tokenizer.eos_token_id], seed=spec["seed"])
    # Tunix counts each epoch's update a step
    cluster = one_mesh_cluster(mesh, tokenizer, rollout, batch, spec["steps"] * spec["epochs"], spec, actor=actor,
                               critic=critic, reference=reference)
    learner = ppo_learner.PPOLearner(
        rl_cluster=cluster, reward_fns=random_reward,
        ppo_config=ppo_learner.PPOConfig(num_iterations=spec["epochs"], beta=0.05, epsilon=0.2))
    prompts = [" ".join(f"w{i}" for i in rng.integers(2, cfg.vocab_size, spec["prompt_length"]))
               for _ in range(batch * spec["steps"])]
    learner.train(grain.MapDataset.source([{"prompts": p} for p in prompts]).batch(batch))


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    {"grpo": run_grpo, "ppo": run_ppo}[spec["kind"]](spec)


if __name__ == "__main__":
    main()
