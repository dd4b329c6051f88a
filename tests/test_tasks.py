"""Answer checking, task loaders, and the synthetic arith task."""
import json

import pytest

from r3jax import tasks
from r3jax.tasks import answers
from r3jax.errors import ConfigError, RecordError


@pytest.mark.parametrize("text, expected", [
    ("so 5 + 3 = 8\n#### 8", 8.0), ("#### $1,234.50", 1234.5), ("#### -7", -7.0),
    ("#### 3/4", 0.75), ("#### 50%", 50.0), ("#### 72.", 72.0), ("#### 18 dollars", 18.0),
    ("It is 4 * 3 = <<4*3=12>>12.\n#### 12", 12.0), ("#### <<2*3=6>>", None), ("no marker 42", None),
    ("#### 1,000,000", 1e6), ("first #### 5 then #### 6", 6.0), ("#### \u22123", -3.0),
])
def test_extract_number_after_marker(text, expected):
    assert answers.extract_number(text) == expected


def test_extract_number_last_mode_skips_calculator_annotations():
    assert answers.extract_number("4 * 3 = <<4*3=12>>12 apples, then 7", marker=None) == 7.0
    assert answers.extract_number("total <<1+1=2>>", marker=None) is None


def test_score_number_rule():
    assert answers.score_number(18.0, 18.0, 0.2) == answers.Score(1.0, True, True)
    assert answers.score_number(18.009, 18.0, 0.2).correct
    assert answers.score_number(18.02, 18.0, 0.2) == answers.Score(0.2, False, True)
    assert answers.score_number(None, 18.0, 0.2) == answers.Score(0.0, False, False)


def test_majority_vote():
    assert answers.majority([1.0, 2.0, 2.004, None, None, None]) == 2.0  # no answer never wins
    assert answers.majority([3.0, 5.0]) == 3.0  # a tie goes to the first seen
    assert answers.majority([None, float("nan")]) is None
    assert answers.majority(["no", "yes", "yes"]) == "yes"


def test_extract_label_only_listed_options():
    options = ("yes", "it is not possible to tell", "no")
    assert answers.extract_label('so ### It is NOT possible  to tell.', "###", options) == options[1]
    assert answers.extract_label("### no", "###", options) == "no"
    assert answers.extract_label("### nope", "###", options) is None
    assert answers.extract_label("### maybe", "###", options) is None
    assert answers.extract_label("yes", "###", options) is None
    assert answers.extract_label("### (B)", "###", ("A", "B", "C", "D")) == "B"


def test_every_gsm8k_gold_rationale_scores_one(data_dir):
    task = tasks.get("gsm8k")
    demos = task.demonstrations("train") + task.demonstrations("test")
    assert len(demos) == 7473 + 1319
    for demo in demos:
        response = demo.response
        assert task.score_batch([response], [demo.answer])[0].reward == 1.0, demo.id
    wrong = demos[0].response.rsplit("####", 1)[0] + f"#### {float(demos[0].answer) + 3}"
    assert task.score_batch([wrong], [demos[0].answer])[0] == answers.Score(0.2, False, True)
    assert task.score_batch(["I do not know."], [demos[0].answer])[0].reward == 0.0


@pytest.mark.parametrize("name", ["svamp", "snli", "mnli", "race", "boardgameqa"])
def test_released_tasks_score_their_own_demonstrations(name):
    task = tasks.get(name)
    for demo in task.demonstrations("train")[:200]:
        assert task.score_batch([demo.response], [demo.answer])[0].correct, demo.id
    assert task.demonstrations("test")


def test_malformed_record_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 3"}\n{"question": "q2"\n')
    with pytest.raises(tasks.RecordError, match=r"bad.jsonl:2"):
        tasks.get("gsm8k", train_path=str(path)).demonstrations("train")
    path.write_text('{"question": "q", "answer": "x\\n#### three"}\n')
    with pytest.raises(tasks.RecordError, match=r"bad.jsonl:1: answer 'three' is not a number"):
        tasks.get("gsm8k", train_path=str(path)).demonstrations("train")
    listing = tmp_path / "bad.json"
    listing.write_text(json.dumps([{"instruction": "i", "input": "", "output": "r ### yes"},
                                   {"instruction": "i", "input": "", "output": "r ### perhaps"}]))
    with pytest.raises(tasks.RecordError, match=r"bad.json\[1\]"):
        tasks.get("snli", train_path=str(listing)).demonstrations("train")


