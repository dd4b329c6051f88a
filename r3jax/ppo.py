"""PPO for R^3 as pure functions, and `make_ppo_update`: the whole update as one jitted call.

Conventions: the update learns from an `Experience`: the sampler's `Rollout` (`tokens` and
`attention_mask` `[batch, prompt + new]`, `logprobs` and `completion_mask` `[batch, new]`), the
host's `scores` `[batch]`, a `row_mask` `[batch]` (0 for rows that only pad the batch), and
optionally the same rollouts packed (`packing.Packing`), which the forward passes then read
instead of the padded rows. Values and log-probs at completion position t are those of the state
before token t.

Advantage estimators: `gae` (PPO with a critic, the paper's) or a critic-free group estimator
(`grpo`, `drgrpo`, `rloo`, `reinforce_pp`) over the `group_size` adjacent samples of each start
state. Either way the per-token KL penalty (kl_mode "reward") enters as a reward on each token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from r3jax import optim
from r3jax.config import ESTIMATORS, LOSS_AGGREGATIONS
from r3jax.models.lora import merge
from r3jax.models.transformer import ModelConfig, Read, forward, head_logits
from r3jax.models.value import ActorCritic, critic_values, hidden_and_values
from r3jax.packing import Packing
from r3jax.sampling import Rollout
from r3jax.sharding import StateStep


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.05
    kl_mode: str = "reward"  # "reward": -beta*(logp - logp_ref) per token; "loss": k3 term in the loss
    estimator: str = "gae"
    group_size: int = 1  # samples per start state, adjacent in the batch (>= 2 for group estimators)
    loss_agg: str = "token_mean"  # how the policy loss averages over tokens and sequences
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio_low: float = 0.2  # the ratio is clipped to [1 - low, 1 + high] (DAPO: high > low)
    clip_ratio_high: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 5.0
    entropy_coef: float = 0.0
    epochs: int = 2
    minibatches: int = 1
    temperature: float = 1.0
    whiten_advantages: bool = True
    score_clip: float = 0.0  # 0: off; the non-math recipe clips rewards to +-5
    max_log_ratio: float = 20.0
    logits_chunk: int = 0  # completion positions per LM-head call in chunked_logprobs; 0: all
    max_new_tokens: int = 0  # seq_mean_token_sum_norm's constant (the sampling budget); 0: the batch's width
    reuse_sampler_logprobs: bool = False  # old log-probs from the rollout, not from a policy forward
    prepare_chunks: int = 1  # slices of the batch's rows the no-gradient forward passes run one at a time


def first_pass_prepares(cfg: PPOConfig) -> bool:
    """One minibatch per epoch: the update's first gradient pass then runs the policy and the critic
    on the whole batch before any update, so its own forward, held constant, gives the old log-probs
    and values, and with them the advantages (`complete`). `prepare`'s policy and critic forwards
    would compute the same numbers again; only the reference's forward stays apart. With one epoch
    the ratio is 1 and the gradient is the policy gradient, as in TRL's GRPOTrainer with one
    iteration."""
    return cfg.minibatches == 1


class PPOState(NamedTuple):
    params: ActorCritic
    opt_state: Any
    step: jnp.ndarray    # optimizer updates done


class Experience(NamedTuple):
    """The rows of one update."""
    rollout: Rollout         # as the sampler returned it, `[batch, ...]`
    scores: jnp.ndarray      # [batch] float32, from the host's reward
    row_mask: jnp.ndarray    # [batch] float32: 1 for a real row, 0 for one that only fills the batch
    packing: Packing | None = None  # the rollouts packed into rows, for the forward passes (the
    #                                 rollout then holds only its completion columns)


def experience(rollout: Rollout, scores) -> Experience:
    """An Experience whose rows are all real."""
    scores = jnp.asarray(scores, jnp.float32)
    return Experience(rollout, scores, jnp.ones_like(scores))


class ForwardRows(NamedTuple):
    """What the model reads: padded rollout rows (`[batch, prompt + new]`, positions None) or
    packed rows (`[rows, width]`: segment ids as the mask, positions, and `state_index`, see
    `packing.Packing`)."""
    tokens: jnp.ndarray
    attention_mask: jnp.ndarray
    positions: jnp.ndarray | None = None
    state_index: jnp.ndarray | None = None

    @staticmethod
    def of(data: Experience) -> "ForwardRows":
        if data.packing is None:
            return ForwardRows(data.rollout.tokens, data.rollout.attention_mask)
        return ForwardRows(data.packing.tokens, data.packing.segment_ids, data.packing.positions,
                           data.packing.state_index)

    def completion_read(self, num_new: int) -> Read:
        """The states that predict each completion token, as a forward over these rows reads them
        (`[batch, new]` positions; a rollout's lie in one row)."""
        if self.state_index is None:
            batch, width = self.tokens.shape
            return Read(jnp.broadcast_to(jnp.arange(width - num_new - 1, width - 1), (batch, num_new)))
        width = self.tokens.shape[1]
        return Read(self.state_index % width, self.state_index[:, 0] // width)


class PreparedBatch(NamedTuple):
    """What the minibatch losses read, computed once per update without gradients (the advantages
    and returns by `complete`)."""
    rows: ForwardRows
    targets: jnp.ndarray         # [batch, new] the completion tokens
    completion_mask: jnp.ndarray  # [batch, new]
    old_logprobs: jnp.ndarray    # [batch, new] under the policy before the update (or the sampler's)
    ref_logprobs: jnp.ndarray    # [batch, new] under the frozen reference
    old_values: jnp.ndarray      # [batch, new] the critic's, 0 without one
    advantages: jnp.ndarray      # [batch, new]
    returns: jnp.ndarray         # [batch, new]


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def masked_whiten(x: jnp.ndarray, mask: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def token_logprobs(logits: jnp.ndarray, targets: jnp.ndarray, temperature: float):
    """Log-probs of `targets [batch, n]` under softmax(logits `[batch, n, vocab]` / temperature), the
    distribution the sampler reports; and the entropy of that distribution per position."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def chunked_logprobs(model_cfg: ModelConfig, policy_params: Any, states: jnp.ndarray, targets: jnp.ndarray,
                     temperature: float, chunk: int = 0):
    """`token_logprobs` of `targets [batch, n]` from the final hidden states that predict them
    (`states [batch, n, embed]`): `[batch, n]` log-probs and entropies. The LM head runs on `chunk`
    positions at a time (0: all at once), each chunk rematerialised in the backward pass, so at
    most `[batch, chunk, vocab]` logits live at once instead of `[batch, n, vocab]`."""
    num = targets.shape[1]
    if not chunk or chunk >= num:
        return token_logprobs(head_logits(model_cfg, policy_params, states), targets, temperature)
    pad = -num % chunk
    states = jnp.pad(states, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    batch, num_chunks = states.shape[0], states.shape[1] // chunk

    @jax.checkpoint
    def one_chunk(_, chunk_inputs):
        chunk_states, chunk_targets = chunk_inputs
        return None, token_logprobs(head_logits(model_cfg, policy_params, chunk_states), chunk_targets, temperature)

    by_chunk = lambda x: x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
    _, (logp, entropy) = jax.lax.scan(one_chunk, None, (by_chunk(states), by_chunk(targets)))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, -1)[:, :num]
    return unchunk(logp), unchunk(entropy)


def gae(rewards: jnp.ndarray, values: jnp.ndarray, mask: jnp.ndarray, gamma: float, lam: float):
    """Generalised advantage estimation over `[batch, time]` by a reverse `lax.scan`.

    Rewards and values past the mask count as 0 (the episode has ended). Returns
    (advantages, returns), both masked.
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(next_advantage, delta):
        advantage = delta + gamma * lam * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def per_token_rewards(scores, logprobs, ref_logprobs, mask, cfg: PPOConfig) -> jnp.ndarray:
    """`-beta * (logp - logp_ref)` on every completion token (kl_mode "reward"), plus the score on
    the last one. `[batch, new]`."""
    mask = mask.astype(jnp.float32)
    last = jax.nn.one_hot(mask.sum(1).astype(jnp.int32) - 1, mask.shape[1])
    rewards = scores[:, None] * last
    if cfg.kl_mode == "reward":
        rewards = rewards - cfg.kl_coef * (logprobs - ref_logprobs)
    return rewards * mask


def group_advantages(scores: jnp.ndarray, group_size: int, estimator: str, row_mask: jnp.ndarray | None = None,
                     eps: float = 1e-6) -> jnp.ndarray:
    """Per-sequence advantages `[batch]` of `scores [batch]`, whose groups of `group_size` samples
    of one start state are adjacent. `row_mask [batch]` is 0 on rows that only pad the batch
    (whole groups); they get 0.

    grpo: (r - group mean) / (group std + eps), the unbiased std as TRL and verl take it;
    drgrpo: r - group mean; rloo: r - mean of the group's other samples; reinforce_pp (the
    REINFORCE++ baseline): r - group mean, then whitened over the batch's real rows.
    """
    if estimator not in ESTIMATORS[1:]:
        raise ValueError(f"estimator {estimator!r}: expected one of {ESTIMATORS[1:]}")
    row_mask = jnp.ones_like(scores) if row_mask is None else row_mask.astype(jnp.float32)
    groups = scores.astype(jnp.float32).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.sqrt((centred ** 2).sum(axis=1, keepdims=True) / (group_size - 1))
        advantages = centred / (std + eps)
    elif estimator == "rloo":
        advantages = centred * group_size / (group_size - 1)
    else:
        advantages = centred
    advantages = advantages.reshape(-1) * row_mask
    if estimator == "reinforce_pp":
        mean = masked_mean(advantages, row_mask)
        std = jnp.sqrt(masked_mean((advantages - mean) ** 2, row_mask))
        advantages = (advantages - mean) / (std + eps) * row_mask
    return advantages


def aggregate(values: jnp.ndarray, mask: jnp.ndarray, mode: str, max_new_tokens: int = 0) -> jnp.ndarray:
    """A scalar from per-token `values [batch, new]`: `token_mean` over every token of the batch
    (DAPO), `seq_mean_token_mean` (each sequence's token mean, then the mean over sequences: the
    R^3/ReFT code, GRPO), or `seq_mean_token_sum_norm` (each sequence's token sum over the constant
    `max_new_tokens`, the sampling budget, then the mean: Dr.GRPO; 0 takes the batch's width `new`,
    which a trimmed batch would shrink). Rows with no tokens do not count."""
    if mode == "token_mean":
        return masked_mean(values, mask)
    row_tokens = mask.sum(axis=1)
    row_sums = (values * mask).sum(axis=1)
    rows = (row_tokens > 0).astype(jnp.float32)
    if mode == "seq_mean_token_mean":
        return masked_mean(row_sums / jnp.maximum(row_tokens, 1.0), rows)
    if mode == "seq_mean_token_sum_norm":
        return masked_mean(row_sums / (max_new_tokens or mask.shape[1]), rows)
    raise ValueError(f"loss_agg {mode!r}: expected one of {LOSS_AGGREGATIONS}")


def clipped_surrogate(logp, old_logp, advantages, clip_low: float, clip_high: float, max_log_ratio: float):
    """Per-token clipped surrogate loss `[batch, new]` with the ratio clipped to
    [1 - clip_low, 1 + clip_high], and where the clip was active (1.0) or not."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -max_log_ratio, max_log_ratio))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def policy_loss(logp, old_logp, advantages, mask, cfg: PPOConfig):
    """The clipped surrogate aggregated by `cfg.loss_agg`; returns (loss, clip fraction)."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high,
                                           cfg.max_log_ratio)
    return aggregate(per_token, mask, cfg.loss_agg, cfg.max_new_tokens), masked_mean(clipped, mask)


def value_loss(values, old_values, returns, mask, value_clip):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within value_clip of the old value."""
    clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def k3_kl(logp, ref_logp):
    """Unbiased, non-negative per-token KL estimate exp(r) - r - 1 with r = logp_ref - logp."""
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1.0


def explained_variance(values, returns, mask):
    return 1.0 - masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask) / (
        masked_mean((returns - masked_mean(returns, mask)) ** 2, mask) + 1e-8)


def minibatch_loss(model_cfg: ModelConfig, cfg: PPOConfig, params: ActorCritic, batch: PreparedBatch,
                   policy_weight=1.0, frozen: dict | None = None, data: Experience | None = None, first=True):
    """Total loss of one minibatch and (its metrics, what it completed). `policy_weight` 0 leaves
    only the critic's loss (critic warm-up). `frozen`: the base under LoRA adapters (None: nothing
    is frozen). With `data`, the sampled rows, this is a pass over the whole batch of an update
    whose first pass prepares (`first_pass_prepares`): where `first` (a bool, traced or not) it
    completes `batch` from its own forward, else it reads `batch` as given; what it completed is
    (the batch it read, `complete`'s metrics and per-sequence metrics of its own forward); else None."""
    mask = batch.completion_mask.astype(jnp.float32)
    rows = batch.rows
    hidden, values = hidden_and_values(model_cfg, params, rows.tokens, rows.attention_mask, frozen, rows.positions,
                                       rows.completion_read(mask.shape[1]))
    logp, entropy = chunked_logprobs(model_cfg, merge(frozen, params.policy), hidden, batch.targets, cfg.temperature,
                                     cfg.logits_chunk)
    completed = None
    if data is not None:
        # held constant from here on: no tangent enters `complete`, so no backward pass runs through it
        old_values = batch.old_values if values is None else values * mask
        own, metrics, per_sequence = complete(cfg, jax.lax.stop_gradient(batch._replace(
            old_logprobs=logp * mask, old_values=old_values)), data, params.has_critic)
        batch = jax.tree.map(functools.partial(jnp.where, first), own, batch)
        completed = (batch, metrics, per_sequence)
    pg_loss, clip_frac = policy_loss(logp, batch.old_logprobs, batch.advantages, mask, cfg)
    mean_entropy = masked_mean(entropy, mask)
    loss = policy_weight * pg_loss
    if cfg.entropy_coef:  # else the entropy is only a metric, and no backward pass runs through it
        loss = loss - policy_weight * cfg.entropy_coef * mean_entropy
    kl_loss = masked_mean(k3_kl(logp, batch.ref_logprobs), mask)
    if cfg.kl_mode == "loss":
        loss = loss + policy_weight * cfg.kl_coef * kl_loss
    metrics = {"pg_loss": pg_loss, "clip_frac": clip_frac, "entropy": mean_entropy,
               "approx_kl": masked_mean(batch.old_logprobs - logp, mask)}
    if values is not None:
        metrics["vf_loss"] = value_loss(values, batch.old_values, batch.returns, mask, cfg.value_clip)
        loss = loss + cfg.vf_coef * metrics["vf_loss"]
    metrics["loss"] = loss
    return loss, (metrics, completed)


def _advantages(scores, old_values, old_logp, ref_logp, mask, row_mask, cfg: PPOConfig):
    """(advantages, returns) `[batch, new]`: GAE over the critic's values, or a group estimator's
    per-sequence advantage plus the KL penalty still to come on each token."""
    if cfg.estimator == "gae":
        advantages, returns = gae(per_token_rewards(scores, old_logp, ref_logp, mask, cfg), old_values, mask,
                                  cfg.gamma, cfg.lam)
        return (masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages), returns
    sequence = group_advantages(scores, cfg.group_size, cfg.estimator, row_mask)
    # with no values and gamma = lambda = 1, GAE is the return to go: the sequence's advantage
    # (a reward on its last token) plus the per-token KL penalties from here on
    advantages, _ = gae(per_token_rewards(sequence, old_logp, ref_logp, mask, cfg), jnp.zeros_like(mask),
                        mask, 1.0, 1.0)
    return advantages, advantages


def by_row_chunks(fn: Callable, chunks: int, *rows: jnp.ndarray):
    """`fn(*rows)` for arrays whose first axis is the batch's rows, computed on `chunks` equal slices
    of the rows one after another (`lax.map`), so only one slice's activations are alive at a time;
    the same values as one call, as `fn` treats each row on its own."""
    if chunks <= 1:
        return fn(*rows)
    sliced = jax.lax.map(lambda xs: fn(*xs), tuple(x.reshape(chunks, -1, *x.shape[1:]) for x in rows))
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), sliced)


