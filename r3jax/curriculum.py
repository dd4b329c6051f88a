"""Reverse curriculum: cut rationales into steps, build start states, and schedule them.

A start state gives the question plus the first k steps of a correct rationale; the policy writes
the rest. Strategies: `outcome` (k = 0 only, plain RL), `staged` (from the easiest stage back to
the full task), `mixed` (R^3: every start state in one shuffled set), `adaptive` (each
demonstration's own start point, moved by how its samples fare: `Curriculum.adapt`). Batches are a
pure function of (seed, step) and, for `adaptive`, of the start points, which the trainer keeps in
its checkpoints; so a resumed run sees exactly the data it would have seen. `hint_on_failure`
(POPE, BREAD) samples k = 0 only, and samples a group none of whose samples succeeded again from a
hint: a start state of its demonstration, kept per demonstration like adaptive's start points.
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


# The strategies that keep a start state per demonstration (`Curriculum.initial_levels`, `adapt`)
PER_DEMONSTRATION = ("adaptive", "hint_on_failure")
# hint_on_failure's rule, as adapt's band: any success shortens a hint by a step, none lengthens it.
# (Always taking the shortest hint that has worked so far would never try a shorter one.)
HINT_BAND = (0.0, 1e-9)


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """`adaptive`: the share of every batch at k = 0, and the success-rate band of the start-point rule."""
    full_task_fraction: float = 0.25
    band: tuple[float, float] = (0.2, 0.8)


class Curriculum:
    """Serves batches of start states for a strategy; `batch(step)` depends only on the step (and,
    for `adaptive`, on the start points it is given)."""

    def __init__(self, states: Sequence[StartState], strategy: str, batch_size: int, seed: int = 0,
                 stage_length: float = 1.0, stage_unit: str = "epochs",
                 stage_weights: Sequence[float] | None = None, adaptive: AdaptiveSettings = AdaptiveSettings()):
        self.strategy, self.batch_size, self.seed = strategy, batch_size, seed
        self.stage_unit, self.adaptive = stage_unit, adaptive
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
        # per demonstration (in order of first appearance) its start states, full task first
        by_demo: dict[str, list[StartState]] = {}
        for state in self.states:
            by_demo.setdefault(state.demo.id, []).append(state)
        self.pools = [sorted(pool, key=lambda s: s.stage) for pool in by_demo.values()]
        self.demo_index = {demo: i for i, demo in enumerate(by_demo)}
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

    def initial_levels(self) -> list[int]:
        """`adaptive`'s start points before any step: each demonstration's easiest start state (the
        index into its start states, 0 = the full task)."""
        return [len(pool) - 1 for pool in self.pools]

    def adapt(self, levels: Sequence[int], outcomes: Sequence[tuple[StartState, bool]]) -> list[int]:
        """The start points after a step whose samples (`outcomes`: each sampled start state and
        whether its answer was correct) came back. A demonstration sampled at its own start point
        moves one start state earlier (towards k = 0) when at least `band[1]` of those samples
        succeeded, one later when at most `band[0]` did, and stays in between; never past either
        end. Samples at other start points (the batch's full-task share) do not move it.

        Why a success-rate band with hysteresis rather than AdaBack's continuous reveal ratio: R^3's
        start points are a few fixed states per demonstration, so the ratio has to move in whole
        states, and a band keeps each demonstration where its group of samples disagrees (the
        samples a group estimator learns from) without flipping back and forth on one lucky group."""
        low, high = HINT_BAND if self.strategy == "hint_on_failure" else self.adaptive.band
        results: dict[int, list[bool]] = {}
        for state, correct in outcomes:
            demo = self.demo_index[state.demo.id]
            if self.pools[demo][levels[demo]].stage == state.stage:
                results.setdefault(demo, []).append(bool(correct))
        new = list(levels)
        for demo, successes in results.items():
            rate = float(np.mean(successes))
            if rate >= high:
                new[demo] = max(new[demo] - 1, 0)
            elif rate <= low:
                new[demo] = min(new[demo] + 1, len(self.pools[demo]) - 1)
        return new

    def hint(self, state: StartState, levels: Sequence[int]) -> StartState:
        """hint_on_failure: the start state of `state`'s demonstration to sample again from."""
        demo = self.demo_index[state.demo.id]
        return self.pools[demo][levels[demo]]

    def batch(self, step: int, progress: float = 0.0, levels: Sequence[int] | None = None) -> list[StartState]:
        if self.strategy in PER_DEMONSTRATION:
            full_task = (self.batch_size if self.strategy == "hint_on_failure"
                         else round(self.adaptive.full_task_fraction * self.batch_size))
            chosen = epoch_order(self.seed, step, self.batch_size, len(self.pools))
            return [self.pools[d][0 if slot < full_task else levels[d]] for slot, d in enumerate(chosen)]
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