def test_a_missing_shared_data_file_names_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("R3JAX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"gsm8k/train.jsonl: data file not found \(the shared data folder, "
                                                r"\$R3JAX_DATA_DIR, is .*nowhere: set it"):
        tasks.get("gsm8k").demonstrations("train")
    with pytest.raises(FileNotFoundError, match=r"mine.jsonl: data file not found$"):
        tasks.get("jsonl", train_path=str(tmp_path / "mine.jsonl")).demonstrations("train")


def test_an_option_a_task_does_not_take_is_named():
    with pytest.raises(tasks.ConfigError, match=r"^config.task.options.max_stepz: task arith takes no such option "
                                                r"\(closest given: max_steps\)$"):
        tasks.get("arith", max_steps=4, max_stepz=3)
    with pytest.raises(tasks.ConfigError, match="^config.task.options.bogus: task snli takes no such option$"):
        tasks.get("snli", bogus=1)


def test_validation_split_is_carved_from_train():
    task = tasks.get("arith", num_train=50, validation_size=10)
    train, validation = task.demonstrations("train"), task.demonstrations("validation")
    assert len(train) == 40 and len(validation) == 10
    assert not {d.id for d in train} & {d.id for d in validation}
    assert len(tasks.get("arith", num_train=50, validation_size=0.05).demonstrations("validation")) == 2
    with pytest.raises(ConfigError, match="^config.task.options.validation_size: 0.005 of 50 training "
                                          "demonstrations of task arith is none of them"):
        tasks.get("arith", num_train=50, validation_size=0.005).demonstrations("train")
    with pytest.raises(ConfigError, match="^config.task.options.validation_size: 50 leaves none of the 50"):
        tasks.get("arith", num_train=50, validation_size=50).demonstrations("train")


@pytest.mark.parametrize("options, key", [({"max_steps": 1}, "max_steps"), ({"min_steps": 0}, "min_steps"),
                                          ({"operations": ("^",)}, "operations"), ({"max_value": 4}, "max_value"),
                                          ({"max_operand": 0}, "max_operand")])
def test_a_bad_arith_option_is_refused_naming_its_key(options, key):
    with pytest.raises(ConfigError, match=f"^config.task.options.{key}: "):
        tasks.get("arith", **options)


def test_arith_is_deterministic_and_gold_scores_one():
    first = tasks.get("arith", seed=3, num_train=300, max_steps=8).demonstrations("train")
    again = tasks.get("arith", seed=3, num_train=300, max_steps=8).demonstrations("train")
    other = tasks.get("arith", seed=4, num_train=300, max_steps=8).demonstrations("train")
    assert first == again and first != other
    task = tasks.get("arith", seed=3)
    steps = set()
    for demo in first:
        assert task.score_batch([demo.response], [demo.answer])[0] == answers.Score(1.0, True, True)
        lines = demo.rationale.strip().split("\n")
        steps.add(len(lines))
        assert len(lines) == dict(demo.meta)["num_steps"]
        for line in lines:  # every line is a correct equation
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 -- our own generated arithmetic
    assert steps == set(range(2, 9))


def test_unknown_task_and_bad_options():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        tasks.get("gsm9k")
    with pytest.raises(ValueError, match="operations"):
        tasks.get("arith", operations=("div",))
    with pytest.raises(ValueError, match="task race_middle: .*config.task.options.train_path .*config.task.options.tfds"):
        tasks.get("race_middle")


TFDS_RECORDS = {  # in TFDS's feature layout: bytes strings, int labels, nested sequences
    "gsm8k": [{"question": b"Tom has 3 cats and gets 2 more. How many?", "answer": b"3 + 2 = 5\n#### 5"}],
    "snli": [{"premise": b"A man sleeps.", "hypothesis": b"A person rests.", "label": 0},
             {"premise": b"A dog runs.", "hypothesis": b"A cat sits.", "label": 2},
             {"premise": b"Unlabelled.", "hypothesis": b"Skip me.", "label": -1}],
    "race/high": [{"article": b"Ann went home.", "questions": [b"Where?", b"Who?"],
                   "answers": [b"B", b"A"], "options": [[b"school", b"home", b"park", b"shop"],
                                                       [b"Ann", b"Bob", b"Cy", b"Di"]]}],
}


def _tfds_records(builder, split, **kwargs):
    config = builder.builder_config
    return TFDS_RECORDS[f"{builder.name}/{config.name}" if config else builder.name]


def test_tfds_sources_read_through_tfds_data_source():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(as_data_source_fn=_tfds_records):
        gsm = tasks.get("gsm8k", tfds=True).demonstrations("train")
        snli = tasks.get("snli", tfds=True).demonstrations("train")
        race = tasks.get("race", tfds=True).demonstrations("train")
    assert gsm[0].answer == "5" and gsm[0].rationale == "\n3 + 2 = 5"
    assert [d.answer for d in snli] == ["yes", "no"] and "OPTIONS:" in snli[0].question
    assert [d.answer for d in race] == ["B", "A"] and "B: home" in race[0].question
    with pytest.raises(ValueError, match="no TFDS source"):
        tasks.get("boardgameqa", tfds=True).demonstrations("train")


def test_tfds_random_mock_data_gives_located_errors():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        mnli = tasks.get("mnli", tfds=True).demonstrations("test")
        with pytest.raises(RecordError, match=r"tfds:gsm8k/train\[0\]"):
            tasks.get("gsm8k", tfds=True).demonstrations("train")  # random text has no '####'
        with pytest.raises(RecordError, match=r"tfds:race/middle/train\[0\.0\]"):
            tasks.get("race", level="middle", tfds=True).demonstrations("train")
    assert len(mnli) == 4 and all(d.answer in ("yes", "no", "it is not possible to tell") for d in mnli)