def _forward_passes(model_cfg: ModelConfig, cfg: PPOConfig, params: ActorCritic | None, ref_params, frozen,
                    rows: ForwardRows, targets, mask):
    """The no-gradient forward passes: (old log-probs, old values, reference log-probs), each
    `[batch, new]` and masked, 0 where a pass is not made (the policy and the critic when `params`
    is None, the policy's log-probs when reused from the sampler, no critic, no KL penalty)."""
    read = rows.completion_read(mask.shape[1])
    old_logp = ref_logp = values = None
    if params is not None and cfg.reuse_sampler_logprobs:
        values = critic_values(model_cfg, params, rows.tokens, rows.attention_mask, frozen, rows.positions, read)
    elif params is not None:
        hidden, values = hidden_and_values(model_cfg, params, rows.tokens, rows.attention_mask, frozen, rows.positions,
                                           read)
        old_logp, _ = chunked_logprobs(model_cfg, merge(frozen, params.policy), hidden, targets, cfg.temperature,
                                       cfg.logits_chunk)
    if cfg.kl_coef:
        _, ref_hidden = forward(model_cfg.base(), ref_params, rows.tokens, rows.attention_mask, with_head=False,
                                positions=rows.positions, read=read)
        ref_logp, _ = chunked_logprobs(model_cfg, ref_params, ref_hidden, targets, cfg.temperature, cfg.logits_chunk)
    return tuple(jnp.zeros_like(mask) if x is None else x * mask for x in (old_logp, values, ref_logp))


