"""Classification with a rationale: SNLI, MNLI, RACE, BoardgameQA (label after a final marker)."""
from __future__ import annotations

import os
from typing import Sequence

from r3jax.tasks import answers
from r3jax.tasks.answers import Score
from r3jax.errors import RecordError
from r3jax.tasks.base import Demonstration, Task, data_dir, field

NLI_OPTIONS = ("yes", "it is not possible to tell", "no")


class LabelTask(Task):
    """Binary exact-match reward on the option after the final marker; rationales cut by words."""
    cut = "words"

    def __init__(self, name: str, options: tuple[str, ...], marker: str, train_path: str,
                 test_path: str, tfds_name: str | None = None, **base):
        super().__init__(**base)
        self.name, self.options, self.marker = name, options, marker
        self.paths = {"train": train_path, "test": test_path}
        self.tfds_name = tfds_name

    def demonstration(self, record: dict, location: str) -> Demonstration:
        question = field(record, location, "instruction")
        if record.get("input"):
            question = f"{question}\n{record['input']}"
        output = field(record, location, "output")
        body, marker, label = output.rpartition(self.marker)
        gold = answers.extract_label(marker + label, self.marker, self.options) if marker else None
        if gold is None:
            raise RecordError(f"{location}: output does not end in {self.marker!r} and one of {self.options}")
        rationale = " " + body.strip() if body.strip() else ""
        return Demonstration(str(record.get("item_id", location)), question, rationale,
                             f" {self.marker} {gold}", gold)

    def load_split(self, split: str) -> list[Demonstration]:
        return [self.demonstration(record, location) for location, record in self.records(split)]

    def extract_answers(self, responses: Sequence[str]) -> list[str | None]:
        return [answers.extract_label(r, self.marker, self.options) for r in responses]

    def score_extracted(self, answer: str | None, gold: str) -> Score:
        return answers.score_label(answer, gold)


def _paths(folder: str, train: str, test: str, train_path: str | None, test_path: str | None):
    root = os.path.join(data_dir(), "r3_examples", folder)
    return dict(train_path=train_path or os.path.join(root, train),
                test_path=test_path or os.path.join(root, test))


def snli(train_path=None, test_path=None, **options) -> LabelTask:
    return LabelTask("snli", NLI_OPTIONS, "###", tfds_name="snli", **options,
                     **_paths("snli", "snli_train_example.json", "snli_test.json", train_path, test_path))


def mnli(train_path=None, test_path=None, **options) -> LabelTask:
    return LabelTask("mnli", NLI_OPTIONS, "###", tfds_name="multi_nli", **options,
                     **_paths("mnli", "mnli_train_example.json", "mnli_test.json", train_path, test_path))


def race(level: str = "high", train_path=None, test_path=None, **options) -> LabelTask:
    if level not in ("high", "middle"):
        raise ValueError(f"race level {level!r}: expected 'high' or 'middle'")
    paths = _paths("race_high", "raceHigh_train_example.json", "raceHigh_test.json", train_path, test_path)
    if level == "middle" and not (train_path and test_path) and not options.get("tfds"):
        raise ValueError("task race_middle: no local files ship for it; give config.task.options.train_path and "
                         "test_path, or config.task.options.tfds=True")
    return LabelTask(f"race_{level}", ("A", "B", "C", "D"), "###", tfds_name=f"race/{level}",
                     **options, **paths)


def boardgameqa(train_path=None, test_path=None, **options) -> LabelTask:
    return LabelTask("boardgameqa", ("proved", "disproved", "unknown"), "####", **options,
                     **_paths("boardgameqa", "boardgame_train_example.json", "boardgame_test.json",
                              train_path, test_path))
