"""`jsonl`: a user's own data from local files, without writing a Task class.

Records are either `{"question", "rationale", "answer"}` (prompted with the paper's instruction
template) or TRL's `{"prompt", "completion"}` (the prompt used verbatim; the answer is what follows
the last `answer_marker` in the completion, or an `answer` field). Rationales are cut into steps
by lines or words like any task's. Answers are scored as numbers (with a partial reward for a
wrong number) or as text; `task.options.reward_fn` replaces either.
"""
from __future__ import annotations

from typing import Sequence

from r3jax.errors import ConfigError
from r3jax.tasks import answers
from r3jax.tasks.answers import Score
from r3jax.errors import RecordError
from r3jax.tasks.base import Demonstration, Task, field, read_records

FORMATS = {"question": ("question", "rationale", "answer"), "prompt": ("prompt", "completion")}
SEPARATORS = {"lines": "\n", "words": " "}
ANSWER_TYPES = ("number", "text")


def _record_format(record: dict, location: str) -> str:
    for name, fields in FORMATS.items():
        if all(f in record for f in fields[:2]):
            return name
    raise RecordError(f"{location}: expected the fields question, rationale, answer or prompt, completion")


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, train_path: str = "", test_path: str = "", cut: str = "lines", answer_type: str = "number",
                 answer_marker: str = "####", partial_reward: float = 0.0, **base):
        super().__init__(**base)
        if not train_path:
            raise ConfigError("config.task.options.train_path: task jsonl needs a .jsonl or .json file of records")
        if cut not in SEPARATORS:
            raise ConfigError(f"config.task.options.cut: {cut!r} is not one of {tuple(SEPARATORS)}")
        if answer_type not in ANSWER_TYPES:
            raise ConfigError(f"config.task.options.answer_type: {answer_type!r} is not one of {ANSWER_TYPES}")
        if not answer_marker and (answer_type == "text" or cut == "words"):
            raise ConfigError("config.task.options.answer_marker: text answers and word-cut rationales need a marker")
        self.cut, self.answer_type, self.marker = cut, answer_type, answer_marker
        self.partial_reward = partial_reward
        self.paths = {"train": train_path, "test": test_path}
        location, first = next(read_records(train_path), ("", None))
        if first is None:
            raise RecordError(f"{train_path}: no records")
        self.format = _record_format(first, location)

    def _gold(self, text, location: str) -> str:
        text = str(text).strip()
        if self.answer_type == "number" and answers.parse_number(text) is None:
            raise RecordError(f"{location}: answer {text!r} is not a number (task.options.answer_type=number)")
        return text

    def demonstration(self, record: dict, location: str) -> Demonstration:
        if _record_format(record, location) != self.format:
            raise RecordError(f"{location}: a {_record_format(record, location)} record in a file of "
                              f"{self.format} records")
        if self.format == "question":
            question, body = field(record, location, "question"), str(field(record, location, "rationale"))
            gold = self._gold(field(record, location, "answer"), location)
        else:
            question, completion = field(record, location, "prompt"), str(field(record, location, "completion"))
            body, marker, after = completion.rpartition(self.marker) if self.marker else (completion, "", "")
            if not marker and "answer" not in record:
                raise RecordError(f"{location}: the completion has no {self.marker!r} before its answer "
                                  "and the record no answer field")
            gold = self._gold(record.get("answer", after), location)
        separator = SEPARATORS[self.cut]
        rationale = separator + body.strip() if body.strip() else ""
        final = separator + (f"{self.marker} {gold}" if self.marker else gold)
        return Demonstration(str(record.get("id", location)), question, rationale, final, gold)

    def load_split(self, split: str) -> list[Demonstration]:
        if not self.paths[split]:
            return []
        return [self.demonstration(record, location) for location, record in read_records(self.paths[split])]

    def prompt(self, question: str) -> str:
        return question if self.format == "prompt" else super().prompt(question)

    def extract_answers(self, responses: Sequence[str]) -> list:
        if self.answer_type == "number":
            return [answers.extract_number(r, self.marker or None) for r in responses]
        return [r.rsplit(self.marker, 1)[1].strip().split("\n")[0] if self.marker in r else None for r in responses]

    def score_extracted(self, answer, gold: str) -> Score:
        if self.answer_type == "number":
            return answers.score_number(answer, float(answers.parse_number(gold)), self.partial_reward)
        return answers.score_label(answer, gold)
