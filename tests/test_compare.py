"""The comparison's protocol in-process with stub trainers (seconds, not minutes): its units,
the cache that a rerun reuses, the tuning choice on validation, every difference pair, and the
markdown and plot of the report."""
import json
import math
import os
import zlib

import numpy as np
import pytest

from r3jax import config as config_lib, report
from r3jax.train import compare

PROBLEMS = 24
SAMPLED = 12  # compare.sample_problems
BEST_LR, BEST_CONTINUED_LR = 3e-5, 1e-4


def _config():
    c = config_lib.base_config()
    c.mode = "compare"
    c.rl.batch_size = 8
    c.compare.update(seeds=(0, 1, 2), arms=("rl", "staged", "r3", "adaptive", "rl-grpo", "r3-grpo"), tune_lr=(1e-5, 3e-5, 1e-4),
                     tune_continued_lr=(3e-5, 1e-4), samples=2, sample_problems=SAMPLED)
    return c


class Stubs:
    """Trainers whose models are their settings: validation accuracy peaks at BEST_LR (or
    BEST_CONTINUED_LR), and test correctness is a fixed draw per arm and seed."""

    def __init__(self):
        self.trained, self.tested = [], []

    def train(self, unit, unit_config, seed, run_dir):
        self.trained.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        lr = unit_config.compare.continued_lr if unit.continued_updates else unit_config.rl.lr
        if not unit.continued_updates:  # an RL log for the tuning record's training trend
            with open(os.path.join(run_dir, "rl.jsonl"), "w") as f:
                f.writelines(json.dumps({"step": s, "reward": 0.1 * s, "kl": 0.01, "tokens_sampled": 80 * s,
                                         "reward/stage_0": 0.05 * s + seed}) + "\n" for s in range(1, 7))
        params = {"name": unit.name, "lr": lr, "seed": seed, "strategy": unit.strategy,
                  "estimator": unit_config.rl.estimator, "group_size": unit_config.rl.group_size}
        entries = ({"optimizer_updates": unit.continued_updates} if unit.continued_updates
                   else {"steps": 5, "tokens_sampled": 400, "optimizer_updates": 10})
        return params, entries

    @staticmethod
    def on_validation(params):
        best = BEST_CONTINUED_LR if params["name"] == "sft_continued" else BEST_LR
        return {"report": {"accuracy": 0.9 - abs(math.log10(params["lr"] / best)) / 10}}

    def on_test(self, params):
        self.tested.append(params)
        rng = np.random.default_rng(zlib.crc32(f"{params['name']}-{params.get('seed')}".encode()))
        correct = (rng.random(PROBLEMS) < 0.7).astype(float)
        sample_correct = rng.integers(0, 3, SAMPLED) / 2  # 2 samples per problem: 0, 1/2 or 1 right
        return {"report": {"accuracy": float(correct.mean())}, "correct": correct.tolist(),
                "sample_correct": sample_correct.tolist(), "sample_accuracy": float(sample_correct.mean()),
                "pass_at_k": 0.6}

    @staticmethod
    def premise():
        return {"steps_2": {"stage_0": 0.4, "stage_1": 0.9}, "steps_3": {"stage_0": 0.2, "stage_1": 0.8}}

    def trainers(self):
        return compare.Trainers(self.train, self.on_validation, self.on_test, self.premise, {"name": "sft"})


def _run(tmp_path, stubs, config=None):
    lengths = [2 + i % 2 for i in range(PROBLEMS)]
    return compare.protocol(config or _config(), str(tmp_path / "compare"), stubs.trainers(), lengths)


