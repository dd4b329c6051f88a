"""Evaluation: chunks are pipelined (the host scores one while the device decodes the next), so
check every record against the completion its own chunk produced, and the report against the
records."""
import dataclasses

import jax
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax import sharding, tasks, tokenizer
from r3jax.curriculum import StartState, start_states
from r3jax.evaluate import EvalSettings, Problems, accuracy_report, evaluate
from r3jax.rollout import Policy, generate, tokenize_states
from r3jax.sampling import SamplingConfig
from r3jax.tasks.answers import Score
from r3jax.tasks.base import Demonstration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = tasks.get("arith", num_train=200, num_test=10)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    tok = tokenizer.load(tokenizer.train_sentencepiece(
        texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=TINY.vocab_size))
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    return task, tok, cfg, tiny_params(cfg, scale=6.0)


GREEDY = EvalSettings(batch_size=4, max_new_tokens=12)


def test_pipelined_records_match_their_own_chunks(setup):
    task, tok, cfg, params = setup
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    demos = task.demonstrations("test")
    report, records = evaluate(Policy(cfg, params, tok, mesh), Problems(task, demos, GREEDY))
    assert [r["id"] for r in records] == [d.id for d in demos]

    settings = SamplingConfig(max_new_tokens=12, greedy=True, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    expected = []
    for start in range(0, len(demos), 4):
        chunk = tokenize_states(tok, task, [start_states(task, d, None)[0] for d in demos[start:start + 4]])
        expected += generate(cfg, params, tok, chunk, settings, jax.random.key(0), mesh, rows=4)[1]
    assert [r["completions"] for r in records] == [[t] for t in expected]
    assert len(set(expected)) > 1  # the random model writes different text per problem
    assert report["accuracy"] == pytest.approx(np.mean([r["correct"] for r in records]))
    assert report["answered"] == pytest.approx(np.mean([r["predictions"][0] is not None for r in records]))


def test_accuracy_report_by_hand():
    """Two stages, one answer unreadable: accuracy, reward and the answered share, worked by hand."""
    demo = Demonstration("d", "q", "\n1 + 1 = 2", "\n#### 2", "2")
    states = [StartState(demo, k=1 - stage, num_steps=1, stage=stage, given="", prompt_text="", target="")
              for stage in (0, 0, 1)]
    scores = [Score(1.0, True, True), Score(0.0, False, False), Score(0.1, False, True)]
    report = accuracy_report(states, scores)
    assert report == pytest.approx({"accuracy": 1 / 3, "reward": 1.1 / 3, "accuracy/stage_0": 0.5,
                                    "reward/stage_0": 0.5, "accuracy/stage_1": 0.0, "reward/stage_1": 0.1,
                                    "answered": 2 / 3})
    unknown = [Score(1.0, True, None)] + scores[1:]  # a user's reward_fn says nothing of reading
    assert "answered" not in accuracy_report(states, unknown)


def test_maj_at_k_near_zero_temperature_is_greedy(setup):
    """Each problem's k samples stay together: at temperature 1e-6 every one of them is the greedy
    completion of its own problem, so the vote and the sample accuracy equal greedy accuracy."""
    task, tok, cfg, params = setup
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    demos = task.demonstrations("test")
    policy, problems = Policy(cfg, params, tok, mesh), Problems(task, demos, GREEDY)
    greedy_report, greedy_records = evaluate(policy, problems)
    report, records = evaluate(policy, problems.sampled(3, 1e-6))
    assert [r["completions"] for r in records] == [g["completions"] * 3 for g in greedy_records]
    assert report["accuracy"] == greedy_report["accuracy"] == report["sample_accuracy"]


def test_maj_at_k_samples_differ_and_predictions_are_the_tasks_answers(setup):
    task, tok, cfg, params = setup
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    demos = task.demonstrations("test")
    report, records = evaluate(Policy(cfg, params, tok, mesh), Problems(task, demos, GREEDY).sampled(3, 1.0))
    assert any(len(set(r["completions"])) > 1 for r in records)
    for record, demo in zip(records, demos):
        given = start_states(task, demo, None)[0].given
        assert record["predictions"] == task.answers([given + c for c in record["completions"]])
    assert report["accuracy"] == pytest.approx(np.mean([r["correct"] for r in records]))
