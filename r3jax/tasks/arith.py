"""`arith`: seeded synthetic multi-step arithmetic word problems, one reasoning step per line.

Made for from-scratch experiments on a CPU: small vocabulary, exact answers, and a knob for the
chain length, which is what makes outcome-only exploration hard.

    Mia has 7 pens. They get 5 more. Leo has 9 cups. They give away 3. They double them.
    How many pens does Mia have now?
    ->  7 + 5 = 12 / 12 - 3 = 9 / 9 * 2 = 18 / #### 18
"""
from __future__ import annotations

import random
from typing import Sequence

from r3jax.errors import ConfigError
from r3jax.tasks import answers
from r3jax.tasks.answers import Score
from r3jax.tasks.base import Demonstration, Task

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Eva", "Tom", "Ivy", "Ben")
ITEMS = ("pens", "cups", "hats", "eggs", "apples", "coins", "books", "shells")
OPERATIONS = ("add", "sub", "mul")
MULTIPLIERS = {2: "double", 3: "triple"}
MARKER = "####"


def _step(rng: random.Random, value: int, ops: tuple[str, ...], max_value: int, max_operand: int):
    """One operation on `value`: (sentence, rationale line, new value)."""
    choices = [op for op in ops if (op != "sub" or value > 1) and (op != "mul" or value * 2 <= max_value)
               and (op != "add" or value < max_value)]
    op = rng.choice(choices)
    if op == "add":
        b = rng.randint(1, min(max_operand, max_value - value))
        return f"They get {b} more.", f"{value} + {b} = {value + b}", value + b
    if op == "sub":
        b = rng.randint(1, min(max_operand, value - 1))
        return f"They give away {b}.", f"{value} - {b} = {value - b}", value - b
    factor = rng.choice([f for f in MULTIPLIERS if value * f <= max_value])
    return f"They {MULTIPLIERS[factor]} them.", f"{value} * {factor} = {value * factor}", value * factor


def problem(rng: random.Random, num_steps: int, max_value: int, max_operand: int, ops: tuple[str, ...],
            distractors: int) -> tuple[str, list[str], int]:
    """(question, rationale lines, answer) with `num_steps` operations after the start value."""
    name, other = rng.sample(NAMES, 2)
    item, other_item = rng.sample(ITEMS, 2)
    value = rng.randint(2, max_value // 2)
    sentences, lines = [f"{name} has {value} {item}."], []
    for _ in range(num_steps):
        sentence, line, value = _step(rng, value, ops, max_value, max_operand)
        sentences.append(sentence)
        lines.append(line)
    for _ in range(distractors):
        position = rng.randint(1, len(sentences))
        sentences.insert(position, f"{other} has {rng.randint(2, max_value)} {other_item}.")
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, lines, value


class ArithTask(Task):
    name = "arith"
    cut = "lines"

    def __init__(self, seed: int = 0, num_train: int = 4000, num_test: int = 500,
                 min_steps: int = 2, max_steps: int = 6, max_value: int = 50, max_operand: int = 9,
                 operations: tuple[str, ...] = OPERATIONS, distractors: int = 1,
                 partial_reward: float = 0.1, header: str = "", **base):
        super().__init__(header=header, **base)
        unknown = set(operations) - set(OPERATIONS)
        if unknown or not operations:
            raise ConfigError(f"config.task.options.operations: {tuple(operations)}; choose from {OPERATIONS}")
        if not 1 <= min_steps <= max_steps:
            raise ConfigError(f"config.task.options.{'min_steps' if min_steps < 1 else 'max_steps'}: need 1 <= "
                              f"min_steps ({min_steps}) <= max_steps ({max_steps})")
        if max_value < 8:
            raise ConfigError(f"config.task.options.max_value: {max_value}; needs to be at least 8")
        self.seed, self.sizes = seed, {"train": num_train, "test": num_test}
        if max_operand < 1:
            raise ConfigError(f"config.task.options.max_operand: {max_operand}; needs to be at least 1")
        self.steps, self.max_value, self.max_operand = (min_steps, max_steps), max_value, max_operand
        self.operations, self.distractors = tuple(operations), distractors
        self.partial_reward = partial_reward

    def load_split(self, split: str) -> list[Demonstration]:
        rng = random.Random(f"arith/{self.seed}/{split}")
        demos = []
        for i in range(self.sizes[split]):
            num_steps = rng.randint(*self.steps)
            question, lines, value = problem(rng, num_steps, self.max_value, self.max_operand,
                                             self.operations, rng.randint(0, self.distractors))
            demos.append(Demonstration(f"arith-{split}-{i}", question, "".join("\n" + l for l in lines),
                                       f"\n{MARKER} {value}", str(value), (("num_steps", num_steps),)))
        return demos

    def extract_answers(self, responses: Sequence[str]) -> list[float | None]:
        return [answers.extract_number(r, MARKER) for r in responses]

    def score_extracted(self, answer: float | None, gold: str) -> Score:
        return answers.score_number(answer, float(gold), self.partial_reward)
