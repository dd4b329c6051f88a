"""r3jax's policy gradient against a PyTorch implementation of the published losses, written here
from the papers (PPO with GAE and whitened advantages, the KL penalty in the reward or the k3 term
in the loss; GRPO, Dr.GRPO and RLOO advantages; each loss aggregation), on the same HF model and
batch. The guard against a sign, alignment or masking slip anywhere between the rollout and the
gradient: r3jax's `prepare` then `minibatch_loss`, differentiated at weights other than the ones
that sampled (so the ratio is not 1 and clipping is active), must give torch's gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import make_hf_model
from r3jax import ppo
from r3jax.models import hf
from r3jax.models.value import ActorCritic
from r3jax.sampling import Rollout

GROUP, GROUPS, PROMPT, NEW, BETA, CLIP, TEMPERATURE = 4, 3, 6, 7, 0.1, 0.2, 0.9


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(r3jax config, {name: r3jax params}, {name: torch model}) for the policy that sampled
    ("old"), the weights the gradient is taken at ("new") and the frozen reference."""
    paths = {name: str(tmp_path_factory.mktemp(name)) for name in ("old", "new", "ref")}
    make_hf_model("llama", paths["old"])
    _perturbed(make_hf_model("llama", paths["new"]), 1, 0.02).save_pretrained(paths["new"])
    make_hf_model("llama", paths["ref"], seed=2)
    loaded = {name: hf.load(path) for name, path in paths.items()}
    torch_models = {name: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                    for name, path in paths.items()}
    return loaded["old"][0], {name: params for name, (_, params) in loaded.items()}, torch_models


def _rollout(vocab: int) -> tuple[Rollout, np.ndarray]:
    """Left-padded prompts, completions of 1..NEW tokens (padding after), and scores with one
    group all equal."""
    rng = np.random.default_rng(0)
    rows = GROUP * GROUPS
    prompt_lengths = np.repeat(rng.integers(2, PROMPT + 1, GROUPS), GROUP)
    lengths = rng.integers(1, NEW + 1, rows)
    tokens = rng.integers(3, vocab, (rows, PROMPT + NEW))
    prompt_mask = np.arange(PROMPT)[None] >= PROMPT - prompt_lengths[:, None]
    completion_mask = np.arange(NEW)[None] < lengths[:, None]
    mask = np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32)
    tokens = tokens * mask
    scores = rng.choice([0.0, 0.1, 1.0], rows)
    scores[:GROUP] = 1.0
    rollout = Rollout(jnp.asarray(tokens), jnp.asarray(mask), jnp.zeros((rows, NEW), jnp.float32),
                      jnp.asarray(completion_mask.astype(np.int32)), jnp.asarray(lengths))
    return rollout, scores


