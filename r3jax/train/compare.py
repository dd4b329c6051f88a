"""The paper's comparison from one SFT checkpoint under one RL budget: outcome-only RL, staged RL
and R^3 (mixed), each with the paper's PPO or a critic-free estimator (`<arm>-<estimator>`),
several seeds each, and SFT continued for as many updates as the RL arms get.

Accuracy at k = 0 on the test split, read once at the end: greedy with a 95% interval (a
bootstrap over problems and seeds) per arm and for the differences between arms (paired on the
same problems), by chain length; single-sample accuracy at the RL temperature and pass@k on a
subset. Before any RL, the premise table: the SFT model's success at the RL temperature per chain
length and start stage, on the validation split.
"""
from __future__ import annotations

import collections
import os
import sys

import jax
import numpy as np

from r3jax import curriculum, files, rollout as rollout_lib, sharding, stats, workdir as workdir_lib
from r3jax.checkpoint import StopSignal
from r3jax.config import ARMS
from r3jax.evaluate import evaluate
from r3jax.metrics import machine_info, read_jsonl
from r3jax.sampling import SamplingConfig
from r3jax.tasks import Task
from r3jax.train import job, rl, sft

DIFFERENCES = (("r3", "sft"), ("r3", "rl"), ("r3", "staged"), ("r3", "sft_continued"), ("staged", "rl"))


def arm_parts(arm: str) -> tuple[str, str]:
    """`r3-grpo` -> ("r3", "grpo"); a bare arm is the paper's PPO (`gae`)."""
    strategy, _, estimator = arm.partition("-")
    return strategy, estimator or "gae"


def difference_pairs(arms) -> list[tuple[str, str]]:
    """DIFFERENCES, then the strategy-against-strategy ones again within each further estimator
    among `arms` (`r3-grpo` vs `rl-grpo`)."""
    estimators = dict.fromkeys(arm_parts(arm)[1] for arm in arms if arm_parts(arm)[1] != "gae")
    return list(DIFFERENCES) + [(f"{first}-{estimator}", f"{second}-{estimator}") for estimator in estimators
                                for first, second in DIFFERENCES if first in ARMS and second in ARMS]


def premise_table(model_cfg, params, tokenizer, task: Task, demos, config, mesh) -> dict[str, dict[str, float]]:
    """The SFT model's success rate at the RL temperature from every start stage, per chain
    length: {"steps_n": {"stage_j": rate}}. R^3's premise: low from stage 0 on long chains, high
    from the last stage."""
    c = config.rl
    states = rollout_lib.tokenize_states(tokenizer, task, [
        s for demo in demos for s in curriculum.start_states(task, demo, c.num_start_states or None)])
    settings = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                              stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    outcomes = collections.defaultdict(list)
    size = config.eval.batch_size
    for start in range(0, len(states), size):
        chunk = states[start:start + size]
        _, texts = rollout_lib.generate(model_cfg, params, tokenizer, chunk, settings,
                                        jax.random.fold_in(jax.random.key(config.seed), start), mesh, rows=size)
        scores = task.score_batch([s.given + t for s, t in zip(chunk, texts)], [s.demo.answer for s in chunk])
        for state, score in zip(chunk, scores):
            outcomes[(dict(state.demo.meta).get("num_steps", state.num_steps), state.stage)].append(score.correct)
    table: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (length, stage), values in sorted(outcomes.items()):
        table[f"steps_{length}"][f"stage_{stage}"] = float(np.mean(values))
    return dict(table)


def evaluate_model(model_cfg, params, tokenizer, task: Task, test_demos, config, mesh) -> dict:
    """Greedy per-problem correctness on the test problems, and on the first
    compare.sample_problems of them `compare.samples` samples each at the RL temperature:
    single-sample accuracy and pass@k."""
    report, records = evaluate(model_cfg, params, tokenizer, task, test_demos, mesh, config.eval.batch_size,
                               config.eval.max_new_tokens, desc="test")
    result = {"report": report, "correct": [float(r["correct"]) for r in records]}
    k = config.compare.samples
    if k:
        sampled, sample_records = evaluate(
            model_cfg, params, tokenizer, task, test_demos[:config.compare.sample_problems], mesh,
            config.eval.batch_size, config.eval.max_new_tokens, desc=f"test, {k} samples", maj_k=k,
            temperature=config.rl.temperature)
        right = [sum(task.score_answer(p, r["answer"]).correct for p in r["predictions"]) for r in sample_records]
        result.update(sample_accuracy=sampled["sample_accuracy"],
                      pass_at_k=float(np.mean([stats.pass_at_k(k, c, k) for c in right])))
    return result


