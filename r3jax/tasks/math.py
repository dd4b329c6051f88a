"""Math word problems: GSM8K and SVAMP, chain of thought (CoT) and program of thought (P-CoT)."""
from __future__ import annotations

import os
from typing import Sequence

from r3jax.tasks import answers
from r3jax.tasks.answers import Score
from r3jax.errors import RecordError
from r3jax.tasks.base import Demonstration, Task, data_dir, field
from r3jax.tasks.sandbox import Limits, Sandbox

MARKER = "####"
RESPONSE_IN_QUESTION = "### Response:"


def _gold(text: str, location: str) -> str:
    text = str(text).strip()
    if answers.parse_number(text) is None:
        raise RecordError(f"{location}: answer {text!r} is not a number")
    return text


def math_demonstration(record: dict, location: str, program: bool) -> Demonstration:
    """Reads every released format: GSM8K {question, answer}, the paper's {instruction, output},
    ReFT {question, answer_cot, answer_value}, test-only {question, answer_value}, SVAMP.json."""
    if "Body" in record:
        question = f"{field(record, location, 'Body')} {field(record, location, 'Question')}".strip()
        return Demonstration(str(record.get("ID", location)), question, "", "",
                             _gold(field(record, location, "Answer"), location))
    question = field(record, location, "question", "instruction")
    if RESPONSE_IN_QUESTION in question:
        raise RecordError(f"{location}: this is a start-state (mix) record, not a demonstration")
    text = record.get("answer", record.get("output", record.get("answer_cot", "")))
    item_id = str(record.get("item_id", location))
    if program:
        return Demonstration(item_id, question, "\n" + text.strip() if text else "", "",
                             _gold(field(record, location, "answer_value"), location))
    body, marker, after = text.rpartition(MARKER)
    if not marker:
        body, after = text, ""
    gold = _gold(record["answer_value"] if "answer_value" in record else after, location)
    rationale = "\n" + body.strip() if body.strip() else ""
    final = f"\n{MARKER} {after.strip() or gold}" if (rationale or after) else ""
    return Demonstration(item_id, question, rationale, final, gold)


class MathTask(Task):
    """Numeric answers; `program=True` executes `solution()` in the sandbox (P-CoT)."""

    def __init__(self, name: str, train_path: str, test_path: str, partial_reward: float,
                 program: bool = False, cut: str = "lines", answer_marker: str | None = MARKER,
                 sandbox_workers: int = 4, sandbox_limits: Limits = Limits(), require_isolation: bool = False,
                 tfds_name: str | None = None, **base):
        super().__init__(**base)
        self.name, self.cut, self.program = name, cut, program
        self.paths = {"train": train_path, "test": test_path}
        self.partial_reward = partial_reward
        self.answer_marker = answer_marker
        self.tfds_name = tfds_name
        self.sandbox_workers, self.sandbox_limits = sandbox_workers, sandbox_limits
        self.require_isolation = require_isolation
        self._sandbox: Sandbox | None = None

    def load_split(self, split: str) -> list[Demonstration]:
        return [math_demonstration(record, location, self.program) for location, record in self.records(split)]

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.sandbox_workers, self.sandbox_limits, self.require_isolation)
        return self._sandbox

    def runtime_info(self) -> dict[str, str]:
        return {"sandbox": self.sandbox.isolation} if self.program else {}

    def extract_answers(self, responses: Sequence[str]) -> list[float | None]:
        """P-CoT: what each program returns when run in the sandbox; CoT: the number after the marker."""
        if self.program:
            return [v if isinstance(v, float) else None for v in self.sandbox.run(responses)]
        return [answers.extract_number(r, self.answer_marker) for r in responses]

    def score_extracted(self, answer: float | None, gold: str) -> Score:
        return answers.score_number(answer, float(answers.parse_number(gold)), self.partial_reward)

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def gsm8k(variant: str = "cot", train_path: str | None = None, test_path: str | None = None,
          partial_reward: float = 0.2, **options) -> MathTask:
    root = data_dir()
    if variant == "cot":
        return MathTask("gsm8k", train_path or os.path.join(root, "gsm8k", "train.jsonl"),
                        test_path or os.path.join(root, "gsm8k", "test.jsonl"), partial_reward,
                        tfds_name="gsm8k", **options)
    if variant == "pot":
        return MathTask(
            "gsm8k_pot",
            train_path or os.path.join(root, "r3_examples", "gsm8k_pot", "gsm8k_python_train_example.json"),
            test_path or os.path.join(root, "r3_examples", "gsm8k_cot", "gsm8k_test.json"),
            partial_reward, program=True, **options)
    raise ValueError(f"gsm8k variant {variant!r}: expected 'cot' or 'pot'")


def svamp(variant: str = "cot", train_path: str | None = None, test_path: str | None = None,
          partial_reward: float = 0.1, **options) -> MathTask:
    root = data_dir()
    test = test_path or os.path.join(root, "reft", "svamp_test_set.json")
    if variant == "cot":
        # The authors cut SVAMP CoT rationales at word positions, not lines.
        return MathTask("svamp", train_path or os.path.join(root, "reft", "svamp_nl.json"), test,
                        partial_reward, cut="words", **options)
    if variant == "pot":
        return MathTask("svamp_pot", train_path or os.path.join(root, "reft", "svamp_python_sdp.json"),
                        test, partial_reward, program=True, **options)
    raise ValueError(f"svamp variant {variant!r}: expected 'cot' or 'pot'")