def _torch_logprobs(model, tokens, mask):
    """log softmax(logits / T) of each completion token, positions counting real tokens."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits.float()
    logp = torch.log_softmax(logits[:, -NEW - 1:-1] / TEMPERATURE, dim=-1)
    return logp.gather(-1, tokens[:, -NEW:, None])[..., 0]


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _gae_advantages(scores, old, ref, values, mask, kl_mode, gamma=1.0, lam=0.95):
    """PPO for RLHF (Ziegler et al.; Ouyang et al.): the score on the last token, -beta * (logp -
    logp_ref) on every token, GAE over the critic's values, advantages whitened over the batch's tokens."""
    last = mask.sum(1).long() - 1
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), last] = scores
    if kl_mode == "reward":
        rewards = rewards - BETA * (old - ref)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(mask)
    running = torch.zeros(len(scores))
    for t in reversed(range(NEW)):
        next_value = values[:, t + 1] if t + 1 < NEW else torch.zeros(len(scores))
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    mean = _masked_mean(advantages, mask)
    var = _masked_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) / torch.sqrt(var + 1e-8) * mask


def _group_advantages(scores, estimator):
    """GRPO (Shao et al.): (r - mean) / (std + eps) in each group, the unbiased std as TRL and verl
    take it; Dr.GRPO (Liu et al.): r - mean; RLOO (Ahmadian et al.): r - mean of the others."""
    groups = scores.reshape(GROUPS, GROUP)
    centred = groups - groups.mean(1, keepdim=True)
    if estimator == "grpo":
        return (centred / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1)
    if estimator == "rloo":
        return (groups - (groups.sum(1, keepdim=True) - groups) / (GROUP - 1)).reshape(-1)
    return centred.reshape(-1)


def _aggregate(per_token, mask, mode):
    if mode == "token_mean":
        return _masked_mean(per_token, mask)
    sums = (per_token * mask).sum(1)
    if mode == "seq_mean_token_mean":
        return (sums / mask.sum(1)).mean()
    return (sums / NEW).mean()


def _torch_gradient(torch_models, rollout, scores, old_values, case):
    tokens, mask = torch.tensor(np.asarray(rollout.tokens)), torch.tensor(np.asarray(rollout.attention_mask))
    completion = torch.tensor(np.asarray(rollout.completion_mask)).float()
    scores = torch.tensor(scores, dtype=torch.float32)
    with torch.no_grad():
        old, ref = (_torch_logprobs(torch_models[name], tokens, mask) for name in ("old", "ref"))
    if case["estimator"] == "gae":
        advantages = _gae_advantages(scores, old, ref, torch.tensor(old_values), completion, case["kl_mode"])
    else:
        advantages = _group_advantages(scores, case["estimator"])[:, None] * completion
    model = torch_models["new"]
    model.zero_grad()
    logp = _torch_logprobs(model, tokens, mask)
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    per_token = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
    loss = _aggregate(per_token, completion, case["loss_agg"])
    if case["kl_mode"] == "loss":
        log_ratio = ref - logp
        loss = loss + BETA * _masked_mean(torch.exp(log_ratio) - log_ratio - 1, completion)
    loss.backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


CASES = [
    dict(estimator="gae", loss_agg="token_mean", kl_mode="reward"),
    dict(estimator="gae", loss_agg="seq_mean_token_mean", kl_mode="loss"),
    dict(estimator="grpo", loss_agg="seq_mean_token_mean", kl_mode="loss"),
    dict(estimator="drgrpo", loss_agg="seq_mean_token_sum_norm", kl_mode="loss"),
    dict(estimator="rloo", loss_agg="token_mean", kl_mode="loss"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case.values()))
def test_policy_gradient_equals_the_published_losses_in_torch(models, case):
    cfg, params, torch_models = models
    critic = case["estimator"] == "gae"
    ppo_cfg = ppo.PPOConfig(kl_coef=BETA, kl_mode=case["kl_mode"], estimator=case["estimator"],
                            group_size=1 if critic else GROUP, loss_agg=case["loss_agg"], clip_ratio_low=CLIP,
                            clip_ratio_high=CLIP, temperature=TEMPERATURE, max_new_tokens=NEW, entropy_coef=0.0)
    rollout, scores = _rollout(cfg.vocab_size)
    head = {"kernel": jax.random.normal(jax.random.key(3), (cfg.hidden_size,)), "bias": jnp.float32(0.1)}
    critic_params = dict(value_head=head, critic_backbone=params["ref"]) if critic else {}
    batch, _, _ = ppo.prepare(cfg, ppo_cfg, ActorCritic(params["old"], **critic_params), params["ref"],
                              ppo.experience(rollout, scores))
    grads, (metrics, _) = jax.grad(ppo.minibatch_loss, argnums=2, has_aux=True)(
        cfg, ppo_cfg, ActorCritic(params["new"], **critic_params), batch)
    assert 0.0 < float(metrics["clip_frac"]) < 1.0  # the clip is active on some tokens, not all
    theirs = _torch_gradient(torch_models, rollout, scores, np.asarray(batch.old_values), case)
    ours = jax.tree.map(np.asarray, grads.policy)
    pairs = []
    for hf_name, path, to_ours, _ in hf._tensor_map(cfg):
        leaf = ours
        for part in path:
            leaf = leaf[part]
        pairs.append((leaf.ravel(), to_ours(theirs[hf_name]).ravel()))
    ours_flat, theirs_flat = (np.concatenate(side) for side in zip(*pairs))
    cosine = ours_flat @ theirs_flat / (np.linalg.norm(ours_flat) * np.linalg.norm(theirs_flat))
    assert cosine >= 0.99999, cosine
    assert abs(np.linalg.norm(ours_flat) / np.linalg.norm(theirs_flat) - 1) < 1e-3
