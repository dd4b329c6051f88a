"""The paper's comparison from one SFT checkpoint under one RL budget: outcome-only RL, staged RL
and R^3 (mixed), several seeds each; accuracy at k = 0 overall and by number of reasoning steps."""
from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np

from r3jax import sharding
from r3jax.checkpoint import StopSignal
from r3jax.config import ARMS
from r3jax.evaluate import evaluate
from r3jax.metrics import machine_info
from r3jax.tasks import Task
from r3jax.train import job, rl, sft


def summarise(reports: list[dict]) -> dict:
    accuracies = [r["accuracy"] for r in reports]
    steps = sorted({k for r in reports for k in r if k.startswith("accuracy/steps_")},
                   key=lambda k: int(k.rsplit("_", 1)[1]))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "seeds": accuracies,
            "by_steps": {k.rsplit("_", 1)[1]: float(np.mean([r[k] for r in reports])) for k in steps},
            "tokens_sampled": [r.get("tokens_sampled") for r in reports],
            "rl_steps": [r.get("steps") for r in reports]}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = summary["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(arms)
    left.bar(names, [arms[n]["mean"] for n in names], yerr=[arms[n]["std"] for n in names], capsize=6,
             color=[f"C{i}" for i in range(len(names))])
    left.tick_params(axis="x", labelrotation=30)
    left.set_ylabel("test accuracy (k = 0, greedy)")
    left.set_title("mean ± std over seeds")
    for name in names:
        steps = sorted(arms[name]["by_steps"], key=int)
        right.plot([int(s) for s in steps], [arms[name]["by_steps"][s] for s in steps], marker="o", label=name)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("reasoning steps in the problem")
    right.set_ylabel("accuracy")
    right.set_title("accuracy by chain length")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, workdir: str, task: Task, mesh) -> dict | None:
    stop = StopSignal()
    tokenizer = job.build_tokenizer(config, task, workdir)
    model_cfg, params = job.build_model(config, tokenizer, mesh)
    sft_dir = config.rl.init or sft.train(config, model_cfg, params, tokenizer, task, mesh, workdir, stop)
    if sft_dir is None:
        return None
    test_demos = task.demonstrations(config.eval.split)
    if config.eval.num_examples:
        test_demos = test_demos[:config.eval.num_examples]
    model_cfg, policy = job.load_policy(sft_dir, config, mesh)
    sft_report, _ = evaluate(policy, model_cfg, tokenizer, task, test_demos, mesh, config.eval.batch_size,
                             config.eval.max_new_tokens, desc="SFT test")
    arms = {"sft": summarise([sft_report])}
    for estimator, arm in itertools.product(config.compare.estimators, config.compare.arms):
        name = arm if estimator == "gae" else f"{arm}-{estimator}"
        arm_config = config.copy_and_resolve_references()
        arm_config.rl.estimator = estimator
        arm_config.rl.group_size = 1 if estimator == "gae" else config.compare.group_size
        reports = []
        for seed in config.compare.seeds:
            run_dir = os.path.join(workdir, "compare", f"{name}-seed{seed}")
            done_file = os.path.join(run_dir, "report.json")
            if os.path.exists(done_file):
                with open(done_file) as f:
                    reports.append(json.load(f))
                continue
            model_cfg, policy = job.load_policy(sft_dir, config, mesh)
            result = rl.train(arm_config, model_cfg, policy, tokenizer, task, mesh, run_dir, stop,
                              strategy=ARMS[arm], seed=seed)
            if result is None:
                return None
            reports.append(result["report"])
            if sharding.is_primary():
                with open(done_file, "w") as f:
                    json.dump(result["report"], f, indent=2)
        arms[name] = summarise(reports) | {"estimator": estimator, "group_size": arm_config.rl.group_size}
    stop.restore()
    summary = {"arms": arms,
               "budget": {"sampled_tokens": config.rl.token_budget, "max_rl_steps": config.rl.steps,
                          "prompts_per_step": config.rl.batch_size},
               "sft_checkpoint": "one SFT model shared by all arms; its std is 0 by construction",
               "test_examples": len(test_demos), "machine": machine_info(),
               "command": "python -m r3jax.main " + " ".join(sys.argv[1:])}
    if not sharding.is_primary():
        return summary
    output = config.compare.output
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(summary, f, indent=2)
    plot(summary, os.path.splitext(output)[0] + ".png")
    for name, arm in arms.items():
        print(f"{name:7s} {arm['mean']:.3f} ± {arm['std']:.3f}  by steps: "
              + " ".join(f"{k}:{v:.2f}" for k, v in arm["by_steps"].items()))
    return summary
