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
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from r3jax import (curriculum, files, rollout as rollout_lib, settings as settings_lib, sharding, stats,
                   workdir as workdir_lib)
from r3jax.checkpoint import StopSignal
from r3jax.config import ARMS
from r3jax.evaluate import Problems, evaluate
from r3jax.metrics import machine_info, read_jsonl
from r3jax.rollout import Policy
from r3jax.report import TRIAL_RESULTS, comparison_markdown, comparison_plot, interval_text
from r3jax.tasks import Task
from r3jax.train import job, rl, sft

DIFFERENCES = (("r3", "sft"), ("r3", "rl"), ("r3", "staged"), ("r3", "sft_continued"), ("staged", "rl"),
               ("adaptive", "r3"), ("hint_on_failure", "r3"))


def arm_parts(arm: str, default_estimator: str) -> tuple[str, str]:
    """`r3-grpo` -> ("r3", "grpo"); a bare arm uses `default_estimator` (rl.estimator)."""
    strategy, _, estimator = arm.partition("-")
    return strategy, estimator or default_estimator


def difference_pairs(arms) -> list[tuple[str, str]]:
    """DIFFERENCES, then the strategy-against-strategy ones again within each estimator suffix
    among `arms` (`r3-grpo` vs `rl-grpo`)."""
    estimators = dict.fromkeys(arm_parts(arm, "")[1] for arm in arms if arm_parts(arm, "")[1])
    return list(DIFFERENCES) + [(f"{first}-{estimator}", f"{second}-{estimator}") for estimator in estimators
                                for first, second in DIFFERENCES if first in ARMS and second in ARMS]


def premise_table(policy: Policy, task: Task, demos, config) -> dict[str, dict[str, float]]:
    """The SFT model's success rate at the RL temperature from every start stage, per chain
    length: {"steps_n": {"stage_j": rate}}. R^3's premise: low from stage 0 on long chains, high
    from the last stage."""
    c, (model_cfg, params, tokenizer, mesh) = config.rl, policy
    states = rollout_lib.tokenize_states(tokenizer, task, [
        s for demo in demos for s in curriculum.start_states(task, demo, c.num_start_states or None)])
    settings = rollout_lib.sampling_config(tokenizer, c.max_new_tokens, c.temperature)
    outcomes = collections.defaultdict(list)
    size = config.eval.batch_size
    for start in range(0, len(states), size):
        chunk = states[start:start + size]
        _, texts = rollout_lib.generate(model_cfg, params, tokenizer, chunk, settings,
                                        jax.random.fold_in(jax.random.key(config.seed), start), mesh, rows=size)
        scores = sharding.computed_by_primary(lambda: task.score_batch(
            [s.given + t for s, t in zip(chunk, texts)], [s.demo.answer for s in chunk]))
        for state, score in zip(chunk, scores):
            outcomes[(dict(state.demo.meta).get("num_steps", state.num_steps), state.stage)].append(score.correct)
    table: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (length, stage), values in sorted(outcomes.items()):
        table[f"steps_{length}"][f"stage_{stage}"] = float(np.mean(values))
    return dict(table)


SCORES = {"greedy": "correct", "sample": "sample_correct"}  # compare.metric -> a result's per-problem scores


