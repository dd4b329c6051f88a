"""A run's settings, built once from its validated config (`of`, in main.run): the config itself,
frozen, beside the typed settings that the update, the evaluator and the metrics read. The
comparison's units differ in rl.*, sft.* and the seed; each unit's run gets its own, from its own
config, through the same `of`.

The model's ModelConfig is not here: its vocabulary and shape come from the tokenizer or the
checkpoint a run loads (train.job).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from r3jax.config import from_section, value_at
from r3jax.evaluate import EvalSettings
from r3jax.metrics import MetricsConfig
from r3jax.ppo import PPOConfig


class Settings(NamedTuple):
    config: ml_collections.FrozenConfigDict  # every key, read-only
    ppo: PPOConfig           # config.rl's update knobs
    eval: EvalSettings       # config.eval
    metrics: MetricsConfig   # config.metrics


def of(config: ml_collections.ConfigDict) -> Settings:
    # FrozenConfigDict keeps the ConfigDict it is given (as_configdict): freeze a copy of its own
    frozen = ml_collections.FrozenConfigDict(config.copy_and_resolve_references())
    return Settings(frozen, from_section(PPOConfig, frozen.rl), from_section(EvalSettings, frozen.eval),
                    from_section(MetricsConfig, frozen.metrics))


def with_changes(config: ml_collections.ConfigDict, changes: dict[str, Any]) -> ml_collections.ConfigDict:
    """A new config: `config` (frozen or not, left as it is) with {dotted key: value} applied."""
    changed = ml_collections.ConfigDict(config).copy_and_resolve_references()  # of a frozen one: its kept ConfigDict
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (value_at(changed, section) if section else changed)[name] = value
    return changed
