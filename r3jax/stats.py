"""Intervals for accuracies and for differences between arms: a bootstrap over test problems
(paired between arms: both arms see the same resampled problems) and over seeds."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    mean: float
    lo: float  # 2.5th percentile of the bootstrap distribution
    hi: float  # 97.5th percentile


def _resampled_means(correct: np.ndarray, problems: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """`correct [seeds, problems]` averaged over bootstrap draws of seeds `[draws, seeds]` and
    problems `[draws, problems]`: `[draws]`."""
    per_seed = correct[:, problems].mean(axis=2).T  # [draws, seeds]
    return np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)


def _draws(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    return rng.integers(0, size, (count, size))


def bootstrap(correct: np.ndarray, draws: int = 2000, seed: int = 0) -> Interval:
    """95% interval of the accuracy of `correct [seeds, problems]` (0/1 or scores), resampling
    problems and seeds."""
    correct = np.atleast_2d(np.asarray(correct, float))
    rng = np.random.default_rng(seed)
    means = _resampled_means(correct, _draws(rng, draws, correct.shape[1]), _draws(rng, draws, correct.shape[0]))
    return Interval(float(correct.mean()), *map(float, np.percentile(means, [2.5, 97.5])))


def paired_difference(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> Interval:
    """95% interval of accuracy(a) - accuracy(b), `a [seeds_a, problems]` and `b [seeds_b,
    problems]` on the same problems: one draw of problems serves both arms; seeds are drawn per
    arm."""
    a, b = (np.atleast_2d(np.asarray(x, float)) for x in (a, b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired arms need the same problems: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    problems = _draws(rng, draws, a.shape[1])
    difference = (_resampled_means(a, problems, _draws(rng, draws, a.shape[0]))
                  - _resampled_means(b, problems, _draws(rng, draws, b.shape[0])))
    return Interval(float(a.mean() - b.mean()), *map(float, np.percentile(difference, [2.5, 97.5])))


def verdict(difference: Interval) -> str:
    """How a 95% interval of a difference (first minus second) reads."""
    if difference.lo <= 0 <= difference.hi:
        return "no difference"
    return "first arm better" if difference.lo > 0 else "second arm better"


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one problem from `samples` draws of which `correct` were right."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def summarise_arm(runs: list[dict], lengths: list, scores: str = "correct") -> dict:
    """An arm of a comparison over its seeds (`runs`, one evaluation per seed, each with per-problem
    `scores`, by default greedy `correct`): mean and 95% interval, per-seed values, per chain length
    (`lengths`, one per scored problem), and the sampled metrics."""
    correct = np.array([run[scores] for run in runs])
    interval = bootstrap(correct)
    by_length = {}
    for length in sorted(set(lengths)):
        columns = np.array(lengths) == length
        by_length[str(length)] = bootstrap(correct[:, columns])._asdict()
    summary = {"mean": interval.mean, "ci95": [interval.lo, interval.hi],
               "seeds": [float(np.mean(c)) for c in correct], "by_steps": by_length,
               "tokens_sampled": [run["report"].get("tokens_sampled") for run in runs],
               "rl_steps": [run["report"].get("steps") for run in runs]}
    for key in ("sample_accuracy", "pass_at_k"):
        if key in runs[0]:
            summary[key] = float(np.mean([run[key] for run in runs]))
    return summary
