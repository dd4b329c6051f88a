"""The update on a trimmed batch (cut to its longest real prompt and completion) and on a packed
one (several rollouts per row, `packing.pack`) equals the update on the padded batch, to float32
rounding: parameters and metrics, for every estimator and loss aggregation, on one device and on
8; and with no KL penalty the reference is never read."""
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY, tiny_params
from r3jax import optim, packing, ppo, programs, sharding
from r3jax.models.transformer import attention_kernel, fused_attention, init_params
from r3jax.models.value import actor_critic_params
from r3jax.sampling import Rollout, SamplingConfig, sample
from r3jax.tokenizer import left_pad
from r3jax.train.rl import trim, update_batch

ROWS, NEW, EXTRA_PROMPT, EXTRA_NEW = 8, 6, 13, 21
# float32 rounding: the padded batch sums attention and losses over more (masked, zero) terms, and
# the packed one in another order
TOLERANCE = dict(rtol=2e-5, atol=2e-6)
PACK_WIDTH = 16  # two or three of the test's rollouts (4-12 real tokens) per row


def _padded_batch(params, group_size: int) -> ppo.Experience:
    """A sampled batch, then widened as the sampler's buckets widen it: EXTRA_PROMPT more columns
    of left padding and EXTRA_NEW more completion columns past every completion's end; the
    completions cut at different lengths."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, TINY.vocab_size, size=n)) for n in rng.integers(2, 7, ROWS // group_size)]
    tokens, mask = left_pad([p for p in prompts for _ in range(group_size)], 0)
    rollout = sample(TINY, params.policy, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(5),
                     SamplingConfig(max_new_tokens=NEW, pad_id=0))
    rollout = Rollout(*map(np.asarray, rollout))
    lengths = rng.integers(1, NEW + 1, size=ROWS)
    lengths[0] = NEW  # the longest completion fills the sampled width
    completion_mask = (np.arange(NEW)[None] < lengths[:, None]).astype(np.int32)
    prompt = rollout.tokens.shape[1] - NEW
    attention = np.concatenate([rollout.attention_mask[:, :prompt], completion_mask], axis=1)
    tokens = np.where(attention > 0, rollout.tokens, 0)
    widen = lambda x, left, right: np.pad(x, ((0, 0), (left, right)))
    padded = Rollout(widen(tokens, EXTRA_PROMPT, EXTRA_NEW), widen(attention, EXTRA_PROMPT, EXTRA_NEW),
                     widen(rollout.logprobs * completion_mask, 0, EXTRA_NEW), widen(completion_mask, 0, EXTRA_NEW),
                     lengths.astype(np.int32))
    scores = rng.random(ROWS).astype(np.float32)
    return ppo.Experience(padded, scores, np.ones(ROWS, np.float32))


def _update(cfg, params, batch, mesh=None, model_cfg=TINY):
    # plain SGD: Adam's first steps move every weight by about +-lr whatever its gradient's size, so
    # a gradient of rounding size (1e-8) would move a weight as far as a real one
    optimizer = optax.sgd(0.05)
    state = ppo.init_state(jax.tree.map(jnp.copy, params), optimizer)
    reference = tiny_params(seed=1)
    if mesh is not None:
        policy_shardings = sharding.logical_shardings(
            jax.eval_shape(functools.partial(init_params, TINY), jax.random.key(0)), mesh)
        state = ppo.init_state(jax.device_put(jax.tree.map(jnp.copy, params), params.replace(
            policy=policy_shardings, value_head=jax.tree.map(lambda _: sharding.replicated(mesh), params.value_head),
            critic_backbone=None if params.critic_backbone is None else policy_shardings)), optimizer)
        reference, batch = jax.device_put(reference, policy_shardings), sharding.shard_batch(batch, mesh)
    with programs.mesh_context((state, reference, batch)):  # as programs.Cached traces a run's update
        state, metrics, per_sequence = ppo.make_ppo_update(model_cfg, cfg, optimizer)(state, reference, batch,
                                                                                     jax.random.key(4))
    return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}, per_sequence


def packed(batch: ppo.Experience, batch_shards: int = 1) -> ppo.Experience:
    """The batch as rl.pack gives it to the update: trimmed, packed, the rollout cut to its completions."""
    return update_batch(types.SimpleNamespace(length_bucket=4, pack=True, pack_width=PACK_WIDTH), batch, batch_shards)


def _assert_same_update(cfg, params, mesh=None, model_cfg=TINY):
    """The padded batch's update under the dense attention kernel against the trimmed batch's (cfg
    as given) and the packed batch's (one minibatch: packed rows mix rollouts, so they are not
    split), both under model_cfg's kernel."""
    padded = _padded_batch(params, cfg.group_size)
    trimmed = trim(padded, 4)
    assert trimmed.rollout.tokens.shape[1] < padded.rollout.tokens.shape[1] - EXTRA_PROMPT  # both regions cut
    assert trimmed.rollout.completion_mask.shape[1] == 8  # the longest completion, 6, rounded up to 4s
    one_minibatch = dataclasses.replace(cfg, minibatches=1)
    for cfg, batch in ((cfg, trimmed), (one_minibatch, packed(padded, 1 if mesh is None else 4))):
        want_params, want, want_rows = _update(cfg, params, padded, mesh)
        got_params, got, got_rows = _update(cfg, params, batch, mesh, model_cfg)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], err_msg=key, **TOLERANCE)
        for key in want_rows:
            np.testing.assert_allclose(np.asarray(got_rows[key]), np.asarray(want_rows[key]), err_msg=key,
                                       **TOLERANCE)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), got_params, want_params)
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got_params,
                                             jax.tree.map(np.asarray, params)))
        assert max(moved) > 1e-4  # the update did move the weights


