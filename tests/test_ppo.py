"""PPO: GAE against numpy, losses against a hand-worked case, one compiled update, learning."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY, tiny_params
from r3jax import optim, ppo, sharding
from r3jax.models.transformer import init_params
from r3jax.models.value import actor_critic_params
from r3jax.sampling import SamplingConfig, sample
from r3jax.tokenizer import left_pad


def _random_masked(rng, batch, time):
    rewards = rng.normal(size=(batch, time))
    values = rng.normal(size=(batch, time))
    lengths = rng.integers(1, time + 1, size=batch)
    mask = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
    return rewards, values, mask


def _gae_numpy_loop(rewards, values, mask, gamma, lam):
    batch, time = rewards.shape
    adv = np.zeros_like(rewards)
    for b in range(batch):
        last = 0.0
        for t in reversed(range(time)):
            if not mask[b, t]:
                continue
            next_value = values[b, t + 1] if t + 1 < time and mask[b, t + 1] else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def _gae_original(rewards, values, mask, gamma, lam):
    """The ReFT/R^3 code's way: masked deltas, then a discounted cumsum of gamma*lam from the end."""
    values, rewards = values * mask, rewards * mask
    next_values = np.concatenate([values[:, 1:], np.zeros((values.shape[0], 1))], axis=1)
    deltas = rewards + gamma * next_values - values
    adv = np.zeros_like(deltas)
    running = np.zeros(deltas.shape[0])
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_matches_numpy_loop_and_original_formulation(gamma, lam):
    rewards, values, mask = _random_masked(np.random.default_rng(0), 6, 11)
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for reference in (_gae_numpy_loop, _gae_original):
        ref_adv, ref_ret = reference(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret), ref_ret, atol=1e-5)


def test_losses_match_hand_worked_example():
    # ratios e^0.1=1.105, e^-0.5=0.607, e^0.3=1.350; advantages 1, -2, 0.5; clip 0.2; one masked out
    logp = jnp.array([[0.1, -0.5, 0.3, 9.0]])
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -2.0, 0.5, 5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_frac = ppo.policy_loss(logp, old, adv, mask, ppo.PPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.2))
    # token 1: max(-1.105, -1.105) = -1.105 (not clipped)
    # token 2: max(2*0.607, 2*0.8) = 1.6 (clipped); token 3: max(-0.675, -0.6) = -0.6 (clipped)
    expected = (-np.exp(0.1) + 1.6 - 0.6) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(clip_frac), 2 / 3, rtol=1e-5)
    # values 1.0 and 0.0 against old 0.5, returns 2.0 and -1.0, clip 0.2:
    # token 1: max((1-2)^2, (0.7-2)^2) = 1.69; token 2: max((0+1)^2, (0.3+1)^2) = 1.69
    v_loss = ppo.value_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.5]]), jnp.array([[2.0, -1.0]]),
                            jnp.ones((1, 2)), 0.2)
    np.testing.assert_allclose(float(v_loss), 0.5 * 1.69, rtol=1e-5)