def unit_dir(config, out: str, *parts) -> str:
    """`<out>/<parts>-<hash>`: a unit of the comparison, named by every config value that defines
    it (the arms, seeds and tuning grid of the whole comparison aside), so a changed setting never
    reuses it."""
    return os.path.join(out, "-".join(map(str, parts)) + "-" + workdir_lib.unit_key(
        config, *parts, ignore=("compare.seeds", "compare.arms", *TUNED_KEYS, "mode")))


TUNED_KEYS = ("compare.tune_lr", "compare.tune_kl_coef", "compare.tune_continued_lr")


def tuning_trials(config) -> list[dict[str, float]]:
    """The RL settings every RL arm is tried with: compare.tune_lr x compare.tune_kl_coef, each
    defaulting to the config's own value, as {dotted key: value}."""
    return [{"rl.lr": lr, "rl.kl_coef": kl_coef} for lr in config.compare.tune_lr or (config.rl.lr,)
            for kl_coef in config.compare.tune_kl_coef or (config.rl.kl_coef,)]


def continued_trials(config) -> list[dict[str, float]]:
    """The learning rates SFT-continued is tried with (compare.tune_continued_lr)."""
    return [{"compare.continued_lr": lr} for lr in config.compare.tune_continued_lr or (config.compare.continued_lr,)]


def training_trend(run_dir: str) -> dict[str, float] | None:
    """Whether RL moved what it optimises: the unit's training reward over the first and the last
    third of its steps, and its KL to the reference over the last third; None without an RL log."""
    path = os.path.join(run_dir, "rl.jsonl")
    if not os.path.exists(path):
        return None
    records = read_jsonl(path)
    third = max(1, len(records) // 3)
    first, last = records[:third], records[-third:]
    return {"reward_first_third": float(np.mean([r["reward"] for r in first])),
            "reward_last_third": float(np.mean([r["reward"] for r in last])),
            "kl_last_third": float(np.mean([r["kl"] for r in last]))}


TRIAL_RESULTS = ("validation_accuracy", "training")  # a tuning record's outcome; the rest is its settings


def trial_settings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TRIAL_RESULTS}


def with_settings(config, settings: dict):
    """A copy of `config` with {dotted key: value} applied."""
    changed = config.copy_and_resolve_references()
    for key, value in settings.items():
        section, name = key.split(".")
        changed[section][name] = value
    return changed


def _cached(path: str, compute) -> dict:
    """A finished unit of the comparison: read it back, or compute and store it (process 0)."""
    if os.path.exists(path):
        return files.read_json(path, "delete it to recompute that unit")
    result = compute()
    if result is not None and sharding.is_primary():
        files.write_json(path, result, indent=None)
    return result


def summarise(runs: list[dict], lengths: list) -> dict:
    """An arm over its seeds: mean and 95% interval of greedy accuracy, per-seed values, per chain
    length, and the sampled metrics."""
    correct = np.array([run["correct"] for run in runs])
    interval = stats.bootstrap(correct)
    by_length = {}
    for length in sorted(set(lengths)):
        columns = np.array(lengths) == length
        by_length[str(length)] = stats.bootstrap(correct[:, columns])._asdict()
    summary = {"mean": interval.mean, "ci95": [interval.lo, interval.hi],
               "seeds": [float(np.mean(c)) for c in correct], "by_steps": by_length,
               "tokens_sampled": [run["report"].get("tokens_sampled") for run in runs],
               "rl_steps": [run["report"].get("steps") for run in runs]}
    for key in ("sample_accuracy", "pass_at_k"):
        if key in runs[0]:
            summary[key] = float(np.mean([run[key] for run in runs]))
    return summary