def test_every_arm_is_tuned_on_validation_then_run_per_seed(tmp_path):
    stubs = Stubs()
    summary = _run(tmp_path, stubs)
    arms = ("rl", "staged", "r3", "adaptive", "rl-grpo", "r3-grpo")
    assert list(summary["arms"]) == ["sft", *arms, "sft_continued"]
    for arm in arms:  # 3 trials on seed 0, then seeds 1 and 2 with the best; seed 0's best unit is reused
        units = {os.path.basename(d).rsplit("-", 1)[0] for d in stubs.trained if os.path.basename(d).startswith(f"{arm}-seed")}
        assert units == {f"{arm}-seed0", f"{arm}-seed1", f"{arm}-seed2"}
        assert len({d for d in stubs.trained if os.path.basename(d).startswith(f"{arm}-seed0")}) == 3
        chosen = max(summary["tuning"][arm], key=lambda t: t["validation_accuracy"])
        assert chosen["rl.lr"] == BEST_LR and [t["rl.lr"] for t in summary["tuning"][arm]] == [1e-5, 3e-5, 1e-4]
        assert summary["tuning"][arm][0]["training"] == {"reward_first_third": pytest.approx(0.15),
                                                         "reward_last_third": pytest.approx(0.55),
                                                         "kl_last_third": pytest.approx(0.01)}
    tested = [p for p in stubs.tested if p["name"] != "sft"]
    assert all(p["lr"] == (BEST_CONTINUED_LR if p["name"] == "sft_continued" else BEST_LR) for p in tested)
    assert sorted((p["name"], p["seed"]) for p in tested) == sorted((a, s) for a in (*arms, "sft_continued")
                                                                    for s in (0, 1, 2))
    grpo = [p for p in tested if p["name"].endswith("-grpo")]
    assert {(p["estimator"], p["group_size"]) for p in grpo} == {("grpo", 4)}
    assert {p["strategy"] for p in tested if p["name"].startswith("r3")} == {"mixed"}
    assert {p["strategy"] for p in tested if p["name"].startswith("rl")} == {"outcome"}
    assert {p["strategy"] for p in tested if p["name"] == "adaptive"} == {"adaptive"}
    continued = [d for d in stubs.trained if "sft_continued" in d]
    assert all(os.path.basename(d).split("-")[2] == "10" for d in continued)  # as many updates as R^3 made
    assert summary["protocol"]["tuning_trials_per_arm"] == 3 and summary["protocol"]["tuning_trials_sft_continued"] == 2


def test_each_rl_arm_has_its_training_reward_at_k0_over_the_budget(tmp_path):
    """Reward at k = 0 averaged over seeds within equal shares of the token budget; the stub logs
    0.05 * step + seed at 80 tokens a step, so with 6 shares of 480 tokens share i holds step i + 1."""
    c = _config()
    c.rl.token_budget = 480
    c.compare.update(arms=("r3",), tune_lr=(), tune_continued_lr=())
    assert compare.training_curves([str(tmp_path / "no-log")], 0) == {}
    summary = _run(tmp_path, Stubs(), c)
    assert "training" not in summary["arms"]["sft"] and "training" not in summary["arms"]["sft_continued"]
    r3 = summary["arms"]["r3"]["training"]
    assert len(r3["tokens"]) == 20 and r3["tokens"][-1] == 480
    stubs = Stubs()
    run_dirs = [str(tmp_path / f"run{seed}") for seed in (0, 1, 2)]
    for seed, run_dir in enumerate(run_dirs):
        stubs.train(compare.Unit("r3", c, []), c, seed, run_dir)
    curves = compare.training_curves(run_dirs, 480, bins=6)
    assert curves["tokens"] == [80, 160, 240, 320, 400, 480]
    assert curves["reward/stage_0"] == pytest.approx([0.05 * step + 1 for step in range(1, 7)])
    assert set(curves) == {"tokens", "reward/stage_0"}


def test_a_rerun_reuses_every_unit(tmp_path):
    first = _run(tmp_path, Stubs())
    again = Stubs()
    assert _run(tmp_path, again) == first and again.trained == [] and again.tested == []


def test_every_difference_pair_is_paired_on_problems(tmp_path):
    summary = _run(tmp_path, Stubs())
    assert list(summary["differences"]) == [
        "r3_vs_sft", "r3_vs_rl", "r3_vs_staged", "r3_vs_sft_continued", "staged_vs_rl", "adaptive_vs_r3",
        "r3-grpo_vs_rl-grpo"]
    arms = summary["arms"]
    for name, difference in summary["differences"].items():
        first, second = name.split("_vs_")
        assert difference["mean"] == pytest.approx(arms[first]["mean"] - arms[second]["mean"])
        assert difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]


def test_a_single_trial_is_not_a_tuning_and_a_stop_returns_none(tmp_path):
    c = _config()
    c.compare.update(tune_lr=(), tune_continued_lr=(), arms=("r3",), seeds=(0,))
    summary = _run(tmp_path, Stubs(), c)
    assert summary["tuning"] == {} and list(summary["arms"]) == ["sft", "r3", "sft_continued"]
    stopped = Stubs()
    stopped.train = lambda *args: None
    assert _run(tmp_path / "stopped", stopped, c) is None