def test_per_token_rewards_put_score_on_last_token():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    ref = jnp.array([[-1.5, -2.0, -2.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    rewards = ppo.per_token_rewards(jnp.array([0.2]), logp, ref, mask, ppo.PPOConfig(kl_coef=0.1))
    np.testing.assert_allclose(np.asarray(rewards), [[-0.05, 0.2, 0.0]], atol=1e-6)


TARGET = 7
PPO_CFG = ppo.PPOConfig(kl_coef=0.0, epochs=2, minibatches=2, vf_coef=0.5)


def _toy_batch(params, key, batch=16, group_size=1):
    """Sampled completions of random prompts (each repeated `group_size` times, adjacent), scored
    by the fraction of TARGET tokens."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, TINY.vocab_size, size=n)) for n in rng.integers(2, 6, batch // group_size)]
    tokens, mask = left_pad([p for p in prompts for _ in range(group_size)], 0)
    rollout = sample(TINY, params.policy, jnp.asarray(tokens), jnp.asarray(mask), key,
                     SamplingConfig(max_new_tokens=6, pad_id=0))
    hits = (rollout.completions == TARGET) * rollout.completion_mask
    return ppo.experience(rollout, hits.sum(1) / rollout.completion_mask.sum(1))


@pytest.mark.parametrize("minibatches", [2, 1])  # 1: the first pass completes the batch
def test_update_is_one_compiled_call_without_host_transfers(minibatches):
    cfg = dataclasses.replace(PPO_CFG, minibatches=minibatches)
    params = actor_critic_params(TINY, tiny_params(), separate_critic=False)
    optimizer = optim.adamw(1e-3)
    update = ppo.make_ppo_update(TINY, cfg, optimizer)
    state = ppo.init_state(params, optimizer)
    ref = tiny_params()
    keys = list(jax.random.split(jax.random.key(0), 3))
    batches = [_toy_batch(params, k) for k in keys]
    state, _, _ = update(state, ref, batches[0], keys[0])
    hlo = update.lower(state, ref, batches[1], keys[1]).as_text()
    assert "callback" not in hlo and "outfeed" not in hlo
    with jax.transfer_guard("disallow"):
        state, metrics, _ = update(state, ref, batches[1], keys[1])
        state, metrics, _ = update(state, ref, batches[2], keys[2])
    assert update.compilations() == 1
    assert int(state.step) == 3 * cfg.epochs * cfg.minibatches
    assert np.isfinite(float(metrics["loss"]))


def test_sharded_state_keeps_its_layout_so_steps_compile_once():
    """FSDP x tensor params: the updated state (params and optimizer moments) comes back laid out
    as it went in, so the second SFT step and PPO update reuse the first one's compilation."""
    from r3jax.train import sft

    mesh = sharding.make_mesh((1, 4, 2))
    placed = jax.device_put(tiny_params(), sharding.logical_shardings(
        jax.eval_shape(functools.partial(init_params, TINY), jax.random.key(0)), mesh))
    optimizer = optim.adamw(1e-3)

    def layout(state):  # each leaf's mesh axes per dimension; a one-device scalar counts as replicated
        return [tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
                if isinstance(leaf.sharding, jax.sharding.NamedSharding) else (None,) * leaf.ndim
                for leaf in jax.tree.leaves(state)]

    update = ppo.make_ppo_update(TINY, PPO_CFG, optimizer)
    params = actor_critic_params(TINY, jax.tree.map(jnp.copy, placed), separate_critic=False)
    params = params.replace(value_head=jax.device_put(params.value_head, sharding.replicated(mesh)))
    state = ppo.init_state(params, optimizer)
    before = layout(state)
    for key in jax.random.split(jax.random.key(0), 2):
        batch = sharding.shard_batch(jax.tree.map(np.asarray, _toy_batch(state.params, key)), mesh)
        state, _, _ = update(state, placed, batch, key)
    assert update.compilations() == 1 and layout(state) == before

    step = sft.make_train_step(TINY, optimizer)
    state = sft.SFTState(placed, jax.jit(optimizer.init)(placed), jnp.zeros((), jnp.int32))
    before = layout(state)
    tokens = np.random.default_rng(0).integers(1, TINY.vocab_size, (8, 1, 12))
    batch = sharding.shard_batch({"tokens": tokens, "attention_mask": np.ones_like(tokens),
                                  "loss_mask": np.ones_like(tokens)}, mesh)
    for _ in range(2):
        state, _ = step(state, batch, 1.0)
    assert step.compilations() == 1 and layout(state) == before


@pytest.mark.parametrize("estimator, separate_critic", [("grpo", False), ("gae", True)])
def test_reusing_the_samplers_logprobs_gives_the_same_update(estimator, separate_critic):
    """rl.reuse_sampler_logprobs skips the policy's forward in `prepare` (all of it without a
    critic, its LM head with a separate critic): in float32 the sampler's log-probs are the
    recomputed ones to 1e-5, and the loss gradient is the same (cosine 1 - 1e-6). Compared
    before Adam, which turns float32 noise in near-zero gradients into steps of +-lr."""
    cfg = dataclasses.replace(PPO_CFG, estimator=estimator, group_size=4 if estimator == "grpo" else 1,
                              kl_coef=0.05)
    params = actor_critic_params(TINY, tiny_params(), separate_critic, critic=estimator == "gae")
    data = _toy_batch(params, jax.random.key(5), group_size=cfg.group_size)
    prepared = [ppo.prepare(TINY, dataclasses.replace(cfg, reuse_sampler_logprobs=reuse), params, tiny_params(seed=2),
                            data)[0] for reuse in (False, True)]
    np.testing.assert_allclose(prepared[1].old_logprobs, prepared[0].old_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(prepared[1].advantages, prepared[0].advantages, atol=1e-4, rtol=0)
    grads = [np.concatenate([g.ravel() for g in jax.tree.leaves(jax.grad(ppo.minibatch_loss, argnums=2, has_aux=True)(
        TINY, cfg, params, batch)[0])]) for batch in prepared]
    assert grads[0] @ grads[1] / (np.linalg.norm(grads[0]) * np.linalg.norm(grads[1])) > 1 - 1e-6


@pytest.mark.parametrize("estimator, separate_critic, kl_mode, epochs, reuse", [
    ("grpo", False, "reward", 1, False), ("grpo", False, "loss", 2, False), ("gae", True, "reward", 2, False),
    ("gae", False, "reward", 2, True), ("rloo", False, "reward", 3, False)])
def test_an_update_whose_first_pass_prepares_equals_one_that_prepares_apart(monkeypatch, estimator, separate_critic,
                                                                         kl_mode, epochs, reuse):
    """One minibatch (ppo.first_pass_prepares): the first gradient pass takes the old log-probs and
    values from its own forward, held constant, and `prepare` runs only the reference. The update
    gives the parameters and metrics of the update whose `prepare` runs the policy and the critic
    too (first_pass_prepares forced off), to float32 rounding: 1e-5 relative. Plain SGD, so that
    float32 noise in near-zero gradients is not turned into steps of +-lr as Adam would."""
    cfg = dataclasses.replace(PPO_CFG, estimator=estimator, group_size=4 if estimator != "gae" else 1, epochs=epochs,
                              minibatches=1, kl_coef=0.05, kl_mode=kl_mode, reuse_sampler_logprobs=reuse)
    assert ppo.first_pass_prepares(cfg)
    params = actor_critic_params(TINY, tiny_params(), separate_critic, critic=estimator == "gae")
    data = _toy_batch(params, jax.random.key(7), group_size=cfg.group_size)
    optimizer = optim.actor_critic(optax.sgd(0.5), optax.sgd(0.5), params)

    def updated():
        update = ppo.make_ppo_update(TINY, cfg, optimizer)
        state = ppo.init_state(jax.tree.map(jnp.copy, params), optimizer)
        state, metrics, per_sequence = update(state, tiny_params(seed=2), data, jax.random.key(3))
        return state.params, metrics, per_sequence

    fused = updated()
    monkeypatch.setattr(ppo, "first_pass_prepares", lambda _: False)
    apart = updated()
    assert set(fused[1]) == set(apart[1]) and set(fused[2]) == set(apart[2])
    for name in fused[1]:
        np.testing.assert_allclose(fused[1][name], apart[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), fused[2], apart[2])
    moved = jax.tree.map(lambda new, old: np.abs(np.asarray(new) - np.asarray(old)).max(), fused[0], params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the comparison is of parameters that moved
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), fused[0], apart[0])


@pytest.mark.parametrize("estimator, separate_critic", [("grpo", False), ("gae", False), ("gae", True)])
def test_prepare_in_row_chunks_equals_one_pass(estimator, separate_critic):
    """rl.prepare_chunks: the no-gradient forward passes over 4 slices of the rows, one at a time,
    give the one-pass batch and metrics to float32 rounding (1e-5: another batch shape sums in another
    order), with a critic or without, KL on."""
    cfg = dataclasses.replace(PPO_CFG, estimator=estimator, group_size=4 if estimator == "grpo" else 1, kl_coef=0.05)
    params = actor_critic_params(TINY, tiny_params(), separate_critic, critic=estimator == "gae")
    data = _toy_batch(params, jax.random.key(6), group_size=cfg.group_size)
    whole, chunked = (ppo.prepare(TINY, dataclasses.replace(cfg, prepare_chunks=chunks), params, tiny_params(seed=2),
                                  data) for chunks in (1, 4))
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5), chunked, whole)


@pytest.mark.parametrize("separate_critic", [False, True])
def test_ppo_raises_reward_on_toy_task(separate_critic):
    policy = tiny_params()
    params = actor_critic_params(TINY, policy, separate_critic)
    reference = tiny_params()  # its own buffers: the state is donated to the update
    optimizer = optim.actor_critic(optim.adamw(3e-3), optim.adamw(1e-3), params)
    update = ppo.make_ppo_update(TINY, PPO_CFG, optimizer)
    state = ppo.init_state(params, optimizer)
    key = jax.random.key(1)
    scores = []
    for _ in range(30):
        key, sample_key, update_key = jax.random.split(key, 3)
        batch = _toy_batch(state.params, sample_key)
        scores.append(float(batch.scores.mean()))
        state, metrics, _ = update(state, reference, batch, update_key)
    assert np.mean(scores[:3]) < 0.1
    assert np.mean(scores[-3:]) > 0.5, scores
    assert abs(float(metrics["sampler_kl"])) < 1e-3  # sampler and trainer agree on log-probs


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_update_raises_reward_on_toy_task(estimator):
    cfg = dataclasses.replace(PPO_CFG, estimator=estimator, group_size=4, loss_agg="seq_mean_token_mean")
    params = actor_critic_params(TINY, tiny_params(), separate_critic=False, critic=False)
    assert not params.has_critic and params.critic_backbone is None  # the policy alone
    optimizer = optim.adamw(3e-3)
    update = ppo.make_ppo_update(TINY, cfg, optimizer)
    state = ppo.init_state(params, optimizer)
    reference = tiny_params()
    key = jax.random.key(1)
    scores = []
    for _ in range(30):
        key, sample_key, update_key = jax.random.split(key, 3)
        batch = _toy_batch(state.params, sample_key, group_size=4)
        scores.append(float(batch.scores.mean()))
        state, metrics, _ = update(state, reference, batch, update_key)
    assert np.mean(scores[:3]) < 0.1
    assert np.mean(scores[-3:]) > 0.5, scores
    assert "vf_loss" not in metrics and "value_explained_variance" not in metrics


def test_critic_warmup_moves_only_the_critic():
    params = actor_critic_params(TINY, tiny_params(), separate_critic=True)
    optimizer = optim.adamw(1e-3)
    update = ppo.make_ppo_update(TINY, PPO_CFG, optimizer)
    before = jax.tree.map(np.array, params)  # copies: the state is donated
    batch = _toy_batch(params, jax.random.key(2))._replace(scores=jnp.linspace(0.0, 1.0, 16))
    state, _, _ = update(ppo.init_state(params, optimizer), tiny_params(), batch, jax.random.key(3), 1.0, 0.0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params.policy), before.policy)
    moved = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), state.params, before)
    assert "lm_head" not in params.critic_backbone  # values never read it: nothing stepped for nothing
    assert all(jax.tree.leaves(moved.value_head)) and all(jax.tree.leaves(moved.critic_backbone))


