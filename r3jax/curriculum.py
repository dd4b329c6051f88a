"""Reverse curriculum: cut rationales into steps, build start states, and schedule them.

A start state gives the question plus the first k steps of a correct rationale; the policy writes
the rest. Strategies: `outcome` (k = 0 only, plain RL), `staged` (from the easiest stage back to
the full task), `mixed` (R^3: every start state in one shuffled set). Batches are a pure
function of (seed, step), so a resumed run sees exactly the data it would have seen.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from r3jax.tasks.base import Demonstration, Task



def cut_steps(rationale: str, mode: str, num_chunks: int = 5) -> list[str]:
    """Steps whose concatenation is exactly `rationale`, each keeping its leading separator.

    `lines`: one step per line. `words`: `num_chunks` near-uniform chunks cut at word boundaries
    (word positions round(n * j / num_chunks)).
    """
    if mode == "lines":
        steps = re.findall(r"\n[^\n]*", rationale)
    elif mode == "words":
        words = re.findall(r"\s+\S+", rationale)
        bounds = [round(len(words) * j / num_chunks) for j in range(num_chunks + 1)]
        steps = ["".join(words[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    else:
        raise ValueError(f"cut mode {mode!r}: expected 'lines' or 'words'")
    if "".join(steps) != rationale:
        raise ValueError(f"rationale does not start with a separator, cannot cut: {rationale[:40]!r}")
    return steps


@dataclasses.dataclass(frozen=True)
class StartState:
    """`prompt_text + target` is the demonstration's full SFT text. `stage` 0 is the full task.

    `prompt_tokens` (set by `rollout.tokenize_states`) are the SFT sequence's tokens up to the end
    of `given`; until then they are empty."""
    demo: Demonstration
    k: int
    num_steps: int
    stage: int
    given: str
    prompt_text: str
    target: str
    prompt_tokens: tuple[int, ...] = ()


def start_ks(num_steps: int, num_start_states: int | None) -> list[int]:
    """Steps given per start state: all of 0..T-1, or the authors' M-point rule
    n_j = min(round(T * j / M), T - 1) for j = 0..M-1 (duplicates kept)."""
    if num_steps == 0:
        return [0]
    if num_start_states is None:
        return list(range(num_steps))
    return [min(round(num_steps * j / num_start_states), num_steps - 1) for j in range(num_start_states)]


def start_states(task: Task, demo: Demonstration, num_start_states: int | None) -> list[StartState]:
    steps = cut_steps(demo.rationale, task.cut, num_start_states or 5)
    prompt = task.prompt(demo.question)
    states = []
    for j, k in enumerate(start_ks(len(steps), num_start_states)):
        given = "".join(steps[:k])
        states.append(StartState(demo, k, len(steps), j if num_start_states else k, given,
                                 prompt + given, "".join(steps[k:]) + demo.final))
    return states


def epoch_order(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Indices for `step`: consecutive batches walk fresh permutations of range(n), epoch by epoch."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = positions // n, positions % n
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return np.array([perms[e][o] for e, o in zip(epochs, offsets)])


class Curriculum:
    """Serves batches of start states for a strategy; `batch(step)` depends only on the step."""

    def __init__(self, states: Sequence[StartState], strategy: str, batch_size: int, seed: int = 0,
                 stage_length: float = 1.0, stage_unit: str = "epochs",
                 stage_weights: Sequence[float] | None = None):
        self.strategy, self.batch_size, self.seed = strategy, batch_size, seed
        self.stage_unit = stage_unit
        if strategy == "outcome":
            states = [s for s in states if s.stage == 0]
        self.states = list(states)
        if not self.states:
            raise ValueError("curriculum: no start states (empty training set?)")
        self.stages = sorted({s.stage for s in self.states}, reverse=True)  # easiest first
        self.by_stage = {stage: [s for s in self.states if s.stage == stage] for stage in self.stages}
        self.stage_weights = None
        if stage_weights is not None:
            if len(stage_weights) <= max(self.stages):
                raise ValueError(f"stage_weights has {len(stage_weights)} entries, stages go up to "
                                 f"{max(self.stages)}")
            self.stage_weights = np.asarray(stage_weights, float)
        self.stage_ends = np.cumsum([
            int(stage_length) if stage_unit == "steps"
            else max(1, math.ceil(stage_length * len(self.by_stage[s]) / batch_size))
            for s in self.stages])  # unused with stage_unit "budget"

    def stage_at(self, step: int, progress: float = 0.0) -> int | None:
        """The stage a staged run trains on: by step, or with stage_unit "budget" by the fraction
        of the token budget spent (`progress`), equal shares per stage. The last stage continues."""
        if self.strategy != "staged":
            return None
        if self.stage_unit == "budget":
            index = int(progress * len(self.stages))
        else:
            index = int(np.searchsorted(self.stage_ends, step, side="right"))
        return self.stages[min(index, len(self.stages) - 1)]

    def batch(self, step: int, progress: float = 0.0) -> list[StartState]:
        if self.strategy == "staged":
            stage = self.stage_at(step, progress)
            pool = self.by_stage[stage]
            return [pool[i] for i in epoch_order(self.seed + stage, step, self.batch_size, len(pool))]
        if self.stage_weights is not None:
            counts = {stage: len(pool) for stage, pool in self.by_stage.items()}
            p = np.array([self.stage_weights[s.stage] / counts[s.stage] for s in self.states])
            rng = np.random.default_rng([self.seed, step])
            return [self.states[i] for i in rng.choice(len(self.states), self.batch_size, p=p / p.sum())]
        return [self.states[i] for i in epoch_order(self.seed, step, self.batch_size, len(self.states))]