def evaluate_model(policy: Policy, problems: Problems, config) -> dict:
    """Greedy per-problem correctness on the test `problems` (`correct`), and on the first
    compare.sample_problems of them `compare.samples` samples each at the RL temperature: each
    problem's share of right samples (`sample_correct`), single-sample accuracy and pass@k."""
    report, records = evaluate(policy, problems, desc="test")
    result = {"report": report, "correct": [float(r["correct"]) for r in records]}
    k = config.compare.samples
    if k:
        subset = problems._replace(demos=problems.demos[:config.compare.sample_problems])
        sampled, sample_records = evaluate(policy, subset.sampled(k, config.rl.temperature), desc=f"test, {k} samples")
        right = [sum(problems.task.score_answer(p, r["answer"]).correct for p in r["predictions"])
                 for r in sample_records]
        result.update(sample_correct=[c / k for c in right], sample_accuracy=sampled["sample_accuracy"],
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
    trend = {"reward_first_third": float(np.mean([r["reward"] for r in first])),
             "reward_last_third": float(np.mean([r["reward"] for r in last]))}
    if "kl" in last[0]:  # absent at rl.kl_coef = 0: no reference to measure against
        trend["kl_last_third"] = float(np.mean([r["kl"] for r in last]))
    return trend


CURVE_KEYS = ("reward/stage_0", "hinted_fraction", "start_point/mean_stage")  # an arm's training curves


def training_curves(run_dirs: list[str], budget: int, bins: int = 20) -> dict[str, list[float]]:
    """An arm's training logs over its seeds (`run_dirs`), each CURVE_KEYS entry that they log
    averaged within `bins` equal shares of the token budget (0: of the most tokens a run sampled): {"tokens": [share ends], key: [mean]}.
    Reward at k = 0 is the one training reward that every arm measures on the same start states."""
    records = [record for run_dir in run_dirs for record in read_jsonl(os.path.join(run_dir, "rl.jsonl"))]
    if not records:
        return {}
    budget = budget or max(record["tokens_sampled"] for record in records)  # 0: the run was given steps
    ends = np.linspace(budget / bins, budget, bins)
    sums = collections.defaultdict(lambda: np.zeros(bins))
    counts = collections.defaultdict(lambda: np.zeros(bins))
    for record in records:
        share = min(int(np.searchsorted(ends, record["tokens_sampled"])), bins - 1)
        for key in CURVE_KEYS:
            if key in record:
                sums[key][share] += record[key]
                counts[key][share] += 1
    curves = {key: [float(v) if c else None for v, c in zip(sums[key] / np.maximum(counts[key], 1), counts[key])]
              for key in sums}  # None: no step ended in that share
    return {"tokens": ends.tolist(), **curves} if curves else {}


def trial_settings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TRIAL_RESULTS}


class Trainers(NamedTuple):
    """What the protocol runs, passed in (the real ones: `trainers`; tests pass stubs)."""
    # (unit, its config under a trial, seed, run_dir) -> (params, report entries), None if stopped
    train: Callable[["Unit", Any, int, str], tuple[Any, dict] | None]
    on_validation: Callable[[Any], dict]  # params -> {"report": {"accuracy": ...}}
    on_test: Callable[[Any], dict]  # params -> evaluate_model's result
    premise: Callable[[], dict]  # the SFT model's premise table
    sft_params: Any  # the SFT model: the arms' common start


class Unit(NamedTuple):
    """One arm of the comparison: tried with each of `trials` on validation, then run per seed."""
    name: str  # "r3", "rl-grpo", "sft_continued", ...
    config: Any  # the arm's config, before a trial's settings
    trials: list[dict]  # {dotted key: value} per tuning trial
    strategy: str = ""  # an RL arm's rl.strategy
    continued_updates: int = 0  # > 0: SFT continued for that many updates instead of RL


def rl_units(config) -> list[Unit]:
    """Every RL arm of compare.arms, each with its estimator's settings."""
    units = []
    for arm in config.compare.arms:
        strategy, estimator = arm_parts(arm, config.rl.estimator)
        arm_config = settings_lib.with_changes(config, {
            "rl.estimator": estimator, "rl.group_size": 1 if estimator == "gae" else config.compare.group_size})
        units.append(Unit(arm, arm_config, tuning_trials(config), strategy=ARMS[strategy]))
    return units


def continued_unit(config, updates: int) -> Unit:
    """SFT continued for `updates` optimizer steps: as many as R^3's runs made."""
    return Unit("sft_continued", config, continued_trials(config), continued_updates=updates)


def _unit_path(unit: Unit, config, out: str, seed: int) -> str:
    parts = (unit.name, f"seed{seed}") + ((unit.continued_updates,) if unit.continued_updates else ())
    return unit_dir(config, out, *parts)


def _trained(trainers: Trainers, unit: Unit, unit_config, seed: int, path: str, result_name: str,
             evaluate_params) -> dict | None:
    """One arm and seed, trained once in its unit `path` and evaluated by `evaluate_params`; the
    result cached under `result_name` there."""
    def train_and_evaluate():
        trained_model = trainers.train(unit, unit_config, seed, path)
        if trained_model is None:
            return None
        params, entries = trained_model
        evaluated = evaluate_params(params)
        evaluated["report"].update(entries)
        return evaluated

    return files.cached_json(os.path.join(path, result_name), train_and_evaluate, sharding.is_primary())


