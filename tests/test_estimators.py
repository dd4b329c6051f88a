"""Critic-free estimators and loss aggregations against plain numpy, on hand-made rewards."""
import jax.numpy as jnp
import numpy as np
import pytest

from r3jax import ppo

# groups of mixed, all-0 and all-1 rewards, with a partial reward in one
SCORES = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0.2, 1, 0, 0], np.float32)


def _numpy_group_advantages(scores, group_size, estimator, row_mask):
    out = np.zeros_like(scores, dtype=np.float64)
    for start in range(0, len(scores), group_size):
        rows = slice(start, start + group_size)
        if not row_mask[rows].any():
            continue
        r = scores[rows].astype(np.float64)
        if estimator == "grpo":
            out[rows] = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
        elif estimator in ("drgrpo", "reinforce_pp"):
            out[rows] = r - r.mean()
        elif estimator == "rloo":
            out[rows] = [r[i] - np.delete(r, i).mean() for i in range(len(r))]
    if estimator == "reinforce_pp":
        valid = row_mask.astype(bool)
        out[valid] = (out[valid] - out[valid].mean()) / (out[valid].std() + 1e-6)
    return out * row_mask


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_group_advantages_match_numpy(estimator, group_size, padded):
    row_mask = np.ones_like(SCORES)
    if padded:
        row_mask[-group_size:] = 0  # one padded group at the end, as dynamic sampling leaves it
    got = ppo.group_advantages(jnp.asarray(SCORES), group_size, estimator, jnp.asarray(row_mask))
    np.testing.assert_allclose(np.asarray(got), _numpy_group_advantages(SCORES, group_size, estimator, row_mask),
                               rtol=1e-5, atol=1e-6)


def test_equal_reward_groups_get_zero_advantage():
    got = np.asarray(ppo.group_advantages(jnp.asarray(SCORES), 4, "grpo"))
    assert (got[4:8] == 0).all() and (got[8:12] == 0).all() and (got[:4] != 0).all()


def _numpy_aggregate(values, mask, mode):
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum()
    rows = mask.sum(1) > 0
    if mode == "seq_mean_token_mean":
        return ((values * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()
    return ((values * mask).sum(1)[rows] / mask.shape[1]).mean()


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregation_matches_numpy(mode):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 7)).astype(np.float32)
    mask = (np.arange(7)[None] < np.array([7, 3, 1, 0, 5])[:, None]).astype(np.float32)  # row 3 padded
    got = ppo.aggregate(jnp.asarray(values), jnp.asarray(mask), mode)
    np.testing.assert_allclose(float(got), _numpy_aggregate(values, mask, mode), rtol=1e-6)


def test_asymmetric_clip_hand_worked():
    # ratio e^0.3 = 1.35: a positive advantage is clipped at 1 + high, a negative one is not clipped
    logp, old = jnp.array([[0.3, 0.3, -0.3]]), jnp.zeros((1, 3))
    advantages = jnp.array([[1.0, -1.0, -1.0]])
    per_token, clipped = ppo.clipped_surrogate(logp, old, advantages, clip_low=0.1, clip_high=0.28, max_log_ratio=20.0)
    ratio = np.exp([0.3, 0.3, -0.3])
    np.testing.assert_allclose(np.asarray(per_token)[0], [-1.28, ratio[1], 0.9], rtol=1e-6)
    assert np.asarray(clipped)[0].tolist() == [1.0, 0.0, 1.0]
