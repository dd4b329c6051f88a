"""Start states against the authors' released GSM8K mix; strategies and resumable batches."""
import collections
import json
import os

import numpy as np
import pytest

from r3jax import curriculum, tasks


def _authors_mix(data_dir):
    with open(os.path.join(data_dir, "r3_examples", "gsm8k_cot", "gsm8k_nl_mix_example.json")) as f:
        records = json.load(f)
    out = []
    for r in records:
        question, given = r["question"].split("\n\n### Response: ", 1)
        k = len(given.split("\n")) if given else 0
        out.append((question, given, r["answer_cot"], k, k + len(r["answer_cot"].split("\n"))))
    return out


def _our_states(data_dir, name):
    path = os.path.join(data_dir, "r3_examples", "gsm8k_cot", name)
    task = tasks.get("gsm8k", train_path=path)
    return [s for d in task.demonstrations("train") for s in curriculum.start_states(task, d, 5)]


def test_authors_mix_records_are_rebuilt_exactly(data_dir):
    task = tasks.get("gsm8k")
    by_question = {d.question: d for d in task.demonstrations("train")}
    for question, given, remaining, k, _ in _authors_mix(data_dir):
        states = curriculum.start_states(task, by_question[question], 5)
        rebuilt = {(s.given.lstrip("\n"), s.target.rsplit("\n####", 1)[0].lstrip("\n")) for s in states}
        assert (given, remaining) in rebuilt


def test_start_state_histogram_matches_authors_mix(data_dir):
    ours = collections.Counter((s.k, s.num_steps) for s in _our_states(data_dir, "gsm8k_nl_train_example.json"))
    theirs = collections.Counter((k, t) for *_, k, t in _authors_mix(data_dir))

    def by_fraction(counter):  # the shape: how far into the rationale each start state sits
        total = sum(counter.values())
        hist = collections.Counter()
        for (k, t), n in counter.items():
            hist[min(int(5 * k / t), 4)] += n / total
        return np.array([hist[i] for i in range(5)])

    assert np.abs(by_fraction(ours) - by_fraction(theirs)).sum() / 2 < 0.05
    # both are roughly a quarter bare questions (k = 0), as DESIGN.md notes
    for counter in (ours, theirs):
        share = sum(n for (k, _), n in counter.items() if k == 0) / sum(counter.values())
        assert 0.2 < share < 0.35


def test_prefix_plus_remainder_rebuilds_demonstration(data_dir):
    for name in ("gsm8k", "svamp", "snli", "boardgameqa", "gsm8k_pot", "arith"):
        task = tasks.get(name)
        for demo in task.demonstrations("train")[:100]:
            for m in (None, 5, 6):
                for s in curriculum.start_states(task, demo, m):
                    assert s.prompt_text + s.target == task.prompt(demo.question) + demo.response
                    assert 0 <= s.k < max(s.num_steps, 1)


def test_word_cuts_are_near_uniform():
    steps = curriculum.cut_steps(" " + " ".join(f"w{i}" for i in range(23)), "words", 5)
    assert len(steps) == 5 and [len(s.split()) for s in steps] == [5, 4, 5, 4, 5]
    with pytest.raises(ValueError, match="cut mode"):
        curriculum.cut_steps("\na", "sentences")


@pytest.fixture(scope="module")
def arith_states():
    task = tasks.get("arith", num_train=60, min_steps=4, max_steps=4)
    return [s for d in task.demonstrations("train") for s in curriculum.start_states(task, d, 4)]


def test_strategies(arith_states):
    outcome = curriculum.Curriculum(arith_states, "outcome", batch_size=8)
    assert all(s.k == 0 for step in range(20) for s in outcome.batch(step))
    mixed = curriculum.Curriculum(arith_states, "mixed", batch_size=8)
    seen = collections.Counter(s.stage for step in range(30) for s in mixed.batch(step))  # one epoch
    assert seen == collections.Counter(s.stage for s in arith_states)
    staged = curriculum.Curriculum(arith_states, "staged", batch_size=8, stage_length=3, stage_unit="steps")
    schedule = [staged.stage_at(step) for step in range(14)]
    assert schedule == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0]
    for step in range(14):
        assert {s.stage for s in staged.batch(step)} == {schedule[step]}
    by_epochs = curriculum.Curriculum(arith_states, "staged", batch_size=8, stage_length=1.0)
    assert by_epochs.stage_ends.tolist() == [8, 16, 24, 32]  # 60 states a stage -> 8 batches
    by_budget = curriculum.Curriculum(arith_states, "staged", batch_size=8, stage_unit="budget")
    assert [by_budget.stage_at(0, p) for p in (0.0, 0.24, 0.26, 0.6, 0.99, 1.5)] == [3, 3, 2, 1, 0, 0]


