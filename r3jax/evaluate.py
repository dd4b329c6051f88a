"""Generation from start states, and accuracy per task, per start stage and per reasoning length."""
from __future__ import annotations

import collections
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from r3jax import sharding
from r3jax.curriculum import StartState, start_states
from r3jax.models.transformer import ModelConfig
from r3jax.sampling import Rollout, SamplingConfig, sample
from r3jax.tasks.answers import majority
from r3jax.tasks.base import Task
from r3jax.tokenizer import Tokenizer, left_pad


def encode_prompts(tokenizer: Tokenizer, states: Sequence[StartState], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt tokens `[rows, length]` (BOS + prompt text); rows past the states repeat
    the first one so the batch splits evenly over the mesh."""
    encoded = [tokenizer.encode(s.prompt_text, add_bos=True) for s in states]
    encoded += [encoded[0]] * (rows - len(encoded))
    return left_pad(encoded, tokenizer.pad_id)


def decode_completions(tokenizer: Tokenizer, rollout: Rollout, count: int) -> list[str]:
    """The text of the first `count` completions, each cut after its stop token."""
    completions = sharding.to_host(rollout.completions)
    mask = sharding.to_host(rollout.completion_mask).astype(bool)
    stops = set(tokenizer.stop_ids)
    return [tokenizer.decode([t for t in row[m] if t not in stops]) for row, m in zip(completions[:count], mask[:count])]


def dispatch_sampling(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, states: Sequence[StartState],
                      settings: SamplingConfig, key: jax.Array, mesh, rows: int = 0) -> Rollout:
    """Queues sampling of one completion per start state and returns without waiting for the
    device. The batch has at least `rows` rows (a fixed batch shape means one compile), rounded
    up to a multiple of the data-parallel size."""
    rows = max(rows, len(states))
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows += -rows % data_parallel
    tokens, mask = sharding.shard_batch(encode_prompts(tokenizer, states, rows), mesh)
    return sample(params, model_cfg, tokens, mask, key, settings)


def generate(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, states: Sequence[StartState],
             settings: SamplingConfig, key: jax.Array, mesh, rows: int = 0) -> tuple[Rollout, list[str]]:
    """Samples one completion per start state: the rollout and the completions' text."""
    rollout = dispatch_sampling(params, model_cfg, tokenizer, states, settings, key, mesh, rows)
    return rollout, decode_completions(tokenizer, rollout, len(states))


def accuracy_report(states: Sequence[StartState], scores) -> dict[str, float]:
    """accuracy and reward overall, per stage (`/stage_j`) and per reasoning length (`/steps_n`)."""
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
    return report


def evaluate(params: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, task: Task, demos, mesh,
             batch_size: int, max_new_tokens: int, desc: str = "eval", maj_k: int = 0,
             temperature: float = 1.0) -> tuple[dict, list[dict]]:
    """Accuracy on the full task (start state k = 0): greedy, or with `maj_k` > 0 the majority
    answer of `maj_k` completions sampled at `temperature` (the report then also holds
    `sample_accuracy`, the mean over single samples). Returns (report, per-example records)."""
    states = [start_states(task, demo, None)[0] for demo in demos]
    samples = maj_k or 1
    settings = SamplingConfig(max_new_tokens=max_new_tokens, greedy=not maj_k,
                              temperature=temperature if maj_k else 1.0, stop_ids=tokenizer.stop_ids,
                              pad_id=tokenizer.pad_id)
    rows = [state for state in states for _ in range(samples)]  # a problem's samples are adjacent
    texts, predictions = [], []

    def read_chunk(chunk: Sequence[StartState], rollout: Rollout) -> None:
        chunk_texts = decode_completions(tokenizer, rollout, len(chunk))
        texts.extend(chunk_texts)
        predictions.extend(task.answers([s.given + t for s, t in zip(chunk, chunk_texts)]))

    pending = None
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=not sharding.is_primary()):
        chunk = rows[start:start + batch_size]
        rollout = dispatch_sampling(params, model_cfg, tokenizer, chunk, settings,
                                    jax.random.fold_in(jax.random.key(0), start), mesh, rows=batch_size)
        if pending:  # the host scores the previous chunk while the device decodes this one
            read_chunk(*pending)
        pending = (chunk, rollout)
    if pending:
        read_chunk(*pending)

    scores, records = [], []
    for i, state in enumerate(states):
        votes = predictions[i * samples:(i + 1) * samples]
        score = task.score_answer(majority(votes), state.demo.answer)
        scores.append(score)
        records.append({"id": state.demo.id, "completions": texts[i * samples:(i + 1) * samples],
                        "predictions": votes, "answer": state.demo.answer, "correct": score.correct})
    report = accuracy_report(states, scores)
    if maj_k:
        report["sample_accuracy"] = float(np.mean([task.score_answer(p, s.demo.answer).correct
                                                   for p, s in zip(predictions, rows)]))
    return report, records
