"""What every task shares: demonstrations, prompts, record reading with located errors."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from r3jax.errors import ConfigError, InputError, RecordError
from r3jax.tasks import tfds_source
from r3jax.tasks.answers import Score

DEFAULT_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n")
RESPONSE_MARKER = "\n\n### Response:"
REWARD_FN_KEY = "config.task.options.reward_fn"


def data_dir() -> str:
    """Where the shared data lives: $R3JAX_DATA_DIR, default ../shared/data beside the project."""
    default = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
    return os.path.abspath(os.environ.get("R3JAX_DATA_DIR", default))


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """A worked example. `rationale` starts with its separator ("\\n" per line, " " per word), so
    `prompt(question) + rationale + final` is the exact SFT text; `final` holds the answer segment."""
    id: str
    question: str
    rationale: str
    final: str
    answer: str
    meta: tuple[tuple[str, Any], ...] = ()

    @property
    def response(self) -> str:
        return self.rationale + self.final


def _parsed(path: str) -> Iterator[tuple[str, Any]]:
    with open(path) as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        raise RecordError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            return
        try:
            records = json.load(f)
        except json.JSONDecodeError as error:
            raise RecordError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: expected a JSON list of records")
    yield from ((f"{path}[{index}]", record) for index, record in enumerate(records))


def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """(location, record) for a .jsonl (one object a line) or .json (a list of objects) file."""
    if not os.path.exists(path):
        shared = data_dir()
        hint = (f" (the shared data folder, $R3JAX_DATA_DIR, is {shared}: set it, or give task.options.train_path "
                "and test_path)") if os.path.abspath(path).startswith(shared + os.sep) else ""
        raise FileNotFoundError(f"{path}: data file not found{hint}")
    for location, record in _parsed(path):
        if not isinstance(record, dict):
            raise RecordError(f"{location}: expected a JSON object")
        yield location, record


def field(record: dict, location: str, *names: str) -> Any:
    """The first of `names` present in the record, else a RecordError naming them and the place."""
    for name in names:
        if name in record:
            return record[name]
    raise RecordError(f"{location}: missing field {' or '.join(repr(n) for n in names)}")


def load_reward_fn(spec: str) -> Callable[[str, str], Score]:
    """`package.module:function`, imported from the installed packages or the working directory.
    The function takes (response, gold answer) and returns a Score, a bool, or a finite reward
    (correct when at least 1). Returned as a scorer that stops the run, naming the function and the
    response, where the function raises or returns anything else."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InputError(f"{REWARD_FN_KEY}: {spec!r} is not package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"{REWARD_FN_KEY}: cannot import {module_name} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"{REWARD_FN_KEY}: {module_name} has no function {function_name}")
    return functools.partial(_user_score, function, spec)


def _user_score(function: Callable, spec: str, response: str, gold: str) -> Score:
    scoring = f"scoring the response ending {response[-120:]!r} against {gold!r}"
    try:
        value = function(response, gold)
    except Exception as error:
        raise InputError(f"{REWARD_FN_KEY}: {spec} raised {type(error).__name__}: {error}, {scoring}") from error
    if isinstance(value, Score):
        return value
    if isinstance(value, (bool, np.bool_)):
        return Score(float(value), bool(value), None)
    reward = _finite_number(value)
    if reward is not None:
        return Score(reward, reward >= 1.0, None)
    raise InputError(f"{REWARD_FN_KEY}: {spec} returned {value!r}, {scoring}; a reward function returns a Score, "
                     "a bool or a finite number")


def _finite_number(value) -> float | None:
    """`value` as a finite float (a Python or numpy number, a one-element array or tensor), else
    None; text is not a number here, even where float() would read it."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class Task:
    """A task: demonstrations per split, the paper's prompt, and completion scoring."""
    name: str = ""
    cut: str = "lines"  # how curriculum.cut_steps splits rationales: "lines" or "words"
    paths: dict[str, str] = {}  # split -> local file
    tfds_name: str | None = None

    def __init__(self, header: str = DEFAULT_HEADER, validation_size: float = 0, tfds: bool = False,
                 limit: int = 0, reward_fn: str = ""):
        self.header = header
        self.validation_size = validation_size
        self.use_tfds = tfds
        self.limit = limit
        self.reward_fn = load_reward_fn(reward_fn) if reward_fn else None

    def records(self, split: str) -> Iterator[tuple[str, dict]]:
        """(location, raw record) from the local file of the split, or from TFDS."""
        if not self.use_tfds:
            return read_records(self.paths[split])
        if not self.tfds_name:
            raise ConfigError(f"config.task.options.tfds: task {self.name} has no TFDS source; give train_path and "
                              "test_path")
        return tfds_source.records(self.tfds_name, split)

    def load_split(self, split: str) -> list[Demonstration]:
        raise NotImplementedError

    def demonstrations(self, split: str) -> list[Demonstration]:
        """`train`, `test`, or `validation`: the last `validation_size` training demonstrations (a
        fraction of them if below 1), which `train` then leaves out; at most `limit` of them when
        a limit is set."""
        if split == "test":
            demos = self.load_split("test")
        elif split in ("train", "validation"):
            train = self.load_split("train")
            size = round(len(train) * self.validation_size) if self.validation_size < 1 else int(self.validation_size)
            if size >= len(train):
                raise ConfigError(f"config.task.options.validation_size: {self.validation_size} leaves none of the "
                                  f"{len(train)} training demonstrations of task {self.name} to train on")
            if self.validation_size and not size:
                raise ConfigError(f"config.task.options.validation_size: {self.validation_size} of {len(train)} "
                                  f"training demonstrations of task {self.name} is none of them; give a count "
                                  "(validation_size=1 or more) or more data")
            cut = len(train) - size
            demos = train[:cut] if split == "train" else train[cut:]
        else:
            raise ValueError(f"unknown split {split!r} (train, validation, test)")
        return demos[:self.limit] if self.limit else demos

    def prompt(self, question: str) -> str:
        return self.header + question + RESPONSE_MARKER

    def answers(self, responses: Sequence[str]) -> list:
        """What scoring and maj@k voting compare, per response (the start state's given steps plus
        the generated completion): the task's extracted answer (None where it gives none), or
        with a `reward_fn` the whole response."""
        return list(responses) if self.reward_fn else self.extract_answers(responses)

    def score_answer(self, answer, gold: str) -> Score:
        return self.reward_fn(answer, gold) if self.reward_fn else self.score_extracted(answer, gold)

    def extract_answers(self, responses: Sequence[str]) -> list:
        raise NotImplementedError

    def score_extracted(self, answer, gold: str) -> Score:
        raise NotImplementedError

    def score_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[Score]:
        return [self.score_answer(a, g) for a, g in zip(self.answers(responses), golds)]

    def runtime_info(self) -> dict[str, str]:
        """What a run should record about how this task executes (e.g. the sandbox's isolation);
        starts what it reports on, so a problem shows at start-up."""
        return {}

    def close(self) -> None:
        """Releases worker processes, if the task has any."""