def test_batches_depend_only_on_step(arith_states):
    a = curriculum.Curriculum(arith_states, "mixed", batch_size=8, seed=5)
    b = curriculum.Curriculum(arith_states, "mixed", batch_size=8, seed=5)
    assert [s.prompt_text for s in a.batch(17)] == [s.prompt_text for s in b.batch(17)]
    weighted = curriculum.Curriculum(arith_states, "mixed", batch_size=400, stage_weights=[1, 0, 0, 3])
    counts = collections.Counter(s.stage for s in weighted.batch(0))
    assert set(counts) == {0, 3} and counts[3] > 2 * counts[0]


def test_adaptive_start_points_move_with_success_and_stay_within_the_demonstration(arith_states):
    """A start point moves one state earlier after a group's successes (rate >= 0.8), one later
    after failures (<= 0.2), stays in the band; never below k = 0 or past the last state; samples
    at another start point (the full-task share) move nothing."""
    adaptive = curriculum.Curriculum(arith_states, "adaptive", batch_size=8,
                                     adaptive=curriculum.AdaptiveSettings(0.0, (0.2, 0.8)))
    levels = adaptive.initial_levels()
    assert len(levels) == 60 and set(levels) == {3}  # every demonstration at its easiest (k = 3 of 4 steps)
    pools = adaptive.pools
    at = lambda demo, level, results: [(pools[demo][level], ok) for ok in results]
    outcomes = (at(0, 3, [True] * 4) + at(1, 3, [True, True, True, False]) + at(2, 3, [True, False, False, False])
                + at(3, 3, [True, True, False, False]) + at(4, 0, [True] * 4))
    moved = adaptive.adapt(levels, outcomes)
    assert moved[:5] == [2, 3, 3, 3, 3] and moved[5:] == levels[5:]  # 4/4 earlier, 3/4 and 2/4 stay, 1/4 stays at the end
    for _ in range(5):
        moved = adaptive.adapt(moved, at(0, moved[0], [True] * 4) + at(2, moved[2], [False] * 4))
    assert moved[0] == 0 and moved[2] == 3  # held at k = 0 and at the last state
    moved = adaptive.adapt(moved, at(0, 0, [False] * 4))
    assert moved[0] == 1


def test_adaptive_batches_keep_the_full_task_share_and_follow_the_start_points(arith_states):
    adaptive = curriculum.Curriculum(arith_states, "adaptive", batch_size=8,
                                     adaptive=curriculum.AdaptiveSettings(0.25, (0.2, 0.8)))
    levels = [demo % 4 for demo in range(60)]
    for step in range(20):
        batch = adaptive.batch(step, 0.0, levels)
        assert [s.stage for s in batch[:2]] == [0, 0]  # 25% of 8
        assert all(s.stage == levels[adaptive.demo_index[s.demo.id]] for s in batch[2:])
    assert adaptive.batch(3, 0.0, levels) == adaptive.batch(3, 0.0, list(levels))  # a function of step and levels


def test_hint_on_failure_samples_the_full_task_and_moves_hints_by_any_success(arith_states):
    hints = curriculum.Curriculum(arith_states, "hint_on_failure", batch_size=8)
    levels = hints.initial_levels()
    assert all(s.k == 0 for step in range(10) for s in hints.batch(step, 0.0, levels))
    pools = hints.pools
    outcomes = [(pools[0][3], False), (pools[0][3], True), (pools[1][3], False), (pools[1][3], False),
                (pools[2][0], True), (pools[2][0], True)]  # a k = 0 success does not move a hint
    assert hints.adapt(levels, outcomes)[:3] == [2, 3, 3]
    assert hints.hint(pools[0][0], [2] + levels[1:]) is pools[0][2]
