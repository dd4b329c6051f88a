"""Side by side with the peers: r3jax against TRL's GRPOTrainer and Tunix's GrpoLearner on the main
job's SFT model, with the same prompt ids, the project's arith reward and the same hyperparameters.

    python bench/peers.py learning [--settings 1.3:3e-5 1.0:1e-5] [--seeds 0 1 2] [--steps 200]
                                   [--systems r3jax-grpo trl-grpo r3jax-ppo tunix-grpo] [--out peers-learning]
    python bench/peers.py speed [--steps 30] [--rounds 3]

Each peer runs in its own virtualenv under bench/.peers/, created on first use from PEER_PINS
(bench/peer_trl.py is TRL's side, bench/peer_tunix.py Tunix's). The SFT model is bench/.peers/main-job/sft/best, made by the
main job's SFT phase if missing, or --sft DIR.

learning: per setting (temperature:lr) and seed, each system trains --steps steps of 64
  completions (8 prompts x 8), one AdamW update per batch, no KL, and its final model is evaluated
  by r3jax's one evaluator on the validation split: greedy and 4 samples per problem at the
  setting's temperature. Writes bench/results/<out>.json and .png (reward curves with seed
  bands). Each run is kept in its directory under bench/.peers/learning and reused.
speed: the GRPO step above (r3jax, TRL), and a PPO step with a critic at the earlier comparison's
  shape (r3jax, TRL, Tunix; the 3.95M Llama of bench/ppo_step.py, 16 x 64+64 tokens, 2 epochs): short runs of each system
  interleaved over rounds, the first step apart from the steady ones, the 1-minute load average
  recorded; r3jax's first round compiles into an empty compilation cache, later rounds read it
  (the first warm step is their median).
  Then the bare forward + backward + AdamW on the PPO step's model and tokens, JAX against
  PyTorch in one process, to tell the framework's cost from the RL step's; and what the PPO
  step's targets ask of r3jax's update, as a rate over an fp32 matmul's measured in the run.
  Writes bench/results/peers-<device>.json.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from common import device_name, write
from r3jax import config as config_lib, files, stats, tasks
from r3jax import tokenizer as tokenizer_lib
from r3jax.curriculum import start_states
from r3jax.metrics import machine_info, read_jsonl
from r3jax.rollout import tokenize_states
from r3jax.train.job import predictions_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "bench", ".peers")
PEER_PINS = {"trl": ["trl==0.29.1", "torch==2.13.0", "transformers==5.23.0", "accelerate==1.13.0",
                     "datasets==4.8.4", "numpy==2.4.6"],
             "tunix": ["google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2"]}
SYSTEMS = ("r3jax-grpo", "trl-grpo", "r3jax-ppo", "tunix-grpo")
PEER_SYSTEMS = {"trl-grpo": "trl", "tunix-grpo": "tunix"}  # a peer's GRPO system -> its virtualenv
GROUP, BATCH, EVAL_SAMPLES = 8, 64, 4
# Knobs set alike on both sides; what could not be matched is listed in the results.
SHARED = {"group_size": GROUP, "batch_size": BATCH, "max_new_tokens": 160, "grad_clip": 1.0, "epochs": 1}
UNMATCHED = [
    "prompt order: each trainer shuffles the same prompts with its own generator",
    "group std: TRL divides by (unbiased std + 1e-4), r3jax by its own std and epsilon",
    "random streams: sampling and initial state differ between torch and JAX at the same seed",
    "r3jax-ppo: a separate critic (lr 3e-4, 2 epochs, GAE) in place of group baselines; TRL's PPO is not run",
]


def peer_python(name: str) -> str:
    """The peer's virtualenv interpreter, created from PEER_PINS on first use; exits with one line
    if the registry or a pin cannot be installed."""
    venv = os.path.join(PEERS, name)
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, "installed")):
        return python
    log = os.path.join(PEERS, f"{name}-install.log")
    os.makedirs(PEERS, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "venv", venv], stdout=out, stderr=out).returncode == 0 and \
            subprocess.run([python, "-m", "pip", "install", *PEER_PINS[name]], stdout=out, stderr=out).returncode == 0
    if not done:
        sys.exit(f"error: could not install {' '.join(PEER_PINS[name])} into {venv} (see {log})")
    open(os.path.join(venv, "installed"), "w").close()
    return python


def peer_versions(name: str) -> dict[str, str]:
    frozen = subprocess.run([peer_python(name), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    wanted = {pin.split("==")[0] for pin in PEER_PINS[name]}
    return dict(line.split("==") for line in frozen.split() if line.split("==")[0] in wanted)


@functools.cache
def task_options() -> dict:
    """The main job's task options (configs/arith.py), for TRL's reward and for scoring samples."""
    return config_lib.load_config_file(os.path.join(ROOT, "configs", "arith.py")).task.options.to_dict()


@functools.cache
def arith_task() -> tasks.Task:
    return tasks.get("arith", **task_options())


def read_record(path: str) -> dict:
    return files.read_json(path, f"delete {os.path.dirname(path)} to run that unit again")


def main_job(*overrides: str, log: str) -> None:
    """One run of `python -m r3jax.main` on the main job's config with `overrides`; exits naming
    its log if it fails."""
    command = [sys.executable, "-m", "r3jax.main", f"--config={ROOT}/configs/arith.py", *overrides]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as out:
        if subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"error: {' '.join(command[2:])} failed (see {log})")


def ensure_sft(sft: str | None) -> str:
    if sft:
        return sft
    workdir = os.path.join(PEERS, "main-job")
    best = os.path.join(workdir, "sft", "best")
    if not os.path.exists(os.path.join(best, "config.json")):
        print(f"making the main job's SFT model in {workdir}")
        os.makedirs(workdir, exist_ok=True)
        main_job("--config.mode=sft", f"--workdir={workdir}", log=os.path.join(workdir, "sft.log"))
    return best


def weights_sha256(model: str) -> str:
    """sha256 of an export's weights: which SFT model a run measured (bench/.peers is remade per host)."""
    digest = hashlib.sha256()
    with open(os.path.join(model, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prompts(sft: str, path: str) -> None:
    """The RL training prompts (start state k = 0 of every training demonstration) as r3jax
    tokenizes them, with their gold answers: JSONL of prompt, prompt_ids, gold."""
    task = arith_task()
    tokenizer = tokenizer_lib.load(sft)
    states = tokenize_states(tokenizer, task, [start_states(task, d, None)[0] for d in task.demonstrations("train")])
    with open(path, "w") as f:
        for state in states:
            f.write(json.dumps({"prompt": state.prompt_text, "prompt_ids": list(map(int, state.prompt_tokens)),
                                "gold": state.demo.answer}) + "\n")


def r3jax_run(sft: str, out: str, estimator: str, temperature: float, lr: float, steps: int, seed: int) -> None:
    """r3jax's RL phase from `sft` (outcome reward at k = 0, no KL) with its model exported to out/rl/final."""
    critic = ["--config.rl.separate_critic=True", "--config.rl.critic_lr=3e-4", "--config.rl.epochs=2",
              "--config.rl.group_size=1"] if estimator == "gae" else \
        [f"--config.rl.group_size={GROUP}", f"--config.rl.epochs={SHARED['epochs']}",
         "--config.rl.separate_critic=False"]
    main_job("--config.mode=rl", f"--config.rl.init={sft}", f"--workdir={out}", f"--config.seed={seed}",
             "--config.rl.strategy=outcome", f"--config.rl.estimator={estimator}", *critic,
             f"--config.rl.batch_size={BATCH}", "--config.rl.kl_coef=0", f"--config.rl.lr={lr}",
             f"--config.rl.temperature={temperature}", f"--config.rl.steps={steps}",
             f"--config.rl.grad_clip={SHARED['grad_clip']}", "--config.rl.loss_agg=token_mean",
             "--config.rl.eval_every=0", f"--config.rl.checkpoint_every={steps}",
             "--config.eval.num_examples=1",  # the final models are evaluated apart, by evaluate()
             log=os.path.join(out, "run.log"))


def peer_grpo_run(peer: str, sft: str, prompts: str, out: str, temperature: float, lr: float, steps: int,
                  seed: int) -> None:
    spec = {"kind": "grpo", "model": sft, "prompts": prompts, "out": out, "steps": steps, "seed": seed,
            "lr": lr, "temperature": temperature, "task_options": task_options(),
            "stop_ids": list(tokenizer_lib.load(sft).stop_ids), **SHARED}
    peer_run(spec, peer)


def peer_run(spec: dict, peer: str = "trl") -> None:
    """bench/peer_<peer>.py on `spec` in that peer's virtualenv; exits naming its log if it fails."""
    os.makedirs(spec["out"], exist_ok=True)
    spec_path = os.path.join(spec["out"], "spec.json")
    files.write_json(spec_path, spec)
    log = os.path.join(spec["out"], "run.log")
    with open(log, "w") as f:
        code = subprocess.run([peer_python(peer), os.path.join(ROOT, "bench", f"peer_{peer}.py"), spec_path],
                              env={**os.environ, "PYTHONPATH": ROOT}, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"error: {peer}'s {spec['kind']} run failed (see {log})")


def evaluate_final(model: str, sft: str, out: str, temperature: float) -> dict:
    """Greedy and single-sample accuracy on the validation split through r3jax's evaluator, the
    sampler's keys the same for every model: {greedy, sample, greedy_correct, sample_correct}."""
    main_job("--config.mode=eval", f"--config.model.path={model}", f"--config.tokenizer.path={sft}",
             f"--workdir={out}", "--config.eval.split=validation",
             f"--config.eval.maj_k={EVAL_SAMPLES}", f"--config.eval.temperature={temperature}",
             log=os.path.join(out, "eval.log"))
    task = arith_task()
    greedy = read_jsonl(predictions_path(out, "model"))
    sampled = read_jsonl(predictions_path(out, f"model_maj{EVAL_SAMPLES}"))
    return {"greedy_correct": [float(r["correct"]) for r in greedy],
            "sample_correct": [float(np.mean([task.score_answer(p, r["answer"]).correct for p in r["predictions"]]))
                               for r in sampled]}


def training_rewards(system: str, out: str) -> list[float]:
    if system.startswith("r3jax"):
        return [r["reward"] for r in read_jsonl(os.path.join(out, "rl", "rl.jsonl"))]
    return [r["reward"] for r in read_jsonl(os.path.join(out, "steps.jsonl"))]


def final_model(system: str, out: str) -> str:
    return os.path.join(out, "rl", "final") if system.startswith("r3jax") else os.path.join(out, "final")


def learning_unit(system: str, sft: str, prompts: str, temperature: float, lr: float, steps: int,
                  seed: int) -> dict:
    """One system's run at one setting and seed, cached in its directory: its per-step training
    reward and the per-problem correctness of its final model."""
    out = os.path.join(PEERS, "learning", f"{system}-t{temperature}-lr{lr}-steps{steps}-seed{seed}")
    record_path = os.path.join(out, "record.json")
    if os.path.exists(record_path):
        return read_record(record_path)
    started = time.time()
    if system in PEER_SYSTEMS:
        peer_grpo_run(PEER_SYSTEMS[system], sft, prompts, out, temperature, lr, steps, seed)
    else:
        r3jax_run(sft, out, "grpo" if system == "r3jax-grpo" else "gae", temperature, lr, steps, seed)
    record = {"rewards": training_rewards(system, out), "train_s": time.time() - started,
              **evaluate_final(final_model(system, out), sft, os.path.join(out, "eval"), temperature)}
    files.write_json(record_path, record)
    return record


def sft_record(sft: str, temperature: float) -> dict:
    """The SFT model's per-problem correctness through the same evaluator: where every system starts."""
    out = os.path.join(PEERS, "learning", f"sft-t{temperature}")
    record_path = os.path.join(out, "record.json")
    if not os.path.exists(record_path):
        files.write_json(record_path, evaluate_final(sft, sft, os.path.join(out, "eval"), temperature))
    return read_record(record_path)


def correct(records: list[dict], metric: str) -> np.ndarray:
    """`[seeds, problems]` correctness of `metric` (greedy or sample)."""
    return np.array([r[f"{metric}_correct"] for r in records])


def accuracy_intervals(records: list[dict]) -> dict:
    """Greedy and single-sample accuracy with 95% intervals over problems and seeds."""
    return {metric: stats.bootstrap(correct(records, metric))._asdict() for metric in ("greedy", "sample")}


def differences(records: dict[str, list[dict]]) -> dict:
    """Paired 95% intervals (the same validation problems resampled for both, seeds per system) of
    each r3jax system minus each peer (TRL, Tunix), and of each system minus the SFT model (`records["sft"]`), in
    greedy and single-sample accuracy."""
    systems = [system for system in records if system != "sft"]
    pairs = [(system, peer) for system in systems if system.startswith("r3jax") for peer in PEER_SYSTEMS
             if peer in records]
    pairs += [(system, "sft") for system in systems]
    return {f"{a} - {b}": {metric: stats.paired_difference(correct(records[a], metric), correct(records[b], metric))
                           ._asdict() for metric in ("greedy", "sample")} for a, b in pairs}


def summarise(records: list[dict]) -> dict:
    """Seed-pooled intervals of the final models' accuracies, and the mean reward curve with its
    per-step seed range."""
    curves = np.array([r["rewards"] for r in records])
    return {"seeds": len(records), "reward_mean": curves.mean(0).tolist(), "reward_min": curves.min(0).tolist(),
            "reward_max": curves.max(0).tolist(), "first_10_reward": float(curves[:, :10].mean()),
            "last_10_reward": float(curves[:, -10:].mean()), **accuracy_intervals(records)}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, (setting, systems) in zip(axes[0], settings.items()):
        for system, summary in systems.items():
            if system == "sft":
                continue
            steps = np.arange(1, len(summary["reward_mean"]) + 1)
            window = min(10, len(steps))
            smooth = np.convolve(summary["reward_mean"], np.ones(window) / window, mode="valid")
            line, = ax.plot(steps[window - 1:], smooth, label=f"{system} ({summary['seeds']} seeds)")
            ax.fill_between(steps, summary["reward_min"], summary["reward_max"], color=line.get_color(), alpha=0.15)
        ax.set(title=f"T, lr = {setting}", xlabel="step (64 completions)", ylabel="training reward")
        ax.legend()
    fig.suptitle("Training reward: mean over seeds (10-step average), band = seed range per step")
    files.save_figure(fig, path)


def learning(args) -> None:
    sft = ensure_sft(args.sft)
    prompts = os.path.join(PEERS, "prompts.jsonl")
    write_prompts(sft, prompts)
    results = {"machine": machine_info(), **{PEER_SYSTEMS[s]: peer_versions(PEER_SYSTEMS[s]) for s in args.systems
                                             if s in PEER_SYSTEMS}, "sft": sft, "steps": args.steps,
               "shared": SHARED, "unmatched": UNMATCHED, "eval": f"validation split, greedy and {EVAL_SAMPLES} "
               "samples per problem at the setting's temperature, r3jax's evaluator (the same sampling keys for every "
               "model)", "settings": {}, "differences": {}}
    for setting in args.settings:
        temperature, lr = map(float, setting.split(":"))
        records = {"sft": [sft_record(sft, temperature)]}
        per_system = {"sft": accuracy_intervals(records["sft"])}
        for system in args.systems:
            records[system] = [learning_unit(system, sft, prompts, temperature, lr, args.steps, seed)
                               for seed in args.seeds]
            per_system[system] = summarise(records[system])
            print(f"{setting} {system}: reward {per_system[system]['first_10_reward']:.3f} -> "
                  f"{per_system[system]['last_10_reward']:.3f}, sample accuracy {per_system[system]['sample']}")
        results["settings"][setting] = per_system
        results["differences"][setting] = differences(records)
    path = os.path.join(ROOT, "bench", "results", f"{args.out}.json")
    files.write_json(path, results)
    plot(results, path[:-len(".json")] + ".png")
    print(f"wrote {path}")


def speed_records(system: str, out: str) -> list[dict]:
    """Per step: rollout_s, update_s, step_s (and TRL's load average)."""
    if system == "trl-grpo":
        return read_jsonl(os.path.join(out, "steps.jsonl"))
    return [{"rollout_s": r["time/sample_s"], "update_s": r["time/update_s"],
             "step_s": r["time/sample_s"] + r["time/update_s"]} for r in read_jsonl(os.path.join(out, "rl", "rl.jsonl"))]


def speed_summary(runs: list[dict]) -> dict:
    steady = [step for run in runs for step in run["steps"][1:]]
    summary = {key: float(np.median([s[key] for s in steady])) for key in ("rollout_s", "update_s", "step_s")
               if key in steady[0]}  # Tunix's runs time whole steps only
    summary["first_step_s"] = [run["steps"][0]["step_s"] for run in runs]
    summary["run_s"] = [sum(step["step_s"] for step in run["steps"]) for run in runs]  # compiles included
    summary["loadavg_1m"] = [run["loadavg_before"] for run in runs]
    return summary


def r3jax_ppo_steps(steps: int, seed: int) -> list[dict]:
    """r3jax's PPO step at the earlier comparison's shape (bench/ppo_step.py's SMALL model, 16
    prompts of 64 tokens, 64 sampled, a separate critic, 2 epochs): the jitted sampler, then the
    one compiled update, each timed to completion."""
    import jax
    import jax.numpy as jnp
    from ppo_step import BATCH, NEW, PROMPT, SMALL, fresh_weights, ppo_caller
    from r3jax import optim, ppo, sampling

    key = jax.random.key(seed)
    update = ppo_caller(SMALL, ppo.PPOConfig(**PPO_STEP), optim.adamw(1e-6), key, separate_critic=True)
    params = fresh_weights(SMALL, key)
    prompts = jax.random.randint(key, (BATCH, PROMPT), 3, SMALL.vocab_size)
    settings = sampling.SamplingConfig(max_new_tokens=NEW)
    records = []
    for step in range(steps):
        started = time.perf_counter()
        rollout = sampling.sample(SMALL, params, prompts, jnp.ones_like(prompts), jax.random.fold_in(key, step), settings)
        jax.block_until_ready(rollout)
        sampled, cpu = time.perf_counter(), process_cpu_s()
        update()
        done = time.perf_counter()
        records.append({"rollout_s": sampled - started, "update_s": done - sampled, "step_s": done - started,
                        "update_cpu_s": process_cpu_s() - cpu})
    return records


def process_cpu_s() -> float:
    """CPU seconds this process's threads have used, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PPO_STEP = {"epochs": 2, "minibatches": 1}  # r3jax's PPO step's ppo.PPOConfig (defaults besides)


def ppo_update_bound(summary: dict, ppo_runs: list[dict]) -> dict:
    """What the PPO step's targets ask of r3jax's update on this host. Its model FLOPs (the policy's
    passes with the LM head, the separate critic's 3 per epoch without), the rate it ran at, and
    the update time that 0.6x TRL's step and 0.5x Tunix's leave after r3jax's own rollout: each as
    a rate, over an fp32 2048^3 matmul's rate measured here (what the host's matmul kernels give
    at their best), with the cores the update kept busy (CPU seconds over wall seconds)."""
    import jax.numpy as jnp
    from ppo_step import BATCH, NEW, PROMPT, SMALL, forward_flops, update_passes
    from r3jax import ppo
    from sampler import matmul_rate

    ppo_cfg = ppo.PPOConfig(**PPO_STEP)
    flops = (update_passes(ppo_cfg) * forward_flops(SMALL, BATCH, PROMPT + NEW, NEW, NEW)
             + 3 * ppo_cfg.epochs * forward_flops(SMALL, BATCH, PROMPT + NEW, 0, NEW))
    matmul = matmul_rate(2048, jnp.float32)
    r3jax, rollout_s = summary["r3jax-ppo"], summary["r3jax-ppo"]["rollout_s"]
    steady = [step for run in ppo_runs for step in run["steps"][1:]]

    def rate(update_s: float) -> dict:
        return {"update_s": update_s, "gflop_per_s": flops / update_s / 1e9, "over_matmul": flops / update_s / matmul}

    return {"model_gflop": flops / 1e9, "matmul_2048_fp32_gflop_per_s": matmul / 1e9,
            "cpu_over_wall": float(np.median([s["update_cpu_s"] / s["update_s"] for s in steady])),
            "measured": rate(r3jax["update_s"]),
            "for_0.6x_trl": rate(0.6 * summary["trl-ppo"]["step_s"] - rollout_s),
            "for_0.5x_tunix": rate(0.5 * summary["tunix-ppo"]["step_s"] - rollout_s)}


def peer_ppo_steps(peer: str, sft: str, out: str, steps: int, seed: int) -> list[dict]:
    """`peer`'s PPO step at r3jax_ppo_steps' shape and settings (TRL's tokenizer is the SFT
    model's, for its pad id; Tunix's is a word-level one of the model's vocabulary)."""
    from ppo_step import BATCH, NEW, PROMPT, SMALL
    peer_run({"kind": "ppo", "model_config": torch_config(SMALL), "tokenizer": sft, "out": out, "steps": steps,
              "seed": seed, "lr": 1e-6, "temperature": 1.0, "batch_size": BATCH, "prompt_length": PROMPT,
              "max_new_tokens": NEW, "grad_clip": 1.0, "epochs": 2}, peer)
    return read_jsonl(os.path.join(out, "steps.jsonl"))


def bare_steps(repeats: int = 10) -> dict:
    """The bare training step (forward + backward + AdamW, no RL) on the PPO comparison's model and
    tokens, in JAX (r3jax's SFT step) and in PyTorch (transformers' Llama with torch.optim.AdamW),
    timed alternately in this process: median seconds of each after a warm-up call."""
    import jax
    import torch
    import transformers
    from ppo_step import BATCH, NEW, PROMPT, SMALL, make_rollout, sft_caller
    from r3jax import optim

    key = jax.random.key(0)
    tokens = make_rollout(SMALL, key).rollout.tokens
    jax_step = sft_caller(SMALL, optim.adamw(1e-6), key, tokens)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**torch_config(SMALL))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    torch_tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)

    def torch_step():
        loss = model(input_ids=torch_tokens, labels=torch_tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    times = {"jax": [], "torch": []}
    for name, step in (("jax", jax_step), ("torch", torch_step)):
        step()  # compile / warm up
    for _ in range(repeats):
        for name, step in (("jax", jax_step), ("torch", torch_step)):
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return {"tokens": [BATCH, PROMPT + NEW], "torch_threads": torch.get_num_threads(), "median_s": medians,
            "jax_over_torch": medians["jax"] / medians["torch"], "times": times}


def torch_config(cfg) -> dict:
    """LlamaConfig's arguments for an r3jax ModelConfig."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings}


SPEED_SYSTEMS = ("r3jax-grpo", "trl-grpo", "r3jax-ppo", "trl-ppo", "tunix-ppo")
SPEED_SETTING = (1.3, 3e-5)  # the GRPO step's temperature and lr


def speed_run(system: str, sft: str, prompts: str, out: str, steps: int, seed: int) -> list[dict]:
    """One short run of `system` in `out`: its per-step rollout_s, update_s and step_s."""
    temperature, lr = SPEED_SETTING
    if system == "r3jax-ppo":
        return r3jax_ppo_steps(steps, seed)
    if system in ("trl-ppo", "tunix-ppo"):
        return peer_ppo_steps(system.split("-")[0], sft, out, steps, seed)
    if system in PEER_SYSTEMS:
        peer_grpo_run(PEER_SYSTEMS[system], sft, prompts, out, temperature, lr, steps, seed)
    else:
        r3jax_run(sft, out, "grpo", temperature, lr, steps, seed)
    return speed_records(system, out)


def speed(args) -> None:
    """Interleaved rounds of each system's GRPO run on the main job and PPO step at the earlier
    comparison's shape; medians of the steady steps, the first steps apart."""
    import shutil
    sft = ensure_sft(args.sft)
    prompts = os.path.join(PEERS, "prompts.jsonl")
    write_prompts(sft, prompts)
    cache = os.path.join(PEERS, "jit-cache")
    shutil.rmtree(cache, ignore_errors=True)  # r3jax's first round compiles cold, the next warm
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    temperature, lr = SPEED_SETTING
    runs = {system: [] for system in SPEED_SYSTEMS}
    for round_ in range(args.rounds):
        for system in SPEED_SYSTEMS:
            out = os.path.join(PEERS, "speed", f"{system}-{round_}")
            shutil.rmtree(out, ignore_errors=True)
            loadavg = os.getloadavg()[0]
            steps = speed_run(system, sft, prompts, out, args.steps, round_)
            runs[system].append({"loadavg_before": loadavg, "steps": steps, "loadavg_after": os.getloadavg()[0]})
            print(f"round {round_} {system}: median step {np.median([s['step_s'] for s in steps[1:]]):.3f} s")
    summary = {system: speed_summary(system_runs) for system, system_runs in runs.items()}
    ratios = {kind: {key: summary[f"r3jax-{kind}"][key] / summary[f"trl-{kind}"][key]
                     for key in ("rollout_s", "update_s", "step_s")} for kind in ("grpo", "ppo")}
    ppo_over_tunix = summary["r3jax-ppo"]["step_s"] / summary["tunix-ppo"]["step_s"]
    # every round after the first finds the programs of the rounds before it kept
    first_warm = float(np.median(summary["r3jax-grpo"]["first_step_s"][1:])) / summary["r3jax-grpo"]["step_s"]
    bare = bare_steps()
    bound = ppo_update_bound(summary, runs["r3jax-ppo"])
    write("peers", {
        "machine": machine_info(), "trl": peer_versions("trl"), "tunix": peer_versions("tunix"),
        "grpo": {"temperature": temperature, "lr": lr, **SHARED, "model": "the main job's SFT model",
                 "model_sha256": weights_sha256(sft)},
        "ppo": {"model": "bench/ppo_step.py's SMALL Llama (3.95M), random weights", "batch": 16, "prompt": 64,
                "new_tokens": 64, "epochs": 2, "critic": "separate",
                "trl_extra": "TRL also runs a reward model forward (r3jax's PPO step here scores nothing)",
                "tunix": "PPOLearner, a random reward function, step_s only (the time between its reward calls); "
                         "its critic takes and drops segment_ids (google/tunix#1539, bench/peer_tunix.py:Critic)"},
        "steps_per_run": args.steps, "rounds": args.rounds, "median_steady": summary, "r3jax_over_trl": ratios,
        "r3jax_over_tunix": {"ppo": {"step_s": ppo_over_tunix}},
        "r3jax_grpo_first_step_warm_cache_over_steady": first_warm, "bare_train_step": bare,
        "ppo_update_bound": bound, "runs": runs})
    for kind, ratio in ratios.items():
        for key, value in ratio.items():
            print(f"{kind} {key}: r3jax {summary[f'r3jax-{kind}'][key]:.3f} s, TRL {summary[f'trl-{kind}'][key]:.3f} s, "
                  f"ratio {value:.2f}")
    print(f"ppo step_s: r3jax {summary['r3jax-ppo']['step_s']:.3f} s, Tunix {summary['tunix-ppo']['step_s']:.3f} s, "
          f"ratio {ppo_over_tunix:.2f}")
    print(f"bare forward + backward + AdamW: JAX {bare['median_s']['jax']:.3f} s, PyTorch {bare['median_s']['torch']:.3f} s, "
          f"ratio {bare['jax_over_torch']:.2f}")
    for name in ("measured", "for_0.6x_trl", "for_0.5x_tunix"):
        print(f"ppo update {name}: {bound[name]['update_s']:.3f} s, {bound[name]['gflop_per_s']:.0f} GFLOP/s, "
              f"{bound[name]['over_matmul']:.2f}x an fp32 2048^3 matmul's {bound['matmul_2048_fp32_gflop_per_s']:.0f}")
    print(f"ppo update: {bound['cpu_over_wall']:.2f} cores busy (CPU s over wall s)")
    print(f"r3jax's first GRPO step with a warm cache: {first_warm:.2f}x a steady step (device {device_name()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("learning", "speed"))
    parser.add_argument("--sft", help="the SFT model (HF directory); default: made by the main job's SFT phase")
    parser.add_argument("--settings", nargs="+", default=["1.3:3e-5", "1.0:1e-5"], help="temperature:lr")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (learning 200, speed 30)")
    parser.add_argument("--out", default="peers-learning", help="learning: bench/results/OUT.json and .png")
    parser.add_argument("--rounds", type=int, default=3,
                        help="speed: interleaved rounds per system (the first compiles cold, the rest warm; >= 2)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: speed needs a cold round and at least one warm one")
    args.steps = args.steps or (200 if args.what == "learning" else 30)
    {"learning": learning, "speed": speed}[args.what](args)


if __name__ == "__main__":
    main()