BASE = ppo.PPOConfig(kl_coef=0.05, epochs=2, minibatches=2, vf_coef=0.5, max_new_tokens=NEW + EXTRA_NEW)


@pytest.mark.parametrize("estimator, separate_critic, loss_agg", [
    ("gae", False, "token_mean"), ("gae", True, "token_mean"), ("grpo", False, "seq_mean_token_sum_norm"),
    ("rloo", False, "seq_mean_token_mean"),
], ids=["gae-value-head", "gae-separate-critic", "grpo-sum-norm", "rloo-seq-mean"])
def test_trimmed_update_equals_padded(estimator, separate_critic, loss_agg):
    critic = estimator == "gae"
    cfg = dataclasses.replace(BASE, estimator=estimator, group_size=1 if critic else 4, loss_agg=loss_agg)
    _assert_same_update(cfg, actor_critic_params(TINY, tiny_params(), separate_critic, critic=critic))


def test_trimmed_update_equals_padded_on_8_devices():
    cfg = dataclasses.replace(BASE, estimator="grpo", group_size=4, loss_agg="seq_mean_token_sum_norm")
    _assert_same_update(cfg, actor_critic_params(TINY, tiny_params(), False, critic=False),
                        sharding.make_mesh((2, 2, 2)))


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_a_fused_attention_kernel_gives_the_dense_update(kernel):
    """model.attention_impl=pallas or splash (Pallas's GPU and TPU flash attention with segment ids;
    interpreted on a CPU) on the trimmed and the packed batch gives the dense kernel's update on
    the padded batch."""
    cfg = dataclasses.replace(BASE, estimator="grpo", group_size=4, loss_agg="seq_mean_token_sum_norm")
    _assert_same_update(cfg, actor_critic_params(TINY, tiny_params(), False, critic=False),
                        model_cfg=TINY.replace(attention_impl=kernel))


def test_splash_on_8_devices_gives_the_dense_update():
    """Splash run per device (`transformer.per_device`): rows over data x fsdp, heads over tensor."""
    cfg = dataclasses.replace(BASE, estimator="grpo", group_size=4, loss_agg="seq_mean_token_sum_norm")
    _assert_same_update(cfg, actor_critic_params(TINY, tiny_params(), False, critic=False),
                        sharding.make_mesh((2, 2, 2)), model_cfg=TINY.replace(attention_impl="splash"))