def markdown(summary: dict) -> str:
    """The comparison as markdown tables: arms, differences, premise."""
    arms, lengths = summary["arms"], sorted({k for arm in summary["arms"].values() for k in arm["by_steps"]}, key=int)
    lines = [f"Test accuracy at k = 0, greedy, {summary['num_test_problems']} {summary['split']} problems; "
             "95% intervals from a bootstrap over problems and seeds.", "",
             "| arm | accuracy [95% interval] | per seed | " + " | ".join(f"{n} steps" for n in lengths)
             + " | one sample | pass@k | RL steps |", "|---" * (len(lengths) + 6) + "|"]
    for name, arm in arms.items():
        steps = [f"{arm['by_steps'][n]['mean']:.3f}" if n in arm["by_steps"] else "" for n in lengths]
        rl_steps = [s for s in arm.get("rl_steps", []) if s is not None]
        lines.append(f"| {name} | {arm['mean']:.3f} [{arm['ci95'][0]:.3f}, {arm['ci95'][1]:.3f}] | "
                     + ", ".join(f"{v:.3f}" for v in arm["seeds"]) + " | " + " | ".join(steps)
                     + f" | {arm.get('sample_accuracy', float('nan')):.3f} | {arm.get('pass_at_k', float('nan')):.3f} | "
                     + (f"{min(rl_steps)}-{max(rl_steps)}" if rl_steps else "") + " |")
    lines += ["", "| difference | mean [95% interval] | verdict |", "|---|---|---|"]
    for name, difference in summary["differences"].items():
        lo, hi = difference["ci95"]
        verdict = stats.verdict(stats.Interval(difference["mean"], lo, hi))
        lines.append(f"| {name.replace('_vs_', ' - ')} | {difference['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {verdict} |")
    if summary.get("tuning"):
        lines += ["", f"Tuning, greedy accuracy on the validation split (seed {summary['protocol']['seeds'][0]}); "
                  "each arm's seeds ran its best trial. Training reward over the first and the last third "
                  "of the trial's RL steps, and its KL to the reference over the last third:", "",
                  "| arm | trial | validation accuracy | training reward | KL |", "|---|---|---|---|---|"]
        for name, arm_trials in summary["tuning"].items():
            best = max(arm_trials, key=lambda t: t["validation_accuracy"])
            for t in arm_trials:
                trend = t.get("training")
                moved = (f"{trend['reward_first_third']:.3f} → {trend['reward_last_third']:.3f} | "
                         f"{trend['kl_last_third']:.2f}") if trend else " | "
                lines.append(f"| {name} | " + ", ".join(f"{k} = {v:g}" for k, v in trial_settings(t).items())
                             + f" | {t['validation_accuracy']:.3f}" + (" (chosen)" if t is best else "")
                             + f" | {moved} |")
    stages = sorted({s for row in summary["premise"].values() for s in row}, key=lambda s: int(s.rsplit("_", 1)[1]))
    lines += ["", "SFT model's success at the RL temperature, validation split (the premise):", "",
              "| chain | " + " | ".join(s.replace("_", " ") for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for length, row in sorted(summary["premise"].items(), key=lambda item: int(item[0].rsplit("_", 1)[1])):
        lines.append(f"| {length.replace('steps_', '')} steps | " + " | ".join(f"{row.get(s, float('nan')):.2f}"
                                                                          for s in stages) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = summary["arms"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    names = list(arms)
    means = np.array([arms[n]["mean"] for n in names])
    errors = np.abs(np.array([arms[n]["ci95"] for n in names]).T - means)
    for i in range(len(names)):  # points, not bars from 0: the arms differ by a few points
        left.errorbar([i], means[i:i + 1], yerr=errors[:, i:i + 1], fmt="o", capsize=6, color=f"C{i}")
    left.set_xticks(range(len(names)), names)
    left.tick_params(axis="x", labelrotation=30)
    left.set_ylabel("test accuracy (k = 0, greedy)")
    left.set_title(f"arms, 95% intervals ({summary['num_test_problems']} problems)")
    differences = summary["differences"]
    labels = list(differences)
    d_means = np.array([differences[d]["mean"] for d in labels])
    d_errors = np.abs(np.array([differences[d]["ci95"] for d in labels]).T - d_means)
    middle.errorbar(d_means, range(len(labels)), xerr=d_errors, fmt="o", capsize=5)
    middle.axvline(0.0, color="grey", linestyle="--")
    middle.set_yticks(range(len(labels)), labels)
    middle.set_xlabel("accuracy difference (first arm minus second)")
    middle.set_title("differences, paired 95% intervals")
    for name in names:
        steps = sorted(arms[name]["by_steps"], key=int)
        right.plot([int(s) for s in steps], [arms[name]["by_steps"][s]["mean"] for s in steps], marker="o", label=name)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("reasoning steps in the problem")
    right.set_ylabel("accuracy")
    right.set_title("accuracy by chain length")
    right.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)


def continued_sft(config, model_cfg, policy, tokenizer, task: Task, mesh, run_dir: str, updates: int, seed: int,
                  stop: StopSignal):
    """The fair control for "RL helps": the SFT model trained on by SFT for `updates` more steps."""
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.sft.update(steps=updates, data_epochs=0.0, lr=config.compare.continued_lr, schedule="constant",
                 warmup_steps=0, eval_every=0)
    return sft.train(c, model_cfg, policy, tokenizer, task, mesh, run_dir, stop)


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
    lengths = [dict(d.meta).get("num_steps", 0) for d in test_demos]
    out = os.path.join(workdir, "compare")
    evaluation = f"result-{workdir_lib.evaluation_key(config)}.json"
    model_cfg, policy = job.load_policy(sft_dir, config, mesh)
    validation_demos = task.demonstrations("validation")
    premise = _cached(os.path.join(unit_dir(config, out, "premise"), "premise.json"), lambda: premise_table(
        model_cfg, policy, tokenizer, task, validation_demos, config, mesh))
    runs = {"sft": [_cached(os.path.join(unit_dir(config, out, "sft"), evaluation), lambda: evaluate_model(
        model_cfg, policy, tokenizer, task, test_demos, config, mesh))]}

    tuning = {}

    def trained(unit_config, run_dir: str, seed: int, result_name: str, evaluate_params, train):
        """One arm and seed in its unit `run_dir`, trained once by `train(unit_config, seed, run_dir)
        -> (params, report entries) | None` (later calls restore it), evaluated by
        `evaluate_params`, cached under `result_name` there."""

        def train_and_evaluate():
            trained_model = train(unit_config, seed, run_dir)
            if trained_model is None:
                return None
            params, entries = trained_model
            evaluated = evaluate_params(params)
            evaluated["report"].update(entries)
            return evaluated

        return _cached(os.path.join(run_dir, result_name), train_and_evaluate)

    def on_validation(params) -> dict:
        report, _ = evaluate(model_cfg, params, tokenizer, task, validation_demos, mesh, config.eval.batch_size,
                             config.eval.max_new_tokens, desc="validation")
        return {"report": report}

    def on_test(params) -> dict:
        return evaluate_model(model_cfg, params, tokenizer, task, test_demos, config, mesh)

    def tuned_runs(name: str, arm_config, trials: list[dict], unit, train) -> list[dict] | None:
        """Every trial with the first seed, judged by greedy accuracy on the validation split (the
        test set stays unread); then every seed with the best trial, on the test split. `unit(seed)`
        names a run's unit."""
        if len(trials) > 1:
            tuning[name] = []
            for trial in trials:
                trial_config = with_settings(arm_config, trial)
                run_dir = unit_dir(trial_config, out, *unit(config.compare.seeds[0]))
                result = trained(trial_config, run_dir, config.compare.seeds[0], f"validation-{evaluation}",
                                 on_validation, train)
                if result is None:
                    return None
                trend = training_trend(run_dir)
                tuning[name].append({**trial, "validation_accuracy": result["report"]["accuracy"]}
                                    | ({"training": trend} if trend else {}))
            best = max(tuning[name], key=lambda t: t["validation_accuracy"])
            arm_config = with_settings(arm_config, trial_settings(best))
        results = []
        for seed in config.compare.seeds:
            result = trained(arm_config, unit_dir(arm_config, out, *unit(seed)), seed, evaluation, on_test, train)
            if result is None:
                return None
            results.append(result)
        return results

    def train_rl(strategy: str):
        def train(arm_config, seed: int, run_dir: str):
            _, start = job.load_policy(sft_dir, config, mesh)
            result = rl.train(arm_config, model_cfg, start, tokenizer, task, mesh, run_dir, stop,
                              strategy=ARMS[strategy], seed=seed)
            if result is None:
                return None
            return result["params"], {"steps": result["steps"], "tokens_sampled": result["tokens_sampled"],
                                      "optimizer_updates": result["steps"] * config.rl.epochs * config.rl.minibatches}
        return train

    for arm in config.compare.arms:
        strategy, estimator = arm_parts(arm)
        arm_config = with_settings(config, {"rl.estimator": estimator,
                                            "rl.group_size": 1 if estimator == "gae" else config.compare.group_size})
        runs[arm] = tuned_runs(arm, arm_config, tuning_trials(config), lambda seed, arm=arm: (arm, f"seed{seed}"),
                               train_rl(strategy))
        if runs[arm] is None:
            return None

    if config.compare.continued_sft and "r3" in runs:
        updates = round(np.mean([r["report"]["optimizer_updates"] for r in runs["r3"]]))

        def train_continued(arm_config, seed: int, run_dir: str):
            _, start = job.load_policy(sft_dir, config, mesh)
            final_dir = continued_sft(arm_config, model_cfg, start, tokenizer, task, mesh, run_dir, updates, seed, stop)
            if final_dir is None:
                return None
            return job.load_policy(final_dir, config, mesh)[1], {"optimizer_updates": updates}

        runs["sft_continued"] = tuned_runs("sft_continued", config, continued_trials(config),
                                           lambda seed: ("sft_continued", f"seed{seed}", updates), train_continued)
        if runs["sft_continued"] is None:
            return None
    stop.restore()

    arms = {name: summarise(arm_runs, lengths) for name, arm_runs in runs.items()}
    differences = {}
    for first, second in difference_pairs(config.compare.arms):
        if first in runs and second in runs:
            interval = stats.paired_difference(np.array([r["correct"] for r in runs[first]]),
                                               np.array([r["correct"] for r in runs[second]]))
            differences[f"{first}_vs_{second}"] = {"mean": interval.mean, "ci95": [interval.lo, interval.hi]}
    summary = {"num_test_problems": len(test_demos), "split": config.eval.split, "arms": arms,
               "differences": differences, "premise": premise, "tuning": tuning,
               "protocol": {"seeds": list(config.compare.seeds), "selection": "SFT best on the validation split",
                            "tuning_trials_per_arm": len(tuning_trials(config)),
                            "tuning_trials_sft_continued": len(continued_trials(config)), "sampled_metrics_problems": config.compare.sample_problems,
                            "samples_per_problem": config.compare.samples, "sample_temperature": config.rl.temperature,
                            "interval": "95%, bootstrap over problems and seeds; differences paired on problems"},
               "budget": {"sampled_tokens": config.rl.token_budget, "max_rl_steps": config.rl.steps,
                          "completions_per_step": config.rl.batch_size},
               "machine": machine_info(), "command": "python -m r3jax.main " + " ".join(sys.argv[1:])}
    if not sharding.is_primary():
        return summary
    output = config.compare.output or os.path.join(workdir, "compare.json")
    files.write_json(output, summary)
    plot(summary, os.path.splitext(output)[0] + ".png")
    files.write_text(os.path.splitext(output)[0] + ".md", markdown(summary))
    for name, arm in arms.items():
        print(f"{name:14s} {arm['mean']:.3f} [{arm['ci95'][0]:.3f}, {arm['ci95'][1]:.3f}]")
    for name, difference in differences.items():
        print(f"{name:22s} {difference['mean']:+.3f} [{difference['ci95'][0]:+.3f}, {difference['ci95'][1]:+.3f}]")
    print(f"results written to {output}")
    return summary
