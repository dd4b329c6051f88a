"""Accuracy per task, per start stage and per reasoning length: greedy, or majority over samples."""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np
from tqdm import tqdm

from r3jax import sharding, watchdog
from r3jax.curriculum import StartState, start_states
from r3jax.rollout import Policy, decode_completions, dispatch_sampling, sampling_config, to_host, tokenize_states
from r3jax.sampling import Rollout
from r3jax.tasks.answers import majority
from r3jax.tasks.base import Demonstration, Task


def accuracy_report(states: Sequence[StartState], scores) -> dict[str, float]:
    """accuracy and reward overall, per stage (`/stage_j`) and per reasoning length (`/steps_n`);
    `answered`, the share of answers the task could read at all (a format rate), where every score
    says (a user's reward_fn need not)."""
    groups: dict[str, list] = collections.defaultdict(list)
    for state, score in zip(states, scores):
        keys = ["", f"/stage_{state.stage}"]
        if "num_steps" in dict(state.demo.meta):
            keys.append(f"/steps_{dict(state.demo.meta)['num_steps']}")
        for key in keys:
            groups[key].append(score)
    report = {}
    for key, group in sorted(groups.items()):
        report[f"accuracy{key}"] = float(np.mean([s.correct for s in group]))
        report[f"reward{key}"] = float(np.mean([s.reward for s in group]))
    if scores and all(s.parsed is not None for s in scores):
        report["answered"] = float(np.mean([s.parsed for s in scores]))
    return report


def samples(task: Task, demos, records: list[dict]) -> list[dict]:
    """Evaluated problems as {"prompt", "completion", "answer", "correct"} (the first completion
    of each), for a log's samples."""
    return [{"prompt": task.prompt(d.question), "completion": r["completions"][0], "answer": r["answer"],
             "correct": bool(r["correct"])} for d, r in zip(demos, records)]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """config.eval: how problems are evaluated (settings.of builds it)."""
    batch_size: int = 32  # completions per sampler call
    max_new_tokens: int = 700
    maj_k: int = 0  # > 0: the majority answer of maj_k samples at `temperature`; 0: greedy
    temperature: float = 1.0


class Problems(NamedTuple):
    """What an evaluation reads: a task's problems and how to evaluate them."""
    task: Task
    demos: Sequence[Demonstration]
    settings: EvalSettings

    def greedy(self) -> "Problems":
        return self._replace(settings=dataclasses.replace(self.settings, maj_k=0))

    def sampled(self, maj_k: int, temperature: float) -> "Problems":
        return self._replace(settings=dataclasses.replace(self.settings, maj_k=maj_k, temperature=temperature))


def greedy_problems(task: Task, demos: Sequence[Demonstration], settings: EvalSettings) -> Problems:
    """`demos` of `task` evaluated greedily, in the batches `settings` (config.eval) sets."""
    return Problems(task, demos, settings).greedy()


def evaluate(policy: Policy, problems: Problems, desc: str = "eval") -> tuple[dict, list[dict]]:
    """Accuracy on the full task (start state k = 0): greedy, or with `maj_k` > 0 the majority
    answer of `maj_k` completions sampled at `temperature` (the report then also holds
    `sample_accuracy`, the mean over single samples). Returns (report, per-example records)."""
    (model_cfg, params, tokenizer, mesh), (task, demos, options) = policy, problems
    maj_k, batch_size = options.maj_k, options.batch_size
    states = tokenize_states(tokenizer, task, [start_states(task, demo, None)[0] for demo in demos])
    samples = maj_k or 1
    settings = sampling_config(tokenizer, options.max_new_tokens, options.temperature if maj_k else 1.0,
                               greedy=not maj_k)
    rows = [state for state in states for _ in range(samples)]  # a problem's samples are adjacent
    texts, predictions = [], []

    def read_chunk(chunk: Sequence[StartState], rollout: Rollout) -> None:
        chunk_texts = decode_completions(tokenizer, to_host(rollout), len(chunk))
        texts.extend(chunk_texts)
        responses = [s.given + t for s, t in zip(chunk, chunk_texts)]
        predictions.extend(sharding.computed_by_primary(lambda: task.answers(responses)))

    pending = None
    with watchdog.watching(desc):
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=not sharding.is_primary()):
            chunk = rows[start:start + batch_size]
            rollout = dispatch_sampling(model_cfg, params, chunk, settings,
                                        jax.random.fold_in(jax.random.key(0), start), mesh, rows=batch_size)
            if pending:  # the host scores the previous chunk while the device decodes this one
                read_chunk(*pending)
                watchdog.progress(f"{desc} batch {start // batch_size}")
            pending = (chunk, rollout)
        if pending:
            read_chunk(*pending)

    votes = [predictions[i * samples:(i + 1) * samples] for i in range(len(states))]
    scores, sample_scores = sharding.computed_by_primary(lambda: (
        [task.score_answer(majority(v), state.demo.answer) for v, state in zip(votes, states)],
        [task.score_answer(p, s.demo.answer) for p, s in zip(predictions, rows)] if maj_k else []))
    records = [{"id": state.demo.id, "completions": texts[i * samples:(i + 1) * samples], "predictions": votes[i],
                "answer": state.demo.answer, "correct": score.correct}
               for i, (state, score) in enumerate(zip(states, scores))]
    report = accuracy_report(states, scores)
    if maj_k:
        report["sample_accuracy"] = float(np.mean([score.correct for score in sample_scores]))
    return report, records
