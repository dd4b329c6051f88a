"""Tables and plots of results, for the main job (results.md) and the comparison (compare.md and
compare.png): one renderer, so an interval or a difference reads the same in both."""
from __future__ import annotations

import numpy as np

from r3jax import files, stats

TRIAL_RESULTS = ("validation_accuracy", "training")  # a tuning record's outcome; the rest is its settings


def interval_text(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    """`0.877 [0.843, 0.910]`, or with `signed` `+0.000 [-0.017, +0.017]` (a difference)."""
    number = "{:+.3f}" if signed else "{:.3f}"
    return f"{number.format(mean)} [{number.format(lo)}, {number.format(hi)}]"


def difference_text(difference: stats.Interval) -> str:
    """A paired difference with its interval and the verdict the interval gives."""
    return f"{interval_text(*difference, signed=True)}, {stats.verdict(difference)}"


def results_markdown(results: dict[str, dict], correct: dict[str, np.ndarray], title: str) -> str:
    """The main job's table: each model's accuracies (`results`), a 95% interval from its
    per-problem `correct [problems]`, and the first trained model minus SFT, paired."""
    keys = sorted({k for r in results.values() for k in r if k.startswith("accuracy")},
                  key=lambda k: (k != "accuracy", len(k), k))
    lines = [f"# {title}", "", "| model | " + " | ".join(keys) + " | 95% interval |", "|---" * (len(keys) + 2) + "|"]
    for name, row in results.items():
        interval = stats.bootstrap(correct[name]) if name in correct else None
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys)
                     + (f" | [{interval.lo:.3f}, {interval.hi:.3f}] |" if interval else " | |"))
    trained = [name for name in correct if name != "sft"]
    if "sft" in correct and trained:
        difference = stats.paired_difference(correct[trained[0]], correct["sft"])
        lines += ["", f"{trained[0]} - sft: {difference_text(difference)} (95% intervals: a bootstrap over the "
                  f"{len(correct['sft'])} problems, paired for the difference)"]
    return "\n".join(lines) + "\n"


def metric_text(summary: dict) -> str:
    """How the comparison's primary metric reads in a table's heading."""
    if summary["metric"] == "greedy":
        return "greedy"
    return f"single-sample accuracy at T = {summary['protocol']['sample_temperature']:g}"


def difference_table(differences: dict[str, dict], heading: str) -> list[str]:
    """Markdown lines: each difference with its interval and verdict."""
    lines = ["", heading, "", "| difference | mean [95% interval] | verdict |", "|---|---|---|"]
    for name, difference in differences.items():
        interval = stats.Interval(difference["mean"], *difference["ci95"])
        lines.append(f"| {name.replace('_vs_', ' - ')} | {interval_text(*interval, signed=True)} | "
                     f"{stats.verdict(interval)} |")
    return lines