@pytest.mark.parametrize("estimator, minibatches", [("gae", 2), ("grpo", 2), ("gae", 1)])  # 1: first_pass_prepares
def test_sharded_update_equals_single_device(estimator, minibatches):
    mesh = sharding.make_mesh((2, 2, 2))
    critic = estimator == "gae"
    cfg = dataclasses.replace(PPO_CFG, estimator=estimator, group_size=1 if critic else 4, kl_coef=0.05,
                              minibatches=minibatches)
    params = actor_critic_params(TINY, tiny_params(), separate_critic=False, critic=critic)
    ref = tiny_params()
    optimizer = optim.adamw(1e-3)
    batch = _toy_batch(params, jax.random.key(3), group_size=cfg.group_size)
    policy_shardings = sharding.logical_shardings(
        jax.eval_shape(functools.partial(init_params, TINY), jax.random.key(0)), mesh)
    shardings = params.replace(policy=policy_shardings, value_head=jax.tree.map(
        lambda _: sharding.replicated(mesh), params.value_head))
    sharded_params = jax.device_put(params, shardings)
    sharded_ref = jax.device_put(ref, policy_shardings)
    sharded_batch = sharding.shard_batch(jax.tree.map(np.asarray, batch), mesh)
    single_state, single, _ = ppo.make_ppo_update(TINY, cfg, optimizer)(
        ppo.init_state(jax.tree.map(jnp.copy, params), optimizer), ref, batch, jax.random.key(4))
    state = ppo.init_state(sharded_params, optimizer)
    multi_state, multi, _ = ppo.make_ppo_update(TINY, cfg, optimizer)(state, sharded_ref, sharded_batch,
                                                                  jax.random.key(4))
    assert multi_state.params.policy["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    opt_leaves = {jax.tree_util.keystr(path): leaf
                  for path, leaf in jax.tree_util.tree_leaves_with_path(multi_state.opt_state)}
    up_moments = [leaf for name, leaf in opt_leaves.items() if name.endswith(".policy['layers_0']['mlp']['up_proj']['kernel']")]
    assert len(up_moments) == 2  # Adam's mu and nu, each split as its weight is: no device holds a whole one
    assert all(moment.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") for moment in up_moments)
    assert all(isinstance(leaf.sharding, jax.sharding.NamedSharding) for leaf in opt_leaves.values())
    for name in ("loss", "kl", "score", "pg_loss", *(("vf_loss",) if critic else ())):
        np.testing.assert_allclose(float(multi[name]), float(single[name]), atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 multi_state.params, single_state.params)


def _completion_inputs(num_new=7):
    tokens = jax.random.randint(jax.random.key(5), (3, 12), 3, TINY.vocab_size)
    return tokens, jnp.ones_like(tokens), num_new


@pytest.mark.parametrize("chunk", [0, 3, 7])
def test_logprobs_of_a_read_forward_match_full_logits_and_chunks_keep_gradients(chunk):
    from r3jax.models.transformer import forward

    params, (tokens, mask, num_new) = tiny_params(), _completion_inputs()
    logits, hidden = forward(TINY, params, tokens, mask)
    scaled = jax.nn.log_softmax(logits[:, -num_new - 1:-1] / 0.7, axis=-1)
    expected = jnp.take_along_axis(scaled, tokens[:, -num_new:, None], axis=-1)[..., 0]
    targets, read = tokens[:, -num_new:], ppo.ForwardRows(tokens, mask).completion_read(num_new)
    _, read_hidden = forward(TINY, params, tokens, mask, with_head=False, read=read)
    logp, entropy = ppo.chunked_logprobs(TINY, params, read_hidden, targets, 0.7, chunk)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(expected), atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(-(jnp.exp(scaled) * scaled).sum(-1)), atol=1e-5)

    def weighted(p, chunk_size):
        _, h = forward(TINY, p, tokens, mask, with_head=False, read=read)
        lp, ent = ppo.chunked_logprobs(TINY, p, h, targets, 0.7, chunk_size)
        return (lp * jnp.arange(num_new)).sum() + ent.sum()

    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 jax.grad(weighted)(params, chunk), jax.grad(weighted)(params, 0))


