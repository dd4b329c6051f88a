"""A user's own data (`task.name=jsonl`) and reward (`task.options.reward_fn`)."""
import json
import os

import pytest

from r3jax import curriculum, tasks
from r3jax.errors import InputError
from r3jax.tasks.answers import Score
from r3jax.errors import RecordError

QUESTION_RECORDS = [
    {"question": "Ann has 3 pens and buys 4 more, then doubles them. How many?",
     "rationale": "3 + 4 = 7\n7 * 2 = 14", "answer": "14"},
    {"question": "Bo has 10 cups and gives away 6. How many?", "rationale": "10 - 6 = 4", "answer": 4},
]
PROMPT_RECORDS = [
    {"prompt": "Premise: a dog runs. Hypothesis: an animal moves. Entailed?",
     "completion": "A dog is an animal and running is moving. ### yes"},
    {"prompt": "Premise: a cat sleeps. Hypothesis: a cat runs. Entailed?",
     "completion": "Sleeping is not running. ### no"},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_question_records_become_demonstrations_cut_by_lines(tmp_path):
    train = _write(tmp_path / "train.jsonl", QUESTION_RECORDS)
    task = tasks.get("jsonl", train_path=train, test_path=train, partial_reward=0.1)
    demo = task.demonstrations("train")[0]
    assert task.prompt(demo.question).endswith(demo.question + "\n\n### Response:")
    assert (demo.rationale, demo.final, demo.answer) == ("\n3 + 4 = 7\n7 * 2 = 14", "\n#### 14", "14")
    states = curriculum.start_states(task, demo, None)
    assert [s.given for s in states] == ["", "\n3 + 4 = 7"]
    assert all(s.prompt_text + s.target == task.prompt(demo.question) + demo.response for s in states)
    scores = task.score_batch([demo.response, "\n#### 15", "no answer"], ["14"] * 3)
    assert scores == [Score(1.0, True, True), Score(0.1, False, True), Score(0.0, False, False)]
    assert task.demonstrations("test")[1].answer == "4"


def test_prompt_completion_records_keep_the_prompt_and_cut_by_words(tmp_path):
    train = _write(tmp_path / "train.jsonl", PROMPT_RECORDS)
    task = tasks.get("jsonl", train_path=train, cut="words", answer_type="text", answer_marker="###")
    demo = task.demonstrations("train")[0]
    assert task.prompt(demo.question) == PROMPT_RECORDS[0]["prompt"]
    assert (demo.rationale, demo.final, demo.answer) == (" A dog is an animal and running is moving.", " ### yes", "yes")
    assert len(curriculum.start_states(task, demo, 5)) == 5
    assert [s.correct for s in task.score_batch([demo.response, " so ### No.", " ### maybe"], ["yes", "no", "no"])] == [
        True, True, False]
    assert task.demonstrations("test") == []  # no test_path: main refuses to evaluate an empty split


@pytest.mark.parametrize("records, message", [
    ([QUESTION_RECORDS[0], PROMPT_RECORDS[0]], "train.jsonl:2: a prompt record in a file of question records"),
    ([{"prompt": "p", "completion": "no marker"}], "train.jsonl:1: the completion has no '####'"),
    ([{**QUESTION_RECORDS[0], "answer": "fourteen"}], "train.jsonl:1: answer 'fourteen' is not a number"),
    ([{"input": "x"}], "train.jsonl:1: expected the fields"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, records, message):
    train = _write(tmp_path / "train.jsonl", records)
    with pytest.raises(RecordError, match=message):
        tasks.get("jsonl", train_path=train).demonstrations("train")


def test_bad_options_name_their_key(tmp_path):
    train = _write(tmp_path / "train.jsonl", QUESTION_RECORDS)
    for options, key in (({}, "train_path"), ({"train_path": train, "cut": "sentences"}, "cut"),
                         ({"train_path": train, "answer_type": "bool"}, "answer_type")):
        with pytest.raises(InputError, match=f"config.task.options.{key}"):
            tasks.get("jsonl", **options)


REWARD_MODULE = '''
from r3jax.tasks.answers import Score

def contains_gold(response, gold):
    return gold in response

def graded(response, gold):
    return 0.5 if "####" in response else 0.0

def scored(response, gold):
    return Score(2.0, True, True)

def raises(response, gold):
    return int(response)

def returns_none(response, gold):
    return None

def returns_nan(response, gold):
    return float("nan")

def returns_text(response, gold):
    return "1"

def returns_array(response, gold):
    import numpy
    return numpy.array(0.5, numpy.float32)
'''


def test_a_reward_function_scores_any_task(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)  # imported from the working directory, as the CLI does
    task = tasks.get("arith", num_train=8, num_test=4, reward_fn="my_rewards:contains_gold")
    demo = task.demonstrations("train")[0]
    assert task.answers([demo.response]) == [demo.response]  # the whole response is what is scored
    # whether a bool or a number read an answer is not known; a Score says so itself
    assert task.score_batch([demo.response, "nothing"], [demo.answer] * 2) == [Score(1.0, True, None),
                                                                             Score(0.0, False, None)]
    graded = tasks.get("arith", num_train=8, num_test=4, reward_fn="my_rewards:graded")
    assert graded.score_batch(["#### 1"], ["2"])[0] == Score(0.5, False, None)
    assert tasks.get("arith", num_train=8, reward_fn="my_rewards:scored").score_batch(["x"], ["2"])[0] == Score(
        2.0, True, True)
    assert tasks.get("arith", num_train=8, reward_fn="my_rewards:returns_array").score_batch(["x"], ["2"])[0] == Score(
        0.5, False, None)  # a 0-d array, as numpy or a framework returns a reward
    for spec, message in (("my_rewards", "not package.module:function"), ("nope_module:f", "cannot import nope_module"),
                          ("my_rewards:missing", "has no function missing")):
        with pytest.raises(InputError, match=f"config.task.options.reward_fn: .*{message}"):
            tasks.get("arith", reward_fn=spec)
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("function, message", [
    ("raises", "my_rewards:raises raised ValueError: invalid literal for int"),
    ("returns_none", "my_rewards:returns_none returned None"),
    ("returns_nan", "my_rewards:returns_nan returned nan"),
    ("returns_text", "my_rewards:returns_text returned '1'"),
])
def test_a_reward_function_that_raises_or_returns_no_number_is_named_with_the_response(tmp_path, monkeypatch,
                                                                                      function, message):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    task = tasks.get("arith", num_train=8, num_test=4, reward_fn=f"my_rewards:{function}")
    with pytest.raises(InputError) as error:
        task.score_batch(["so the answer is seven"], ["7"])
    assert str(error.value).startswith(f"config.task.options.reward_fn: {message}")
    assert "scoring the response ending 'so the answer is seven' against '7'" in str(error.value)