def comparison_markdown(summary: dict) -> str:
    """The comparison as markdown tables: arms, differences, premise."""
    arms, lengths = summary["arms"], sorted({k for arm in summary["arms"].values() for k in arm["by_steps"]}, key=int)
    greedy = summary["metric"] != "greedy"  # a sampled primary metric, with greedy accuracy beside it
    lines = [f"Test accuracy at k = 0, {metric_text(summary)}, {summary['num_test_problems']} {summary['split']} "
             "problems; 95% intervals from a bootstrap over problems and seeds.", "",
             "| arm | accuracy [95% interval] | per seed | " + " | ".join(f"{n} steps" for n in lengths)
             + (f" | greedy, {summary['greedy_problems']} problems" if greedy else "")
             + " | one sample | pass@k | RL steps |", "|---" * (len(lengths) + 6 + greedy) + "|"]
    for name, arm in arms.items():
        steps = [f"{arm['by_steps'][n]['mean']:.3f}" if n in arm["by_steps"] else "" for n in lengths]
        rl_steps = [s for s in arm.get("rl_steps", []) if s is not None]
        lines.append(f"| {name} | {interval_text(arm['mean'], *arm['ci95'])} | "
                     + ", ".join(f"{v:.3f}" for v in arm["seeds"]) + " | " + " | ".join(steps)
                     + (f" | {interval_text(arm['greedy']['mean'], *arm['greedy']['ci95'])}" if greedy else "")
                     + f" | {arm.get('sample_accuracy', float('nan')):.3f} | {arm.get('pass_at_k', float('nan')):.3f} | "
                     + (f"{min(rl_steps)}-{max(rl_steps)}" if rl_steps else "") + " |")
    lines += difference_table(summary["differences"], f"Differences, {metric_text(summary)}:")
    if greedy:
        lines += difference_table(summary["greedy_differences"],
                                  f"Differences, greedy accuracy on all {summary['greedy_problems']} problems:")
    if summary.get("tuning"):
        lines += ["", f"Tuning, {metric_text(summary)} on the validation split (seed {summary['protocol']['seeds'][0]}); "
                  "each arm's seeds ran its best trial. Training reward over the first and the last third "
                  "of the trial's RL steps, and its KL to the reference over the last third:", "",
                  "| arm | trial | validation accuracy | training reward | KL |", "|---|---|---|---|---|"]
        for name, arm_trials in summary["tuning"].items():
            best = max(arm_trials, key=lambda t: t["validation_accuracy"])
            for t in arm_trials:
                trend = t.get("training")
                kl = f"{trend['kl_last_third']:.2f}" if trend and "kl_last_third" in trend else ""
                moved = f"{trend['reward_first_third']:.3f} → {trend['reward_last_third']:.3f} | {kl}" if trend else " | "
                settings = ", ".join(f"{k} = {v:g}" for k, v in t.items() if k not in TRIAL_RESULTS)
                lines.append(f"| {name} | {settings} | {t['validation_accuracy']:.3f}"
                             + (" (chosen)" if t is best else "") + f" | {moved} |")
    stages = sorted({s for row in summary["premise"].values() for s in row}, key=lambda s: int(s.rsplit("_", 1)[1]))
    lines += ["", "SFT model's success at the RL temperature, validation split (the premise):", "",
              "| chain | " + " | ".join(s.replace("_", " ") for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for length, row in sorted(summary["premise"].items(), key=lambda item: int(item[0].rsplit("_", 1)[1])):
        lines.append(f"| {length.replace('steps_', '')} steps | " + " | ".join(f"{row.get(s, float('nan')):.2f}"
                                                                          for s in stages) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = summary["arms"]
    curves = {name: arm["training"] for name, arm in arms.items() if "reward/stage_0" in arm.get("training", {})}
    fig, panels = plt.subplots(1, 4 if curves else 3, figsize=(21 if curves else 16, 4.2))
    left, middle, right = panels[:3]
    names = list(arms)
    means = np.array([arms[n]["mean"] for n in names])
    errors = np.abs(np.array([arms[n]["ci95"] for n in names]).T - means)
    for i in range(len(names)):  # points, not bars from 0: the arms differ by a few points
        left.errorbar([i], means[i:i + 1], yerr=errors[:, i:i + 1], fmt="o", capsize=6, color=f"C{i}")
    left.set_xticks(range(len(names)), names)
    left.tick_params(axis="x", labelrotation=30)
    left.set_ylabel(f"test accuracy (k = 0, {metric_text(summary)})")
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
    if curves:
        training = panels[3]
        for i, name in enumerate(names):
            if name in curves:
                training.plot(np.array(curves[name]["tokens"]) / 1e3, np.array(curves[name]["reward/stage_0"], float), marker=".",
                              label=name, color=f"C{i}")
        training.set_xlabel("sampled tokens (thousands)")
        training.set_ylabel("training reward at k = 0, mean over seeds")
        training.set_title("RL training reward from the full task")
        training.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)
