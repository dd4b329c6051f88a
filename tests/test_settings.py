"""The run's settings: one frozen config and the typed parts built from it."""
import dataclasses

import pytest

from r3jax import config as config_lib, settings
from r3jax.evaluate import EvalSettings
from r3jax.ppo import PPOConfig


def test_the_typed_parts_read_the_config_and_the_config_is_read_only():
    config = config_lib.base_config()
    config.rl.clip_ratio_low, config.eval.batch_size, config.metrics.sample_completions = 0.3, 7, 2
    built = settings.of(config)
    assert built.ppo.clip_ratio_low == 0.3 and built.eval.batch_size == 7 and built.metrics.sample_completions == 2
    assert dataclasses.asdict(built.ppo).keys() == {f.name for f in dataclasses.fields(PPOConfig)}
    assert built.eval == EvalSettings(**{f.name: config.eval[f.name] for f in dataclasses.fields(EvalSettings)})
    with pytest.raises(AttributeError, match="immutable"):
        built.config.rl.lr = 1.0
    config.rl.clip_ratio_low = 0.1  # a later change to the source config reaches no built settings
    assert built.config.rl.clip_ratio_low == 0.3 and built.ppo.clip_ratio_low == 0.3


@pytest.mark.parametrize("freeze", [False, True], ids=["plain", "frozen"])
def test_with_changes_returns_a_changed_copy_and_leaves_the_given_config_alone(freeze):
    config = config_lib.base_config()
    given = settings.of(config).config if freeze else config
    changed = settings.with_changes(given, {"rl.lr": 0.5, "seed": 3, "sft.schedule": "constant"})
    assert (changed.rl.lr, changed.seed, changed.sft.schedule) == (0.5, 3, "constant")
    assert (given.rl.lr, given.seed, given.sft.schedule) == (config.rl.lr, config.seed, config.sft.schedule)
    assert settings.of(changed).ppo == settings.of(config).ppo  # lr is the optimizer's, not the update's
    assert settings.of(settings.with_changes(config, {"rl.kl_coef": 0.0})).ppo.kl_coef == 0.0


def test_changes_to_one_copy_never_reach_the_next():
    """(FrozenConfigDict hands out the ConfigDict it was built from; the comparison derives many
    unit configs from one frozen config.)"""
    frozen = settings.of(config_lib.base_config()).config
    first = settings.with_changes(frozen, {"rl.lr": 0.5})
    second = settings.with_changes(frozen, {"seed": 4})
    first.rl.steps = 9
    assert (second.rl.lr, second.rl.steps, frozen.as_configdict().rl.lr) == (frozen.rl.lr, frozen.rl.steps, frozen.rl.lr)
