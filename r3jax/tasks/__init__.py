"""Tasks: `get(name, **options)` -> a Task with demonstrations, prompts and scoring."""
from __future__ import annotations

import functools
from typing import Callable

from r3jax.tasks import labels, math
from r3jax.tasks.arith import ArithTask
from r3jax.tasks.jsonl import JsonlTask
from r3jax.errors import RecordError
from r3jax.tasks.base import Demonstration, Task, data_dir

# the names are config.TASKS (tests/test_config.py checks that both list the same tasks)
REGISTRY: dict[str, Callable[..., Task]] = {
    "gsm8k": functools.partial(math.gsm8k, "cot"),
    "gsm8k_pot": functools.partial(math.gsm8k, "pot"),
    "svamp": functools.partial(math.svamp, "cot"),
    "svamp_pot": functools.partial(math.svamp, "pot"),
    "snli": labels.snli,
    "mnli": labels.mnli,
    "race": labels.race,
    "race_high": functools.partial(labels.race, "high"),
    "race_middle": functools.partial(labels.race, "middle"),
    "boardgameqa": labels.boardgameqa,
    "arith": ArithTask,
    "jsonl": JsonlTask,
}


def get(name: str, **options) -> Task:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](**options)


__all__ = ["Demonstration", "RecordError", "Task", "data_dir", "get", "REGISTRY"]