def test_the_report_shows_every_arm_difference_trial_and_the_premise(tmp_path):
    summary = _run(tmp_path, Stubs())
    summary["machine"], summary["command"] = {}, "python -m r3jax.main"
    text = report.comparison_markdown(summary)
    for arm in summary["arms"]:
        assert f"| {arm} | {report.interval_text(summary['arms'][arm]['mean'], *summary['arms'][arm]['ci95'])} |" in text
    assert "| r3-grpo - rl-grpo |" in text and "| r3 - sft |" in text
    assert text.count("(chosen)") == 7 and "| 2 steps | 0.40 | 0.90 |" in text
    report.comparison_plot(summary, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_interval_texts_are_hand_worked():
    assert report.interval_text(0.8766, 0.8425, 0.91) == "0.877 [0.843, 0.910]"
    assert report.interval_text(0.0, -0.017, 0.017, signed=True) == "+0.000 [-0.017, +0.017]"


def test_the_sampled_primary_metric_ranks_arms_with_greedy_beside_it(tmp_path):
    """compare.metric = sample: arms and differences on each problem's share of right samples over
    the first compare.sample_problems, greedy on every problem beside them; bare arms take
    rl.estimator."""
    c = _config()
    c.rl.estimator = "grpo"
    c.compare.update(metric="sample", arms=("rl", "r3", "hint_on_failure"), tune_lr=(), tune_continued_lr=())
    stubs = Stubs()
    summary = _run(tmp_path, stubs, c)
    assert summary["metric"] == "sample" and summary["num_test_problems"] == SAMPLED
    assert summary["greedy_problems"] == PROBLEMS
    tested = {(p["name"], p["seed"]): p for p in stubs.tested if p["name"] != "sft"}
    assert {(p["estimator"], p["group_size"]) for p in tested.values() if p["name"] != "sft_continued"} == {("grpo", 4)}
    results = {name: [stubs.on_test(tested[(name, seed)]) for seed in (0, 1, 2)] for name in ("r3", "hint_on_failure")}
    for name, runs in results.items():
        assert summary["arms"][name]["mean"] == pytest.approx(np.mean([r["sample_correct"] for r in runs]))
        assert summary["arms"][name]["greedy"]["mean"] == pytest.approx(np.mean([r["correct"] for r in runs]))
    assert set(summary["arms"]["r3"]["by_steps"]) == {"2", "3"}
    assert list(summary["differences"]) == list(summary["greedy_differences"]) == [
        "r3_vs_sft", "r3_vs_rl", "r3_vs_sft_continued", "hint_on_failure_vs_r3"]
    hinted = summary["differences"]["hint_on_failure_vs_r3"]
    assert hinted["mean"] == pytest.approx(summary["arms"]["hint_on_failure"]["mean"] - summary["arms"]["r3"]["mean"])
    greedy = summary["greedy_differences"]["hint_on_failure_vs_r3"]
    assert greedy["mean"] == pytest.approx(summary["arms"]["hint_on_failure"]["greedy"]["mean"]
                                           - summary["arms"]["r3"]["greedy"]["mean"])
    summary["machine"], summary["command"] = {}, "python -m r3jax.main"
    text = report.comparison_markdown(summary)
    assert f"single-sample accuracy at T = {c.rl.temperature:g}, {SAMPLED} test problems" in text
    assert f"Differences, greedy accuracy on all {PROBLEMS} problems:" in text and "| hint_on_failure - r3 |" in text


def test_evaluate_model_scores_each_problem_by_its_share_of_right_samples(monkeypatch):
    """`sample_correct` is per problem the share of its samples that are right; its mean is the
    single-sample accuracy, and pass@k counts a problem with any right sample."""
    from r3jax import tasks
    from r3jax.evaluate import EvalSettings, Problems
    task = tasks.get("arith", num_train=20, num_test=4)
    demos = task.demonstrations("test")
    answers = [d.answer for d in demos]
    right = [task.answers([f"#### {a}"])[0] for a in answers]  # what the evaluator's records hold
    wrong = task.answers(["#### -1"])[0]
    sampled = [[right[0]] * 2, [right[1], wrong], [wrong, wrong]]

    def fake_evaluate(policy, problems, desc=""):
        if not problems.settings.maj_k:
            return {"accuracy": 0.5}, [{"correct": i % 2 == 0} for i in range(len(problems.demos))]
        assert problems.settings.maj_k == 2 and len(problems.demos) == 3
        return {"sample_accuracy": 0.5}, [{"predictions": p, "answer": a} for p, a in zip(sampled, answers)]

    monkeypatch.setattr(compare, "evaluate", fake_evaluate)
    c = _config()
    c.compare.update(samples=2, sample_problems=3)
    result = compare.evaluate_model(None, Problems(task, demos, EvalSettings()), c)
    assert result["correct"] == [1.0, 0.0, 1.0, 0.0]
    assert result["sample_correct"] == [1.0, 0.5, 0.0] and result["pass_at_k"] == pytest.approx(2 / 3)
