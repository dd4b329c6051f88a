"""Bootstrap intervals and pass@k against hand-worked cases."""
import math

import numpy as np
import pytest

from r3jax import stats


def test_two_problem_bootstrap_spans_the_hand_worked_distribution():
    # resampling 2 problems of [1, 0]: mean 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4
    interval = stats.bootstrap(np.array([[1, 0]]), draws=4000)
    assert interval == (0.5, 0.0, 1.0)


def test_constant_results_have_a_point_interval():
    assert stats.bootstrap(np.ones((3, 50))) == (1.0, 1.0, 1.0)
    assert stats.paired_difference(np.ones((3, 50)), np.ones((1, 50))) == (0.0, 0.0, 0.0)


def test_binomial_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    correct = (rng.random(2000) < 0.3).astype(float)[None]
    mean, lo, hi = stats.bootstrap(correct)
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / 2000)  # 0.020 at p = 0.3
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.1)


def test_pairing_narrows_the_difference_of_correlated_arms():
    rng = np.random.default_rng(2)
    base = (rng.random(1000) < 0.5).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:30]] = 1  # b solves everything a does, plus 30 problems
    mean, lo, hi = stats.paired_difference(better[None], base[None])
    assert mean == pytest.approx(0.03) and lo > 0.015 and hi < 0.045
    unpaired = 1.96 * math.sqrt(2 * 0.25 / 1000)  # 0.044 if the arms were independent
    assert (hi - lo) / 2 < unpaired / 2


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    problems = (rng.random(500) < 0.5).astype(float)
    agreeing = np.stack([problems] * 3)
    disagreeing = np.stack([problems, (rng.random(500) < 0.3).astype(float), (rng.random(500) < 0.7).astype(float)])
    narrow, wide = stats.bootstrap(agreeing), stats.bootstrap(disagreeing)
    assert wide.hi - wide.lo > 1.3 * (narrow.hi - narrow.lo)


def test_pass_at_k_hand_worked():
    assert stats.pass_at_k(4, 0, 2) == 0.0
    assert stats.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert stats.pass_at_k(4, 3, 2) == 1.0
    assert stats.pass_at_k(8, 2, 8) == 1.0


def test_verdict_reads_the_interval():
    assert stats.verdict(stats.Interval(0.01, -0.02, 0.04)) == "no difference"
    assert stats.verdict(stats.Interval(0.05, 0.01, 0.09)) == "first arm better"
    assert stats.verdict(stats.Interval(-0.05, -0.09, -0.01)) == "second arm better"