def run_unit(unit: Unit, config, out: str, evaluation: str, trainers: Trainers) -> tuple[list[dict], list[dict]] | None:
    """(the test result of every seed, the tuning records): every trial with the first seed,
    judged by greedy accuracy on the validation split (the test set stays unread); then every
    seed with the best trial, on the test split. None when stopped."""
    arm_config, tuning, first_seed = unit.config, [], config.compare.seeds[0]
    if len(unit.trials) > 1:
        for trial in unit.trials:
            trial_config = settings_lib.with_changes(unit.config, trial)
            path = _unit_path(unit, trial_config, out, first_seed)
            result = _trained(trainers, unit, trial_config, first_seed, path, f"validation-{evaluation}",
                              trainers.on_validation)
            if result is None:
                return None
            trend = training_trend(path)
            tuning.append({**trial, "validation_accuracy": result["report"]["accuracy"]}
                          | ({"training": trend} if trend else {}))
        best = max(tuning, key=lambda t: t["validation_accuracy"])
        arm_config = settings_lib.with_changes(unit.config, trial_settings(best))
    results = []
    for seed in config.compare.seeds:
        path = _unit_path(unit, arm_config, out, seed)
        result = _trained(trainers, unit, arm_config, seed, path, evaluation, trainers.on_test)
        if result is None:
            return None
        results.append({**result, "run_dir": path})
    return results, tuning


def differences(runs: dict[str, list[dict]], arms, scores: str = "correct") -> dict[str, dict]:
    """Every difference pair among the arms that ran, on each result's per-problem `scores`,
    paired on the same problems."""
    found = {}
    for first, second in difference_pairs(arms):
        if first in runs and second in runs:
            interval = stats.paired_difference(np.array([r[scores] for r in runs[first]]),
                                               np.array([r[scores] for r in runs[second]]))
            found[f"{first}_vs_{second}"] = {"mean": interval.mean, "ci95": [interval.lo, interval.hi]}
    return found


def primary_results(runs: dict[str, list[dict]], lengths: list, config) -> dict:
    """The arms and their differences on compare.metric; with the sampled metric, greedy accuracy
    on every test problem beside it (`greedy` per arm, `greedy_differences`)."""
    metric = config.compare.metric
    scored = lengths[:config.compare.sample_problems] if metric == "sample" else lengths
    arms = {name: stats.summarise_arm(arm_runs, scored, SCORES[metric]) for name, arm_runs in runs.items()}
    for name, arm_runs in runs.items():
        curves = training_curves([r["run_dir"] for r in arm_runs if "run_dir" in r], config.rl.token_budget)
        if curves:
            arms[name]["training"] = curves
    found = {"metric": metric, "num_test_problems": len(scored), "arms": arms,
             "differences": differences(runs, config.compare.arms, SCORES[metric])}
    if metric != "greedy":
        for name, arm_runs in runs.items():
            greedy = stats.bootstrap(np.array([r["correct"] for r in arm_runs]))
            arms[name]["greedy"] = {"mean": greedy.mean, "ci95": [greedy.lo, greedy.hi]}
        found.update(greedy_problems=len(lengths), greedy_differences=differences(runs, config.compare.arms))
    return found


def protocol(config, out: str, trainers: Trainers, lengths: list) -> dict | None:
    """The comparison's results (compare.json's content but the machine and command) from the
    units under `out`, trained and evaluated by `trainers`; None when stopped. `lengths`: the
    chain length of each test problem."""
    evaluation = f"result-{workdir_lib.evaluation_key(config)}.json"
    premise = files.cached_json(os.path.join(unit_dir(config, out, "premise"), "premise.json"), trainers.premise,
                                sharding.is_primary())
    sft_result = files.cached_json(os.path.join(unit_dir(config, out, "sft"), evaluation),
                                   lambda: trainers.on_test(trainers.sft_params), sharding.is_primary())
    runs, tuning = {"sft": [sft_result]}, {}
    units = rl_units(config)
    while units:
        unit = units.pop(0)
        outcome = run_unit(unit, config, out, evaluation, trainers)
        if outcome is None:
            return None
        runs[unit.name], trials = outcome
        if len(unit.trials) > 1:
            tuning[unit.name] = trials
        if unit.name == "r3" and config.compare.continued_sft:
            updates = round(np.mean([r["report"]["optimizer_updates"] for r in runs["r3"]]))
            units.append(continued_unit(config, updates))
    return {**primary_results(runs, lengths, config), "split": config.eval.split, "premise": premise, "tuning": tuning,
            "protocol": {"seeds": list(config.compare.seeds), "selection": "SFT best on the validation split",
                         "tuning_trials_per_arm": len(tuning_trials(config)),
                         "tuning_trials_sft_continued": len(continued_trials(config)),
                         "sampled_metrics_problems": config.compare.sample_problems,
                         "samples_per_problem": config.compare.samples, "sample_temperature": config.rl.temperature,
                         "interval": "95%, bootstrap over problems and seeds; differences paired on problems"},
            "budget": {"sampled_tokens": config.rl.token_budget, "max_rl_steps": config.rl.steps,
                       "completions_per_step": config.rl.batch_size}}


