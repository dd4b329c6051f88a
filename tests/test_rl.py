"""The RL step's sampling side in-process: groups per start state, dynamic sampling that keeps the
batch shape and never keeps an all-equal group, the missing-EOS penalty."""
import dataclasses
import zlib

import jax
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax import config as config_lib, sharding, tasks, tokenizer
from r3jax.rollout import Policy
from r3jax.sampling import SamplingConfig
from r3jax.tasks.answers import Score
from r3jax.train import rl


class CoinTask(tasks.get("arith").__class__):
    """arith with a reward that is a fixed coin flip per completion text, so groups mix."""

    def score_batch(self, responses, golds):
        return [Score(float(zlib.crc32(r.encode()) % 3 == 0), False, True) for r in responses]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = CoinTask(num_train=64, num_test=8)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    tok = tokenizer.load(tokenizer.train_sentencepiece(
        texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=TINY.vocab_size))
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    return task, tok, cfg, tiny_params(cfg, scale=3.0)


def _rl_config(**overrides):
    c = config_lib.base_config().rl
    c.update(dict(batch_size=8, group_size=4, estimator="grpo", max_new_tokens=6, max_prompt_length=160))
    c.update(overrides)
    return c


def _collect(setup, c, data_position=0):
    task, tok, cfg, params = setup
    schedule = rl.build_curriculum(c, task, tok, "mixed", seed=0)
    settings = SamplingConfig(max_new_tokens=c.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return rl.collect(c, schedule.batch, task, Policy(cfg, params, tok, mesh), settings, jax.random.key(0), data_position)


def test_groups_are_adjacent_samples_of_one_start_state(setup):
    collected, position = _collect(setup, _rl_config())
    assert position == 1 and collected.rounds == 1 and len(collected.states) == 8
    assert [s.prompt_tokens for s in collected.states[:4]] == [collected.states[0].prompt_tokens] * 4
    assert collected.states[3].prompt_tokens != collected.states[4].prompt_tokens
    assert collected.experience.rollout.tokens.shape[0] == 8 and collected.experience.row_mask.sum() == 8


def test_dynamic_sampling_keeps_the_shape_and_drops_every_equal_group(setup):
    plain, _ = _collect(setup, _rl_config(batch_size=16, group_size=2))
    c = _rl_config(batch_size=16, group_size=2, dynamic_sampling=True, max_sampling_rounds=3)
    collected, position = _collect(setup, c)
    assert position == collected.rounds > 1  # equal groups were dropped, so it sampled more
    assert collected.dropped_groups > 0 and sum(collected.equal_groups.values()) > 0
    batch = collected.experience
    assert all(v.shape[0] == 16 for v in jax.tree.leaves(batch))
    real = batch.row_mask.astype(bool)
    assert real.sum() == len(collected.states) and (real[:real.sum()]).all()
    groups = batch.scores[real].reshape(-1, 2)
    assert (groups[:, 0] != groups[:, 1]).all()  # no kept group has all-equal rewards
    assert (batch.rollout.completion_mask[~real] == 0).all() and (batch.scores[~real] == 0).all()
    # the first round is the plain batch: its unequal groups are the first rows kept
    plain_groups = plain.experience.scores.reshape(-1, 2)
    first = plain_groups[plain_groups[:, 0] != plain_groups[:, 1]]
    np.testing.assert_array_equal(groups[:len(first)], first)


def test_missing_eos_penalty_hits_only_truncated_completions(setup):
    plain, _ = _collect(setup, _rl_config())
    penalised, _ = _collect(setup, _rl_config(missing_eos_penalty=0.5))
    rollout = plain.experience.rollout
    lengths = rollout.completion_mask.sum(1)
    last = rollout.tokens[np.arange(8), rollout.tokens.shape[1] - 6 + np.maximum(lengths - 1, 0)]
    cut_off = ~np.isin(last, setup[1].stop_ids)
    assert cut_off.any()
    np.testing.assert_allclose(penalised.experience.scores, plain.experience.scores - 0.5 * cut_off)


def test_truncated_hand_worked():
    completions = np.array([[5, 2, 0], [5, 6, 7], [0, 0, 0]])
    assert rl.truncated(completions, np.array([2, 3, 0]), (2,)).tolist() == [False, True, True]


def test_rollout_layout_samples_what_the_training_layout_samples(setup):
    """8 simulated devices: FSDP training weights, copied once into a replicated layout for
    data-parallel sampling, give the same completions token for token."""
    import functools

    from r3jax import rollout as rollout_lib
    from r3jax.curriculum import start_states
    from r3jax.models.transformer import init_params

    task, tok, cfg, params = setup
    train_mesh, rollout_mesh = sharding.make_mesh((1, 8, 1)), sharding.make_mesh((8, 1, 1))
    shardings = sharding.logical_shardings(jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0)),
                                           train_mesh)
    fsdp = jax.device_put(params, shardings)
    assert fsdp["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec[0] == "fsdp"
    replicated = sharding.compute_copy(cfg, rollout_mesh)(fsdp)
    assert replicated["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.is_fully_replicated
    states = rollout_lib.tokenize_states(tok, task, [start_states(task, d, 5)[j] for d in task.demonstrations("train")[:4]
                                                     for j in range(4)])
    settings = SamplingConfig(max_new_tokens=10, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    want = rollout_lib.generate(cfg, fsdp, tok, states, settings, jax.random.key(5), train_mesh)
    got = rollout_lib.generate(cfg, replicated, tok, states, settings, jax.random.key(5), rollout_mesh)
    np.testing.assert_array_equal(np.asarray(got[0].tokens), np.asarray(want[0].tokens))
    np.testing.assert_allclose(np.asarray(got[0].logprobs), np.asarray(want[0].logprobs), atol=1e-5)
    assert got[1] == want[1]


def test_generate_pads_prompts_to_the_bucket_on_the_host_and_samples_what_sample_does(setup):
    """generate's prompts reach the device already at the sampler's bucket width; its rollout (on
    the host) and texts equal `sample`'s on the prompts padded only to the longest, which `sample`
    pads itself."""
    import jax.numpy as jnp

    from r3jax import rollout as rollout_lib
    from r3jax.curriculum import start_states
    from r3jax.sampling import prompt_bucket, sample

    task, tok, cfg, params = setup
    states = rollout_lib.tokenize_states(tok, task, [start_states(task, d, 5)[0]
                                                     for d in task.demonstrations("train")[:6]])
    settings = SamplingConfig(max_new_tokens=8, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    rows = [list(s.prompt_tokens) for s in states] + [list(states[0].prompt_tokens)] * 2
    longest = max(map(len, rows))
    assert longest < prompt_bucket(longest)  # so that the bucket pads further
    tokens, mask = rollout_lib.encode_prompts(states, settings, 8)
    assert tokens.shape == mask.shape == (8, prompt_bucket(longest))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rollout, texts = rollout_lib.generate(cfg, params, tok, states, settings, jax.random.key(3), mesh, rows=8)
    assert all(isinstance(field, np.ndarray) for field in rollout)  # on the host, where RL reads it
    unbucketed = tokenizer.left_pad(rows, tok.pad_id)
    want = sample(cfg, params, jnp.asarray(unbucketed[0]), jnp.asarray(unbucketed[1]), jax.random.key(3), settings)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(rollout.logprobs), np.asarray(want.logprobs))
    completions = np.asarray(want.completions)[:6]
    stops = set(tok.stop_ids)
    assert texts == [tok.decode([t for t in row[m] if t not in stops])
                     for row, m in zip(completions, np.asarray(want.completion_mask)[:6].astype(bool))]


class HalfCorrectTask(CoinTask):
    """CoinTask whose rewarded completions count as correct, so some groups all fail and some do not."""

    def score_batch(self, responses, golds):
        return [Score(s.reward, s.reward > 0, True) for s in super().score_batch(responses, golds)]


def test_hint_on_failure_samples_again_exactly_the_groups_that_all_failed(setup):
    """From k = 0 first; then each group with no correct sample, and no other, again from its
    demonstration's hint, a start state whose prompt is token-exact with SFT and ends on a step
    boundary. Both are kept in a batch of twice rl.batch_size rows."""
    from r3jax import curriculum
    from r3jax.rollout import encode_demo, sft_example

    _, tok, cfg, params = setup
    task = HalfCorrectTask(num_train=64, num_test=8)
    c = _rl_config(batch_size=16, group_size=2, strategy="hint_on_failure")
    schedule = rl.build_curriculum(c, task, tok, "hint_on_failure", seed=0)
    levels = [len(pool) - 1 - i % 2 for i, pool in enumerate(schedule.pools)]  # hints of two lengths
    settings = SamplingConfig(max_new_tokens=c.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    collected, _ = rl.collect(c, lambda position: schedule.batch(position, 0.0, levels), task,
                              Policy(cfg, params, tok, mesh), settings, jax.random.key(0), 0,
                              lambda state: schedule.hint(state, levels))
    first, hinted = collected.outcomes[:16], collected.outcomes[16:]
    assert all(state.k == 0 for state, _ in first)
    failed = [first[i][0].demo.id for i in range(0, 16, 2) if not (first[i][1] or first[i + 1][1])]
    assert 0 < len(failed) < 8 and collected.hinted_groups == len(failed)
    assert [hinted[i][0].demo.id for i in range(0, len(hinted), 2)] == failed
    for state, _ in hinted:
        demo = schedule.demo_index[state.demo.id]
        assert state is schedule.pools[demo][levels[demo]] and state.k > 0
        assert state.given == "".join(curriculum.cut_steps(state.demo.rationale, task.cut)[:state.k])
        tokens, _ = sft_example(encode_demo(tok, task, state.demo), tok.eos_id)
        assert list(state.prompt_tokens) == tokens[:len(state.prompt_tokens)]
    batch = collected.experience
    assert batch.rollout.tokens.shape[0] == 32 and batch.row_mask.sum() == 16 + len(hinted)


def test_sampling_in_calls_of_fewer_rows_keeps_the_batch(setup):
    """rl.rollout_rows: the batch sampled 3 rows per call (the last call padded, each call with a
    key of its own) has the plain batch's shape, start states and prompt lengths, and consistent
    masks."""
    plain, _ = _collect(setup, _rl_config())
    chunked, _ = _collect(setup, _rl_config(rollout_rows=3))
    assert [s.prompt_tokens for s in chunked.states] == [s.prompt_tokens for s in plain.states]
    a, b = plain.experience.rollout, chunked.experience.rollout
    assert a.tokens.shape[0] == b.tokens.shape[0] == 8 and a.completion_mask.shape == b.completion_mask.shape
    np.testing.assert_array_equal(b.attention_mask.sum(1) - b.completion_mask.sum(1),
                                  a.attention_mask.sum(1) - a.completion_mask.sum(1))  # same prompts' lengths
    assert np.isfinite(b.logprobs).all() and (b.lengths == b.completion_mask.sum(1)).all()
