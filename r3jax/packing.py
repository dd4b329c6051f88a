"""Packed update batches: several rollouts share one row, so the forward passes of the RL update
run on real tokens instead of padding.

A rollout row (`[prompt + new]`: a left-padded prompt, then the completion and its padding) holds
one contiguous span of real tokens. `pack` lays these spans end to end, first fit by decreasing
length, in rows of a fixed width; each span is a segment (ids 1, 2, ... within its row, 0 for
padding) whose positions restart at 0. The model attends within segments only
(`transformer.forward` with positions), so each span's hidden states are those it has alone.
`state_index` reads them back in the padded layout: everything after the forward (log-probs,
values, GAE, group statistics, losses) runs on `[batch, new]` exactly as unpacked.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Packing(NamedTuple):
    tokens: np.ndarray       # [rows, width] int32
    segment_ids: np.ndarray  # [rows, width] int32: 1, 2, ... per rollout in the row; 0 padding
    positions: np.ndarray    # [rows, width] int32, restarting at 0 in each segment
    state_index: np.ndarray  # [batch, new] int32: flat index (row * width + column) of the hidden
    #                          state that predicts completion token t of rollout b


def round_up(count: int, multiple: int) -> int:
    """`count` (at least 1) rounded up to a multiple of `multiple`."""
    return -(-max(count, 1) // multiple) * multiple


def row_multiple(batch_shards: int) -> int:
    """What a packed batch's row count is a multiple of: the batch's shards (data x fsdp), and 2,
    so that a run compiles fewer distinct row counts."""
    return max(2, batch_shards)


def real_spans(attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first real column, real length) `[batch]` of rows whose real tokens are one contiguous span."""
    real = attention_mask > 0
    return real.argmax(axis=1), real.sum(axis=1)


def first_fit_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row `[batch]`, column `[batch]`, rows used) of spans of `lengths` laid into rows of `width`,
    longest first, each in the first row with room (first-fit decreasing)."""
    if lengths.max(initial=0) > width:
        raise ValueError(f"a rollout of {lengths.max()} tokens does not fit a packed row of {width}")
    row, column, free = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64), []
    for index in np.argsort(-lengths, kind="stable"):
        fitting = next((r for r, room in enumerate(free) if room >= lengths[index]), len(free))
        if fitting == len(free):
            free.append(width)
        row[index], column[index] = fitting, width - free[fitting]
        free[fitting] -= lengths[index]
    return row, column, len(free)


def pack(tokens: np.ndarray, attention_mask: np.ndarray, num_new: int, width: int, row_multiple: int = 1) -> Packing:
    """Packs rollouts `tokens`/`attention_mask [batch, prompt + new]` (host arrays) into rows of
    `width`, their count rounded up to a multiple of `row_multiple` (the batch's shards, and fewer
    distinct shapes to compile)."""
    starts, lengths = real_spans(attention_mask)
    row, column, used = first_fit_rows(lengths, width)
    rows = round_up(used, row_multiple)
    packed_tokens = np.zeros((rows, width), np.int32)
    segment_ids = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    segments_in_row = np.zeros(rows, np.int32)
    for b in np.argsort(row * width + column, kind="stable"):
        r, c, n = row[b], column[b], lengths[b]
        segments_in_row[r] += 1
        packed_tokens[r, c:c + n] = tokens[b, starts[b]:starts[b] + n]
        segment_ids[r, c:c + n] = segments_in_row[r]
        positions[r, c:c + n] = np.arange(n)
    prompt_lengths = tokens.shape[1] - num_new - starts
    # the state before completion token t sits at prompt_length - 1 + t within the span; past the
    # completion (masked positions) any state of the span will do, so the index stays in it
    within = np.minimum(prompt_lengths[:, None] - 1 + np.arange(num_new)[None], lengths[:, None] - 1)
    state_index = np.minimum((row * width + column)[:, None] + np.maximum(within, 0), rows * width - 1)
    return Packing(packed_tokens, segment_ids, positions, state_index.astype(np.int32))


def real_fraction(segment_ids: np.ndarray) -> float:
    """The share of a layout's token positions that hold real tokens (`[rows, width]`, 0 padding)."""
    return float((segment_ids > 0).mean())
