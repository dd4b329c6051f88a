"""Mixed precision: float32 master weights with bfloat16 compute keep the paper's tiny learning
rates (lr 3e-7), where bfloat16 weights updated in place lose nearly every update."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax import optim, ppo, sharding
from r3jax.models import hf
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout
from r3jax.train import sft

LR = 3e-7
FP32 = dataclasses.replace(TINY, param_dtype="float32", dtype="float32")
MIXED = dataclasses.replace(TINY, param_dtype="float32", dtype="bfloat16")
ONE_DEVICE = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
BF16 = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="bfloat16")


def _tokens(seed: int, batch: int, length: int) -> np.ndarray:
    """Every vocabulary id appears, so every embedding row gets a gradient."""
    tokens = np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length)).astype(np.int32)
    tokens.reshape(-1)[:TINY.vocab_size] = np.arange(TINY.vocab_size)
    return tokens


def _sft_step(cfg, params):
    optimizer = optim.adamw(LR)
    tokens = _tokens(0, 8, 32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
             "loss_mask": np.ones_like(tokens)}
    batch = jax.tree.map(lambda x: x[:, None], batch)  # one microbatch
    state = sft.SFTState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    new_state, _ = sft.make_train_step(cfg, optimizer)(state, batch, 1.0)
    return new_state.params


def _ppo_update(cfg, policy):
    params = actor_critic_params(cfg, policy, separate_critic=False)
    optimizer = optim.adamw(LR)
    update = ppo.make_ppo_update(cfg, ppo.PPOConfig(epochs=1), optimizer)
    reference = sharding.compute_copy(cfg, ONE_DEVICE)(policy)
    tokens = _tokens(1, 8, 24)
    completion_mask = np.ones((8, 12), np.int32)
    completion_mask[:4, 8:] = 0
    rollout = Rollout(tokens, np.ones_like(tokens), np.full((8, 12), -4.0, np.float32), completion_mask,
                      completion_mask.sum(1))
    data = ppo.experience(rollout, np.array([1, 0, 0.2, 1, 0, 1, 0, 1], np.float32))
    state, _, _ = update(ppo.init_state(params, optimizer), reference, data, jax.random.key(0))
    return state.params.policy


def _deltas(cfg, step):
    before = tiny_params(cfg)
    after = step(cfg, jax.tree.map(jnp.copy, before))
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), after, before)


def _changed_fraction(deltas) -> float:
    leaves = jax.tree.leaves(deltas)
    return sum(int((d != 0).sum()) for d in leaves) / sum(d.size for d in leaves)


@pytest.mark.parametrize("step", [_sft_step, _ppo_update], ids=["sft", "ppo"])
def test_master_weights_keep_tiny_updates_that_bf16_weights_lose(step):
    mixed, exact, bf16 = (_deltas(cfg, step) for cfg in (MIXED, FP32, BF16))
    assert _changed_fraction(mixed) > 0.99
    assert _changed_fraction(bf16) < 0.1  # the defect the master weights fix
    # bf16 compute moves the weights as an fp32 run does: Adam's first step is about lr * sign(grad)
    flat_mixed = np.concatenate([d.ravel() for d in jax.tree.leaves(mixed)])
    flat_exact = np.concatenate([d.ravel() for d in jax.tree.leaves(exact)])
    assert np.abs(flat_mixed).max() < 1.25 * LR  # fp32 spacing near the norm scales (1.0) is 1.2e-7
    assert np.mean(np.sign(flat_mixed) == np.sign(flat_exact)) > 0.97
    assert np.corrcoef(flat_mixed, flat_exact)[0, 1] > 0.95


def test_master_weights_stay_float32_and_exports_take_the_asked_dtype(tmp_path):
    params = tiny_params(MIXED)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    assert {p.dtype for p in jax.tree.leaves(sharding.compute_copy(MIXED, ONE_DEVICE)(params))} == {jnp.dtype("bfloat16")}
    hf.save(str(tmp_path / "bf16"), MIXED, params, dtype="bfloat16")
    hf.save(str(tmp_path / "fp32"), MIXED, params)
    _, bf16_loaded = hf.load(str(tmp_path / "bf16"), param_dtype="bfloat16")
    _, fp32_loaded = hf.load(str(tmp_path / "fp32"))
    assert {p.dtype for p in jax.tree.leaves(bf16_loaded)} == {jnp.dtype("bfloat16")}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fp32_loaded, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=1e-2, atol=1e-6),
                 bf16_loaded, params)
    import json
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
