"""Sampler: its draws vs numpy's argmax and JAX's categorical, greedy vs full-forward argmax, log-probs vs
teacher forcing, padding, stops, mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax import models, sharding
from r3jax.models.transformer import cache_block, init_params
from r3jax.sampling import SamplingConfig, categorical, filter_logits, first_argmax, sample
from r3jax.tokenizer import left_pad

PAD = 0
full_logits = jax.jit(lambda p, t, m: models.logits(TINY, p, t, m))


@pytest.fixture(scope="module")
def params():
    return tiny_params(scale=8.0)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(3, TINY.vocab_size, size=n)) for n in lengths]
    tokens, mask = left_pad(rows, PAD)
    return jnp.asarray(tokens), jnp.asarray(mask), rows


def _teacher_forced_logprobs(params, rollout, temperature):
    logits = models.logits(TINY, params, rollout.tokens, rollout.attention_mask)
    p = rollout.prompt_length
    logp = jax.nn.log_softmax(logits[:, p - 1:-1] / temperature, axis=-1)
    return jnp.take_along_axis(logp, rollout.completions[..., None], axis=-1)[..., 0]


def test_first_argmax_is_numpys_argmax_with_ties_and_minus_infinity():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(200, 37)).astype(np.float32)  # many tied maxima
    x[rng.random(x.shape) < 0.2] = -np.inf
    x[5] = -np.inf
    x[5, 36] = 1.0  # the maximum at the last index
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.parametrize("top_k", [0, 5])
def test_categorical_draws_what_jax_random_categorical_draws(top_k):
    """The sampler's categorical is jax.random.categorical with another argmax: the same token for
    every key, also where top-k set logits to -inf."""
    logits = filter_logits(jax.random.normal(jax.random.key(0), (8, 300)) * 4, top_k, 1.0)
    ours, theirs = jax.jit(categorical), jax.jit(jax.random.categorical)
    for seed in range(100):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(ours(key, logits)), np.asarray(theirs(key, logits)))


def test_greedy_equals_full_forward_argmax(params):
    tokens, mask, rows = _prompts([5, 9, 3])
    rollout = sample(TINY, params, tokens, mask, jax.random.key(0),
                     SamplingConfig(max_new_tokens=12, greedy=True, pad_id=PAD))
    for row, prompt in enumerate(rows):
        seq = list(prompt)
        for _ in range(12):
            # right-padded to one shape (one compile); causal attention ignores the padding
            n = len(seq)
            padded = jnp.asarray([seq + [PAD] * (32 - n)])
            real = jnp.asarray([[1] * n + [0] * (32 - n)])
            seq.append(int(jnp.argmax(full_logits(params, padded, real)[0, n - 1])))
        np.testing.assert_array_equal(np.asarray(rollout.completions[row]), seq[len(prompt):])


def test_cache_block_defaults_by_backend(monkeypatch):
    """Unset, a decode step reads the KV cache in 64-slot blocks on a CPU and in one pass on an
    accelerator (bench/results/sampler-nvidia-h100-80gb-hbm3.json); a set value always wins."""
    assert TINY.decode_block is None and cache_block(TINY) == 64
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cache_block(TINY) == 0 and cache_block(TINY.replace(decode_block=8)) == 8


# decode_block 8: the 32-slot cache is read in 4 blocks (online softmax); 0: in one pass
@pytest.mark.parametrize("temperature, decode_block", [(1.0, 64), (0.7, 64), (1.0, 8), (1.0, 0)])
def test_logprobs_equal_teacher_forced(params, temperature, decode_block):
    tokens, mask, _ = _prompts([4, 11, 7, 2])
    rollout = sample(TINY.replace(decode_block=decode_block), params, tokens, mask, jax.random.key(1),
                     SamplingConfig(max_new_tokens=16, temperature=temperature, pad_id=PAD))
    recomputed = _teacher_forced_logprobs(params, rollout, temperature)
    m = np.asarray(rollout.completion_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[m], np.asarray(recomputed)[m], atol=1e-4)


def test_left_padding_does_not_change_samples(params):
    _, _, rows = _prompts([6])
    settings = SamplingConfig(max_new_tokens=10, pad_id=PAD)
    outs = []
    for length in (6, 9, 13):  # all in the 16 bucket, so the random draws line up
        tokens, mask = left_pad(rows * 2, PAD, length)
        outs.append(sample(TINY, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(2), settings))
    for other in outs[1:]:
        np.testing.assert_array_equal(np.asarray(other.completions), np.asarray(outs[0].completions))
        np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(outs[0].logprobs), atol=1e-5)


def test_stopped_rows_stay_masked_and_rng_reproduces(params):
    tokens, mask, _ = _prompts([5, 8, 3, 6], seed=3)
    free = sample(TINY, params, tokens, mask, jax.random.key(4), SamplingConfig(max_new_tokens=20, pad_id=PAD))
    stop = int(free.completions[0, 3])
    settings = SamplingConfig(max_new_tokens=20, stop_ids=(stop,), pad_id=PAD)
    first = sample(TINY, params, tokens, mask, jax.random.key(4), settings)
    again = sample(TINY, params, tokens, mask, jax.random.key(4), settings)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    completions, cmask = np.asarray(first.completions), np.asarray(first.completion_mask)
    for row in range(4):
        hits = np.flatnonzero(completions[row] == stop)
        end = hits[0] + 1 if hits.size else 20
        assert cmask[row, :end].all() and not cmask[row, end:].any()
        assert (completions[row, end:] == PAD).all()
        assert int(first.lengths[row]) == end
    assert int(first.lengths[0]) <= 4


def test_mesh_result_equals_single_device(params):
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.logical_shardings(
        jax.eval_shape(functools.partial(init_params, TINY), jax.random.key(0)), mesh)
    sharded_params = jax.device_put(params, shardings)
    tokens, mask, _ = _prompts([5, 9, 3, 7, 2, 6, 4, 8], seed=5)
    settings = SamplingConfig(max_new_tokens=12, pad_id=PAD)
    single = sample(TINY, params, tokens, mask, jax.random.key(6), settings)
    tokens_s, mask_s = sharding.shard_batch((np.asarray(tokens), np.asarray(mask)), mesh)
    multi = sample(TINY, sharded_params, tokens_s, mask_s, jax.random.key(6), settings)
    np.testing.assert_array_equal(np.asarray(multi.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(multi.logprobs), np.asarray(single.logprobs), atol=1e-5)