def continued_sft(config, start: Policy, task: Task, run_dir: str, updates: int, stop: StopSignal) -> str | None:
    """The fair control for "RL helps": the SFT model trained on by SFT for `updates` more steps
    (with config.seed and compare.continued_lr)."""
    continued = settings_lib.with_changes(config, {
        "sft.steps": updates, "sft.data_epochs": 0.0, "sft.lr": config.compare.continued_lr,
        "sft.schedule": "constant", "sft.warmup_steps": 0, "sft.eval_every": 0})
    return sft.train(settings_lib.of(continued), start, task, run_dir, stop)


def trainers(settings: settings_lib.Settings, workdir: str, task: Task, mesh,
             stop: StopSignal) -> tuple[Trainers, list] | None:
    """The real trainers and evaluator of the comparison, from the SFT model (trained here first
    unless rl.init names one), and the test problems' chain lengths; None when stopped."""
    config = settings.config
    tokenizer = job.build_tokenizer(config, task, workdir)
    sft_dir = config.rl.init or sft.train(settings, job.build_model(config, tokenizer, mesh), task, workdir, stop)
    if sft_dir is None:
        return None
    problems = job.test_problems(settings, task)
    sft_model = job.load_policy(sft_dir, config, tokenizer, mesh)
    validation = problems._replace(demos=task.demonstrations("validation"))
    if config.compare.metric == "sample":
        validation = validation.sampled(config.compare.samples, config.rl.temperature)
    validation_key = "sample_accuracy" if config.compare.metric == "sample" else "accuracy"

    def train(unit: Unit, unit_config, seed: int, run_dir: str):
        start = job.with_adapters(config, job.load_policy(sft_dir, config, tokenizer, mesh))  # fresh buffers: training donates them
        run_config = settings_lib.with_changes(
            unit_config, {"seed": seed} | ({"rl.strategy": unit.strategy} if unit.strategy else {}))
        if unit.continued_updates:
            final_dir = continued_sft(run_config, start, task, run_dir, unit.continued_updates, stop)
            return None if final_dir is None else (job.load_policy(final_dir, config, tokenizer, mesh).params,
                                                   {"optimizer_updates": unit.continued_updates})
        result = rl.train(settings_lib.of(run_config), start, task, run_dir, stop)
        if result is None:
            return None
        return result["params"], {"steps": result["steps"], "tokens_sampled": result["tokens_sampled"],
                                  "optimizer_updates": result["steps"] * config.rl.epochs * config.rl.minibatches}

    return Trainers(
        train=train,
        on_validation=lambda params: {"report": {"accuracy": evaluate(sft_model.with_params(params), validation,
                                                                      "validation")[0][validation_key]}},
        on_test=lambda params: evaluate_model(sft_model.with_params(params), problems, config),
        premise=lambda: premise_table(sft_model, task, validation.demos, config),
        sft_params=sft_model.params), [dict(d.meta).get("num_steps", 0) for d in problems.demos]


def run(settings: settings_lib.Settings, workdir: str, task: Task, mesh) -> dict | None:
    """The comparison in `workdir`: compare.json, .md and .png (process 0); None when stopped."""
    stop = StopSignal()
    config = settings.config
    built = trainers(settings, workdir, task, mesh, stop)
    summary = built and protocol(config, os.path.join(workdir, "compare"), *built)
    if summary is None:
        return None
    stop.restore()
    summary.update(machine=machine_info(), command="python -m r3jax.main " + " ".join(sys.argv[1:]))
    if not sharding.is_primary():
        return summary
    output = config.compare.output or os.path.join(workdir, "compare.json")
    files.write_json(output, summary)
    comparison_plot(summary, os.path.splitext(output)[0] + ".png")
    files.write_text(os.path.splitext(output)[0] + ".md", comparison_markdown(summary))
    for name, arm in summary["arms"].items():
        print(f"{name:14s} {interval_text(arm['mean'], *arm['ci95'])}")
    for name, difference in summary["differences"].items():
        print(f"{name:22s} {interval_text(difference['mean'], *difference['ci95'], signed=True)}")
    print(f"results written to {output}")
    return summary