def forward_passes(model_cfg: ModelConfig, cfg: PPOConfig, params: ActorCritic | None, ref_params,
                   data: Experience, frozen: dict | None = None) -> PreparedBatch:
    """The batch with its old and reference log-probs and old values (`_forward_passes`; `params`
    None: the reference's alone), not yet its advantages and returns. `ref_params`: the KL penalty's
    frozen reference, a model without adapters; None with LoRA, whose reference is the frozen base
    itself (the adapters off)."""
    rollout = data.rollout
    mask = rollout.completion_mask.astype(jnp.float32)
    ref_params = frozen if ref_params is None else ref_params
    targets = rollout.tokens[:, -mask.shape[1]:]
    passes = functools.partial(_forward_passes, model_cfg, cfg, params, ref_params, frozen)
    if data.packing is None:
        old_logp, old_values, ref_logp = by_row_chunks(
            lambda tokens, attention_mask, *per_row: passes(ForwardRows(tokens, attention_mask), *per_row),
            cfg.prepare_chunks, rollout.tokens, rollout.attention_mask, targets, mask)
    else:  # a packed row mixes rollouts, so it cannot be cut by rollout rows (config refuses chunks)
        old_logp, old_values, ref_logp = passes(ForwardRows.of(data), targets, mask)
    return PreparedBatch(ForwardRows.of(data), targets, rollout.completion_mask, old_logp, ref_logp, old_values,
                         jnp.zeros_like(mask), jnp.zeros_like(mask))


