"""Answer extraction and scoring: numbers for math, listed options for label tasks."""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

CALCULATOR = re.compile(r"<<[^<>]*>>")
# -$1,234.50 | 3/4 | .5 | 50% ; thousands separators only in groups of three
NUMBER = re.compile(
    r"(?<![\w.])(-)?\s?\$?\s?(-)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?(\d+(?:\.\d+)?))?")
TOLERANCE = 1e-2


@dataclasses.dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    parsed: bool | None  # whether an answer could be read at all; None: not known (a user's reward_fn)


def _to_float(match: re.Match) -> float:
    sign = -1.0 if (match.group(1) or match.group(2)) else 1.0
    value = float(match.group(3).replace(",", ""))
    if match.group(4):
        denominator = float(match.group(4))
        value = value / denominator if denominator else float("nan")
    return sign * value


def parse_number(text: str) -> float | None:
    """The first number in `text` ("$1,234.5" -> 1234.5, "-3/4" -> -0.75, "50%" -> 50)."""
    match = NUMBER.search(text.replace("\u2212", "-"))
    return None if match is None else _to_float(match)


def extract_number(text: str, marker: str | None = "####") -> float | None:
    """The answer of a completion: the first number after the final `marker`, or with
    `marker=None` the last number of the text. Calculator annotations `<<a*b=c>>` never count."""
    text = CALCULATOR.sub("", text).replace("\u2212", "-")
    if marker is not None:
        if marker not in text:
            return None
        return parse_number(text.rsplit(marker, 1)[1])
    matches = list(NUMBER.finditer(text))
    return _to_float(matches[-1]) if matches else None


def score_number(pred: float | None, gold: float, partial_reward: float) -> Score:
    """1 when |pred - gold| <= 1e-2, `partial_reward` for a wrong number, 0 when nothing parsed."""
    if pred is None or pred != pred:
        return Score(0.0, False, False)
    correct = abs(pred - gold) <= TOLERANCE
    return Score(1.0 if correct else partial_reward, correct, True)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[\"'()\[\].,:;!*]", " ", text.lower()).split())


def extract_label(text: str, marker: str, options: Sequence[str]) -> str | None:
    """The listed option right after the final `marker` (case and spacing ignored), else None."""
    if marker not in text:
        return None
    answer = _normalise(text.rsplit(marker, 1)[1])
    # longest first so "no" never shadows a longer option that starts with it
    for option in sorted(options, key=len, reverse=True):
        norm = _normalise(option)
        if answer == norm or answer.startswith(norm + " "):
            return option
    return None


def score_label(pred: str | None, gold: str) -> Score:
    if pred is None:
        return Score(0.0, False, False)
    correct = _normalise(pred) == _normalise(gold)
    return Score(float(correct), correct, True)


def majority(values: Sequence) -> float | str | None:
    """The most common answer among `values` (None, no answer, never wins; None if all are).
    Numbers within TOLERANCE of each other count as one answer; ties go to the one seen first."""
    counts: dict = {}
    first: dict = {}
    for value in values:
        if value is None or value != value:
            continue
        key = round(value / TOLERANCE) if isinstance(value, float) else value
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, value)
    if not counts:
        return None
    return first[max(counts, key=counts.get)]