@pytest.mark.parametrize("kv_heads, local_heads", [(2, 1), (1, 1), (4, 2)])
@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_a_pallas_kernel_runs_on_each_devices_shard(kernel, kv_heads, local_heads):
    """On a mesh, the kernel sees its device's rows and key/value heads (all of them where `tensor`
    does not divide their count); with no mesh, the whole arrays."""
    batch, seq, groups, dim = 8, 16, 2, 8
    q = jnp.zeros((batch, seq, kv_heads, groups, dim))
    keys = jnp.zeros((batch, kv_heads, seq, dim))
    segments = jnp.ones((batch, seq), jnp.int32)

    def kernel_inputs():
        jaxpr = jax.make_jaxpr(functools.partial(fused_attention, kernel=kernel))(q, keys, keys, segments)
        mapped = _equations(jaxpr.jaxpr, "shard_map")
        # the last four: splash's mask tables come first, replicated
        return [tuple(v.aval.shape) for v in mapped[0].params["jaxpr"].invars[-4:]] if mapped else None

    assert kernel_inputs() is None
    with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
        query_shard, key_shard, _, segment_shard = kernel_inputs()
    assert query_shard == (batch // 4, seq, local_heads, groups, dim)
    assert key_shard == (batch // 4, seq, local_heads, dim)
    assert segment_shard == (batch // 4, seq)


def test_a_program_built_for_another_platform_takes_its_kernels():
    """`compiling_for`, as the planner's --tpu and bench/tpu_compile.py build for chips not attached:
    `auto`'s kernel, the decode's cache blocks and whether a Pallas kernel is interpreted follow the
    platform named, here and back outside the block."""
    from r3jax.models import transformer

    bf16 = TINY.replace(dtype="bfloat16")
    q, keys = jnp.zeros((2, 16, 2, 2, 8)), jnp.zeros((2, 2, 16, 8))

    def interpreted(kernel):
        jaxpr = jax.make_jaxpr(functools.partial(fused_attention, kernel=kernel))(q, keys, keys, jnp.ones((2, 16), int))
        return [bool(e.params["interpret"]) for e in _equations(jaxpr.jaxpr, "pallas_call")]

    assert (attention_kernel(bf16), transformer.cache_block(TINY), interpreted("splash")) == ("xla", 64, [True])
    with transformer.compiling_for("gpu"):
        assert (attention_kernel(bf16), transformer.cache_block(TINY), interpreted("pallas")) == ("cudnn", 0, [False])
    with transformer.compiling_for("tpu"):
        assert (attention_kernel(bf16), transformer.cache_block(TINY), interpreted("splash")) == ("xla", 0, [False])
    assert transformer.platform() == "cpu"


def _equations(jaxpr, primitive: str) -> list:
    """The `primitive` equations of `jaxpr` and of every jaxpr in its other equations' parameters."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
            continue
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _equations(inner, primitive)
    return found


def test_params_are_made_without_a_pallas_kernel():
    """sharding.init_sharded jits the init over every device: a Pallas kernel there would be a Mosaic
    call outside shard_map, which XLA refuses to compile for several TPU chips."""
    for kernel in ("pallas", "splash"):
        jaxpr = jax.make_jaxpr(functools.partial(init_params, TINY.replace(attention_impl=kernel)))(jax.random.key(0))
        assert "pallas_call" not in str(jaxpr)


def test_auto_attention_is_fused_under_bfloat16_on_a_gpu_and_dense_elsewhere(monkeypatch):
    assert TINY.attention_impl == "auto"
    assert attention_kernel(TINY.replace(dtype="bfloat16")) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_kernel(TINY.replace(dtype="bfloat16")) == "cudnn"
    assert attention_kernel(TINY) == "xla"  # cuDNN takes 16-bit inputs only
    assert attention_kernel(TINY.replace(dtype="bfloat16", attention_impl="pallas")) == "pallas"


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_every_loss_aggregation_reads_the_same_on_the_trimmed_batch(loss_agg):
    """Each aggregation of per-token values over the completion region, padded against trimmed
    (the full updates above run each estimator with one of them)."""
    batch = _padded_batch(actor_critic_params(TINY, tiny_params(), False), 1)
    trimmed = trim(batch, 4)
    values = np.random.default_rng(1).normal(size=batch.rollout.completion_mask.shape).astype(np.float32)
    width = trimmed.rollout.completion_mask.shape[1]
    padded_loss = ppo.aggregate(values, batch.rollout.completion_mask, loss_agg, NEW + EXTRA_NEW)
    trimmed_loss = ppo.aggregate(values[:, :width], trimmed.rollout.completion_mask, loss_agg, NEW + EXTRA_NEW)
    np.testing.assert_allclose(float(trimmed_loss), float(padded_loss), **TOLERANCE)


def test_trim_rounds_to_the_bucket_and_never_widens():
    batch = _padded_batch(actor_critic_params(TINY, tiny_params(), False), 1)
    prompt = batch.rollout.tokens.shape[1] - NEW - EXTRA_NEW
    longest_prompt = int(batch.rollout.attention_mask[:, :prompt].sum(1).max())
    for bucket in (1, 3, 32, 1000):
        trimmed = trim(batch, bucket)
        new = trimmed.rollout.completion_mask.shape[1]
        assert new == min(NEW + EXTRA_NEW, -(-NEW // bucket) * bucket)
        assert trimmed.rollout.tokens.shape[1] - new == min(prompt, -(-longest_prompt // bucket) * bucket)
        assert trimmed.rollout.logprobs.shape == trimmed.rollout.completion_mask.shape
        assert int(trimmed.rollout.completion_mask.sum()) == int(batch.rollout.completion_mask.sum())
        assert int(trimmed.rollout.attention_mask.sum()) == int(batch.rollout.attention_mask.sum())


def test_without_a_kl_penalty_the_reference_is_never_read():
    cfg = dataclasses.replace(BASE, kl_coef=0.0, estimator="grpo", group_size=4)
    params = actor_critic_params(TINY, tiny_params(), False, critic=False)
    batch = trim(_padded_batch(params, 4), 4)
    optimizer = optim.adamw(1e-3)
    update = ppo.make_ppo_update(TINY, cfg, optimizer)
    with_reference = update(ppo.init_state(jax.tree.map(jnp.copy, params), optimizer), tiny_params(seed=1), batch,
                            jax.random.key(4))
    without = update(ppo.init_state(jax.tree.map(jnp.copy, params), optimizer), None, batch, jax.random.key(4))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, without[0].params),
                 jax.tree.map(np.asarray, with_reference[0].params))
    assert "kl" not in without[1] and "kl" not in without[2]


def test_pack_lays_each_rollout_whole_into_one_segment_and_indexes_its_completion_states():
    batch = trim(_padded_batch(actor_critic_params(TINY, tiny_params(), False), 1), 4)
    rollout, new = batch.rollout, batch.rollout.completion_mask.shape[1]
    packing_ = packing.pack(rollout.tokens, rollout.attention_mask, new, PACK_WIDTH, row_multiple=3)
    rows = packing_.tokens.shape[0]
    assert rows % 3 == 0 and packing_.tokens.shape[1] == PACK_WIDTH
    assert packing.real_fraction(packing_.segment_ids) > packing.real_fraction(rollout.attention_mask)
    assert int((packing_.segment_ids > 0).sum()) == int(rollout.attention_mask.sum())  # every real token, once
    for row in range(rows):  # positions restart at 0 in each segment
        for segment in np.unique(packing_.segment_ids[row][packing_.segment_ids[row] > 0]):
            where = packing_.segment_ids[row] == segment
            np.testing.assert_array_equal(packing_.positions[row][where], np.arange(where.sum()))
    flat_tokens = packing_.tokens.reshape(-1)
    real = rollout.completion_mask > 0
    # the state before completion token t, followed by that token itself
    np.testing.assert_array_equal(flat_tokens[packing_.state_index + 1][real], rollout.tokens[:, -new:][real])
    assert packing_.state_index.max() < rows * PACK_WIDTH


def test_pack_refuses_a_rollout_wider_than_the_row():
    batch = _padded_batch(actor_critic_params(TINY, tiny_params(), False), 1)
    with pytest.raises(ValueError, match="does not fit a packed row of 3"):
        packing.pack(batch.rollout.tokens, batch.rollout.attention_mask, NEW + EXTRA_NEW, 3)