def complete(cfg: PPOConfig, batch: PreparedBatch, data: Experience, has_critic: bool
             ) -> tuple[PreparedBatch, dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
    """The batch with its advantages and returns, held constant, then the sampled batch's scalar
    metrics and per-sequence metrics (`[batch]`, for per-stage means on the host)."""
    rollout = data.rollout
    mask = batch.completion_mask.astype(jnp.float32)
    row_mask = data.row_mask.astype(jnp.float32)
    old_logp = rollout.logprobs * mask if cfg.reuse_sampler_logprobs else batch.old_logprobs
    ref_logp = batch.ref_logprobs if cfg.kl_coef else old_logp  # no KL penalty: the reference is never read
    scores = jnp.clip(data.scores, -cfg.score_clip, cfg.score_clip) if cfg.score_clip else data.scores
    advantages, returns = _advantages(scores, batch.old_values, old_logp, ref_logp, mask, row_mask, cfg)
    batch = jax.lax.stop_gradient(batch._replace(old_logprobs=old_logp, ref_logprobs=ref_logp,
                                                 advantages=advantages, returns=returns))
    metrics = {"score": masked_mean(data.scores, row_mask), "response_length": masked_mean(mask.sum(1), row_mask),
               "return": masked_mean(batch.returns, mask),
               "sampler_kl": masked_mean(rollout.logprobs - batch.old_logprobs, mask)}
    per_sequence = {"response_length": mask.sum(1)}
    if cfg.kl_coef:
        per_sequence["kl"] = ((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1)
        metrics["kl"] = masked_mean(per_sequence["kl"], row_mask)
    if has_critic:
        metrics["value_explained_variance"] = explained_variance(batch.old_values, batch.returns, mask)
    return batch, metrics, per_sequence


def prepare(model_cfg: ModelConfig, cfg: PPOConfig, params: ActorCritic, ref_params, data: Experience,
            frozen: dict | None = None) -> tuple[PreparedBatch, dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
    """Old and reference log-probs, values, rewards and advantages (no gradients), as an update
    that does not complete its batch in its first pass reads them; then `complete`'s metrics."""
    return complete(cfg, forward_passes(model_cfg, cfg, params, ref_params, data, frozen), data, params.has_critic)


def make_ppo_update(model_cfg: ModelConfig, cfg: PPOConfig, optimizer: optax.GradientTransformation,
                    identity: Any = None) -> Callable[..., tuple[PPOState, dict, dict]]:
    """`update(state, ref_params, experience, key, lr_scale=1.0, policy_weight=1.0, frozen=None) ->
    (state, metrics, per-sequence metrics)`, one jitted call with the state donated: the forward
    passes, then `lax.scan` over epochs x minibatches of clipped PPO steps (one minibatch: over
    epochs, the first completing the batch, `first_pass_prepares`, and `key` unread). `lr_scale`:
    the schedule's multiplier for this RL step; `policy_weight` 0 trains only the critic (warm-up);
    `frozen`: the base under LoRA adapters, never differentiated. With an `identity` (what built
    `optimizer`: `optim.rl_optimizer_knobs`) its programs are kept on disk (`programs.Cached`)."""

    def update(state: PPOState, ref_params, data: Experience, key: jax.Array, lr_scale=1.0, policy_weight=1.0,
               frozen=None):
        completes = first_pass_prepares(cfg)
        batch = forward_passes(model_cfg, cfg, None if completes else state.params, ref_params, data, frozen)
        size = batch.targets.shape[0]
        if size % cfg.minibatches:
            raise ValueError(f"batch {size} does not split into {cfg.minibatches} minibatches")
        if batch.rows.state_index is not None and cfg.minibatches > 1:
            raise ValueError("packed rows mix rollouts, so they cannot be split into minibatches")
        grad_fn = jax.grad(functools.partial(minibatch_loss, model_cfg, cfg), has_aux=True)

        def apply(params, opt_state, grads, step_metrics):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = optim.scaled(updates, lr_scale)
            updates = updates.replace(policy=optim.scaled(updates.policy, policy_weight))
            step_metrics["grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state), step_metrics

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            grads, (step_metrics, _) = grad_fn(params, minibatch, policy_weight, frozen)
            return apply(params, opt_state, grads, step_metrics)

        def epoch(carry, epoch_key):
            """Minibatches of rows in a fresh random order (several minibatches, so not packed)."""
            order = jax.random.permutation(epoch_key, size)
            minibatches = jax.tree.map(
                lambda x: x[order].reshape(cfg.minibatches, size // cfg.minibatches, *x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, carry, minibatches)

        def whole_batch_epoch(carry, first):
            """One pass over the whole batch, in any row order; the first completes the batch."""
            params, opt_state, batch_so_far = carry
            grads, (step_metrics, (batch_read, metrics, per_sequence)) = grad_fn(
                params, batch_so_far, policy_weight, frozen, data, first)
            (params, opt_state), step_metrics = apply(params, opt_state, grads, step_metrics)
            return (params, opt_state, batch_read), (step_metrics, metrics, per_sequence)

        if completes:
            (params, opt_state, _), (step_metrics, metrics, per_sequence) = jax.lax.scan(
                whole_batch_epoch, (state.params, state.opt_state, batch), jnp.arange(cfg.epochs) == 0)
            metrics, per_sequence = jax.tree.map(lambda x: x[0], (metrics, per_sequence))
        else:
            batch, metrics, per_sequence = complete(cfg, batch, data, state.params.has_critic)
            (params, opt_state), step_metrics = jax.lax.scan(
                epoch, (state.params, state.opt_state), jax.random.split(key, cfg.epochs))
        metrics.update(jax.tree.map(jnp.mean, step_metrics))
        return PPOState(params, opt_state, state.step + cfg.epochs * cfg.minibatches), metrics, per_sequence

    return StateStep(update, "ppo-update", None if identity is None else (model_cfg, cfg, identity))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> PPOState:
    """The first training state: Adam's moments laid out like the params (`optim.initial_state`)."""
    return PPOState(params, *optim.initial_state(optimizer, params))
