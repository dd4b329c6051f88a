"""Tasks: `get(name, **options)` -> a Task with demonstrations, prompts and scoring."""
from __future__ import annotations

import difflib
import functools
import re
from typing import Callable

from r3jax.tasks import labels, math
from r3jax.tasks.arith import ArithTask
from r3jax.tasks.jsonl import JsonlTask
from r3jax.errors import ConfigError, RecordError
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
    """The task `name` with its own `options` (config.task.options); ConfigError naming an option
    the task does not take."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(REGISTRY)})")
    try:
        return REGISTRY[name](**options)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None or unexpected.group(1) not in options:
            raise
        bad = unexpected.group(1)
        closest = difflib.get_close_matches(bad, [option for option in options if option != bad], n=1)
        raise ConfigError(f"config.task.options.{bad}: task {name} takes no such option"
                          + (f" (closest given: {closest[0]})" if closest else "")) from None


__all__ = ["ConfigError", "Demonstration", "RecordError", "Task", "data_dir", "get", "REGISTRY"]