def test_update_with_chunked_logits_equals_unchunked():
    params = actor_critic_params(TINY, tiny_params(), separate_critic=False)
    optimizer = optim.adamw(1e-3)
    batch = _toy_batch(params, jax.random.key(6))
    results = []
    for chunk in (0, 4):
        update = ppo.make_ppo_update(TINY, dataclasses.replace(PPO_CFG, logits_chunk=chunk, kl_coef=0.05), optimizer)
        results.append(update(ppo.init_state(jax.tree.map(jnp.copy, params), optimizer), tiny_params(), batch,
                              jax.random.key(7)))
    (plain_state, plain, _), (chunked_state, chunked, _) = results
    for name in ("loss", "kl", "pg_loss", "vf_loss", "entropy"):
        np.testing.assert_allclose(float(chunked[name]), float(plain[name]), atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 chunked_state.params, plain_state.params)


def test_sft_loss_in_logit_chunks_equals_all_at_once():
    from r3jax.train.sft import nll_sum

    tokens = jax.random.randint(jax.random.key(6), (3, 21), 0, TINY.vocab_size)
    batch = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens),
             "loss_mask": jnp.ones_like(tokens).at[:, :5].set(0)}
    params = tiny_params()
    plain = jax.value_and_grad(lambda p: nll_sum(TINY, p, batch)[0])(params)
    chunked = jax.value_and_grad(lambda p: nll_sum(TINY, p, batch, logits_chunk=8)[0])(params)
    np.testing.assert_allclose(float(chunked[0]), float(plain[0]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), chunked[1], plain[1])
