"""Text <-> token batches: start states to prompt tokens that are exact prefixes of the SFT
sequences, sampling from them, and completions back to text.

SFT trains on `BOS + encode(prompt) + encode_continuation(response) + EOS`. A start state's prompt
is that sequence cut after the tokens of its given steps, so RL samples from exactly the token
prefixes SFT trained on, for any tokenizer. Where a step boundary falls inside a token (a
byte-level BPE merging "\\n" into the next word, say), the cut comes before that token: it goes to
the completion, and `StartState.given` holds the text the prompt tokens cover.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from r3jax import sharding
from r3jax.config import data_parallel_size
from r3jax.curriculum import StartState
from r3jax.models.transformer import ModelConfig
from r3jax.sampling import Rollout, SamplingConfig, prompt_bucket, sample
from r3jax.tasks.base import Demonstration, Task
from r3jax.tokenizer import Span, Tokenizer, left_pad, tokens_within


class Policy(NamedTuple):
    """A model ready to sample and train: what the trainers, the evaluator and the results pass
    as one value. The functions below it keep the order (model_cfg, params, ...)."""
    model_cfg: ModelConfig
    params: Any  # the model's weights, a pytree placed on `mesh`
    tokenizer: Tokenizer
    mesh: Any  # jax.sharding.Mesh

    def with_params(self, params: Any) -> "Policy":
        return self._replace(params=params)


class EncodedDemo(NamedTuple):
    prompt: tuple[int, ...]    # BOS + the prompt's tokens: how every SFT sequence and start state begins
    response: tuple[int, ...]  # the response's tokens as a continuation of the prompt (no EOS)
    spans: tuple[Span, ...]    # per response token: its (begin, end) characters in demo.response


def encode_demo(tokenizer: Tokenizer, task: Task, demo: Demonstration) -> EncodedDemo:
    response, spans = tokenizer.encode_continuation(demo.response)
    return EncodedDemo(tuple(tokenizer.encode(task.prompt(demo.question), add_bos=True)),
                       tuple(response), tuple(spans))


def sft_example(encoded: EncodedDemo, eos_id: int) -> tuple[list[int], list[int]]:
    """(tokens, loss mask): the prompt (mask 0), then the response and EOS (mask 1)."""
    tokens = [*encoded.prompt, *encoded.response, eos_id]
    return tokens, [0] * len(encoded.prompt) + [1] * (len(encoded.response) + 1)


def tokenize_states(tokenizer: Tokenizer, task: Task, states: Sequence[StartState]) -> list[StartState]:
    """The states with `prompt_tokens` set to their SFT sequence's tokens up to the end of the
    given steps, and `given`, `prompt_text` and `target` moved back to a token boundary if needed."""
    encoded: dict[str, EncodedDemo] = {}
    tokenized = []
    for state in states:
        demo = state.demo
        if demo.id not in encoded:
            encoded[demo.id] = encode_demo(tokenizer, task, demo)
        prompt, response, spans = encoded[demo.id]
        count = tokens_within(spans, len(state.given))
        given_chars = spans[count][0] if count < len(spans) else len(demo.response)
        given = demo.response[:given_chars]
        tokenized.append(dataclasses.replace(
            state, given=given, prompt_text=task.prompt(demo.question) + given,
            target=demo.response[given_chars:], prompt_tokens=prompt + response[:count]))
    return tokenized


def encode_prompts(states: Sequence[StartState], settings: SamplingConfig, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens and mask `[rows, bucket]`, left-padded to the sampler's bucket here on the host
    (`sample` would pad on the device: one more small program per prompt width); rows past the
    states repeat the first one so the batch splits evenly over the mesh."""
    if any(not s.prompt_tokens for s in states):
        raise ValueError("start states without prompt tokens: pass them through tokenize_states")
    encoded = [list(s.prompt_tokens) for s in states]
    encoded += [encoded[0]] * (rows - len(encoded))
    return left_pad(encoded, settings.pad_id, prompt_bucket(max(map(len, encoded)), settings.min_prompt_bucket))


def to_host(rollout: Rollout) -> Rollout:
    """The rollout's fields as numpy on this process, gathered from the other hosts (multi-host:
    every process must call it)."""
    return Rollout(*(sharding.to_host(field) for field in rollout))


def decode_completions(tokenizer: Tokenizer, rollout: Rollout, count: int) -> list[str]:
    """The text of the first `count` completions of a rollout on the host (`to_host`), each cut
    after its stop token."""
    mask = rollout.completion_mask.astype(bool)
    stops = set(tokenizer.stop_ids)
    return [tokenizer.decode([t for t in row[m] if t not in stops])
            for row, m in zip(rollout.completions[:count], mask[:count])]


def dispatch_sampling(model_cfg: ModelConfig, params: Any, states: Sequence[StartState],
                      settings: SamplingConfig, key: jax.Array, mesh, rows: int = 0) -> Rollout:
    """Queues sampling of one completion per start state and returns without waiting for the
    device. The batch has at least `rows` rows (a fixed batch shape means one compile), rounded
    up to a multiple of the data-parallel size."""
    rows = max(rows, len(states))
    rows += -rows % data_parallel_size(mesh.devices.shape)
    tokens, mask = sharding.shard_batch(encode_prompts(states, settings, rows), mesh)
    return sample(model_cfg, params, tokens, mask, key, settings)


def generate(model_cfg: ModelConfig, params: Any, tokenizer: Tokenizer, states: Sequence[StartState],
             settings: SamplingConfig, key: jax.Array, mesh, rows: int = 0) -> tuple[Rollout, list[str]]:
    """Samples one completion per start state: the rollout on the host and the completions' text."""
    rollout = to_host(dispatch_sampling(model_cfg, params, states, settings, key, mesh, rows))
    return rollout, decode_completions(tokenizer, rollout, len(states))


def sampling_config(tokenizer: Tokenizer, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, greedy: bool = False) -> SamplingConfig:
    """The sampler's settings, with `tokenizer`'s stop and pad ids: the one way every caller
    builds them."""
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          greedy=greedy, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
